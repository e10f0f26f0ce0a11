"""The real-model recipe's task (``examples/smollm2/``): short list instructions in natural language, answered
by a program that is always right, graded by a program.

Five kinds of prompt, each asking for a comma-separated list of at most ~12 items (answers <= 64 tokens):

    Put these words in alphabetical order: pear, kiwi, apple.      -> apple, kiwi, pear
    Sort these numbers from smallest to largest: 42, 7, 19.        -> 7, 19, 42
    Write these words in reverse order: red, blue, green.          -> green, blue, red
    From this list, name only the animals, in the order given: ... -> dog, cat
    Count from 12 to 24 in steps of 3.                             -> 12, 15, 18, 21, 24

A small pretrained instruct model reads every prompt and answers in the asked format; what it gets wrong is
the content: the order, wrong or missing items, repeats, a missed step. That is the regime where a
discriminator initialised from the student can tell its answers from the teacher's by reading them.

The teacher here is this module's :func:`answer` — no stronger LLM exists offline — so every teacher answer
is correct; the rows are in ``gad-collect``'s format and go through the trainer's usual checks.
:func:`score` is in [0, 1]: 1.0 for the exact list, else the share of positions holding the right item (an
extra, missing or repeated item shifts or lengthens the list and costs its positions). Bullets, numbering,
a preamble, "and", case and punctuation are read leniently (:func:`read_items`), so a format slip does not
count as a content error.

    python -m gad_megatron.data.list_task --out examples/smollm2/data      # writes train.jsonl + heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

CATEGORIES = {
    "animals": ["dog", "cat", "horse", "rabbit", "lion", "tiger", "sheep", "goat", "mouse", "bear", "wolf", "fox",
                "deer", "monkey", "zebra", "camel"],
    "fruits": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum", "kiwi",
               "melon", "lime", "apricot", "papaya", "fig"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray",
               "violet", "silver", "gold"],
    "vehicles": ["car", "bus", "train", "truck", "bicycle", "boat", "plane", "taxi", "tram", "ship", "scooter",
                 "van", "tractor", "helicopter"],
    "tools": ["hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "axe", "pliers", "ladder", "brush",
              "screwdriver"],
}
KINDS = ("alphabetical", "ascending", "reverse", "filter", "count")
SYSTEM = "You are a helpful assistant. Answer with the list only, items separated by commas."
_SPLIT = re.compile(r",|\n|;|\band\b")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_WORD = re.compile(r"[a-z0-9]+")


def _words(rng: random.Random, k: int) -> list:
    pool = sorted({w for ws in CATEGORIES.values() for w in ws})
    return rng.sample(pool, k)


def make_prompt(kind: str, rng: random.Random) -> tuple:
    """(prompt text, the facts the answer is computed from) for one ``kind``."""
    if kind == "alphabetical":
        items = _words(rng, rng.randint(4, 7))
        return f"Put these words in alphabetical order: {', '.join(items)}.", items
    if kind == "ascending":
        items = [str(x) for x in rng.sample(range(1, 100), rng.randint(4, 7))]
        return f"Sort these numbers from smallest to largest: {', '.join(items)}.", items
    if kind == "reverse":
        items = _words(rng, rng.randint(4, 7))
        return f"Write these words in reverse order: {', '.join(items)}.", items
    if kind == "filter":
        cat = rng.choice(sorted(CATEGORIES))
        inside = rng.sample(CATEGORIES[cat], rng.randint(2, 4))
        others = [w for c, ws in sorted(CATEGORIES.items()) if c != cat for w in ws if w not in CATEGORIES[cat]]
        items = inside + rng.sample(others, rng.randint(2, 4))
        rng.shuffle(items)
        return f"From this list, name only the {cat}, in the order given: {', '.join(items)}.", [cat] + items
    if kind == "count":
        step = rng.randint(2, 5)
        start = rng.randint(1, 40)
        stop = start + step * rng.randint(3, 8)
        return f"Count from {start} to {stop} in steps of {step}.", [start, stop, step]
    raise ValueError(f"unknown list task kind {kind!r}")


_PATTERNS = (
    ("alphabetical", re.compile(r"^Put these words in alphabetical order: (.*)\.$")),
    ("ascending", re.compile(r"^Sort these numbers from smallest to largest: (.*)\.$")),
    ("reverse", re.compile(r"^Write these words in reverse order: (.*)\.$")),
    ("filter", re.compile(r"^From this list, name only the (\w+), in the order given: (.*)\.$")),
    ("count", re.compile(r"^Count from (\d+) to (\d+) in steps of (\d+)\.$")),
)


def parse_prompt(text: str) -> tuple:
    """(kind, facts) back from a prompt's text; ValueError naming the text when it is not one of ours."""
    for kind, pat in _PATTERNS:
        m = pat.match(text.strip())
        if not m:
            continue
        if kind == "filter":
            return kind, [m.group(1)] + m.group(2).split(", ")
        if kind == "count":
            return kind, [int(g) for g in m.groups()]
        return kind, m.group(1).split(", ")
    raise ValueError(f"not a list-task prompt: {text[:80]!r}")


def answer_items(kind: str, facts: list) -> list:
    if kind == "alphabetical":
        return sorted(facts)
    if kind == "ascending":
        return sorted(facts, key=int)
    if kind == "reverse":
        return list(reversed(facts))
    if kind == "filter":
        cat, items = facts[0], facts[1:]
        return [w for w in items if w in CATEGORIES[cat]]
    if kind == "count":
        start, stop, step = facts
        return [str(x) for x in range(start, stop + 1, step)]
    raise ValueError(f"unknown list task kind {kind!r}")


def answer(prompt: str) -> str:
    """The teacher: the correct answer to one of this task's prompts."""
    return ", ".join(answer_items(*parse_prompt(prompt)))


def read_items(response: str) -> list:
    """A response as a list of items: split on commas, newlines, ';' and 'and'; each part's item is its last
    word (every answer item is one word or number), so bullets, numbering, a preamble ("The numbers are 4,
    ...", "Sorted: apple, ..."), case and punctuation are not read as content errors."""
    out = []
    for part in _SPLIT.split(response):
        words = _WORD.findall(_BULLET.sub("", part).lower())
        if words:
            out.append(words[-1])
    return out


def score(messages: list, response: str) -> float:
    """Scorer for ``eval.scorer`` / ``reward.scorer``: 1.0 for the exact list, else the share of positions
    holding the right item (the longer of the two lists counts the positions)."""
    want = answer_items(*parse_prompt(messages[-1]["content"]))
    got = read_items(response)
    if got == want:
        return 1.0
    return sum(a == b for a, b in zip(want, got)) / max(len(want), len(got))


def make_rows(n: int, seed: int, exclude: frozenset = frozenset(), prefix: str = "list") -> list:
    """``n`` distinct prompts (none in ``exclude``), kinds in turn, with the teacher's answers, in
    ``gad-collect``'s row format."""
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        kind = KINDS[len(rows) % len(KINDS)]
        prompt, _ = make_prompt(kind, rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"id": f"{prefix}-{len(rows):05d}",
                     "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                     "teacher_response": answer(prompt), "model": "rule-teacher (gad_megatron.data.list_task)"})
    return rows


def write_split(out_dir: str, train: int = 1200, heldout: int = 240, seed: int = 0) -> tuple:
    """train.jsonl and heldout.jsonl (disjoint prompts) under ``out_dir``; each file written atomically."""
    held = make_rows(heldout, seed + 1, prefix="list-heldout")
    rows = make_rows(train, seed, exclude=frozenset(r["messages"][-1]["content"] for r in held), prefix="list-train")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, part in (("train.jsonl", rows), ("heldout.jsonl", held)):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        os.replace(path + ".tmp", path)
        paths.append(path)
    return tuple(paths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--heldout", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for path in write_split(a.out, a.train, a.heldout, a.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
