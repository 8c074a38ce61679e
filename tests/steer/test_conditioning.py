import pytest

from steer.conditioning import DEFAULT_SYSTEM, condition_messages, direction_line, parse_direction, render_prompt
from steer.errors import InvalidInput
from steer.objectives import Direction


def test_direction_line_format_is_exact():
    d = Direction.from_weights({"helpfulness": 0.7, "creativity": 0.3})
    assert direction_line(d) == (
        "Your response should maximize weighted rating = helpfulness*0.70 + creativity*0.30 + conciseness*0.00"
    )


def test_condition_adds_system_or_extends_existing():
    d = Direction.corner("creativity")
    out = condition_messages([{"role": "user", "content": "hi"}], d)
    assert out[0] == {"role": "system", "content": DEFAULT_SYSTEM + "\n\n" + direction_line(d)}
    assert out[1] == {"role": "user", "content": "hi"}

    given = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}]
    out = condition_messages(given, d)
    assert out[0]["content"] == "You are a pirate.\n\n" + direction_line(d)
    assert given[0]["content"] == "You are a pirate."  # input untouched
    with pytest.raises(InvalidInput, match=r"messages\[0\].content: already contains a direction line"):
        condition_messages(out, d)


def test_rendered_prompt_carries_direction_in_system_turn_and_parses_back(tokenizer):
    d = Direction.from_weights({"helpfulness": 0.2, "creativity": 0.5, "conciseness": 0.3})
    text = render_prompt(tokenizer, [{"role": "user", "content": "Name a colour."}], d)
    assert text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM)
    assert direction_line(d) + "<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    back = parse_direction(text)
    assert back.objectives == d.objectives
    assert back.weights == pytest.approx(d.weights)


def test_parse_renormalises_rounded_weights_and_checks_objectives():
    d = Direction.from_weights({"helpfulness": 1, "creativity": 1, "conciseness": 1})
    line = direction_line(d)  # 0.33 each: sums to 0.99
    back = parse_direction(line)
    assert back.weights == pytest.approx((1 / 3,) * 3)
    with pytest.raises(InvalidInput, match="expected"):
        parse_direction(line, objectives=("helpfulness", "safety", "conciseness"))
    with pytest.raises(InvalidInput, match="no direction line"):
        parse_direction("You are helpful.")


def test_strip_direction_line_undoes_condition_messages():
    from steer.conditioning import condition_messages, strip_direction_line
    from steer.objectives import Direction

    d = Direction.from_weights({"helpfulness": 0.7, "creativity": 0.3, "conciseness": 0.0})
    plain = [{"role": "user", "content": "hi"}]
    assert strip_direction_line(condition_messages(plain, d)) == plain  # the default system message goes too
    own = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}]
    assert strip_direction_line(condition_messages(own, d)) == own
    assert strip_direction_line(own) == own  # nothing to strip
