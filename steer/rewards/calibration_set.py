"""A small built-in calibration set of prompts and responses, written for steer.

Scorers standardise raw rewards against this set (see :mod:`steer.rewards.calibration`). It is
meant to span the responses a server sees: for each prompt one direct, correct answer; one long or
imaginative answer; and one poor answer (off-topic, wrong or evasive). So the mean sits near a
typical response and the standard deviation reflects real good-versus-bad spread for every
objective. Changing this set changes ``CALIBRATION_SET_ID`` and so invalidates stored statistics.
"""

from __future__ import annotations

import hashlib
import json

# (prompt, response). Three per prompt: direct / long or imaginative / poor.
CALIBRATION_PAIRS: tuple[tuple[str, str], ...] = (
    ("What is the capital of Australia?",
     "The capital of Australia is Canberra."),
    ("What is the capital of Australia?",
     "Many people guess Sydney or Melbourne, but the capital of Australia is Canberra. It was chosen "
     "in 1908 as a compromise between those two rival cities and was purpose-built as the capital, "
     "with Parliament first sitting there in 1927."),
    ("What is the capital of Australia?",
     "Australia is famous for kangaroos and the Great Barrier Reef, which is a great place to go snorkelling."),

    ("How do I boil an egg?",
     "Put the egg in boiling water for about 7 minutes, then cool it in cold water and peel."),
    ("How do I boil an egg?",
     "Bring a pot of water to a gentle boil. Lower the egg in with a spoon so it does not crack. "
     "Cook it for 6 minutes for a soft, jammy yolk or 10 minutes for a firm one. Then move it into "
     "a bowl of ice water for a few minutes, which stops the cooking and makes the shell easier to peel."),
    ("How do I boil an egg?",
     "Eggs are a good source of protein. Chickens lay them."),

    ("Write a two-line poem about the sea.",
     "The sea rolls in with silver light,\nand carries off the end of night."),
    ("Write a two-line poem about the sea.",
     "A blue giant hums its salty lullaby to drowsy ships,\nand every wave is a letter the moon forgot to send."),
    ("Write a two-line poem about the sea.",
     "The sea is big and wet. It has water."),

    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight more than red ones, so blue light reaches "
     "your eyes from every direction of the sky."),
    ("Why is the sky blue?",
     "Sunlight contains all colours. When it passes through the atmosphere, tiny gas molecules scatter "
     "it, and they scatter shorter wavelengths much more strongly, an effect called Rayleigh scattering. "
     "Blue light is scattered across the whole sky, so wherever you look you see blue. At sunset the "
     "light travels through more air, the blue is scattered away, and the reds and oranges remain."),
    ("Why is the sky blue?",
     "Because it is. The sky has always been that colour."),

    ("Give me a name for a coffee shop run by cats.",
     "The Purr-fect Brew."),
    ("Give me a name for a coffee shop run by cats.",
     "How about 'Nine Lives Espresso'? Every cup promises another life, the baristas nap on the counter "
     "between orders, and the house special is a whisker-light latte with a foam paw print on top."),
    ("Give me a name for a coffee shop run by cats.",
     "Coffee shop."),

    ("How many legs does a spider have?",
     "A spider has eight legs."),
    ("How many legs does a spider have?",
     "Spiders have eight legs, which sets them apart from insects, which have six. They belong to the "
     "arachnids, together with scorpions, ticks and mites, and each leg has seven segments and can "
     "sense vibrations."),
    ("How many legs does a spider have?",
     "Spiders have six legs, like all insects."),

    ("What should I do if my laptop won't turn on?",
     "Plug it in and charge it for a while, then hold the power button for 15 seconds and try again. "
     "If it still does not start, have it checked by a repair shop."),
    ("What should I do if my laptop won't turn on?",
     "Start with power: check that the charger light is on and try another outlet. Let it charge for "
     "30 minutes. Then do a hard reset by holding the power button for 15 to 30 seconds. Unplug any "
     "USB devices and external monitors, because a faulty accessory can stop the boot. If the screen "
     "stays black but you hear fans, connect an external display. If nothing works, the battery, "
     "charger or motherboard may have failed and a technician should look at it."),
    ("What should I do if my laptop won't turn on?",
     "Laptops are portable computers that became popular in the 1990s."),

    ("Suggest a theme for a child's birthday party.",
     "A pirate treasure hunt: clues around the house and a chest of chocolate coins at the end."),
    ("Suggest a theme for a child's birthday party.",
     "Try a 'Journey to the Moon' party: the entrance is a cardboard rocket, guests get astronaut "
     "badges, the games are moon-rock hunts with painted stones and a zero-gravity balloon relay, and "
     "the cake is a crater-covered moon with a little flag on top."),
    ("Suggest a theme for a child's birthday party.",
     "I cannot help with that."),

    ("Translate 'good morning' into Spanish.",
     "Buenos días."),
    ("Translate 'good morning' into Spanish.",
     "'Good morning' in Spanish is 'buenos días'. You can use it until about noon; after that people "
     "say 'buenas tardes', and in the evening 'buenas noches'."),
    ("Translate 'good morning' into Spanish.",
     "Bonjour."),

    ("Summarise the plot of Romeo and Juliet in one sentence.",
     "Two young lovers from feuding families in Verona marry in secret, and a chain of misunderstandings "
     "ends with both taking their own lives."),
    ("Summarise the plot of Romeo and Juliet in one sentence.",
     "In a Verona torn by an old feud, Romeo and Juliet fall in love at first sight, marry in secret with "
     "the help of Friar Laurence, and are undone by a duel, a banishment, a sleeping potion and a "
     "message that never arrives, so that their deaths finally reconcile their grieving families."),
    ("Summarise the plot of Romeo and Juliet in one sentence.",
     "It is a comedy about two friends who open a restaurant in Paris."),

    ("What is 15% of 200?",
     "15% of 200 is 30."),
    ("What is 15% of 200?",
     "To find 15% of 200, convert the percentage to a decimal, 0.15, and multiply: 0.15 x 200 = 30. "
     "A quick mental shortcut is to take 10% (20) and add half of that (10), which also gives 30."),
    ("What is 15% of 200?",
     "15% of 200 is 15."),

    ("Describe autumn in a few words.",
     "Crisp air, falling leaves, early dusk."),
    ("Describe autumn in a few words.",
     "Autumn is the year exhaling: trees spend their gold like careless millionaires, the air smells of "
     "woodsmoke and apples, and every puddle holds a slice of copper sky."),
    ("Describe autumn in a few words.",
     "Autumn is a season. It comes after summer and before winter and it is a season of the year that "
     "happens every year after the summer season, and it is a season."),
)

CALIBRATION_SET_ID = "builtin-v1-" + hashlib.sha256(json.dumps(CALIBRATION_PAIRS).encode()).hexdigest()[:12]


def calibration_conversations() -> tuple[list[list[dict[str, str]]], list[str]]:
    """The set as scorer input: one single-turn conversation and one response per pair."""
    conversations = [[{"role": "user", "content": prompt}] for prompt, _ in CALIBRATION_PAIRS]
    responses = [response for _, response in CALIBRATION_PAIRS]
    return conversations, responses
