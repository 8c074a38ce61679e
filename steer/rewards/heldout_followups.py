"""Follow-up sets held out from training: the FLR judge of ``python -m steer.eval``.

Training (DPA pairs, RERANK, ``--scorer default``) scores helpfulness and creativity with the
follow-ups in :mod:`steer.rewards.followups`. A policy optimised against those sentences can learn
to please them (the phrases, not the quality), so an evaluation that reuses them grades the policy
with its own exam. These sets judge the same qualities with sentences training never saw: the same
idea (what a user would say next after a good or a bad response), different wording, and no
sentence in common with the training sets (checked by the tests).

Conciseness has no set here on purpose: the evaluation judges it by the response's token count,
which no follow-up can game.
"""

from __future__ import annotations

from collections.abc import Mapping

from steer.rewards.followups import FollowUps

HELPFULNESS = FollowUps(
    positive=(
        "Okay, I followed your steps and it worked.",
        "Got it, now I know exactly what to do next.",
        "This cleared up everything I was unsure about.",
        "Nice, you covered every part of my request.",
        "Brilliant, I can take it from here.",
        "Makes sense now, I appreciate the detail.",
        "That's the information I was looking for.",
        "Good answer, accurate and easy to follow.",
    ),
    negative=(
        "Hmm, I tried that and it did not work.",
        "That skips the part I was asking about.",
        "I think some of those facts are off.",
        "Sorry, but I'm none the wiser after reading that.",
        "Could you respond to what I really wanted to know?",
        "That's vague, I can't do anything with it.",
        "Those steps are incomplete and now I'm stuck.",
        "Wait, that contradicts itself.",
    ),
)

CREATIVITY = FollowUps(
    positive=(
        "Ha, I did not see that twist coming!",
        "What a delightful image, it made me smile.",
        "You have a real knack for playful writing.",
        "That metaphor is brilliant, I'm stealing it.",
        "Such an unusual angle, it's refreshing.",
        "This reads like a little story and I love it.",
        "Very inventive, nobody else would have put it like that.",
        "The wordplay there is charming.",
    ),
    negative=(
        "Meh, that's what anyone would say.",
        "This is dry and flat, no spark at all.",
        "I've read that exact phrasing a hundred times.",
        "Could you try something less formulaic?",
        "It's correct but completely unimaginative.",
        "That's stale, give me something with more flair.",
        "None of it stands out, it's all so ordinary.",
        "It feels mechanical, like a form letter.",
    ),
)

HELDOUT_FOLLOWUPS: Mapping[str, FollowUps] = {
    "helpfulness": HELPFULNESS,
    "creativity": CREATIVITY,
}
