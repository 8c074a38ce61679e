import math

import pytest

from steer.errors import InvalidInput
from steer.objectives import DEFAULT_OBJECTIVES, Direction, validate_objectives


def test_normalises_to_simplex_with_missing_names_as_zero():
    d = Direction.from_weights({"helpfulness": 2.0, "creativity": 6.0})
    assert d.objectives == DEFAULT_OBJECTIVES
    assert d.weights == pytest.approx((0.25, 0.75, 0.0))
    assert d.as_dict() == pytest.approx({"helpfulness": 0.25, "creativity": 0.75, "conciseness": 0.0})
    assert d["creativity"] == pytest.approx(0.75)


def test_huge_finite_weights_normalise_without_overflow():
    assert Direction.from_weights({"helpfulness": 1e308, "creativity": 1e308}).weights == (0.5, 0.5, 0.0)


def test_dot_is_weighted_sum():
    d = Direction.from_weights({"helpfulness": 1, "conciseness": 3})
    # hand-worked: 0.25*2 + 0*100 + 0.75*(-4) = -2.5
    assert d.dot([2.0, 100.0, -4.0]) == pytest.approx(-2.5)
    assert d.dot({"helpfulness": 2.0, "creativity": 100.0, "conciseness": -4.0}) == pytest.approx(-2.5)
    with pytest.raises(InvalidInput, match="3 objectives"):
        d.dot([1.0, 2.0])


@pytest.mark.parametrize(
    "weights, field, reason",
    [
        ({"helpfulness": -0.1}, "weights[helpfulness]", ">= 0"),
        ({"creativity": math.nan}, "weights[creativity]", "finite"),
        ({"creativity": math.inf}, "weights[creativity]", "finite"),
        ({"humour": 1.0}, "weights[humour]", "unknown objective 'humour'"),
        ({"helpfulness": 0.0, "creativity": 0}, "weights", "at least one weight must be > 0"),
        ({}, "weights", "at least one weight must be > 0"),
        ({"helpfulness": "a lot"}, "weights[helpfulness]", "must be a number"),
    ],
)
def test_invalid_weights_name_the_field(weights, field, reason):
    with pytest.raises(InvalidInput) as e:
        Direction.from_weights(weights)
    assert e.value.field == field
    assert reason in str(e.value)
    assert str(e.value).startswith(field + ":")


def test_custom_objective_set():
    d = Direction.from_weights({"safety": 1, "humour": 1}, objectives=("safety", "humour"))
    assert d.as_dict() == {"safety": 0.5, "humour": 0.5}
    with pytest.raises(InvalidInput, match="duplicate"):
        validate_objectives(["a", "a"])
    with pytest.raises(InvalidInput, match=r"objectives\[1\]"):
        validate_objectives(["a", "b c"])


def test_direct_construction_must_already_be_normalised():
    with pytest.raises(InvalidInput, match="sums to 1"):
        Direction(DEFAULT_OBJECTIVES, (0.5, 0.5, 0.5))
    assert Direction.uniform().weights == pytest.approx((1 / 3,) * 3)
    assert Direction.corner("conciseness").weights == (0.0, 0.0, 1.0)
