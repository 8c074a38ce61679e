"""User follow-ups for FLR, written for steer: per objective, what a user might say next after a
response that is good (positive) or bad (negative) on that objective.

Follow-up Likelihood as Reward (Zhang et al., 2024, "Aligning Language Models Using Follow-up
Likelihood as Reward Signal") scores a response by how likely a chat model finds a positive user
reaction to it, minus how likely it finds a negative one. The sets below are short, plain, and
phrased as the next user turn; each names the quality it reacts to, so that the model's
likelihood of it depends on that quality of the preceding response and not on the topic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FollowUps:
    positive: tuple[str, ...]
    negative: tuple[str, ...]

    def __post_init__(self):
        for name in ("positive", "negative"):
            value = tuple(getattr(self, name))
            if not value:
                raise ValueError(f"FollowUps.{name} needs at least one follow-up")
            for i, text in enumerate(value):
                if not isinstance(text, str) or not text.strip() or text != text.strip():
                    raise ValueError(
                        f"FollowUps.{name}[{i}] must be non-empty text without surrounding spaces, got {text!r}")
            object.__setattr__(self, name, value)


HELPFULNESS = FollowUps(
    positive=(
        "Thanks, that answers my question perfectly.",
        "Great, that's exactly what I needed to know.",
        "That was really helpful, thank you!",
        "Perfect, this solves my problem.",
        "Thank you, that explanation makes it clear now.",
        "I understand it now. Thanks for the clear answer.",
        "That's correct, thanks for the help.",
        "Very useful, I'll use this right away.",
    ),
    negative=(
        "That doesn't answer my question at all.",
        "You misunderstood what I asked.",
        "That's wrong. Can you check it again?",
        "This isn't helpful. Please try again.",
        "That has nothing to do with what I asked.",
        "I'm still confused, that didn't help.",
        "That's not correct, you made a mistake.",
        "You didn't address my actual question.",
    ),
)

CREATIVITY = FollowUps(
    positive=(
        "Wow, what an original way to put it!",
        "That's so creative, I never would have thought of that.",
        "I love how imaginative that is.",
        "What a fresh and unexpected idea!",
        "That's a really clever and inventive answer.",
        "Beautifully written, it feels vivid and unique.",
        "Such a fun and surprising take!",
        "That's wonderfully imaginative, tell me more.",
    ),
    negative=(
        "That's pretty generic and boring.",
        "This feels like a cliché I've heard many times.",
        "That's so predictable, nothing new here.",
        "Can you be a bit more original? This is bland.",
        "That's a very dull, by-the-numbers answer.",
        "It sounds like a template, not a real idea.",
        "Nothing about that is surprising or imaginative.",
        "That's the most obvious answer possible.",
    ),
)

CONCISENESS = FollowUps(
    positive=(
        "Thanks for keeping it short and to the point.",
        "Nice and brief, exactly what I wanted.",
        "Perfect, straight to the point.",
        "I like that you didn't waste any words.",
        "Short and clear, thank you.",
        "That was concise, appreciated.",
        "Great, a quick answer without extra fluff.",
        "Thanks for being so succinct.",
    ),
    negative=(
        "That was way too long, can you shorten it?",
        "Too much text. Just give me the short version.",
        "Please get to the point.",
        "That's rambling, I only needed a brief answer.",
        "Can you summarize that in one sentence?",
        "There's a lot of unnecessary detail there.",
        "TL;DR? That was far too wordy.",
        "You repeated yourself a lot, please be more concise.",
    ),
)

BUILTIN_FOLLOWUPS: Mapping[str, FollowUps] = {
    "helpfulness": HELPFULNESS,
    "creativity": CREATIVITY,
    "conciseness": CONCISENESS,
}
