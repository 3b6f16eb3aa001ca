"""Text-classification examples, label mapping and the fixed dev split shared by every task."""
from __future__ import annotations

import random
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

SPLIT_SEED = 0  # dev splits never depend on --seed, so every run scores the same rows
_INT_LABEL = re.compile(r"[-+]?\d+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_BOOLEANS = ("true", "false")


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
        kept = TaskData(self.name, self.train[:max_train], self.eval[:max_eval],
                        self.label_names)
        if max_train is not None:
            unseen = sorted({e.label for e in kept.eval} - {e.label for e in kept.train})
            if unseen:
                warnings.warn(f"--max-train-samples {max_train} keeps no training example of "
                              f"dev label(s) {', '.join(self.label_names[i] for i in unseen)}: "
                              "the model cannot learn them; raise it or leave it out",
                              UserWarning)
        return kept


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


class LabelSpellingWarning(UserWarning):
    """A label column spells one label several ways (``1`` and ``1.0``, ``pos`` and `` pos``,
    ``true`` and ``True``); the spellings are read as one label. Also: labels that differ only
    in case (``Pos`` and ``pos``), read as different labels."""


def label_key(raw: object) -> str:
    """The label ``raw`` denotes: surrounding whitespace dropped, in Unicode's composed form
    (NFC: ``é`` written as one character or as ``e`` and an accent is one label), a number
    equal to an integer (``1``, ``1.0``, ``01``, ``+1``, ``1e0``) written as that integer
    (``1``), and a boolean (JSON's ``true``, Python's ``True``, a spreadsheet's ``TRUE``)
    written as JSON does (``true``, ``false``)."""
    text = unicodedata.normalize("NFC", str(raw).strip())
    if text.lower() in _BOOLEANS:
        return text.lower()
    if _INT_LABEL.fullmatch(text):
        return str(int(text))
    if _NUMBER.fullmatch(text) and float(text).is_integer():
        return str(int(float(text)))
    return text


def label_names_for(raw_labels: Sequence[object], where: str = "the labels") -> List[str]:
    """Names of the label ids, id ``i`` being ``names[i]``.

    Spellings of one label are one class (see `label_key`: ``1`` and ``1.0``, ``pos`` and
    `` pos``, ``true`` and ``TRUE``, ``é`` composed and decomposed); when a column mixes them a
    `LabelSpellingWarning` names them, and the class is named by its `label_key`, otherwise by
    its one spelling. Labels that differ only in case are different labels, with a
    `LabelSpellingWarning`. Integer labels are ordered by value and numbered 0..K-1 (labels
    0..K-1 keep their value as id; others such as {0, 1000000} or {-1, 1} get a compact index,
    the names keep the values). Other labels are ordered as strings.
    Continuous numbers (0.1, 1.3, ...) are refused: classification needs discrete labels.
    """
    texts = [str(v).strip() for v in raw_labels]
    if texts and all(_NUMBER.fullmatch(t) for t in texts):
        fractional = sorted({t for t in texts if not float(t).is_integer()}, key=float)
        if fractional:
            raise ValueError(f"{where} holds continuous values (e.g. {', '.join(fractional[:3])}):"
                             " classification needs discrete labels; bin or name them (this "
                             "command trains classifiers, not regression)")
    spellings: Dict[str, Set[str]] = {}
    for v in raw_labels:
        spellings.setdefault(label_key(v), set()).add(str(v))
    mixed = {key: sorted(found) for key, found in spellings.items() if len(found) > 1}
    if mixed:
        shown = "; ".join(f"{' and '.join(map(repr, found))} as {key!r}"
                          for key, found in sorted(mixed.items())[:3])
        warnings.warn(f"{where} spells {len(mixed)} label(s) several ways, read as one label "
                      f"each: {shown}", LabelSpellingWarning, stacklevel=2)
    names = {key: (key if key in mixed else next(iter(found)).strip())
             for key, found in spellings.items()}
    cased: Dict[str, List[str]] = {}
    for name in sorted(names.values()):
        cased.setdefault(name.casefold(), []).append(name)
    cased = {folded: found for folded, found in cased.items() if len(found) > 1}
    if cased:  # two labels, as case may be meant; a typo would train a class of its own
        shown = "; ".join(" and ".join(map(repr, found)) for found in list(cased.values())[:3])
        warnings.warn(f"{where} holds labels that differ only in case, read as different "
                      f"labels: {shown}; if they are one label, write it one way",
                      LabelSpellingWarning, stacklevel=2)
    if all(_INT_LABEL.fullmatch(key) for key in names):
        return [names[key] for key in sorted(names, key=int)]
    return sorted(names.values())


def label_index(label_names: Sequence[str]) -> Dict[str, int]:
    """`label_key` of each name -> its id: a raw label ``y`` has id
    ``index[label_key(y)]``."""
    return {label_key(name): i for i, name in enumerate(label_names)}
