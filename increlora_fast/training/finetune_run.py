"""One fine-tuning run end to end: data, model, method, loop, evaluation and output files."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..data import TaskData, load_files, load_task, locate_asset
from ..data.assets import PACKAGED_MODELS, hub_access_off, hub_offline
from ..data.examples import Example, fixed_split
from ..data.files import check_data_file, file_sha256
from ..layer import is_supported_base
from ..model import saved_root, suffix_match
from ..files import atomic_write_bytes
from .batches import Batches, padding_side, token_lengths
from .checkpoint import (load_checkpoint, read_checkpoint_settings, remove_checkpoint,
                         save_checkpoint)
from .device import (Placement, peak_memory, reset_peak_memory, resolve_device,
                     tokens_per_second)
from .loop import (BestState, LoopState, StepEnds, balanced_class_weights, evaluate,
                   train_loop)
from .methods import MethodRun
from .registry import build_method
from .output_folder import claim_output_dir, final_outputs
from .outputs import (ALLOCATION_LOG_FILE, CHECKPOINT_PREFIX, METRICS_FILE, OutputWriteError,
                      describe_os_error)
from ..pooling import (apply_pooling, check_pooling, mean_pooling_available, model_pooling,
                       resolve_pooling)
from .settings import (AUTO_SEQ_PERCENTILE, BERT_TARGETS, DEFAULT_SAVE_STEPS,
                       SELECT_HOLDOUT_SHARE, RunSettings, resolve, stored_model,
                       validate)
from .step_runner import resolve_cuda_graphs

HEATMAP_FILE = "rank_heatmap.png"
RANK_OVER_TIME_FILE = "rank_over_time.png"
LABELS_FILE = "labels.json"
# the heads of transformers' sequence classifiers: BERT-like, decoders, encoder-decoders (BART, T5)
HEAD_NAMES = ("classifier", "score", "classification_head")
DATA_FILE_KEYS = (("train_file", "train_file_sha256", "--train-file"),
                  ("eval_file", "eval_file_sha256", "--eval-file"))


class TrainingDivergedError(FloatingPointError):
    """The run produced non-finite parameters or a non-finite evaluation loss."""


def with_data_identity(s: RunSettings) -> RunSettings:
    """A copy with absolute data paths and the sha256 of each data file, and a ``--model`` that
    names a local folder as its absolute path (a resume from another working folder loads it
    again); a data path that is no regular file is refused first (`files.check_data_file`), as
    resolving a pipe's /dev/fd/N gives a made-up path."""
    values = {"model": stored_model(s.model)}
    for path_key, hash_key, option in DATA_FILE_KEYS:
        path = getattr(s, path_key)
        if path is None:
            values[hash_key] = None
            continue
        check_data_file(option, str(Path(path).expanduser()))
        absolute = Path(path).expanduser().resolve()
        values[path_key] = str(absolute)
        values[hash_key] = file_sha256(absolute)
    return dataclasses.replace(s, **values)


def check_data_identity(s: RunSettings, where: str) -> None:
    """Refuse to continue ``s`` (read from ``where``) when a data file is gone or changed."""
    for path_key, hash_key, option in DATA_FILE_KEYS:
        path, saved = getattr(s, path_key), getattr(s, hash_key)
        if path is None:
            continue
        if not Path(path).is_file():
            raise ValueError(f"data file {path} (the {option} stored in {where}) does not exist")
        if saved is None:
            raise ValueError(f"{where} stores no checksum of the data file {path}, so an exact "
                             "continuation cannot be verified; start a new run")
        if file_sha256(Path(path)) != saved:
            raise ValueError(f"data file {path} changed since {where} was written (its sha256 "
                             "differs); resume with the same data or start a new run")


def load_data(s: RunSettings) -> TaskData:
    """The task's examples (a packaged task, GLUE or the user's files), subset if asked."""
    if s.train_file:
        data = load_files(s.train_file, s.eval_file, s.text_column, s.text_pair_column,
                          s.label_column)
    elif s.eval_file:
        raise ValueError("--eval-file needs --train-file")
    else:
        data = load_task(s.task)
    return data.subset(s.max_train_samples, s.max_eval_samples)


def model_path(name: str) -> str:
    """A packaged model name (e.g. ``all-MiniLM-L6-v2``) becomes its cached folder; any other
    name is passed to transformers (a local folder or a hub id)."""
    return str(locate_asset(name)) if name in PACKAGED_MODELS and not Path(name).exists() else name


def _model_source(s: RunSettings) -> Tuple[str, Optional[str]]:
    """(what transformers is given for ``--model``: a local folder's path or a hub id, why the
    hub clients use their local caches only (`hub_access_off`), None for a local folder or a
    usable hub). Refuses a local path that holds no transformers model; turns transformers'
    logging down to errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = model_path(s.model)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not local.is_dir():
        raise ValueError(f"--model {s.model}: no such folder (give a model folder, "
                         "all-MiniLM-L6-v2, or a hub id such as org/name)")
    if looks_local and not (local / "config.json").is_file():
        raise ValueError(f"--model {s.model} holds no transformers model (no config.json in "
                         f"{local})")
    if looks_local:
        return str(local), None  # transformers reads a "~/..." it is given as a hub id
    return path, hub_access_off()


@contextlib.contextmanager
def _loading(s: RunSettings, off: Optional[str]) -> Iterator[None]:
    """Runs transformers' loading of ``--model`` (with ``off``, `_model_source`'s reason, from
    the local hub cache only: a missing hub id fails at once) and turns its OSError or
    ValueError into a one-line ValueError naming the option."""
    try:
        with hub_offline(off is not None):
            yield
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--model {s.model} could not be loaded" + (
            f" ({off}, so only the local hub cache is searched)" if off else "")
            + f": {first}") from err


def model_skeleton(s: RunSettings) -> torch.nn.Module:
    """The sequence classifier ``--model`` names, built from its config on the meta device (no
    weights read, no memory): what the checks of its architecture read before `load_model`,
    which takes seconds to minutes for a big model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path, off = _model_source(s)
    with _loading(s, off):
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)


def load_model(s: RunSettings, data: TaskData):
    """(tokenizer, sequence-classification model, the names of its parameters the checkpoint
    had no weights for, which start random) with a head for the task's labels (a fresh one,
    unless the checkpoint is a classifier whose head has the task's number of labels: then, as
    transformers loads it, that head keeps its trained weights under the task's label names), in
    float32 whatever dtype the checkpoint was saved in (the master weights of mixed precision;
    `device.Placement` autocasts the compute). The tokenizer may have no pad token yet
    (`set_pad_token`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, off = _model_source(s)
    with _loading(s, off):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=data.num_labels, id2label=dict(enumerate(data.label_names)),
            label2id={n: i for i, n in enumerate(data.label_names)},
            ignore_mismatched_sizes=True, dtype=torch.float32, output_loading_info=True)
    new = set(info.get("missing_keys", ())) | {key for key, *_ in info.get("mismatched_keys", ())}
    return tokenizer, model, sorted(new & {name for name, _ in model.named_parameters()})


def set_pad_token(tokenizer, model, name: str) -> Optional[int]:
    """Give a tokenizer without a pad token (decoder checkpoints: Llama, GPT-2, Mistral) the one
    the model's config names (``pad_token_id``), else its EOS token (else its UNK token), and a
    model config without ``pad_token_id`` the tokenizer's: batches are padded, and a decoder's
    ``score`` head finds each input's last token before the padding by the config's id, so
    batches padded with another token would make it read a padding position.

    A tokenizer and a config that both name a pad token, and different ones, are warned about
    (the batches are padded with the tokenizer's, the head looks for the config's). A config
    ``pad_token_id`` that is no token of the tokenizer (-1) is replaced, with a warning: no input
    holds it, so a decoder's head would read the last position, on padded inputs a padding one.

    Returns:
        The ``pad_token_id`` given to the model's config, None when it kept its own.

    Raises:
        ValueError: the tokenizer has neither a pad, an EOS nor an UNK token.
    """
    named = getattr(model.config, "pad_token_id", None)
    token_id = isinstance(named, int) and 0 <= named < len(tokenizer)
    if tokenizer.pad_token is None:
        token = (tokenizer.convert_ids_to_tokens(named) if token_id else None) \
            or tokenizer.eos_token or tokenizer.unk_token
        if token is None:
            raise ValueError(f"--model {name}: its tokenizer has no pad, EOS or UNK token to "
                             "pad batches with; give its tokenizer a pad token")
        tokenizer.pad_token = token
    if named is not None and not token_id:  # (-1 in early Llama configs): no input holds it
        warnings.warn(f"--model {name}: its config's pad_token_id {named} is no token of its "
                      f"tokenizer; set to {tokenizer.pad_token_id}, the token batches are padded "
                      "with", UserWarning, stacklevel=2)
    elif named is not None:
        if named != tokenizer.pad_token_id:
            warnings.warn(f"--model {name}: its tokenizer pads with token id "
                          f"{tokenizer.pad_token_id} and its config names pad_token_id {named}; "
                          "a decoder classifier looks for the config's id to find each input's "
                          "last token, so on padded batches it may read a padding position: give "
                          "the two one pad token", UserWarning, stacklevel=2)
        return None
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.config.pad_token_id


# what a head that is not BERT's pooler reads from the token states, by its name (`head_name`)
HEAD_READS = {"score": "each input's last token",  # decoders: the last before the padding
              "classification_head": "the last end-of-sequence token"}  # BART, T5


def head_reads(model) -> str:
    """What the head of a sequence classifier reads from the encoder's token states, in words:
    the last token for a head that is padded on the left (`batches.padding_side`: XLNet), each
    input's last token for a decoder's ``score``, the last EOS token for an encoder-decoder's
    ``classification_head`` (BART, T5), else the first token (BERT-like heads)."""
    if padding_side(model) == "left":
        return "the last token"
    return HEAD_READS.get(head_name(model), "the first token")


class HeadAddedWarning(UserWarning):
    """--modules-to-save did not name the classification head (or a layer of it that the
    checkpoint has no weights for), so it was added."""


def head_name(model) -> Optional[str]:
    """Name of the classification head of a transformers ``*ForSequenceClassification`` model
    (``classifier`` for BERT-like models, ``score`` for decoder models, ``classification_head``
    for encoder-decoders such as BART and T5), None if it has none of them."""
    return next((name for name in HEAD_NAMES
                 if isinstance(getattr(model, name, None), torch.nn.Module)), None)


def head_layers(model) -> List[str]:
    """The names of a sequence classifier's layers outside its base model that hold parameters,
    in order: ``["classifier"]`` of BERT, ``["pre_classifier", "classifier"]`` of DistilBERT,
    ``["pooler", "classifier"]`` of DeBERTa-v2. An encoder checkpoint has weights for none of
    them, so `finetune` trains and saves them all (`with_head_saved`,
    `with_new_head_layers_saved`)."""
    base = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != base and next(child.parameters(), None) is not None]


def with_head_saved(s: RunSettings, model) -> RunSettings:
    """``s`` with the model's head in ``modules_to_save`` (warning once when it was missing):
    a head left out would stay frozen at its random start and be missing from the adapter.
    It takes the place of an entry naming the other family's head (`HEAD_NAMES`) that names no
    module of the model: the default ``classifier`` on a decoder, whose head is ``score``."""
    head = head_name(model)
    if s.method == "full" or head is None or any(
            suffix_match(head, key) for key in s.modules_to_save):
        return s
    # the other family's head (the default "classifier" on a decoder) names no module here
    names = [name for name, _ in model.named_modules()]
    other = [key for key in s.modules_to_save if key in HEAD_NAMES and not any(
        suffix_match(name, key) for name in names)]
    warnings.warn(f"--modules-to-save {','.join(s.modules_to_save) or '(none)'} leaves out the "
                  f"classification head {head!r}; it is added (trained and saved in the "
                  "adapter)" + (f" in place of {','.join(other)}, which this model does not "
                                "have" if other else ""), HeadAddedWarning, stacklevel=2)
    return dataclasses.replace(s, modules_to_save=[key for key in s.modules_to_save
                                                   if key not in other] + [head])


def _first_layer(model, key: str) -> Tuple[bool, str]:
    """(whether parameter ``key`` lies in the base model, the first name of its layer below
    the model or below its base model): ``(False, "pre_classifier")`` of DistilBERT's
    ``pre_classifier.weight``, ``(True, "pooler")`` of BERT's ``bert.pooler.dense.weight``."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    inside = prefix != "." and key.startswith(prefix)
    return inside, (key[len(prefix):] if inside else key).split(".")[0]


def _unsaved_new_layers(s: RunSettings, model, new: List[str]) -> List[Tuple[bool, str]]:
    """The layers (`_first_layer`: inside the base model or not, first name) of the model's
    parameters among ``new`` that ``s.modules_to_save`` leaves out, each name once, in order."""
    present = {name for name, _ in model.named_parameters()}
    layers: List[Tuple[bool, str]] = []
    for key in (key for key in new if key in present):
        if saved_root(key.rpartition(".")[0], s.modules_to_save) is None:
            inside, layer = _first_layer(model, key)
            if all(layer != known for _, known in layers):
                layers.append((inside, layer))
    return layers


def with_new_head_layers_saved(s: RunSettings, model, new: List[str]) -> RunSettings:
    """``s`` with the layers of the head (outside the base model) that the checkpoint had no
    weights for (``new``, `load_model`) added to ``modules_to_save``, warning once naming
    them (`HeadAddedWarning`): DistilBERT's ``pre_classifier``, DeBERTa-v2's ``pooler``. Their
    encoder checkpoints lack them, so they start random, and an adapter method would leave
    them frozen there, neither trained nor saved. Layers inside the base model are left to
    `check_new_layers_trained`, which refuses them (a checkpoint short of encoder layers is
    not fixed by training the encoder in full)."""
    if s.method == "full":
        return s
    added = [layer for inside, layer in _unsaved_new_layers(s, model, new) if not inside]
    if not added:
        return s
    warnings.warn(f"--model {s.model}: its checkpoint has no weights for "
                  f"{', '.join(map(repr, added))} of the classification head, which "
                  f"{'start' if len(added) > 1 else 'starts'} random; added to "
                  "--modules-to-save (trained and saved in the adapter)", HeadAddedWarning,
                  stacklevel=2)
    return dataclasses.replace(s, modules_to_save=list(s.modules_to_save) + added)


def check_new_layers_trained(s: RunSettings, model, new: List[str]) -> None:
    """Refuse a run of an adapter method that would leave parameters the checkpoint had no
    weights for (``new``, `load_model`) frozen at their random start, neither trained nor
    saved: a layer of the base model that --modules-to-save leaves out (BERT's pooler in a
    checkpoint saved without it, under cls pooling, which reads it; the head's own layers are
    added by `with_new_head_layers_saved` first). Names the layers (their first name below
    the model, or below its base model) and the option that trains them."""
    if s.method == "full":
        return
    untrained = [layer for _, layer in _unsaved_new_layers(s, model, new)]
    if untrained:
        raise ValueError(f"--model {s.model}: its checkpoint has no weights for "
                         f"{', '.join(map(repr, untrained))}, which start random, and "
                         f"--modules-to-save {','.join(s.modules_to_save)} leaves "
                         f"{'them' if len(untrained) > 1 else 'it'} out, so "
                         f"{'they' if len(untrained) > 1 else 'it'} would stay random (neither "
                         "trained nor saved); give --modules-to-save "
                         + ",".join(list(s.modules_to_save) + untrained))


def check_target_modules(s: RunSettings, model) -> None:
    """Refuse --target-modules entries that name no module of the model (an adapter method):
    peft adapts what the others match without a word, so a LoRA run on a model whose names
    differ from the default BERT ones (DeBERTa-v2's query_proj) trained fewer modules than
    asked. The error names the base model's linear layers by their last name."""
    if s.method == "full":
        return
    names = [name for name, _ in model.named_modules() if name]
    missing = [key for key in s.target_modules if not any(suffix_match(n, key) for n in names)]
    if not missing:
        return
    base = getattr(model, "base_model", model)  # (not the head's own linears)
    linears = sorted({name.split(".")[-1] for name, module in base.named_modules()
                      if is_supported_base(module)})
    default = " (the default names BERT's linears)" if s.target_modules == BERT_TARGETS else ""
    raise ValueError(f"--target-modules {', '.join(map(repr, missing))} name(s) no module of "
                     f"--model {s.model}{default}; its linear layers are named {linears}: give "
                     "those you want adapted, comma-separated")


def _positions(model) -> Optional[int]:
    """The most tokens the model's position embeddings take: ``max_position_embeddings``, less
    the offset of models that number positions from after their padding index (RoBERTa, XLM-R,
    CamemBERT: 514 embeddings, 512 tokens); None when the config names no limit (none, or
    XLNet's -1: relative positions)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None \
            and table.num_embeddings == positions:
        positions -= table.padding_idx + 1
    return positions


def check_max_seq_len(s: RunSettings, model) -> None:
    """--max-seq-len (a number) must fit the model's position embeddings."""
    positions = _positions(model)
    if isinstance(s.max_seq_len, int) and positions is not None and s.max_seq_len > positions:
        raise ValueError(f"--max-seq-len {s.max_seq_len} is invalid: the model {s.model} has "
                         f"{positions} positions; use at most {positions}")


def auto_max_seq_len(lengths: List[int], tokenizer, model) -> int:
    """``--max-seq-len auto``: the `AUTO_SEQ_PERCENTILE` th percentile (nearest rank) of the
    training texts' token ``lengths``, at least 8 and at most the model's positions and the
    tokenizer's own maximum (all-MiniLM-L6-v2: 256, what sentence-transformers trained it on)."""
    ordered = sorted(lengths)
    chosen = ordered[max(0, math.ceil(AUTO_SEQ_PERCENTILE / 100 * len(ordered)) - 1)]
    limits = [n for n in (_positions(model), getattr(tokenizer, "model_max_length", None))
              if isinstance(n, int) and n < 1_000_000]
    return max(8, min([chosen] + limits))


def split_holdout(s: RunSettings, train: List[Example],
                  label_names: Optional[List[str]] = None
                  ) -> Tuple[List[Example], List[Example]]:
    """(rows to train on, rows held out): with ``--select-best`` a fixed `SELECT_HOLDOUT_SHARE`
    of the training rows (the same for every --seed) is held out, otherwise none. Warns, naming
    them (by ``label_names`` when given), when it holds out every training row of a label.
    Raises ValueError when the training split is too small to hold any row out."""
    if not s.select_best:
        return list(train), []
    n_held = max(1, round(SELECT_HOLDOUT_SHARE * len(train)))
    if len(train) <= n_held:  # (fixed_split's own error names no option)
        raise ValueError(f"--select-best holds out {n_held} training row(s) to choose the step "
                         f"by, and the training split has only {len(train)}: give more rows "
                         "(--max-train-samples) or leave --select-best out")
    kept, held = fixed_split(train, n_held)
    lost = sorted({e.label for e in held} - {e.label for e in kept})
    if lost:
        names = [label_names[i] if label_names is not None and i < len(label_names) else str(i)
                 for i in lost]
        warnings.warn(f"--select-best holds out every training row of label(s) "
                      f"{', '.join(names)}: the model cannot learn them; give more rows of "
                      "them or leave --select-best out", UserWarning, stacklevel=2)
    return kept, held


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def uses_cuda_graphs(settings: RunSettings, device: Optional[torch.device] = None) -> bool:
    """Whether a run of ``settings`` replays its steps from CUDA graphs on ``device`` (default:
    ``--device`` resolved on this machine); raises ValueError as they do."""
    return resolve_cuda_graphs(settings.cuda_graphs,
                               resolve_device(settings.device) if device is None else device,
                               settings.method, settings.pad_to)


def usable_pooling(s: RunSettings, pooling: str, model: torch.nn.Module) -> str:
    """The pooling a run of ``s`` gives ``model`` (or its `model_skeleton`): ``pooling``, as
    `resolve_pooling` read it, except that ``auto`` reading ``mean`` for a head that cannot take
    it (`mean_pooling_available`) gives ``cls``, with a warning naming what the head reads.

    Raises:
        ValueError: ``pooling`` that `apply_pooling` refuses for ``model`` (``--pooling mean``
            on RoBERTa), in its words.
    """
    if s.pooling == "auto" and pooling == "mean" and not mean_pooling_available(model):
        warnings.warn(f"--pooling auto: {s.model} pools by mean in its sentence-transformers "
                      f"files, but the head of {type(model).__name__} reads {head_reads(model)} "
                      "itself; trained with cls pooling (give --pooling cls to say so)",
                      UserWarning, stacklevel=3)
        return "cls"
    check_pooling(model, pooling)
    return pooling


def build_run(settings: RunSettings, placement: Optional[Placement] = None,
              graphed: Optional[bool] = None
              ) -> Tuple[RunSettings, TaskData, MethodRun, Batches]:
    """Resolved settings, data, the method wrapped around a fresh model (on ``placement``'s
    device, default CPU), and the batches. ``graphed``: whether the steps will be replayed from
    CUDA graphs (the default padding follows it, `settings.resolve`)."""
    data = load_data(settings)
    train, holdout = split_holdout(settings, data.train, data.label_names)
    s = resolve(settings, len(train), graphed)
    seed_everything(s.seed)
    pooling = resolve_pooling(s.pooling, _pooling_folder(s) if s.pooling == "auto" else None)
    if pooling != "cls":  # refused, or auto's fallback said, before the weights load
        pooling = usable_pooling(s, pooling, model_skeleton(s))
    tokenizer, model, new = load_model(s, data)
    given_pad = set_pad_token(tokenizer, model, s.model)
    tokenizer.padding_side = padding_side(model)
    check_max_seq_len(s, model)
    s = with_head_saved(s, model)
    check_target_modules(s, model)
    apply_pooling(model, pooling)
    # after the pooling: mean pooling drops the pooler
    s = with_new_head_layers_saved(s, model, new)
    check_new_layers_trained(s, model, new)
    lengths = token_lengths(tokenizer, train)
    seq_len = auto_max_seq_len(lengths, tokenizer, model) if s.max_seq_len == "auto" \
        else s.max_seq_len
    if placement is not None:
        model = model.to(placement.device)
    run = build_method(model, s)
    run.given_pad_token_id = given_pad
    if s.class_weights == "balanced":
        weights = balanced_class_weights(torch.tensor([e.label for e in train]), data.num_labels)
        run.class_weights = weights.to(placement.device if placement is not None else "cpu")
    batches = Batches(tokenizer, train, data.eval, seq_len, s.batch_size, s.eval_batch_size,
                      s.seed, pad_to=s.pad_to, train_lengths=lengths, holdout=holdout)
    return s, data, run, batches


def check_finite(run: MethodRun, step: int) -> None:
    """Raise `TrainingDivergedError` when a trainable parameter holds NaN or inf after ``step``
    optimizer steps."""
    for name, p in run.model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            raise TrainingDivergedError(
                f"{run.name}: the parameters became non-finite by step {step} (first: {name}); "
                f"its outputs were not written; lower --lr (it was {run.settings.lr:g})")


class _Checkpointer:
    """Saves a checkpoint every ``save_steps`` steps (with ``place``'s GradScaler, if any) and
    removes the previous one this run wrote (``written`` collects their names); checkpoints of
    other runs are never touched: a step whose checkpoint folder another run wrote (a resume
    from a checkpoint an earlier resume continued too) is not saved."""

    def __init__(self, out: Path, run: MethodRun, s: RunSettings, save_steps: int,
                 written: List[str], place: Placement) -> None:
        self.out, self.run, self.s, self.save_steps = out, run, s, save_steps
        self.written, self.place = written, place

    def due(self, step: int) -> bool:
        """Whether the call after ``step`` steps saves (reads the device)."""
        return step % self.save_steps == 0 and step < self.s.max_steps

    def __call__(self, state: LoopState) -> None:
        if not self.due(state.step):
            return
        run, written = self.run, self.written
        state.sync(run.name)  # a non-finite loss is named before the parameters are
        check_finite(run, state.step)
        name = f"{CHECKPOINT_PREFIX}{state.step}"
        if name not in written and (self.out / name).exists():
            # another run's (an earlier resume from the same checkpoint): kept as it is
            warnings.warn(f"{self.out / name} was written by another run (an earlier resume "
                          f"from the same checkpoint?) and is kept; this run's step {state.step} "
                          "is not checkpointed there", stacklevel=2)
            return
        save_checkpoint(self.out / name, run, self.s, state, self.place.scaler)
        for old in [w for w in written if w != name]:
            remove_checkpoint(self.out / old)
            written.remove(old)
        if name not in written:
            written.append(name)


def _pooling_folder(s: RunSettings) -> Optional[Path]:
    """The folder ``--pooling auto`` reads ``--model``'s sentence-transformers files from
    (`pooling.pooling_of_folder`): a local folder, or for a hub id its snapshot in the local
    hub cache when that holds its ``modules.json``; the network is never asked. None for a hub
    id whose cache records that the hub has no ``modules.json`` (not a sentence-transformers
    model), and None with a one-line warning for one whose cache does not say (auto cannot
    know its pooling, and cls is used)."""
    from huggingface_hub import try_to_load_from_cache

    path, off = _model_source(s)
    if Path(path).is_dir():
        return Path(path)
    with _loading(s, off):  # (an invalid hub id: as loading it says)
        found = try_to_load_from_cache(path, "modules.json")
    if isinstance(found, str):
        return Path(found).parent
    if found is None:  # (else the cache's record that the hub has none)
        warnings.warn(f"--pooling auto: the local hub cache holds no sentence-transformers "
                      f"modules.json of {s.model}, so its pooling is unknown; cls is used "
                      "(give --pooling mean or --pooling cls to choose)", UserWarning,
                      stacklevel=3)
    return None


def _matplotlib_available(missing: str) -> bool:
    """Whether the plots can be drawn; warns, naming what is not drawn, when they cannot (a
    bare CUDA image may lack matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(f"matplotlib is not installed, so {missing} not drawn (the numbers are in "
                      "metrics.json and the allocation log); `pip install matplotlib` for it")
        return False
    return True


def write_outputs(out: Path, run: MethodRun, metrics: Dict) -> None:
    """Adapter (or model), metrics.json, labels.json (label id -> name), and for
    rank-allocating methods the heatmap; for IncreLoRA also the allocation log and each module's
    rank against the step. They appear in ``out`` all together, once all are written
    (`output_folder.final_outputs`): a run stopped while it writes them leaves none. A method
    whose files cannot record the model's pooling (`MethodRun.records_pooling`) warns, when it
    is not CLS, that loading them needs it applied.

    Raises:
        OutputWriteError: a file could not be written (e.g. the disk is full), naming ``out``.
    """
    try:
        with final_outputs(out) as stage:
            _write_outputs(out, stage, run, metrics)
    except OSError as err:
        raise OutputWriteError(err.errno, f"cannot write the outputs into {out}: "
                                          f"{describe_os_error(err)}") from err


def _write_outputs(out: Path, stage: Path, run: MethodRun, metrics: Dict) -> None:
    """`write_outputs` into ``stage``, the folder they are moved into ``out`` from."""
    run.save_artifacts(stage)
    pooling = model_pooling(run.model)
    if pooling != "cls" and not run.records_pooling:
        what = "model" if run.name == "full" else "peft adapter"
        warnings.warn(f"the {run.name} {what} in {out} was trained with --pooling {pooling}, "
                      f"which its files cannot record: apply increlora_fast.pooling."
                      f"apply_pooling(model, {pooling!r}) to the model it is loaded into"
                      + ("" if run.name == "full" else " (before peft loads the adapter)")
                      + ", or its predictions differ", stacklevel=3)
    pad = run.given_pad_token_id
    if pad is not None and not run.records_pad_token:
        warnings.warn(f"the {run.name} peft adapter in {out} was trained with pad_token_id {pad}, "
                      "which its base's config lacks and peft's files cannot record: set "
                      f"model.config.pad_token_id = {pad} on the base before peft loads the "
                      "adapter and pad inputs with that token, or its predictions on padded "
                      "inputs differ", stacklevel=3)
    names = metrics.get("label_names") or []
    (stage / LABELS_FILE).write_text(json.dumps(
        {"id2label": {str(i): n for i, n in enumerate(names)},
         "label2id": {n: i for i, n in enumerate(names)}}, indent=2))
    pattern = run.rank_pattern()
    plots = run.name in ("increlora", "adalora") and bool(pattern) and _matplotlib_available(
        f"{HEATMAP_FILE}" + (f" and {RANK_OVER_TIME_FILE} are" if run.name == "increlora"
                             else " is"))
    if plots:
        from ..visualize import save_rank_heatmap
        save_rank_heatmap(pattern, stage / HEATMAP_FILE, title=f"{run.name} rank pattern")
    if run.name == "increlora":
        # --select-best saved the selected step's adapter: the log and the plot end there (an
        # allocation at optimizer step k is in the state after k + 1 steps), so that their last
        # ranks are the saved adapter's
        selected = metrics.get("selected_step")
        log = [entry for entry in run.allocation_log()
               if selected is None or entry["step"] < selected]
        lines = [json.dumps(entry, sort_keys=True) for entry in log]
        (stage / ALLOCATION_LOG_FILE).write_text("".join(line + "\n" for line in lines))
        if plots:
            from .. import visualize
            visualize.save_rank_over_time(
                {name: run.config.init_r for name in pattern}, log, stage / RANK_OVER_TIME_FILE,
                last_step=metrics.get("steps") if selected is None else selected)
    atomic_write_bytes(stage / METRICS_FILE,
                       json.dumps(metrics, indent=2, sort_keys=True).encode())


# A share of training texts cut at --max-seq-len from which the no-learning note suggests a
# longer one.
MANY_TRUNCATED = 0.2


def no_learning_note(m: Dict) -> Optional[str]:
    """One line when the run did no better on the dev set than always predicting its majority
    class (accuracy, or macro-F1, at or below that baseline's), naming the changes most likely to
    help; None otherwise or when ``m`` has no baseline (metrics of an older run)."""
    if "eval_majority_accuracy" not in m:
        return None
    acc, base_acc = m["eval_accuracy"], m["eval_majority_accuracy"]
    f1, base_f1 = m["eval_macro_f1"], m["eval_majority_macro_f1"]
    if acc > base_acc and f1 > base_f1:
        return None
    names = m.get("label_names") or []
    label = m.get("eval_majority_label")
    majority = repr(names[label]) if isinstance(label, int) and label < len(names) else \
        "the majority class"
    settings = m.get("settings") or {}
    hints = [f"more steps (--max-steps or --epochs; it ran {m.get('steps')})"]
    if settings.get("lr") is not None:
        hints.append(f"another --lr (it was {settings['lr']:g})")
    cut = m.get("train_truncated_share") or 0.0
    if cut >= MANY_TRUNCATED:
        hints.append(f"a longer --max-seq-len or --max-seq-len auto ({cut:.0%} of the training "
                     f"texts were cut at {m.get('max_seq_len')} tokens)")
    return (f"no better than always predicting {majority}: dev accuracy {acc:.4f} vs "
            f"{base_acc:.4f}, macro-F1 {f1:.4f} vs {base_f1:.4f}; try "
            + (", ".join(hints[:-1]) + " or " if len(hints) > 1 else "") + hints[-1])


def run_finetune(settings: RunSettings, output_dir: str, resume: Optional[str] = None,
                 save_steps: Optional[int] = 0, progress: bool = True,
                 echo: Callable[[str], None] = print, overwrite: bool = False,
                 cuda_graphs: Optional[str] = None) -> Dict:
    """Train, evaluate on the dev split and write the outputs; returns the metrics.

    Args:
        settings: the run; ignored in favour of the checkpoint's own when ``resume`` is given.
        output_dir: created if missing, locked for the run and checked before anything is
            loaded (see `output_folder.claim_output_dir`).
        resume: a ``checkpoint-<step>`` folder written by an earlier run; its files and the
            data files it names are verified first.
        save_steps: write a checkpoint every this many steps (0: never); only the newest this run
            wrote is kept. None with ``resume``: the interval of the run the checkpoint belongs
            to (`DEFAULT_SAVE_STEPS` for a checkpoint that does not record it); None without
            it: `DEFAULT_SAVE_STEPS`.
        progress: show a tqdm bar.
        echo: receives a one-line description of the run before training starts, and notes
            about the output folder (what interrupted runs left there, a partial run kept).
        overwrite: replace another run in ``output_dir`` (otherwise refused), once this one
            has succeeded.
        cuda_graphs: with ``resume``, ``--cuda-graphs`` in place of the checkpoint's (None:
            the checkpoint's): it says how the steps run, not what they compute (graphed and
            eager steps are equal, and the padding stays the checkpoint's), so a run graphed
            on a GPU can go on where there is none.

    Raises:
        TrainingDivergedError: non-finite parameters or evaluation loss; nothing is written.
        ValueError: ``cuda_graphs`` without ``resume`` (a new run takes
            ``settings.cuda_graphs``), before anything is written.
    """
    if cuda_graphs is not None and not resume:
        raise ValueError(f"run_finetune(cuda_graphs={cuda_graphs!r}) replaces a checkpoint's "
                         "setting on a resume; a new run takes RunSettings.cuda_graphs")
    with claim_output_dir(output_dir, overwrite=overwrite, resume=resume, echo=echo) as out:
        return _run_into(out, settings, resume, save_steps, progress, echo, cuda_graphs)


def _run_into(out: Path, settings: RunSettings, resume: Optional[str], save_steps: Optional[int],
              progress: bool, echo: Callable[[str], None],
              cuda_graphs_given: Optional[str] = None) -> Dict:
    """`run_finetune` inside the folder it claimed."""
    t_start = time.perf_counter()
    if resume:
        settings = read_checkpoint_settings(Path(resume))
        if cuda_graphs_given is not None:
            if cuda_graphs_given == "on" and settings.pad_to == "longest":  # (kept on resume)
                raise ValueError(f"--cuda-graphs on cannot continue {resume}: its run pads each "
                                 "batch to its longest input (--pad-to longest), and graphs "
                                 "need batches of one shape; resume with --cuda-graphs off "
                                 "or auto")
            settings = dataclasses.replace(settings, cuda_graphs=cuda_graphs_given)
            validate(settings)  # (e.g. on with a LoRA checkpoint) before the data is read
    else:
        validate(settings)  # before hashing the data files or loading anything
    # device, precision and graphs (e.g. --cuda-graphs on without CUDA) before the data files
    # are hashed, which takes seconds a gigabyte
    place = Placement.from_text(settings.device, settings.precision)
    cuda_graphs = uses_cuda_graphs(settings, place.device)
    if resume:
        check_data_identity(settings, str(Path(resume) / "settings.json"))
    else:
        settings = with_data_identity(settings)
    reset_peak_memory(place.device)
    s, data, run, batches = build_run(settings, place, cuda_graphs)
    state = load_checkpoint(Path(resume), run, place.scaler) if resume else LoopState()
    if save_steps is None:  # the resumed run's own interval
        save_steps = DEFAULT_SAVE_STEPS if state.save_steps is None else state.save_steps
    state.save_steps = save_steps
    echo(f"{s.method} on {data.name} ({len(batches.train):,} train"
         + (f" + {len(batches.holdout):,} held out" if batches.holdout else "")
         + f" / {len(data.eval):,} dev), "
         f"model {s.model}: {s.max_steps} steps x batch {batches.batch_size}, lr {s.lr:g}, "
         f"seed {s.seed}, on {place.describe()}" + (", CUDA graphs" if cuda_graphs else "")
         + (f", resuming at step {state.step}" if resume else ""))
    pooling = model_pooling(run.model)  # what build_run applied
    if s.max_seq_len == "auto" or s.pooling != "cls" or s.class_weights != "none" or \
            s.select_best or batches.truncated_share >= MANY_TRUNCATED:
        echo(f"max_seq_len {batches.max_seq_len}"
             + (f" (auto: {AUTO_SEQ_PERCENTILE}th percentile of the training texts' token "
                "lengths, within the model's limit)" if s.max_seq_len == "auto" else "")
             + f", {batches.truncated_share:.0%} of training texts cut; pooling {pooling}"
             + (f"; class weights {s.class_weights}" if s.class_weights != "none" else "")
             + (f"; best of every {s.select_every} steps on {len(batches.holdout)} held-out "
                "training rows" if s.select_best else ""))
    written: List[str] = []
    selector = BestState(run, batches, s.select_every, s.max_steps, place) \
        if s.select_best else None
    checkpointer = _Checkpointer(out, run, s, save_steps, written, place) \
        if save_steps > 0 else None
    train_loop(run, batches, s.max_steps, s.grad_clip, state, progress=progress,
               on_step_end=StepEnds(selector, checkpointer), placement=place,
               cuda_graphs=cuda_graphs)
    check_finite(run, state.step)
    if selector is not None:
        selector.restore(state)
    t_eval = time.perf_counter()
    metrics = evaluate(run, batches, place)
    if not math.isfinite(metrics["eval_loss"]):
        raise TrainingDivergedError(f"{run.name}: the evaluation loss is {metrics['eval_loss']} "
                                    f"after step {state.step}; its outputs were not written; "
                                    f"lower --lr (it was {s.lr:g})")
    metrics.update(peak_memory(place.device, state.graph_pool_bytes),
                   device=str(place.device),
                   precision=place.precision, cuda_graphs=cuda_graphs,
                   cuda_graphs_fallback=state.graph_fallback,
                   cuda_graphs_steps=state.graphed_steps,
                   train_tokens=state.session_tokens,
                   tokens_per_second=tokens_per_second(state.session_tokens,
                                                       state.session_seconds),
                   tokens_per_second_warm=state.warm_tokens_per_second(),
                   first_step_seconds=[round(t, 4) for t in state.first_step_seconds],
                   precompile_seconds=None if state.precompile_seconds is None
                   else round(state.precompile_seconds, 3))
    counts = run.parameter_counts()
    tail = state.losses[-max(1, len(state.losses) // 10):]
    metrics.update({
        "method": s.method, "task": data.name, "model": s.model, "seed": s.seed,
        "train_examples": len(batches.train), "label_names": data.label_names,
        "max_seq_len": batches.max_seq_len, "pooling": pooling,
        # the side the head reads (`batches.padding_side`), whatever the tokenizer was saved with
        "padding_side": batches.tokenizer.padding_side,
        "holdout_examples": len(batches.holdout),
        "selected_step": state.best["step"] if state.best else None,
        "holdout_accuracy": state.best["accuracy"] if state.best else None,
        "train_truncated_share": round(batches.truncated_share, 4),
        "steps": state.step, "epochs": round(state.step / batches.steps_per_epoch, 3),
        "train_loss": sum(tail) / len(tail), "train_losses": [round(v, 6) for v in state.losses],
        "train_seconds": round(state.train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - t_eval, 1),
        "trainable_params_active": counts["active"], "trainable_params_padded": counts["padded"],
        "total_rank": run.total_rank(), "rank_pattern": run.rank_pattern(),
        "delta_w_norm": run.update_norm(),
        "method_settings": run.describe(), "settings": s.to_dict(),
        # what finetune added to the modules_to_save asked for (the head, new layers of it)
        "modules_to_save_added": [k for k in s.modules_to_save
                                  if k not in settings.modules_to_save],
        "resumed_from": str(resume) if resume else None,
    })
    metrics["total_seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(out, run, metrics)
    return metrics
