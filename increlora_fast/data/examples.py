"""Text-classification examples, label mapping and the fixed dev split shared by every task."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

SPLIT_SEED = 0  # dev splits never depend on --seed, so every run scores the same rows
_INT_LABEL = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Example:
    """One classification example; ``text_pair`` is set for sentence-pair tasks."""

    text: str
    label: int
    text_pair: Optional[str] = None


@dataclass
class TaskData:
    """Train and dev examples of a task, with the name of every label id."""

    name: str
    train: List[Example]
    eval: List[Example]
    label_names: List[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def has_pairs(self) -> bool:
        return any(e.text_pair is not None for e in self.train)

    def subset(self, max_train: Optional[int], max_eval: Optional[int]) -> "TaskData":
        """The first ``max_train`` / ``max_eval`` examples (None keeps all)."""
        for name, value in (("max_train_samples", max_train), ("max_eval_samples", max_eval)):
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} {value} is invalid: use an integer "
                                 ">= 1 or leave it out")
        return TaskData(self.name, self.train[:max_train], self.eval[:max_eval],
                        self.label_names)


def dedupe(rows: Iterable[Tuple]) -> List[Tuple]:
    """Rows in first-seen order with repeated texts dropped (keeps duplicates out of the dev
    split's counterpart in train)."""
    seen, out = set(), []
    for row in rows:
        key = row[:-1]
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def fixed_split(examples: Sequence[Example], n_dev: int) -> Tuple[List[Example], List[Example]]:
    """(train, dev): ``n_dev`` examples drawn with a fixed seed form the dev split."""
    if len(examples) <= n_dev:
        raise ValueError(f"need more than {n_dev} examples to hold out a dev split of {n_dev}, "
                         f"got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(order)
    dev = sorted(order[:n_dev])
    dev_set = set(dev)
    return ([examples[i] for i in range(len(examples)) if i not in dev_set],
            [examples[i] for i in dev])


def label_names_for(raw_labels: Sequence[object], where: str = "the labels") -> List[str]:
    """Names of the label ids, id ``i`` being ``names[i]``.

    Integer labels are ordered by value and numbered 0..K-1 (labels 0..K-1 keep their value as
    id; others such as {0, 1000000} or {-1, 1} get a compact index, the names keep the values).
    Other labels are ordered as strings. Continuous numbers (0.1, 1.3, ...) are refused:
    classification needs discrete labels.
    """
    texts = [str(v).strip() for v in raw_labels]
    if all(_INT_LABEL.fullmatch(t) for t in texts):
        return [str(v) for v in sorted({int(t) for t in texts})]
    if all(_NUMBER.fullmatch(t) for t in texts):
        fractional = sorted({t for t in texts if float(t) != int(float(t))}, key=float)
        if fractional:
            raise ValueError(f"{where} holds continuous values (e.g. {', '.join(fractional[:3])}):"
                             " classification needs discrete labels; bin or name them (this "
                             "command trains classifiers, not regression)")
    return sorted(set(texts))


def _is_int_names(label_names: List[str]) -> bool:
    return all(_INT_LABEL.fullmatch(n) for n in label_names)


def to_label_id(raw: object, label_names: List[str], where: str) -> int:
    """Id of ``raw`` in ``label_names``; an unknown label names ``where`` it came from."""
    text = str(raw).strip()
    if _INT_LABEL.fullmatch(text) and _is_int_names(label_names):
        text = str(int(text))
    if text not in label_names:
        raise ValueError(f"{where}: label {text!r} does not occur in the training data "
                         f"(training labels: {label_names[:20]})")
    return label_names.index(text)
