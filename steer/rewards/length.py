"""The length signal: an honest, measurable proxy for conciseness.

    raw(y)    = -ln(1 + tokens(y))                      tokens under the scorer's tokenizer
    scaled(y) = (raw(y) - mean) / std                   mean, std over the built-in calibration set

A logarithm because the difference between 5 and 50 tokens matters far more to a reader than the
difference between 500 and 545; the minus sign because shorter is more concise. The statistics
are recomputed at construction (tokenising the calibration set takes milliseconds), so the scaled
value is on the same common scale as the other scorers: 0 is a calibration-set-average length,
+1 one standard deviation shorter. It does not judge whether a short answer is complete; that is
what the other objectives are for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from steer.objectives import validate_objectives
from steer.rewards.calibration import Calibration
from steer.rewards.calibration_set import CALIBRATION_SET_ID, calibration_conversations
from steer.rewards.scorer import Conversation, Scorer


class LengthScorer(Scorer):
    def __init__(self, tokenizer, objective: str = "conciseness"):
        self.tokenizer = tokenizer
        self.objectives = validate_objectives((objective,), "length.objectives")
        conversations, responses = calibration_conversations()
        self.calibration = Calibration.fit(self.objectives, self.raw_scores(conversations, responses),
                                           CALIBRATION_SET_ID)

    def raw_scores(self, conversations: Sequence[Conversation], responses: Sequence[str]) -> torch.Tensor:
        counts = [len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) if r else 0 for r in responses]
        return torch.tensor([[-math.log1p(n)] for n in counts], dtype=torch.float32)  # (n, 1)

    def describe(self) -> str:
        return f"length({self.objectives[0]})"
