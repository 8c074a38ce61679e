"""Does FLR prefer a correct, on-topic answer to an off-topic one? A fixed check on 8 questions.

Examples:
  python -m steer.rewards.flr_ranking                     # the default model, writes nothing
  python -m steer.rewards.flr_ranking --model ./my-model --json flr_ranking.json

For each question the helpfulness reward (FLR, raw) of a correct answer is compared with that of
a fluent answer to a different question. The questions and answers are written for steer and
are not part of the calibration set. Prints one line per question and ``k/8 ranked correctly``.
"""

from __future__ import annotations

import argparse
import json
import sys

from steer.files import atomic_write_text

# (question, correct on-topic answer, off-topic answer)
CASES: tuple[tuple[str, str, str], ...] = (
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
     "The Great Wall of China is thousands of kilometres long and was built over many centuries."),
    ("How many days are there in a leap year?",
     "A leap year has 366 days; the extra day is February 29.",
     "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("Who wrote 'Pride and Prejudice'?",
     "'Pride and Prejudice' was written by Jane Austen and published in 1813.",
     "To change a flat tyre, loosen the nuts, jack up the car, swap the wheel and tighten the nuts again."),
    ("What is the largest planet in our solar system?",
     "Jupiter is the largest planet in our solar system.",
     "A good night's sleep for adults is usually seven to nine hours."),
    ("How do I convert Celsius to Fahrenheit?",
     "Multiply the Celsius temperature by 9/5 and add 32. For example, 20 C is 68 F.",
     "The French Revolution began in 1789 with the storming of the Bastille."),
    ("What is the chemical symbol for gold?",
     "The chemical symbol for gold is Au, from the Latin word aurum.",
     "Basketball was invented by James Naismith in 1891."),
    ("What is the square root of 81?",
     "The square root of 81 is 9.",
     "Mount Everest is the highest mountain above sea level, at about 8,849 metres."),
    ("Which language is mainly spoken in Brazil?",
     "The main language of Brazil is Portuguese.",
     "Bananas are a good source of potassium and are easy to carry as a snack."),
)


def rank_cases(scorer) -> list[dict]:
    """Per question: the raw helpfulness FLR of both answers, and whether the correct one wins."""
    conversations, responses = [], []
    for question, good, bad in CASES:
        conversations += [[{"role": "user", "content": question}]] * 2
        responses += [good, bad]
    raw = scorer.raw_scores(conversations, responses)  # (2 * cases, 1)
    out = []
    for i, (question, _, _) in enumerate(CASES):
        good, bad = float(raw[2 * i, 0]), float(raw[2 * i + 1, 0])
        out.append({"question": question, "on_topic": good, "off_topic": bad, "correct": good > bad})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m steer.rewards.flr_ranking", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="default", help="'default', a model directory or a .gguf file")
    p.add_argument("--json", default=None, help="also write the per-question results here")
    args = p.parse_args(argv)

    import time

    from steer.models import load_model
    from steer.rewards.flr import FLRConfig, FLRScorer

    loaded = load_model(args.model)
    scorer = FLRScorer(loaded.model, loaded.tokenizer, FLRConfig(objectives=("helpfulness",), calibration="none"),
                       context_length=loaded.context_length)
    started = time.monotonic()
    results = rank_cases(scorer)
    seconds = time.monotonic() - started
    for r in results:
        mark = "ok " if r["correct"] else "BAD"
        print(f"{mark} on-topic {r['on_topic']:+.4f}  off-topic {r['off_topic']:+.4f}  {r['question']}")
    correct = sum(r["correct"] for r in results)
    print(f"{correct}/{len(results)} ranked correctly ({seconds:.0f}s, model {loaded.model_id})")
    if args.json:
        atomic_write_text(args.json, json.dumps({"model": loaded.model_id, "correct": correct, "total": len(results),
                                                 "seconds": seconds, "cases": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
