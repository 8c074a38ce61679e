"""Steerability evaluation inputs (steer/eval_grid.py): direction grids and prompt sets."""

import json
import re

import pytest

from steer.errors import InvalidInput
from steer.eval_grid import default_prompts_path, direction_grid, direction_label, load_prompts

# ------------------------------------------------------------------------------------ directions


def test_default_grid_is_corners_uniform_and_pairwise_mixes():
    grid = direction_grid("default")
    assert [direction_label(d) for d in grid] == [
        "helpfulness", "creativity", "conciseness", "uniform", "h.50 cr.50", "h.50 co.50", "cr.50 co.50",
    ]
    assert len(grid) == 7
    assert grid[4].as_dict() == {"helpfulness": 0.5, "creativity": 0.5, "conciseness": 0.0}


def test_simplex_and_explicit_grids():
    assert len(direction_grid("simplex:2")) == 6  # C(2 + 2, 2)
    assert len(direction_grid("simplex:4")) == 15
    assert [d.weights for d in direction_grid("simplex:1")] == [d.weights for d in direction_grid("corners")]
    explicit = direction_grid("helpfulness=3,creativity=1; conciseness=2")
    assert [d.as_dict() for d in explicit] == [
        {"helpfulness": 0.75, "creativity": 0.25, "conciseness": 0.0},
        {"helpfulness": 0.0, "creativity": 0.0, "conciseness": 1.0},
    ]


@pytest.mark.parametrize("spec, field, message", [
    ("simplex:0", "grid", "integer N in 1..20"),
    ("simplex:x", "grid", "integer N"),
    ("triangle", "grid", "expected 'default'"),
    ("helpfulness=1;humour=1", "grid[1][humour]", "unknown objective 'humour'"),
    ("helpfulness=lots", "grid[0]", "expected name=weight"),
    ("helpfulness=0,creativity=0", "grid[0]", "at least one weight must be > 0"),
])
def test_bad_grids_name_the_field(spec, field, message):
    with pytest.raises(InvalidInput, match=re.escape(message)) as e:
        direction_grid(spec)
    assert e.value.field == field


# --------------------------------------------------------------------------------------- prompts


def test_shipped_prompt_sets_are_valid_disjoint_and_large_enough():
    train_path, heldout_path = default_prompts_path("train"), default_prompts_path("heldout")
    for path in (train_path, heldout_path):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            row = json.loads(line)
            assert set(row) == {"prompt", "category"}, f"{path}:{lineno}"
            assert row["prompt"].strip() and row["category"].strip(), f"{path}:{lineno}"
    train, heldout = load_prompts(train_path), load_prompts(heldout_path)
    assert len(train) >= 300 and len(heldout) == 52  # the evaluation's default: all 52 held-out prompts

    def norm(p):
        return " ".join(p.prompt.casefold().split())

    train_keys, heldout_keys = [norm(p) for p in train], [norm(p) for p in heldout]
    assert len(set(train_keys)) == len(train_keys) and len(set(heldout_keys)) == len(heldout_keys)
    assert not set(train_keys) & set(heldout_keys)
    categories = {p.category for p in train}
    assert len(categories) >= 8
    assert {p.category for p in heldout} <= categories  # held out by prompt, not by task type


def test_load_prompts_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Say hi."}\n\n{"prompt": ""}\n')
    with pytest.raises(InvalidInput, match=re.escape(f"{path}:3: 'prompt' must be a non-empty string")) as e:
        load_prompts(path)
    assert e.value.field == "prompts"
    path.write_text('{"prompt": "Say hi."}\nnot json\n')
    with pytest.raises(InvalidInput, match=re.escape(f"{path}:2: not valid JSON")):
        load_prompts(path)
    with pytest.raises(InvalidInput, match="prompts: cannot read"):
        load_prompts(tmp_path / "missing.jsonl")
    path.write_text('{"prompt": "Say hi.", "category": "greeting"}\n')
    assert [(p.prompt, p.category) for p in load_prompts(path)] == [("Say hi.", "greeting")]

