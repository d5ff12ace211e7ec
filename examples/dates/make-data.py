#!/usr/bin/env python3
"""Build the dates data: a generative task scored by exact match. The
prompt is a date written out in one of many English forms ("the third of
March, 2021", "Wed 3 Mar 2021", "03.03.2021"; every form names the year in
full); the completion is the same date as YYYY-MM-DD.

The forms are split: the training set uses some, the dev set adds two it
never has, the eval set two others. Days are drawn from 1900 to 2099 (every
day of a month, weekdays computed, so they are right). Outputs, in --out
DIR: train.jsonl, dev.jsonl and eval.jsonl ({"prompt": ..., "completion":
"YYYY-MM-DD"} a line). There are no class labels: `svfit eval` scores exact
answers. Choose settings on dev; report eval. Standard library only; the
same arguments always give the same bytes.
"""

import argparse
import datetime
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pypi_wheel  # noqa: E402  (examples/pypi_wheel.py: write_task, count)

INSTRUCTION = (
    "Write this date in ISO 8601 form, YYYY-MM-DD. "
    "Answer with the date only.\n\nDate: "
)

ORDINAL_WORDS = """
first second third fourth fifth sixth seventh eighth ninth tenth eleventh
twelfth thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth
nineteenth twentieth twenty-first twenty-second twenty-third twenty-fourth
twenty-fifth twenty-sixth twenty-seventh twenty-eighth twenty-ninth
thirtieth thirty-first
""".split()


def ordinal(n):
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


MONTHS = """January February March April May June July August September
October November December""".split()
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


# Names written out here, not by strftime, so that no locale changes them.
def month(d):
    return MONTHS[d.month - 1]


def mon(d):
    return month(d)[:3]


def weekday(d):
    return WEEKDAYS[d.weekday()]


# Each form writes a date out; the name is for the split below.
FORMS = {
    "us": lambda d: f"{month(d)} {d.day}, {d.year}",
    "uk": lambda d: f"{d.day} {month(d)} {d.year}",
    "ordinal-of": lambda d: f"the {ordinal(d.day)} of {month(d)}, {d.year}",
    "abbrev-us": lambda d: f"{mon(d)}. {d.day}, {d.year}",
    "ordinal-uk": lambda d: f"{ordinal(d.day)} {month(d)} {d.year}",
    "weekday-us": lambda d: f"{weekday(d)}, {month(d)} {d.day}, {d.year}",
    "slash-ymd": lambda d: f"{d.year}/{d.month:02}/{d.day:02}",
    "dotted-dmy": lambda d: f"{d.day:02}.{d.month:02}.{d.year}",
    "weekday-uk": lambda d: f"{weekday(d)[:3]} {d.day} {mon(d)} {d.year}",
    # Seen only in dev:
    "month-the-ordinal": lambda d: f"{month(d)} the {ordinal(d.day)}, {d.year}",
    "abbrev-dash": lambda d: f"{d.day:02}-{mon(d)}-{d.year}",
    # Seen only in eval:
    "words-of": lambda d: f"the {ORDINAL_WORDS[d.day - 1]} of {month(d)}, {d.year}",
    "year-first": lambda d: f"{d.year}, {month(d)} {d.day}",
}
TRAIN_FORMS = ["us", "uk", "ordinal-of", "abbrev-us", "ordinal-uk", "weekday-us",
               "slash-ymd", "dotted-dmy", "weekday-uk"]
HELD_OUT = {"dev": ["month-the-ordinal", "abbrev-dash"], "eval": ["words-of", "year-first"]}

FIRST = datetime.date(1900, 1, 1)
DAYS = (datetime.date(2099, 12, 31) - FIRST).days + 1


def examples(rng, forms, n, held_out, seen):
    """n (text, iso) pairs, none of them a text in `seen` (the splits made
    before: no held-out date repeats a training one), which gets them; with
    held_out, half of them in those forms."""
    out = []
    while len(out) < n:
        d = FIRST + datetime.timedelta(days=rng.randrange(DAYS))
        pool = held_out if held_out and len(out) % 2 == 0 else forms
        text = FORMS[rng.choice(pool)](d)
        if text not in seen:
            seen.add(text)
            out.append((text, d.isoformat()))
    rng.shuffle(out)
    return out


def parse_args():
    p = argparse.ArgumentParser(
        prog="make-data.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog=(
            f"Forms: training {', '.join(TRAIN_FORMS)}; dev adds\n"
            f"{', '.join(HELD_OUT['dev'])}; eval adds {', '.join(HELD_OUT['eval'])}\n"
            "(half of dev and of eval are in the forms they add). Each line of\n"
            'DIR/{train,dev,eval}.jsonl: {"prompt": P, "completion": "YYYY-MM-DD"},\n'
            '  P = "Write this date in ISO 8601 form, YYYY-MM-DD. Answer with the\n'
            '       date only.\\n\\nDate: " + DATE\n'
            "The same arguments give byte-identical files."))
    pypi_wheel.add_split_args(p, "examples")
    return p.parse_args()


def main():
    args = parse_args()
    rng = random.Random(args.seed)
    seen = set()
    splits = {
        "train": examples(rng, TRAIN_FORMS, args.train, None, seen),
        "dev": examples(rng, TRAIN_FORMS, args.dev, HELD_OUT["dev"], seen),
        "eval": examples(rng, TRAIN_FORMS, args.eval, HELD_OUT["eval"], seen),
    }
    paths = pypi_wheel.write_task(args.out, splits, INSTRUCTION, None)
    for name, rows in splits.items():
        print(f"{name}: {len(rows)} dates")
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
