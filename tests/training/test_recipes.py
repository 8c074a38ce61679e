"""The shipped recipes (training/recipes/*.yaml) parse: every `python -m steer.train <command> --config
<recipe> ...` line written in a recipe's comments builds that command's config, so a renamed or
retyped setting fails here and not 20 minutes into a run."""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from steer.training.settings import DPAConfig, DPOConfig, MixtureConfig

from steer.config import merge_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "training" / "recipes").glob("*.yaml"))
CONFIGS = {"dpo": DPOConfig, "dpa": DPAConfig, "mixture": MixtureConfig}


def _commands(recipe: Path) -> list[tuple[str, list[str]]]:
    """(command, argv) of every `python -m steer.train` command in the recipe's comments that runs a
    recipe with --config (continuation lines joined)."""
    lines = [line.lstrip("#").strip() for line in recipe.read_text().splitlines() if line.startswith("#")]
    joined, pending = [], ""
    for line in lines:
        pending = f"{pending} {line}".strip() if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        joined.append(pending)
        pending = ""
    found = []
    for line in joined:
        m = re.match(r"python -m steer\.train (\w+) (.*)$", line)
        if m and m.group(1) in CONFIGS and "--config" in m.group(2):
            found.append((m.group(1), shlex.split(m.group(2))))
    return found


def test_there_are_recipes_with_commands():
    assert {p.name for p in RECIPES} >= {"default-adapter.yaml", "default-mixture.yaml"}
    for recipe in RECIPES:
        assert _commands(recipe), f"{recipe.name} names no `python -m steer.train <command> --config` line"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_commands_parse(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    produced: set[str] = set()  # adapters written by the recipe's earlier commands (not on a fresh clone)
    for command, argv in _commands(recipe):
        init = _init_adapter(argv)
        if init is not None and not Path(init).exists():
            assert Path(init).as_posix() in produced, f"{recipe.name}: no earlier command writes {init}"
            argv = [*argv, "--init-adapter", "default"]  # the shipped adapter: same model, rank and alpha
        config = merge_config(CONFIGS[command], argv, prog=f"steer.train {command}")
        assert Path(config.output).parts[0] == "runs", f"{recipe.name}: {command} writes outside runs/"
        if f"training/recipes/{recipe.name}" in argv:
            assert config.model == "default"
        produced.add((Path(config.output) / "adapter").as_posix())


def _init_adapter(argv: list[str]) -> str | None:
    """The init_adapter a command line asks for (its flag, else its --config file's key), if a path."""
    value = None
    if "--config" in argv:
        value = (yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {}).get("init_adapter")
    if "--init-adapter" in argv:
        value = argv[argv.index("--init-adapter") + 1]
    return None if value in (None, "none", "default") else str(value)


def test_the_parser_sees_a_broken_recipe(tmp_path, monkeypatch):
    """The check above can fail: a recipe with an unknown key is refused, naming the key."""
    from steer.errors import InvalidInput

    bad = tmp_path / "bad.yaml"
    bad.write_text("# python -m steer.train dpa --config bad.yaml --output runs/x\nmodel: default\nlora_rank: 8\n")
    monkeypatch.chdir(tmp_path)
    [(command, argv)] = _commands(bad)
    with pytest.raises(InvalidInput, match="lora_rank"):
        merge_config(CONFIGS[command], argv, prog="steer.train dpa")
