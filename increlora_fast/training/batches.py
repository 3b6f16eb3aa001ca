"""Tokenised examples and the batches of a run.

The training batch of step ``s`` depends only on (seed, s): each epoch is a permutation drawn
from ``seed`` and the epoch number. A resumed run therefore sees the batches the uninterrupted
run would have seen, without storing any sampler state.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence

import torch

from ..data.examples import Example
from .settings import PAD_TO


def token_lengths(tokenizer, examples: Sequence[Example]) -> List[int]:
    """Each example's token count with special tokens and without truncation (a pair: both
    texts together)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    if any(p is None for p in pairs):
        enc = tokenizer(texts, truncation=False, verbose=False)
    else:
        enc = tokenizer(texts, pairs, truncation=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def padding_side(model: torch.nn.Module) -> str:
    """The side a sequence classifier's batches are padded on, whatever side its tokenizer was
    saved with: ``left`` for a head that reads the last position (XLNet's sequence summary,
    ``summary_type`` ``last``, after which its tokenizer puts the CLS token), ``right`` for every
    other. Those read the first token (BERT's pooler, RoBERTa's, DeBERTa-v2's, ELECTRA's and
    DistilBERT's heads), or a decoder's last real token or an encoder-decoder's last EOS (found
    on either side). Left padding put a padding token first, shifted the positions of models
    that number them from the first column (BERT, GPT-2, BART), and fed padding before the EOS
    to an encoder-decoder's decoder (BART, T5: their input shifted right, unmasked), so an
    input's logits depended on what it was batched with."""
    return "left" if getattr(getattr(model, "config", None), "summary_type", None) == "last" \
        else "right"


class Batches:
    """Training and evaluation batches of ``train`` and ``dev`` examples.

    Args:
        tokenizer: a transformers tokenizer.
        max_seq_len: longer inputs are truncated (pairs: the longer side first).
        batch_size: training batch size; the last partial batch of an epoch is dropped.
        eval_batch_size: evaluation batch size.
        seed: seed of the epoch permutations.
        pad_to: training batches are padded to their longest input (``"longest"``) or to
            ``max_seq_len`` (``"max_length"``: every training batch has shape
            (batch_size, max_seq_len), as CUDA graphs need). Evaluation batches are always
            padded to their longest input.
        train_lengths: the training examples' untruncated token lengths (`token_lengths`),
            when the caller has them; computed here otherwise. ``truncated_share`` is the share
            of training examples longer than ``max_seq_len``.
        holdout: training rows held out from training, scored like ``dev`` (``--select-best``).
    """

    def __init__(self, tokenizer, train: Sequence[Example], dev: Sequence[Example],
                 max_seq_len: int, batch_size: int, eval_batch_size: int, seed: int,
                 pad_to: str = "longest", train_lengths: Optional[Sequence[int]] = None,
                 holdout: Sequence[Example] = ()) -> None:
        if pad_to not in PAD_TO:
            raise ValueError(f"--pad-to {pad_to!r} is invalid: use one of {PAD_TO}")
        if not train:
            raise ValueError("the training split is empty")
        if not dev:
            raise ValueError("the dev split is empty")
        self.tokenizer = tokenizer
        self.batch_size = min(batch_size, len(train))
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.max_seq_len = max_seq_len
        self.pad_to = pad_to
        self.train = self._encode(train, max_seq_len)
        lengths = token_lengths(tokenizer, train) if train_lengths is None else train_lengths
        self.truncated_share = sum(n > max_seq_len for n in lengths) / len(train)
        self.dev = self._encode(dev, max_seq_len)
        self.train_labels = torch.tensor([e.label for e in train])
        self.dev_labels = torch.tensor([e.label for e in dev])
        self.holdout = self._encode(holdout, max_seq_len) if holdout else []
        self.holdout_labels = torch.tensor([e.label for e in holdout], dtype=torch.long)
        self.steps_per_epoch = len(train) // self.batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _encode(self, examples: Sequence[Example], max_seq_len: int) -> List[Dict[str, list]]:
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        if any(p is None for p in pairs):
            enc = self.tokenizer(texts, truncation=True, max_length=max_seq_len)
        else:
            enc = self.tokenizer(texts, pairs, truncation="longest_first", max_length=max_seq_len)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(examples))]

    def _collate(self, features: List[Dict[str, list]], labels: torch.Tensor,
                 pad_to: str = "longest") -> Dict[str, torch.Tensor]:
        fixed = {"padding": "max_length", "max_length": self.max_seq_len}
        batch = dict(self.tokenizer.pad(features, return_tensors="pt",
                                        **(fixed if pad_to == "max_length" else {})))
        batch["labels"] = labels
        return batch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def train_batch(self, step: int) -> Dict[str, torch.Tensor]:
        """The training batch of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.train), generator=g)
            self._perm_epoch = epoch
        idx = self._perm[index * self.batch_size:(index + 1) * self.batch_size]
        return self._collate([self.train[i] for i in idx.tolist()], self.train_labels[idx],
                             self.pad_to)

    def eval_batches(self, split: str = "dev") -> Iterator[Dict[str, torch.Tensor]]:
        """The dev split (or ``"holdout"``: the held-out training rows) in batches, shortest
        inputs first (less padding; order does not matter)."""
        if split not in ("dev", "holdout"):
            raise ValueError(f"eval_batches: split {split!r} is not dev or holdout")
        rows, labels = (self.dev, self.dev_labels) if split == "dev" else \
            (self.holdout, self.holdout_labels)
        if not rows:
            raise ValueError(f"there are no {split} rows to score")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        for start in range(0, len(order), self.eval_batch_size):
            idx = torch.tensor(order[start:start + self.eval_batch_size])
            yield self._collate([rows[i] for i in idx.tolist()], labels[idx])
