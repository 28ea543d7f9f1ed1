"""Write the example tasks' JSON-lines data beside this script, deterministically (fixed seeds, inline tables).

    python jobs/examples/make_data.py

Four small tasks with one right answer each, a few hundred rows or fewer, sized so that the four train
together on a 2-core CPU in a few minutes. Targets start with a space: the prompt and target are joined
as is (workers/data.py), and " Lima" is how the word follows "is" in running text.

Each task keeps a few prompts out of all its data (HELDOUT): `heldout.jsonl` holds them as
{"task", "prompt", "expected"} rows for `prefixd generate --pairs` (what `make demo` shows), so the demo
answers prompts that no training or validation row holds. TEMPLATES are the specs' `data.template`s
(tests/test_examples.py keeps them equal).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORDS = """
apple river stone cloud garden window bread candle forest mirror silver honey bottle ladder pencil
rabbit castle orange button pillow meadow lantern basket feather marble thunder island rocket violin
tiger carpet bridge shadow copper blanket harbor jacket kettle lemon market needle ocean pepper puzzle
saddle temple tunnel valley wagon yellow anchor beacon cabin dragon engine falcon ginger hammer insect
jungle kitten lizard magnet napkin oyster parrot quartz ribbon sailor turtle velvet walnut zebra acorn
bamboo cactus dolphin eagle fossil glacier helmet iron jigsaw koala lobster mango nickel olive panda
quiver raven salmon tomato umbrella vessel willow badge circus desert elbow fabric goblet hazel ivory
jelly kayak lotus maple noodle orbit pebble quilt radish spider tulip unicorn vapor wheat yogurt canvas
dinner ember fiddle gravel hollow iceberg jasmine kernel ledger muffin nectar oatmeal paddle riddle
summit timber velcro wizard cobalt denim frost grape harp inkwell jewel knot lilac mortar nutmeg
onion plume quill rattle sponge thistle vinegar whistle almond beetle cherry daisy elm fern gull
heron igloo juniper kiwi llama moss nest otter pine quail reef seal thorn urchin vine wasp yarn
""".split()

# country -> capital; unambiguous, uncontested capitals only, ASCII spellings
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Austria": "Vienna",
    "Switzerland": "Bern",
    "Poland": "Warsaw",
    "Czechia": "Prague",
    "Hungary": "Budapest",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Denmark": "Copenhagen",
    "Finland": "Helsinki",
    "Iceland": "Reykjavik",
    "Ireland": "Dublin",
    "United Kingdom": "London",
    "Russia": "Moscow",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Slovenia": "Ljubljana",
    "Slovakia": "Bratislava",
    "Estonia": "Tallinn",
    "Latvia": "Riga",
    "Lithuania": "Vilnius",
    "Belarus": "Minsk",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Morocco": "Rabat",
    "Algeria": "Algiers",
    "Tunisia": "Tunis",
    "Libya": "Tripoli",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa",
    "Uganda": "Kampala",
    "Senegal": "Dakar",
    "Angola": "Luanda",
    "Zambia": "Lusaka",
    "Zimbabwe": "Harare",
    "Mozambique": "Maputo",
    "Madagascar": "Antananarivo",
    "Sudan": "Khartoum",
    "Somalia": "Mogadishu",
    "Mali": "Bamako",
    "Cameroon": "Yaounde",
    "China": "Beijing",
    "Japan": "Tokyo",
    "South Korea": "Seoul",
    "North Korea": "Pyongyang",
    "India": "New Delhi",
    "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka",
    "Nepal": "Kathmandu",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Cambodia": "Phnom Penh",
    "Laos": "Vientiane",
    "Malaysia": "Kuala Lumpur",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Mongolia": "Ulaanbaatar",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Syria": "Damascus",
    "Jordan": "Amman",
    "Lebanon": "Beirut",
    "Saudi Arabia": "Riyadh",
    "Oman": "Muscat",
    "Qatar": "Doha",
    "Afghanistan": "Kabul",
    "Uzbekistan": "Tashkent",
    "Georgia": "Tbilisi",
    "Armenia": "Yerevan",
    "Azerbaijan": "Baku",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Cuba": "Havana",
    "Jamaica": "Kingston",
    "Honduras": "Tegucigalpa",
    "Nicaragua": "Managua",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ecuador": "Quito",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Argentina": "Buenos Aires",
    "Uruguay": "Montevideo",
    "Paraguay": "Asuncion",
    "Brazil": "Brasilia",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
    "Fiji": "Suva",
}

# verb/simple past; only verbs with one accepted past form (no dreamt/dreamed, no travelled/traveled)
PAST_TENSE = dict(
    pair.split("/")
    for pair in """
walk/walked jump/jumped play/played talk/talked cook/cooked clean/cleaned open/opened close/closed
dance/danced laugh/laughed paint/painted call/called help/helped watch/watched wash/washed kick/kicked
push/pushed pull/pulled climb/climbed visit/visited wait/waited start/started finish/finished listen/listened
smile/smiled move/moved live/lived love/loved like/liked want/wanted need/needed ask/asked answer/answered
stop/stopped plan/planned drop/dropped carry/carried cry/cried try/tried study/studied hurry/hurried
marry/married enjoy/enjoyed stay/stayed pray/prayed fix/fixed mix/mixed rain/rained point/pointed
count/counted fill/filled turn/turned borrow/borrowed follow/followed allow/allowed agree/agreed
arrive/arrived bake/baked believe/believed change/changed decide/decided hope/hoped use/used touch/touched
work/worked look/looked shout/shouted jog/jogged hug/hugged nod/nodded admit/admitted prefer/preferred go/went
see/saw eat/ate drink/drank run/ran swim/swam sing/sang ring/rang begin/began write/wrote ride/rode
drive/drove speak/spoke break/broke choose/chose freeze/froze steal/stole take/took shake/shook give/gave
forgive/forgave come/came become/became know/knew grow/grew throw/threw blow/blew fly/flew draw/drew fall/fell
hold/held tell/told sell/sold feel/felt keep/kept sleep/slept sweep/swept leave/left meet/met feed/fed
lead/led bring/brought buy/bought think/thought fight/fought seek/sought catch/caught teach/taught find/found
stand/stood understand/understood sit/sat win/won forget/forgot make/made say/said pay/paid hear/heard
send/sent spend/spent build/built lend/lent bend/bent lose/lost shoot/shot bite/bit hide/hid slide/slid
strike/struck stick/stuck swing/swung dig/dug spin/spun wear/wore tear/tore swear/swore rise/rose cut/cut
put/put hit/hit let/let set/set shut/shut hurt/hurt cost/cost spread/spread burst/burst mean/meant deal/dealt
creep/crept weep/wept flee/fled
""".split()
)

ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 1 <= n <= 99: 42 -> 'forty-two'."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


# Each task's prompt (the spec's data.template) and its held-out inputs, never written to its data files.
TEMPLATES = {
    "capitals": "The capital of {country} is",
    "number-words": "{number} in words:",
    "past-tense": "Past tense: {verb}\nAnswer:",
    "reverse-words": "Reverse the list: {words}\nReversed:",
}
HELDOUT = {
    "capitals": ("Peru", "Kenya", "Japan", "Canada"),
    "number-words": ("17", "42", "63", "85"),
    "past-tense": ("swim", "catch", "write", "jump"),
    "reverse-words": ("pencil, feather, lantern", "tomato, puzzle, otter", "glacier, eagle, yarn"),
}


def past_tense_rows() -> list[dict]:
    return [{"verb": v, "past": f" {past}"} for v, past in PAST_TENSE.items()]


def reverse_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"words": ", ".join(words), "reversed": " " + ", ".join(reversed(words))})
    return rows


def capital_rows() -> list[dict]:
    return [{"country": c, "capital": f" {cap}"} for c, cap in CAPITALS.items()]


def number_rows() -> list[dict]:
    return [{"number": str(n), "words": f" {number_words(n)}"} for n in range(1, 100)]


# task -> (the column its template reads, the target column, every row of the task in a fixed order)
def task_rows() -> dict[str, tuple[str, str, list[dict]]]:
    return {
        "capitals": ("country", "capital", capital_rows()),
        "number-words": ("number", "words", number_rows()),
        "past-tense": ("verb", "past", past_tense_rows()),
        "reverse-words": (
            "words",
            "reversed",
            reverse_rows(340, seed=1) + [reversed_row(w) for w in HELDOUT["reverse-words"]],
        ),
    }


def reversed_row(words: str) -> dict:
    return {"words": words, "reversed": " " + ", ".join(reversed(words.split(", ")))}


def split_heldout(task: str) -> tuple[list[dict], list[dict]]:
    """(the task's rows for training and validation, its held-out {task, prompt, expected} rows)."""
    column, target, rows = task_rows()[task]
    held = HELDOUT[task]
    by_input = {r[column]: r for r in rows}
    missing = [x for x in held if x not in by_input]
    if missing:
        raise ValueError(f"HELDOUT[{task!r}]: {missing} are not among the task's inputs")
    heldout = [
        {"task": task, "prompt": TEMPLATES[task].format(**by_input[x]), "expected": by_input[x][target].strip()}
        for x in held
    ]
    return [r for r in rows if r[column] not in held], heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(out_dir: Path = HERE) -> None:
    """Write every example's data file, and the held-out prompts, into out_dir."""
    data = {task: split_heldout(task) for task in TEMPLATES}
    write_jsonl(out_dir / "capitals.jsonl", data["capitals"][0])
    write_jsonl(out_dir / "number_words.jsonl", data["number-words"][0])
    write_jsonl(out_dir / "past_tense.jsonl", data["past-tense"][0])
    reverse = data["reverse-words"][0]
    write_jsonl(out_dir / "reverse_words.train.jsonl", reverse[:300])
    write_jsonl(out_dir / "reverse_words.valid.jsonl", reverse[300:340])
    write_jsonl(out_dir / "heldout.jsonl", [row for _, heldout in data.values() for row in heldout])


if __name__ == "__main__":
    main()
