"""Generate the demo's instruction dataset: ``python -m peft_swift_ext.demo.make_dataset``.

Six small, templated tasks with one exact answer format each (sums, unit conversions, capitals, JSON records,
upper-casing, word-order reversal): a 135M model learns the formats within a few minutes of CPU training, so the
held-out loss drops visibly. The output is deterministic; ``tests/demo`` checks that the shipped files equal it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
HELDOUT_PER_TASK = 10
SEED = 1234

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Nigeria": "Abuja", "Russia": "Moscow", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Greece": "Athens", "Turkey": "Ankara",
    "Ireland": "Dublin", "Austria": "Vienna", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Switzerland": "Bern", "Hungary": "Budapest", "Czechia": "Prague", "Peru": "Lima", "Chile": "Santiago",
    "Colombia": "Bogota", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Indonesia": "Jakarta", "Iran": "Tehran", "Morocco": "Rabat", "Ghana": "Accra", "Cuba": "Havana",
    "Iceland": "Reykjavik", "New Zealand": "Wellington", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Ethiopia": "Addis Ababa",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Pakistan": "Islamabad", "Saudi Arabia": "Riyadh",
    "Venezuela": "Caracas", "Uruguay": "Montevideo", "Latvia": "Riga", "Estonia": "Tallinn",
    "Lithuania": "Vilnius", "Slovakia": "Bratislava",
}  # fmt: skip
_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kemal", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara"]  # fmt: skip
_CITIES = ["Lisbon", "Oslo", "Lima", "Kyoto", "Cairo", "Dublin", "Quito", "Perth", "Turin", "Graz"]
_WORDS = ["apple", "river", "green", "stone", "music", "cloud", "paper", "tiger", "bread", "light", "ocean",
          "chair", "dream", "snow", "field", "glass", "honey", "lemon", "night", "storm", "table",
          "water"]  # fmt: skip
_UNITS = [
    ("kilometers", "meters", "km", "m", 1000),
    ("hours", "minutes", "h", "min", 60),
    ("kilograms", "grams", "kg", "g", 1000),
    ("minutes", "seconds", "min", "s", 60),
    ("days", "hours", "d", "h", 24),
]


def _sums(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        yield f"What is {a} + {b}?", f"{a} + {b} = {a + b}"


def _conversions(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        long_from, long_to, short_from, short_to, factor = rng.choice(_UNITS)
        n = rng.randint(2, 30)
        yield f"Convert {n} {long_from} to {long_to}.", f"{n} {short_from} = {n * factor} {short_to}"


def _capitals(rng: random.Random) -> Iterator[tuple[str, str]]:
    countries = sorted(_CAPITALS)
    rng.shuffle(countries)
    for country in countries:
        yield f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."


def _json_records(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(18, 80)
        record = json.dumps({"name": name, "age": age, "city": city})
        yield f"Format as JSON: name {name}, age {age}, city {city}.", record


def _upper(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        phrase = " ".join(rng.sample(_WORDS, 2))
        yield f"Write '{phrase}' in capital letters.", phrase.upper()


def _reversed_words(rng: random.Random) -> Iterator[tuple[str, str]]:
    while True:
        words = rng.sample(_WORDS, 3)
        yield f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


#: task name -> (generator of (instruction, response), number of unique examples to draw).
TASKS: dict[str, tuple[Callable[[random.Random], Iterator[tuple[str, str]]], int]] = {
    "sum": (_sums, 70),
    "convert": (_conversions, 70),
    "capital": (_capitals, len(_CAPITALS)),
    "json": (_json_records, 70),
    "upper": (_upper, 70),
    "reverse": (_reversed_words, 70),
}


def generate() -> tuple[list[dict], list[dict]]:
    """The (train, held-out) records: ``{"task", "instruction", "response"}`` dicts, no instruction in both.

    Each task draws unique instructions from its own seeded generator and puts ``HELDOUT_PER_TASK`` of them in
    the held-out split, so every task is evaluated.
    """
    train: list[dict] = []
    heldout: list[dict] = []
    for task, (make, count) in TASKS.items():
        rng = random.Random(f"{SEED}-{task}")
        records: dict[str, dict] = {}
        for instruction, response in make(rng):
            records.setdefault(instruction, {"task": task, "instruction": instruction, "response": response})
            if len(records) == count:
                break
        unique = list(records.values())
        heldout += unique[:HELDOUT_PER_TASK]
        train += unique[HELDOUT_PER_TASK:]
    random.Random(SEED).shuffle(train)
    return train, heldout


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` line ends)."""
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")


def main() -> None:
    train, heldout = generate()
    DATA_DIR.mkdir(exist_ok=True)
    write_jsonl(DATA_DIR / "train.jsonl", train)
    write_jsonl(DATA_DIR / "heldout.jsonl", heldout)
    print(f"wrote {len(train)} train and {len(heldout)} held-out examples to {DATA_DIR}")


if __name__ == "__main__":
    main()
