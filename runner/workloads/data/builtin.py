"""Built-in MCQ data sets the runner generates offline (`path: builtin:<name>`), deterministic from a seed.

`categories`: 16 topics of everyday knowledge, each with four categories of eight words. Each question asks,
in one of several phrasings, which category a word belongs to; the choices are the topic's categories. The
facts are fixed, so a small model can really learn a topic and be validated on questions it never saw
(other phrasings of the same facts).
The first eight topics (`BASE_TOPICS`) are what the offline `tiny` base model is pretrained on; the other
eight (`NEW_TOPICS`) are left for fine-tuning experiments, so an adapter's gain on them is honest.
"""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import parse_qsl

TOPICS: dict[str, dict[str, list[str]]] = {
    "food": {
        "fruit": "apple banana cherry grape mango peach pear plum".split(),
        "vegetable": "carrot potato onion cabbage spinach lettuce celery radish".split(),
        "grain": "wheat rice barley oats corn rye millet quinoa".split(),
        "dairy product": "milk cheese butter yogurt cream kefir custard whey".split(),
    },
    "animals": {
        "mammal": "dog cat horse cow lion tiger whale bear".split(),
        "bird": "eagle sparrow robin owl parrot pigeon crow swan".split(),
        "fish": "salmon trout tuna cod carp shark herring perch".split(),
        "insect": "ant bee beetle wasp moth fly cricket locust".split(),
    },
    "music": {
        "string instrument": "guitar violin cello harp banjo lute viola mandolin".split(),
        "wind instrument": "flute clarinet oboe bassoon trumpet trombone tuba saxophone".split(),
        "percussion instrument": "drum cymbal gong xylophone tambourine marimba castanet bongo".split(),
        "keyboard instrument": "piano organ harpsichord accordion celesta clavichord synthesizer harmonium".split(),
    },
    "geography": {
        "country": "France Spain Italy Japan Brazil Canada Egypt India".split(),
        "city": "Paris London Tokyo Berlin Madrid Rome Cairo Lima".split(),
        "river": "Nile Amazon Danube Thames Rhine Volga Ganges Yangtze".split(),
        "mountain": "Everest Kilimanjaro Denali Matterhorn Olympus Fuji Elbrus Aconcagua".split(),
    },
    "sports": {
        "ball sport": "football tennis golf baseball hockey rugby volleyball basketball".split(),
        "water sport": "swimming rowing diving surfing sailing polo canoeing waterskiing".split(),
        "combat sport": "boxing judo karate fencing wrestling taekwondo sumo kickboxing".split(),
        "winter sport": "skiing skating snowboarding bobsleigh curling luge biathlon sledding".split(),
    },
    "science": {
        "planet": "Mercury Venus Mars Jupiter Saturn Uranus Neptune Earth".split(),
        "chemical element": "hydrogen helium carbon oxygen nitrogen sodium iron gold".split(),
        "star": "Sirius Vega Polaris Rigel Betelgeuse Antares Altair Deneb".split(),
        "subatomic particle": "proton neutron electron photon quark neutrino muon gluon".split(),
    },
    "professions": {
        "medical job": "doctor nurse surgeon dentist pharmacist paramedic midwife therapist".split(),
        "legal job": "lawyer judge attorney paralegal notary bailiff clerk prosecutor".split(),
        "artistic job": "painter sculptor poet actor dancer singer novelist composer".split(),
        "trade": "plumber carpenter electrician mason welder roofer glazier blacksmith".split(),
    },
    "vehicles": {
        "land vehicle": "car bus truck bicycle tram tractor scooter van".split(),
        "watercraft": "boat ship canoe yacht ferry submarine kayak raft".split(),
        "aircraft": "airplane helicopter glider balloon blimp jet drone zeppelin".split(),
        "rail vehicle": "train locomotive monorail subway funicular railcar handcar trolley".split(),
    },
    "tools": {
        "cutting tool": "knife saw scissors axe chisel razor scalpel sickle".split(),
        "measuring tool": "ruler thermometer scale compass caliper barometer gauge sextant".split(),
        "fastener": "nail screw bolt rivet staple clamp glue tape".split(),
        "digging tool": "shovel spade hoe rake trowel pickaxe mattock plow".split(),
    },
    "clothing": {
        "headwear": "hat cap helmet beret bonnet turban beanie crown".split(),
        "footwear": "boot sandal sneaker slipper loafer clog moccasin stiletto".split(),
        "outerwear": "coat jacket cloak parka poncho raincoat blazer cardigan".split(),
        "accessory": "scarf glove belt tie watch necklace bracelet ring".split(),
    },
    "nature": {
        "weather": "rain snow hail sleet fog thunder drizzle blizzard".split(),
        "landform": "valley canyon plateau cliff dune glacier delta island".split(),
        "tree": "oak pine maple birch willow cedar elm spruce".split(),
        "flower": "rose tulip daisy lily orchid violet lotus poppy".split(),
    },
    "body": {
        "organ": "heart liver lung kidney brain stomach spleen pancreas".split(),
        "bone": "femur skull rib spine pelvis tibia humerus sternum".split(),
        "muscle": "biceps triceps deltoid quadriceps hamstring calf diaphragm gluteus".split(),
        "body fluid": "blood saliva sweat bile plasma lymph mucus tears".split(),
    },
    "math": {
        "shape": "circle square triangle hexagon pentagon octagon rectangle rhombus".split(),
        "operation": "addition subtraction multiplication division exponent logarithm integral derivative".split(),
        "unit": "meter gram liter second ampere kelvin mole candela".split(),
        "statistic": "mean median mode variance range deviation quartile percentile".split(),
    },
    "computing": {
        "programming language": "Python Java Rust Haskell Fortran COBOL Pascal Ruby".split(),
        "hardware part": "CPU touchpad mouse monitor printer router modem webcam".split(),
        "data structure": "array list stack queue trie graph heap hashmap".split(),
        "network protocol": "HTTP FTP SMTP TCP UDP DNS SSH IMAP".split(),
    },
    "kitchen": {
        "utensil": "spoon fork ladle whisk spatula tongs peeler grater".split(),
        "appliance": "oven toaster blender kettle fridge microwave dishwasher freezer".split(),
        "container": "jar bottle bowl cup mug pot pan tray".split(),
        "spice": "cinnamon nutmeg cumin paprika saffron clove ginger turmeric".split(),
    },
    "buildings": {
        "dwelling": "house cottage cabin mansion villa hut igloo apartment".split(),
        "place of worship": "church temple mosque chapel cathedral shrine synagogue monastery".split(),
        "commercial building": "shop bank office mall market bakery pharmacy warehouse".split(),
        "fortification": "castle fort fortress citadel bunker tower bastion rampart".split(),
    },
}
TOPIC_NAMES = list(TOPICS)
BASE_TOPICS = TOPIC_NAMES[:8]
NEW_TOPICS = TOPIC_NAMES[8:]
DEFAULT_PER_TOPIC = 300


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


# Question forms per difficulty: easy names the topic; medium does not; hard adds a word of another category
# that the reader must not be misled by. Choices are the topic's four categories in their fixed order.
FORMS = {
    "easy": [
        "In {topic}, what is {a} {word}?",
        "In {topic}, which category does {a} {word} belong to?",
        "Speaking of {topic}: {a} {word} is which of these?",
    ],
    "medium": [
        "What is {a} {word}?",
        "{A} {word} is best described as which of these?",
        "Which category fits the word '{word}'?",
        "What kind of thing is {a} {word}?",
    ],
    "hard": [
        "Unlike {a2} {other}, what is {a} {word}?",
        "Someone mentions {a2} {other} and {a} {word}. What is the {word}?",
        "Which of these describes {a} {word} (not {a2} {other})?",
    ],
}


def _question(rng: random.Random, topic: str) -> dict[str, Any]:
    cats = TOPICS[topic]
    names = list(cats)
    difficulty = rng.choices(["easy", "medium", "hard"], weights=[0.35, 0.45, 0.2])[0]
    cat = rng.choice(names)
    word = rng.choice(cats[cat])
    other_cat = rng.choice([c for c in names if c != cat])
    other = rng.choice(cats[other_cat])
    form = rng.choice(FORMS[difficulty])
    question = form.format(
        topic=topic, word=word, a=_article(word), A=_article(word).capitalize(), other=other, a2=_article(other)
    )
    return {
        "question": question,
        "choices": list(names),
        "answer": "ABCD"[names.index(cat)],
        "topic": topic,
        "difficulty": difficulty,
        "explanation": f"{_article(word).capitalize()} {word} is {_article(cat)} {cat}.",
    }


def categories(per_topic: int = DEFAULT_PER_TOPIC, seed: int = 0, topics: list[str] | None = None) -> list[dict[str, Any]]:
    """`per_topic` questions for each topic (all 16 unless `topics`), canonical record dicts."""
    out: list[dict[str, Any]] = []
    for topic in topics or TOPIC_NAMES:
        if topic not in TOPICS:
            raise ValueError(f"unknown built-in topic {topic!r}; known: {', '.join(TOPIC_NAMES)}")
        rng = random.Random(f"categories:{seed}:{topic}")
        for i in range(per_topic):
            rec = _question(rng, topic)
            rec["id"] = f"categories-s{seed}/{topic}/{i}"
            rec["source"] = "builtin:categories"
            out.append(rec)
    return out


BUILTIN: dict[str, Any] = {"categories": categories}


def generate(spec: str) -> list[dict[str, Any]]:
    """`categories` or `categories?per_topic=500&seed=3` -> canonical record dicts."""
    name, _, query = spec.partition("?")
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; known: {', '.join(BUILTIN)}")
    params: dict[str, Any] = {}
    for k, v in parse_qsl(query, strict_parsing=False):
        if k in ("per_topic", "seed"):
            params[k] = int(v)
        elif k == "topics":
            params[k] = v.split(",")
        else:
            raise ValueError(f"unknown parameter {k!r} for builtin:{name} (per_topic, seed, topics)")
    return BUILTIN[name](**params)


def corpus_text() -> str:
    """Text the offline tokenizer is trained on: every word, category and question form of the set."""
    lines = []
    for topic, cats in TOPICS.items():
        for cat, words in cats.items():
            lines.append(f"In {topic}, {_article(cat)} {cat}: " + ", ".join(words) + ".")
            lines += [f"Which of these is {_article(cat)} {cat}? {w} is {_article(cat)} {cat}." for w in words]
    return "\n".join(lines)
