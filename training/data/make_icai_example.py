"""Write icai_example.jsonl: 80 preference pairs whose known rule is "the shorter answer wins".

The worked example of ``python -m steer.train icai`` and ``label`` (README, Training). Every item
below was written for steer: a question, a short correct answer, and more correct detail. A pair
is (chosen = the short answer, rejected = the short answer followed by the detail), so both
answers are right and say the same thing first; the only systematic difference is that the
rejected one goes on for two or three more sentences. A principle that prefers shorter answers
therefore agrees with every label; one that prefers detail with none.

Deterministic and model-free: run ``python training/data/make_icai_example.py`` from the
repository root to rewrite the file (the tests check that the committed file is its output).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("icai_example.jsonl")

# (prompt, short answer, detail that the long answer adds)
ITEMS = [
    ("What is the capital of Australia?", "Canberra.",
     "Many people guess Sydney or Melbourne, which are larger, but Canberra was chosen as a compromise between those "
     "two rival cities. It was purpose-built as the capital and Parliament first met there in 1927."),
    ("How many legs does a spider have?", "Eight.",
     "Spiders are arachnids, not insects, and insects have six legs. Spiders also have two extra appendages near the "
     "mouth called pedipalps, which look like small legs but are used for sensing and handling food."),
    ("What gas do plants take in for photosynthesis?", "Carbon dioxide.",
     "Plants absorb it through tiny pores in their leaves called stomata. Using energy from sunlight, they combine it "
     "with water to make glucose, and they release oxygen as a by-product."),
    ("How long should I boil an egg for a hard yolk?", "About ten minutes.",
     "Start the egg in boiling water and keep it at a gentle boil so the shell does not crack. When the time is up, "
     "move it into cold water for a few minutes, which stops the cooking and makes peeling easier."),
    ("What does CPU stand for?", "Central processing unit.",
     "It is the part of a computer that carries out the instructions of programs. Modern CPUs contain several cores, "
     "so they can work on more than one task at the same time, and they run billions of cycles per second."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare.",
     "He wrote it early in his career, probably around 1595. The play is based on an older Italian story, and it has "
     "been adapted countless times since, in ballets, operas, musicals and films."),
    ("What is the boiling point of water at sea level in Celsius?", "100 degrees Celsius.",
     "That is 212 degrees Fahrenheit. At higher altitudes the air pressure is lower, so water boils at a lower "
     "temperature, which is why cooking times can be longer in the mountains."),
    ("How do I undo my last change in most text editors?", "Press Ctrl+Z, or Cmd+Z on a Mac.",
     "Pressing it repeatedly usually steps further back through your history of changes. To redo something you undid, "
     "most editors use Ctrl+Y or Ctrl+Shift+Z, or Cmd+Shift+Z on a Mac."),
    ("What is the largest planet in our solar system?", "Jupiter.",
     "It is more than eleven times as wide as Earth and more massive than all the other planets combined. It is a gas "
     "giant made mostly of hydrogen and helium, and its Great Red Spot is a storm larger than Earth."),
    ("How many minutes are in a day?", "1,440 minutes.",
     "A day has 24 hours and each hour has 60 minutes, so you multiply 24 by 60. In seconds that is 86,400, a number "
     "that comes up often in computing and astronomy."),
    ("What is the chemical symbol for gold?", "Au.",
     "It comes from the Latin word aurum, meaning gold. Gold is element number 79 on the periodic table, and it is "
     "prized because it does not rust or tarnish."),
    ("Should I water succulents every day?", "No, water them only when the soil is completely dry.",
     "Succulents store water in their thick leaves and stems, so daily watering usually rots their roots. In summer "
     "that often means once every week or two, and much less in winter when they grow slowly."),
    ("What year did the first person walk on the Moon?", "1969.",
     "Neil Armstrong stepped onto the surface on July 20 during the Apollo 11 mission, followed by Buzz Aldrin. "
     "Michael Collins stayed in orbit in the command module while they explored."),
    ("What is the opposite of 'ancient'?", "Modern.",
     "Depending on the context, words like new, recent or contemporary can also work. For example, ancient history is "
     "contrasted with modern history, while an ancient car might simply be called a new one."),
    ("How many sides does a hexagon have?", "Six.",
     "The name comes from the Greek word for six. Hexagons appear often in nature, most famously in honeycomb, because "
     "they tile a flat surface with no gaps while using little material for their walls."),
    ("What is the main ingredient in guacamole?", "Avocado.",
     "The avocado is mashed and usually mixed with lime juice, salt, onion, tomato and coriander. The lime juice adds "
     "flavour and also slows the browning that happens when avocado meets the air."),
    ("What is the freezing point of water in Fahrenheit?", "32 degrees Fahrenheit.",
     "That equals 0 degrees Celsius. Adding salt to water lowers its freezing point, which is why salt is spread on "
     "icy roads in winter."),
    ("Which organ pumps blood through the body?", "The heart.",
     "It beats around 100,000 times a day and has four chambers. The right side sends blood to the lungs to pick up "
     "oxygen, and the left side pumps that oxygen-rich blood to the rest of the body."),
    ("How do I convert kilometres to miles?", "Multiply the kilometres by about 0.62.",
     "So 10 kilometres is roughly 6.2 miles. To go the other way, multiply miles by about 1.61, which means a marathon "
     "of 26.2 miles is about 42.2 kilometres."),
    ("What is the smallest prime number?", "Two.",
     "It is also the only even prime number, because every other even number can be divided by two. The number one is "
     "not considered prime, since a prime must have exactly two different divisors."),
    ("What language is spoken in Brazil?", "Portuguese.",
     "Brazil was a Portuguese colony for over three hundred years, which is why it differs from its Spanish-speaking "
     "neighbours. Brazilian Portuguese has its own accent and vocabulary, and many indigenous languages are spoken "
     "there too."),
    ("How often should I replace my toothbrush?", "Every three to four months.",
     "Replace it sooner if the bristles are frayed, since worn bristles clean much less effectively. Many dentists "
     "also suggest a new brush after you have been ill."),
    ("What does HTML stand for?", "HyperText Markup Language.",
     "It is the standard language for structuring web pages, using tags such as headings, paragraphs and links. It is "
     "usually combined with CSS for styling and JavaScript for interactive behaviour."),
    ("What is the tallest mountain on Earth?", "Mount Everest.",
     "Its summit is about 8,849 metres above sea level, on the border between Nepal and China. Measured from base to "
     "peak, Mauna Kea in Hawaii is taller, but most of it lies under the ocean."),
    ("How many continents are there?", "Seven.",
     "They are Africa, Antarctica, Asia, Australia, Europe, North America and South America. Some traditions count "
     "fewer, for example by combining Europe and Asia into Eurasia or treating the Americas as one."),
    ("What is the square root of 81?", "Nine.",
     "Nine times nine is 81. Strictly speaking, minus nine squared is also 81, but the square root symbol usually "
     "means the positive root."),
    ("Is a tomato a fruit or a vegetable?", "Botanically, a fruit.",
     "It develops from the flower and contains seeds, which is the botanical definition of a fruit. In cooking, "
     "though, it is treated as a vegetable because it is savoury rather than sweet."),
    ("What is the currency of Japan?", "The yen.",
     "Its symbol is ¥ and its code is JPY. Unlike many currencies, the yen is not usually divided into smaller units "
     "in everyday use, so prices are written in whole yen."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci.",
     "He worked on it in the early 1500s and kept refining it for years. The painting hangs in the Louvre in Paris, "
     "where it is protected behind bulletproof glass and seen by millions of visitors each year."),
    ("How many bones are in the adult human body?", "206.",
     "Babies are born with around 270 bones, and many of them fuse together as the body grows. More than half of an "
     "adult's bones are in the hands and feet."),
    ("What is the fastest land animal?", "The cheetah.",
     "It can reach about 100 to 120 kilometres per hour in short bursts. It cannot keep that speed for long, usually "
     "only for a few hundred metres, before it has to stop and recover."),
    ("How do I make a cell absolute in a spreadsheet formula?",
     "Put dollar signs before the column and row, like $A$1.",
     "That way the reference stays fixed when you copy the formula to other cells. In most spreadsheets you can press "
     "F4 while editing a reference to cycle through the absolute and mixed versions."),
    ("What is the hardest natural substance?", "Diamond.",
     "It is made of carbon atoms bonded in a very strong crystal lattice. That hardness is why diamonds are used in "
     "cutting and drilling tools, not only in jewellery."),
    ("What is the plural of 'mouse'?", "Mice.",
     "For the computer device, both mice and mouses are used, though mice is more common. Mouse is one of a small "
     "group of English nouns that change their vowel in the plural, like goose and geese."),
    ("At what temperature should I bake chocolate chip cookies?", "About 180 degrees Celsius, or 350 Fahrenheit.",
     "Bake them for roughly ten to twelve minutes, until the edges are golden but the centres still look slightly "
     "soft. They firm up as they cool on the tray, so taking them out early keeps them chewy."),
    ("What is the longest river in the world?", "The Nile, by most measurements.",
     "It flows about 6,650 kilometres through northeastern Africa into the Mediterranean. Some researchers argue the "
     "Amazon is longer, depending on where its source is taken to be."),
    ("How many players are on a football team on the pitch?", "Eleven.",
     "One of them is the goalkeeper, the only player allowed to handle the ball inside the penalty area. Teams can "
     "also make a limited number of substitutions during a match."),
    ("What does a thermometer measure?", "Temperature.",
     "Older thermometers use mercury or coloured alcohol that expands as it warms, while digital ones use electronic "
     "sensors. They are used for the weather, for cooking and for checking whether someone has a fever."),
    ("What is the speed of light?", "About 300,000 kilometres per second.",
     "More precisely it is 299,792,458 metres per second in a vacuum. At that speed, light from the Sun takes about "
     "eight minutes to reach Earth."),
    ("How do I take a screenshot on Windows?", "Press Windows+Shift+S.",
     "That opens a tool that lets you select part of the screen, and the image is copied to your clipboard. Pressing "
     "the Print Screen key alone captures the whole screen instead."),
    ("What is the largest ocean?", "The Pacific Ocean.",
     "It covers about a third of Earth's surface, more than all the land combined. It also contains the Mariana "
     "Trench, the deepest known point in the oceans."),
    ("Which vitamin does sunlight help the body make?", "Vitamin D.",
     "The skin produces it when exposed to ultraviolet light. It helps the body absorb calcium, which keeps bones "
     "strong, and people in places with dark winters sometimes take supplements."),
    ("What is the past tense of 'run'?", "Ran.",
     "The past participle is also run, as in 'I have run five kilometres'. It is an irregular verb, so it does not "
     "follow the usual pattern of adding -ed."),
    ("How many hours of sleep do adults need?", "About seven to nine hours a night.",
     "Needs vary a little from person to person, but regularly getting less than seven is linked to poorer "
     "concentration and health. Keeping a consistent bedtime helps as much as the total number of hours."),
    ("What is the capital of Canada?", "Ottawa.",
     "Many people expect Toronto or Montreal, which are larger cities. Ottawa was chosen in the nineteenth century "
     "partly because it lay between English-speaking and French-speaking regions."),
    ("How many strings does a standard guitar have?", "Six.",
     "In standard tuning they are E, A, D, G, B and E, from the lowest to the highest. There are also twelve-string "
     "guitars, seven-string guitars and four-string bass guitars."),
    ("What is 15 percent of 200?", "30.",
     "Ten percent of 200 is 20, and five percent is half of that, which is 10. Adding them gives 30, a quick way to "
     "work out tips in your head."),
    ("What causes the seasons on Earth?", "The tilt of Earth's axis.",
     "Earth is tilted by about 23.5 degrees, so during the year each hemisphere leans towards the Sun and then away "
     "from it. It is not caused by changes in our distance from the Sun."),
    ("What is the main language of programming for web browsers?", "JavaScript.",
     "Every major browser can run it directly, which lets pages respond to clicks and update without reloading. It is "
     "unrelated to Java despite the similar name, and it also runs on servers through tools like Node.js."),
    ("What is a group of lions called?", "A pride.",
     "A pride usually consists of several related females, their cubs and a few adult males. The females do most of "
     "the hunting, often working together to bring down large prey."),
    ("How do I remove a coffee stain from a shirt?",
     "Rinse it with cold water and dab on a little dish soap before washing.",
     "Act as quickly as possible, because dried stains are harder to lift. Avoid hot water at first, since heat can "
     "set the stain into the fabric."),
    ("Which planet is known as the Red Planet?", "Mars.",
     "Its reddish colour comes from iron oxide, which is essentially rust, in its dust and rocks. Mars has the largest "
     "volcano in the solar system, Olympus Mons, and two small moons."),
    ("What does DNA stand for?", "Deoxyribonucleic acid.",
     "It carries the genetic instructions that living things use to grow, work and reproduce. Its structure is the "
     "famous double helix, described in 1953."),
    ("How many days are in a leap year?", "366.",
     "The extra day is added to February, making it 29 days long. Leap years happen every four years, except for "
     "century years that are not divisible by 400."),
    ("What is the primary colour that mixes with blue to make green?", "Yellow.",
     "This is true for paints and other pigments, where yellow and blue combine to green. With light, the rules "
     "differ: green is itself a primary colour of light."),
    ("Who developed the theory of relativity?", "Albert Einstein.",
     "He published special relativity in 1905 and general relativity about ten years later. The theories changed how "
     "physicists understand space, time and gravity, and they are used today in GPS satellites."),
    ("How do I keep cut apples from turning brown?", "Brush them with a little lemon juice.",
     "The acid slows the reaction between the apple's enzymes and the air that causes browning. Soaking the slices "
     "briefly in lightly salted water works too, and a quick rinse removes the taste."),
    ("What is the largest mammal?", "The blue whale.",
     "It can grow to around 30 metres long and weigh well over 100 tonnes. Despite its size, it feeds mainly on tiny "
     "shrimp-like animals called krill."),
    ("What is the capital of Italy?", "Rome.",
     "It has been an important city for more than two thousand years and was the centre of the Roman Empire. Vatican "
     "City, an independent state, lies entirely within Rome."),
    ("How many centimetres are in a metre?", "100.",
     "The prefix centi means one hundredth. A metre is also 1,000 millimetres, and 1,000 metres make a kilometre."),
    ("What is the chemical formula for water?", "H2O.",
     "Each molecule has two hydrogen atoms bonded to one oxygen atom. The molecule is slightly bent, which gives water "
     "many of its unusual properties, such as ice floating."),
    ("Should I stretch before or after running?", "Do a light dynamic warm-up before, and static stretches after.",
     "Dynamic moves like leg swings prepare the muscles, while holding long stretches before running can briefly "
     "reduce power. After the run, gentle stretches help you cool down and relax."),
    ("What instrument has 88 keys?", "The piano.",
     "A standard piano has 52 white keys and 36 black keys. Its full range spans a little over seven octaves, wider "
     "than almost any other common instrument."),
    ("What is the main gas in Earth's atmosphere?", "Nitrogen.",
     "It makes up about 78 percent of the air, while oxygen makes up about 21 percent. The rest is mostly argon, with "
     "small amounts of carbon dioxide and other gases."),
    ("How do I find the area of a rectangle?", "Multiply its length by its width.",
     "For example, a room 4 metres long and 3 metres wide has an area of 12 square metres. Make sure both sides are in "
     "the same units before you multiply."),
    ("Which country gifted the Statue of Liberty to the United States?", "France.",
     "It was a gift celebrating friendship and the ideals of liberty, dedicated in 1886. Its internal iron framework "
     "was designed by Gustave Eiffel, who later built the Eiffel Tower."),
    ("What is the normal human body temperature?", "About 37 degrees Celsius.",
     "That is roughly 98.6 degrees Fahrenheit, though a healthy range is a little wider. Body temperature also changes "
     "slightly through the day, usually lowest in the early morning."),
    ("How many teaspoons are in a tablespoon?", "Three.",
     "This is the standard kitchen conversion in most countries. Two tablespoons make about one fluid ounce, which "
     "helps when scaling a recipe."),
    ("What is the capital of Egypt?", "Cairo.",
     "It sits on the Nile and is one of the largest cities in Africa. The pyramids of Giza are on the city's edge, "
     "close enough to see from some neighbourhoods."),
    ("What do bees make from nectar?", "Honey.",
     "Bees collect nectar from flowers and store it in the hive, where they reduce its water content by fanning it "
     "with their wings. Honey keeps for a very long time because it is so low in water."),
    ("How many weeks are in a year?", "52, plus one or two days.",
     "A normal year has 365 days, which is 52 weeks and one day. In a leap year there are two days left over."),
    ("What is the symbol for the element iron?", "Fe.",
     "It comes from the Latin word ferrum. Iron is the most common element by mass on Earth, most of it in the "
     "planet's core."),
    ("What is the opposite of 'generous'?", "Stingy.",
     "Other words with a similar meaning are mean, selfish and miserly. Which one fits best depends on how strong you "
     "want the criticism to sound."),
    ("How do I restart a frozen iPhone?",
     "Press volume up, then volume down, then hold the side button until the Apple logo appears.",
     "This forced restart does not delete any of your data. If the phone keeps freezing, updating iOS or freeing up "
     "storage space often helps."),
    ("Which bird is a symbol of peace?", "The dove.",
     "A white dove carrying an olive branch is a symbol that goes back to the story of Noah's ark. Picasso's drawing "
     "of a dove made the image famous after the Second World War."),
    ("What is the largest desert in the world?", "Antarctica, if cold deserts count; otherwise the Sahara.",
     "A desert is defined by how little precipitation it receives, not by heat. Antarctica gets very little snow or "
     "rain, which makes it the largest desert, while the Sahara is the largest hot one."),
    ("How many zeros are in one million?", "Six.",
     "One million is written 1,000,000. A billion, in the usual modern meaning, has nine zeros, and a trillion has "
     "twelve."),
    ("What is the main food of giant pandas?", "Bamboo.",
     "It makes up about 99 percent of their diet, and they eat for up to fourteen hours a day. Bamboo is low in "
     "nutrients, so pandas need huge amounts of it to get enough energy."),
    ("Who was the first President of the United States?", "George Washington.",
     "He served two terms, from 1789 to 1797, and then chose to step down. That decision set the tradition of a "
     "two-term limit, later written into the Constitution."),
    ("What is the best way to store fresh herbs like parsley?", "Stand them in a glass of water in the fridge.",
     "Trim the stems first and loosely cover the leaves with a plastic bag to keep them from drying out. Basil is the "
     "exception: it keeps better at room temperature."),
]


def rows() -> list[dict]:
    """One TRL pair per item, chosen = the short answer."""
    return [{"prompt": prompt, "chosen": short, "rejected": f"{short} {detail}"} for prompt, short, detail in ITEMS]


def main() -> None:
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(ITEMS)} pairs to {OUT}")


if __name__ == "__main__":
    main()
