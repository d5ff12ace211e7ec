#!/usr/bin/env python3
"""Build the word-sentiment data for the svfit word-sentiment example.

Source: the VADER sentiment lexicon (Hutto and Gilbert, 2014): 7,520 English
words, emoticons and slang, each rated by ten people from -4 (extremely
negative) to +4 (extremely positive), as shipped inside the PyPI wheel
vaderSentiment==3.3.2 (MIT License). The wheel is fetched once with pip (no
dependencies, nothing installed), checked against a pinned sha256, and
vaderSentiment/vader_lexicon.txt is read straight out of it: one entry a
line, tab-separated: the token, the mean rating, its standard deviation and
the ten ratings.

A word (lowercase letters only) whose mean rating is at least --margin is
"positive", at most -margin "negative"; the rest are left out. Outputs, in
--out DIR: train.jsonl, dev.jsonl and eval.jsonl ({"prompt": ...,
"completion": LABEL} a line, balanced over the two labels) and labels.txt.
Choose settings on dev; report eval. Dev is drawn from the words left after
eval and train, so train.jsonl and eval.jsonl are the same bytes as before
dev existed. Standard library only; the same arguments always give the same
bytes.
"""

import argparse
import os
import random
import re
import sys
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pypi_wheel  # noqa: E402  (examples/pypi_wheel.py)

PROG = "make-data"
PACKAGE = "vaderSentiment"
VERSION = "3.3.2"
WHEEL = f"{PACKAGE}-{VERSION}-py2.py3-none-any.whl"
WHEEL_SHA256 = "3bf1d243b98b1afad575b9f22bc2cb1e212b94ff89ca74f8a23a588d024ea311"
MEMBER = "vaderSentiment/vader_lexicon.txt"
EXPECTED_ENTRIES = 7520
WORD_RE = re.compile(r"^[a-z]+$")

LABELS = ["positive", "negative"]
INSTRUCTION = (
    "Is the sentiment of this English word positive or negative? "
    "Answer with one word: positive or negative.\n\nWord: "
)


def read_words(wheel, margin):
    """{label: [word]} of the lexicon's words rated at least `margin` from
    neutral, in the lexicon's order."""
    with zipfile.ZipFile(wheel) as z:
        lines = z.read(MEMBER).decode("utf-8").splitlines()
    if len(lines) != EXPECTED_ENTRIES:
        pypi_wheel.fail(PROG, f"expected {EXPECTED_ENTRIES} entries in {MEMBER}, "
                              f"found {len(lines)}")
    words = {label: [] for label in LABELS}
    for n, line in enumerate(lines, 1):
        fields = line.split("\t")
        try:
            token, mean = fields[0], float(fields[1])
        except (IndexError, ValueError):
            pypi_wheel.fail(PROG, f"{MEMBER} line {n}: not 'token<TAB>mean<TAB>...'")
        if not WORD_RE.match(token):
            continue
        if mean >= margin:
            words["positive"].append(token)
        elif mean <= -margin:
            words["negative"].append(token)
    return words


def parse_args():
    p = argparse.ArgumentParser(
        prog="make-data.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build train/dev/eval JSONL files for two-class word sentiment.\n\n"
            "Source: the VADER sentiment lexicon (7,520 rated tokens) inside the\n"
            f"PyPI wheel {PACKAGE}=={VERSION} (MIT License). The wheel is downloaded\n"
            "once with 'python3 -m pip download --no-deps' into the cache, its\n"
            f"sha256 is checked ({WHEEL_SHA256[:16]}...), and the lexicon is read\n"
            "straight out of it (nothing is installed)."),
        epilog=(
            "Each label gets half of --eval, --train and --dev words, drawn without\n"
            "overlap with random.Random(--seed) (dev from the words eval and train\n"
            "leave; a word the lexicon lists twice counts once); the same\n"
            "arguments give byte-identical files. Choose settings on dev;\n"
            "report eval. Each line of DIR/{train,dev,eval}.jsonl:\n"
            '  {"prompt": P, "completion": LABEL}\n'
            "LABEL: positive | negative, and\n"
            '  P = "Is the sentiment of this English word positive or negative?\n'
            '       Answer with one word: positive or negative.\\n\\nWord: " + WORD'))
    pypi_wheel.add_common_args(p)
    p.add_argument("--train", type=pypi_wheel.count, default=600, metavar="N",
                   help="training examples, N/2 per label [default: 600]")
    p.add_argument("--dev", type=pypi_wheel.count, default=200, metavar="N",
                   help="development examples, N/2 per label [default: 200]")
    p.add_argument("--eval", type=pypi_wheel.count, default=200, metavar="N",
                   help="evaluation examples, N/2 per label [default: 200]")
    p.add_argument("--margin", type=float, default=1.0, metavar="M",
                   help="least distance of a word's mean rating from neutral "
                        "(the scale is -4 to 4) [default: 1.0]")
    pypi_wheel.add_seed_arg(p)
    return p.parse_args()


def main():
    args = parse_args()
    cache = args.cache if args.cache is not None else pypi_wheel.default_cache()
    wheel = pypi_wheel.fetch_wheel(PROG, cache, PACKAGE, VERSION, WHEEL, WHEEL_SHA256)
    words = read_words(wheel, args.margin)

    rng = random.Random(args.seed)
    splits = {"train": [], "dev": [], "eval": []}
    for label in LABELS:
        pool = words[label]
        rng.shuffle(pool)
        # The lexicon lists a few words twice (fav, lol, ok, ...): keep the
        # first of each in the shuffled pool, so no word is in two splits.
        # Done after the shuffle, it moves nothing before a second copy.
        pool = list(dict.fromkeys(pool))
        e, t, d = args.eval // 2, args.train // 2, args.dev // 2
        if e + t + d > len(pool):
            pypi_wheel.fail(PROG, f"--train {args.train}, --dev {args.dev} and --eval "
                                  f"{args.eval} need {e + t + d} '{label}' words, only "
                                  f"{len(pool)} have a mean rating {args.margin} from "
                                  f"neutral")
        splits["eval"] += [(w, label) for w in pool[:e]]
        splits["train"] += [(w, label) for w in pool[e:e + t]]
        # Dev comes from what eval and train leave, and is shuffled after
        # them, so train.jsonl and eval.jsonl are the bytes they were before
        # there was a dev split.
        splits["dev"] += [(w, label) for w in pool[e + t:e + t + d]]
    for name in ("train", "eval", "dev"):
        rng.shuffle(splits[name])

    paths = pypi_wheel.write_task(args.out, splits, INSTRUCTION, LABELS)

    print(f"source: {wheel} (sha256 ok); words rated at least {args.margin} from "
          f"neutral: {len(set(words['positive']))} positive, "
          f"{len(set(words['negative']))} negative (distinct words)")
    print(f"train {len(splits['train'])}, dev {len(splits['dev'])}, "
          f"eval {len(splits['eval'])}, balanced")
    for name in ("train", "dev", "eval", "labels"):
        print(f"wrote {paths[name]}")


if __name__ == "__main__":
    main()
