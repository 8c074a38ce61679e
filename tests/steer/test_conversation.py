import pytest

from steer.conversation import build_conversation
from steer.errors import InvalidInput


def test_prompt_becomes_a_user_turn():
    assert build_conversation("hello") == [{"role": "user", "content": "hello"}]


def test_messages_pass_through():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "u2"}]
    assert build_conversation(messages=msgs) == msgs


@pytest.mark.parametrize(
    "prompt, messages, field, reason",
    [
        ("", [], "prompt", "is empty"),
        ("   ", None, "prompt", "blank"),
        ("hi", [{"role": "user", "content": "x"}], "prompt", "not both"),
        (None, [{"role": "robot", "content": "x"}], "messages[0].role", "must be one of"),
        (None, [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, {"role": "user", "content": "y"}],
         "messages[1].role", "first"),
        (None, [{"role": "user", "content": ""}], "messages[0].content", "empty"),
        (None, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "messages[1].role",
         "last message must be the user's"),
    ],
)
def test_invalid_conversations_name_the_field(prompt, messages, field, reason):
    with pytest.raises(InvalidInput) as e:
        build_conversation(prompt, messages)
    assert e.value.field == field
    assert reason in e.value.reason
