#!/usr/bin/env python3
"""Build the review-sentiment data: two-class sentiment of short review
sentences whose label hangs on negation and contrast.

Each sentence is a template filled with a part of a film ("the plot") and
adjectives from two hand-written lists (positive, negative). The label is
the sentiment the sentence gives the film, by the template's rule: "The
plot was not dull at all." is positive, "I expected a gripping script, but
it turned out tedious." negative. Words alone do not decide it: a sentence
holds a positive and a negative adjective as often as not.

The adjectives are split three ways (train, dev, eval) and so are the
templates (the train ones, then a few seen only in dev, and a few seen only
in eval): the held-out sentences use words and phrasings the training set
never has. Outputs, in --out DIR: train.jsonl, dev.jsonl and eval.jsonl
({"prompt": ..., "completion": LABEL} a line, balanced over the two labels)
and labels.txt. Choose settings on dev; report eval. Standard library only;
the same arguments always give the same bytes.
"""

import argparse
import os
import random
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pypi_wheel  # noqa: E402  (examples/pypi_wheel.py: write_task, count)

LABELS = ["positive", "negative"]
INSTRUCTION = (
    "Is this film review sentence positive or negative? "
    "Answer with one word: positive or negative.\n\nSentence: "
)

POSITIVE = """
absorbing accomplished affecting amazing assured beautiful bold brilliant
captivating charming clever compelling delightful dazzling elegant
engaging enjoyable exceptional exciting exquisite fascinating fresh funny
gorgeous graceful gripping heartfelt hilarious imaginative impressive
inspired intelligent inventive lively lovely luminous masterful memorable
moving original outstanding poignant polished powerful radiant refreshing
remarkable rich rousing sharp smart sparkling splendid stirring striking
stunning subtle superb sweet tender thoughtful thrilling touching
triumphant vibrant vivid warm witty wonderful
""".split()

NEGATIVE = """
annoying awful awkward bland bloated boring careless cheap clumsy
confused contrived dismal drab dreadful dreary dull empty flat forced
forgettable grating hollow horrible incoherent inept insipid irritating
joyless lame laughable lazy lifeless limp listless mediocre messy
monotonous muddled naive noisy pointless plodding pretentious shallow
shoddy silly sloppy sluggish stale stiff stilted stupid tedious tiresome
trite ugly unbearable uneven uninspired unwatchable vapid weak wooden
""".split()

PARTS = """
plot script acting dialogue ending soundtrack cast direction pacing story
cinematography score editing humour lead performance screenplay finale
""".split()

# (template, rule): rule names the adjective whose sentiment is the label
# ("a" or "b") and whether the sentence turns it around ("not").
TRAIN_TEMPLATES = [
    ("The {p} was {a}.", "a"),
    ("The {p} was not {a} at all.", "not a"),
    ("I expected a {a} {p}, but it turned out {b}.", "b"),
    ("Despite a {a} {p}, the film as a whole is {b}.", "b"),
    ("The {p} is {a}, and so is the {q}.", "a"),
    ("Nobody could call the {p} {a}.", "not a"),
    ("The {p} may be {a}, yet the {q} is {b}.", "b"),
    ("What a {a} {p}!", "a"),
    ("The {p} is far from {a}.", "not a"),
    ("Some found the {p} {a}; I found it {b}.", "b"),
]
DEV_TEMPLATES = [
    ("The {p} never once feels {a}.", "not a"),
    ("Call the {p} {a} if you like; to me it was {b}.", "b"),
    ("Few films have a {p} this {a}.", "a"),
]
EVAL_TEMPLATES = [
    ("The {p} was anything but {a}.", "not a"),
    ("On paper the {p} sounds {a}; on screen it is {b}.", "b"),
    ("Rarely is a {p} so {a}.", "a"),
]


# Draws in a row that may find no new sentence before a split is given up
# as too large for its templates and words.
MAX_MISSES = 100_000


def label_of(rule, a, b):
    word = b if rule.endswith("b") else a
    positive = word in POSITIVE
    if rule.startswith("not"):
        positive = not positive
    return "positive" if positive else "negative"


def sentences(rng, templates, words, n):
    """n (sentence, label) pairs, n/2 per label, from these templates and
    {label: [adjective]} words."""
    want = {label: n // 2 for label in LABELS}
    out, seen, misses = [], set(), 0
    while any(want.values()):
        if misses > MAX_MISSES:
            pypi_wheel.fail("make-data", f"no new sentence in {MAX_MISSES} draws: ask for "
                                         f"fewer than {n} (these templates and words run out)")
        template, rule = rng.choice(templates)
        a = rng.choice(words[rng.choice(LABELS)])
        b = rng.choice(words[rng.choice(LABELS)])
        p, q = rng.sample(PARTS, 2)
        text = template.format(p=p, q=q, a=a, b=b)
        text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)
        text = text[0].upper() + text[1:]
        label = label_of(rule, a, b)
        misses += 1
        if want[label] and text not in seen:
            misses = 0
            seen.add(text)
            want[label] -= 1
            out.append((text, label))
    rng.shuffle(out)
    return out


def parse_args():
    p = argparse.ArgumentParser(
        prog="make-data.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + ".",
        epilog=(
            "Adjectives and templates are split between train, dev and eval, so\n"
            "dev and eval sentences use words and phrasings training never has.\n"
            "Each line of DIR/{train,dev,eval}.jsonl:\n"
            '  {"prompt": P, "completion": LABEL}, LABEL: positive | negative,\n'
            '  P = "Is this film review sentence positive or negative? Answer with\n'
            '       one word: positive or negative.\\n\\nSentence: " + SENTENCE\n'
            "The same arguments give byte-identical files."))
    pypi_wheel.add_split_args(p, "sentences, half per label")
    return p.parse_args()


def main():
    args = parse_args()
    rng = random.Random(args.seed)
    words = {"train": {}, "dev": {}, "eval": {}}
    for label, pool in (("positive", POSITIVE), ("negative", NEGATIVE)):
        pool = sorted(pool)
        rng.shuffle(pool)
        fifth = len(pool) // 5
        words["eval"][label] = pool[:fifth]
        words["dev"][label] = pool[fifth:2 * fifth]
        words["train"][label] = pool[2 * fifth:]
    templates = {
        "train": TRAIN_TEMPLATES,
        "dev": TRAIN_TEMPLATES + DEV_TEMPLATES,
        "eval": TRAIN_TEMPLATES + EVAL_TEMPLATES,
    }
    splits = {
        name: sentences(rng, templates[name], words[name], getattr(args, name))
        for name in ("train", "dev", "eval")
    }
    paths = pypi_wheel.write_task(args.out, splits, INSTRUCTION, LABELS)
    for name in ("train", "dev", "eval"):
        n = len(words[name]["positive"]) + len(words[name]["negative"])
        print(f"{name}: {len(splits[name])} sentences, {len(templates[name])} templates, "
              f"{n} adjectives")
    for name, path in paths.items():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
