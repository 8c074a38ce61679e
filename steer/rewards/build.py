"""Build a scorer from a short text spec: what ``--scorer`` on the command line means.

Grammar::

    none                                  no scorer (Score is UNIMPLEMENTED, no RERANK, no rewards)
    default                               FLR for every objective except conciseness, plus the
                                          length signal for conciseness
    <dir>                                 a trained reward model directory (steer.train reward)
    PART[+PART...]                        a composite; PART is one of
        flr[:obj,obj,...]                 FLR (default: every objective no other part scores)
        length[:obj]                      the length signal (default objective: conciseness)
        rm:<dir>                          a trained reward model

The parts must score each of the server's objectives exactly once. FLR runs on the served model
unless ``scorer_model`` names another (loaded once, shared by all FLR parts).
"""

from __future__ import annotations

from collections.abc import Sequence

from steer.errors import InvalidInput
from steer.objectives import DEFAULT_OBJECTIVES
from steer.rewards.scorer import CompositeScorer, Scorer

NONE = "none"
DEFAULT = "default"
LENGTH_OBJECTIVE = "conciseness"


def build_scorer(
    spec: str,
    loaded,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    *,
    scorer_model: str | None = None,
    scorer_dtype: str = "float32",
    calibration: str = "auto",
    field: str = "scorer",
    progress: bool = False,
) -> Scorer | None:
    """The scorer ``spec`` names, over ``objectives`` (``loaded``: the served LoadedModel).

    ``progress`` shows a bar while FLR parts score (offline jobs; a server keeps it off).
    ``scorer_dtype``: the weights' dtype of ``scorer_model`` when FLR loads it."""
    from steer.rewards.reward_model import is_reward_model_dir

    spec = (spec or NONE).strip()
    objectives = tuple(objectives)
    if spec == NONE:
        return None
    if spec == DEFAULT:
        rest = [o for o in objectives if o != LENGTH_OBJECTIVE]
        spec = "+".join(([f"flr:{','.join(rest)}"] if rest else [])
                        + ([f"length:{LENGTH_OBJECTIVE}"] if LENGTH_OBJECTIVE in objectives else []))
    elif is_reward_model_dir(spec):
        spec = f"rm:{spec}"

    parsed: list[tuple[str, str]] = []
    for i, part in enumerate(spec.split("+")):
        kind, _, arg = part.strip().partition(":")
        if kind not in ("flr", "length", "rm"):
            raise InvalidInput(
                field,
                f"part {i + 1} {part!r} is not flr[:objectives], length[:objective], rm:<dir>, 'default', 'none' "
                "or a reward model directory (one with reward_model.json)",
            )
        parsed.append((kind, arg.strip()))

    # Parts with fixed objectives first, so a bare `flr` knows what is left for it.
    parts: list[Scorer | None] = [None] * len(parsed)
    for i, (kind, arg) in enumerate(parsed):
        if kind == "rm":
            from steer.rewards.reward_model import RewardModelScorer

            if not arg or not is_reward_model_dir(arg):
                raise InvalidInput(field, f"rm:{arg} is not a reward model directory (no reward_model.json)")
            parts[i] = RewardModelScorer(arg)
        elif kind == "length":
            from steer.rewards.length import LengthScorer

            names = arg.split(",") if arg else [LENGTH_OBJECTIVE]
            if len(names) != 1:
                raise InvalidInput(field, f"length scores one objective, got {names}")
            parts[i] = LengthScorer(loaded.tokenizer, names[0])
    claimed = {o for p in parts if p is not None for o in p.objectives}
    claimed.update(o for kind, arg in parsed if kind == "flr" and arg for o in arg.split(","))
    scorer_loaded = None
    for i, (kind, arg) in enumerate(parsed):
        if kind != "flr":
            continue
        from steer.rewards.flr import FLRConfig, FLRScorer

        names = arg.split(",") if arg else [o for o in objectives if o not in claimed]
        if not names:
            raise InvalidInput(field, "flr has no objective left to score")
        claimed.update(names)
        if scorer_loaded is None:
            if scorer_model is not None:
                from steer.models import load_model

                scorer_loaded = load_model(scorer_model, dtype=scorer_dtype)
            else:
                scorer_loaded = loaded
        parts[i] = FLRScorer(
            scorer_loaded.model, scorer_loaded.tokenizer,
            FLRConfig(objectives=tuple(names), calibration=calibration, progress=progress),
            model_id=scorer_loaded.model_id if scorer_loaded is not loaded else "",
            context_length=scorer_loaded.context_length,
        )
    scored = [o for p in parts for o in p.objectives]
    if sorted(scored) != sorted(objectives):
        raise InvalidInput(field, f"{spec!r} scores {scored}, but the server's objectives are {list(objectives)}: "
                                  "each must be scored exactly once")
    return CompositeScorer(parts, objectives) if len(parts) > 1 or parts[0].objectives != objectives else parts[0]
