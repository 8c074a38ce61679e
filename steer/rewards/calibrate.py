"""Compute FLR calibration statistics (mean, std per objective) on the built-in calibration set.

Examples:
  python -m steer.rewards.calibrate                          # default model -> the shipped file
  python -m steer.rewards.calibrate --model ./my-model --output my-model-flr.json
  python -m steer.serve --model ./my-model                   # finds it in $STEER_CACHE/calibration (auto)

The server computes and caches missing statistics on its own; this command makes them ahead of
time, and regenerates the shipped file for the default model when the follow-ups, the
calibration set or the FLR definition change (a test fails until then).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from steer.logs import add_log_level_flag, configure_logging

SHIPPED = Path(__file__).parent / "calibration" / "flr-smollm2-135m-instruct.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m steer.rewards.calibrate", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="'default', a model directory or a .gguf file")
    p.add_argument("--objectives", default="helpfulness,creativity,conciseness",
                   help="comma-separated, each with built-in follow-ups")
    p.add_argument("--output", default=None, help="JSON to write (default: the shipped file for the default model, "
                                                  "else $STEER_CACHE/calibration/)")
    add_log_level_flag(p)
    args = p.parse_args(argv)

    import time

    from steer.errors import InvalidInput
    from steer.models import load_model
    from steer.rewards.calibration import cache_dir
    from steer.rewards.flr import FLRConfig, FLRScorer

    configure_logging(args.log_level)
    try:
        loaded = load_model(args.model)
        config = FLRConfig(objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
                           calibration="none", progress=True)
        scorer = FLRScorer(loaded.model, loaded.tokenizer, config, model_id=loaded.model_id,
                           context_length=loaded.context_length)
        scorer.calibration_keys()  # fails fast, before minutes of scoring, if the model cannot be fingerprinted
        started = time.monotonic()
        calibration = scorer.calibrate()
        if args.output:
            output = Path(args.output)
        elif args.model == "default":
            output = SHIPPED
        else:
            output = cache_dir() / f"flr-{scorer.calibration_keys()[config.objectives[0]]}.json"
        scorer.save_calibration(output, calibration)
    except (InvalidInput, ValueError, FileNotFoundError, OSError) as e:
        print(f"steer.rewards.calibrate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({time.monotonic() - started:.0f}s)")
    for name, (mean, std) in calibration.stats.items():
        print(f"  {name}: mean {mean:+.4f}  std {std:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
