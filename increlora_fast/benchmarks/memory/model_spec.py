"""The model a memory breakdown is about: its config (a folder, a ``config.json`` path or a hub
id), its head, a copy on the meta device (shapes and dtypes, no weights) and real copies of any
depth to run."""
from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from torch import nn

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
HEADS = ("auto", "causal-lm", "masked-lm", "seq-cls")
_HEAD_MAPPINGS = {"causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING",
                  "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING",
                  "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING"}
_AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
                 "seq-cls": "AutoModelForSequenceClassification"}


def load_config(model: str):
    """A transformers config from a folder holding ``config.json``, a path to a config file, a
    packaged model name (``all-MiniLM-L6-v2``) or a hub id (which needs the hub, or its cache)."""
    from transformers import AutoConfig, PretrainedConfig

    from ...data.assets import PACKAGED_MODELS, locate_asset

    path = Path(model).expanduser()
    if model in PACKAGED_MODELS and not path.exists():
        path = Path(locate_asset(model))
        model = str(path)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ValueError(f"--model {model}: no such folder or config file (give a model "
                         "folder, its config.json, all-MiniLM-L6-v2, or a hub id such as "
                         "org/name)")  # a path, not a hub id (as finetune's `_model_source`)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--model {model}: not a readable JSON config ({err})") from None
        if "model_type" not in data:
            raise ValueError(f"--model {model}: the config has no 'model_type' field, so the "
                             "model family is unknown")
        data = dict(data)
        _check_model_type(model, data["model_type"])
        with _refused_as_value_error(model):
            return AutoConfig.for_model(data.pop("model_type"), **data)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"--model {model}: the folder has no config.json")
    if path.is_dir():
        try:
            data = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--model {model}: config.json is not readable JSON ({err})") \
                from None
        if isinstance(data, dict) and "model_type" in data:
            _check_model_type(model, data["model_type"])
    try:
        with _refused_as_value_error(model):
            config = AutoConfig.from_pretrained(model)
    except OSError as err:
        raise ValueError(f"--model {model}: no such folder or config file, and the hub id could "
                         f"not be resolved (offline?): {str(err).splitlines()[0]}") from None
    assert isinstance(config, PretrainedConfig)
    return config


def _check_model_type(model: str, model_type: object) -> None:
    """ValueError naming --model when transformers knows no family ``model_type`` (its own
    error lists every family it knows, hundreds of names, without the option)."""
    import transformers
    from transformers import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ValueError(f"--model {model}: model_type {model_type!r} is not a model family "
                         f"transformers {transformers.__version__} knows")


@contextlib.contextmanager
def _refused_as_value_error(model: str) -> Iterator[None]:
    """A config transformers refuses (a field of the wrong type, a size that does not divide:
    huggingface_hub's validation errors, TypeError, ValueError) as one ValueError line naming
    --model."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except (ValueError, TypeError, KeyError, StrictDataclassError) as err:
        reason = " ".join(str(err).split())
        reason = reason if len(reason) <= 240 else reason[:237] + "..."
        raise ValueError(f"--model {model}: transformers cannot build this config: "
                         f"{type(err).__name__}: {reason}") from None


def resolve_head(config, head: str) -> str:
    """The head to train: the one the config's ``architectures`` name, else sequence
    classification for encoder families and a causal LM for decoder-only ones; ValueError
    naming --head when transformers has no model with that head for the config's family."""
    if head not in HEADS:
        raise ValueError(f"--head {head!r} is invalid: use one of {list(HEADS)}")
    chosen = _auto_head(config) if head == "auto" else head
    import transformers

    mapping = getattr(transformers, _HEAD_MAPPINGS[chosen])
    if type(config) not in mapping:
        has = [h for h, m in _HEAD_MAPPINGS.items() if type(config) in getattr(transformers, m)]
        picked = f"--head auto (from the config: {chosen})" if head == "auto" else \
            f"--head {chosen}"
        raise ValueError(f"{picked}: transformers has no {chosen} model for "
                         f"{getattr(config, 'model_type', type(config).__name__)!r}; use "
                         + (f"--head {' or '.join(has)}" if has else "another model"))
    return chosen


def _auto_head(config) -> str:
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
            return "causal-lm"
        if arch.endswith("ForMaskedLM"):
            return "masked-lm"
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    # Encoder families (BERT also has a causal head) are classified, decoders generate.
    if type(config) in MODEL_FOR_MASKED_LM_MAPPING or type(config) not in \
            MODEL_FOR_CAUSAL_LM_MAPPING:
        return "seq-cls"
    return "causal-lm"


def with_layers(config, n_layers: Optional[int]):
    """A copy of ``config`` with ``n_layers`` transformer blocks (None: unchanged); per-layer
    lists (e.g. ``layer_types``) are cut to match."""
    config = copy.deepcopy(config)
    if n_layers is None:
        return config
    old = getattr(config, "num_hidden_layers", None)
    if old is None:
        raise ValueError(f"{type(config).__name__} has no num_hidden_layers: --estimate cannot "
                         "vary the depth of this model")
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old and key != "architectures":
            setattr(config, key, value[:n_layers])
    config.num_hidden_layers = n_layers
    return config


@dataclass
class ModelSpec:
    """What to build: a config, its head and the dtype of the base weights."""

    config: object
    head: str
    dtype: torch.dtype

    @property
    def n_layers(self) -> Optional[int]:
        return getattr(self.config, "num_hidden_layers", None)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def build(self, device: torch.device, n_layers: Optional[int] = None,
              meta: bool = False) -> nn.Module:
        """The model with random weights on ``device`` (or with no weights on the meta device:
        accelerate's ``init_empty_weights``; buffers stay real; tied weights tied as in the real
        model)."""
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        config = with_layers(self.config, n_layers)
        if self.head == "seq-cls" and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0  # decoder classifiers need it to find the last token
        auto = getattr(transformers, _AUTO_CLASSES[self.head])
        if meta:
            from accelerate import init_empty_weights

            with init_empty_weights():
                model = auto.from_config(config, dtype=self.dtype)
            # from_config leaves a meta model's tied weights (e.g. tie_word_embeddings) untied,
            # which would count the shared embedding twice; the real model ties them.
            model.tie_weights()
            return model
        with torch.device(device):
            return auto.from_config(config, dtype=self.dtype).train()

    def max_positions(self) -> Optional[int]:
        """The longest sequence a model with learned absolute position embeddings (BERT's
        ``position_embeddings``, GPT-2's ``wpe``) can embed: the table's rows less RoBERTa's
        padding offset, at most the config's ``max_position_embeddings`` (OPT's table has 2
        extra rows); None when no such table bounds it (e.g. rotary positions)."""
        limits = []
        for name, module in self.build(torch.device("cpu"), meta=True).named_modules():
            last = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Embedding) and ("position" in last or last == "wpe"):
                offset = module.padding_idx + 1 if module.padding_idx is not None else 0
                limits.append(module.num_embeddings - offset)
        if not limits:
            return None
        configured = getattr(self.config, "max_position_embeddings", None)
        return min(limits + ([configured] if isinstance(configured, int) else []))

    def batch(self, batch_size: int, seq_len: int, device: torch.device,
              seed: int = 0) -> Dict[str, torch.Tensor]:
        """Random token ids, a full attention mask and the head's labels. An encoder-decoder
        classifier (T5, BART) reads each row's last <eos> and needs as many in every row: one,
        at the end."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (batch_size, seq_len), generator=gen)
        eos = getattr(self.config, "eos_token_id", None)
        if self.head == "seq-cls" and getattr(self.config, "is_encoder_decoder", False) and \
                isinstance(eos, int):
            ids[ids == eos] = (eos + 1) % self.vocab_size
            ids[:, -1] = eos
        labels = torch.zeros(batch_size, dtype=torch.long) if self.head == "seq-cls" \
            else ids.clone()
        return {"input_ids": ids.to(device), "labels": labels.to(device),
                "attention_mask": torch.ones_like(ids).to(device)}
