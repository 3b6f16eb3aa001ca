"""`RunSettings`: every setting of one fine-tuning run, with the per-method defaults filled in.

A checkpoint stores the resolved settings, so ``--resume`` rebuilds exactly the same run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..config import SCORE_KINDS, default_incre_rank_num

METHODS = ("increlora", "lora", "adalora", "full")
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_TASK = "rotten_tomatoes"
DEFAULT_MAX_STEPS = 300
# `finetune --save-steps`'s default, and a resume's when its checkpoint does not record one
DEFAULT_SAVE_STEPS = 100
# Share of training (percent) by which IncreLoRA's derived top_h meets the rank budget, per
# --schedule: "default" (this library's) and "authors" (their GLUE scripts reach it at 21-42 %,
# with restart warmup = growth interval).
SCHEDULES = {"default": 50, "authors": 35}
PAD_TO = ("longest", "max_length")
# Options for small data of one's own (issue 29); the defaults keep the behaviour before them.
POOLINGS = ("cls", "mean", "auto")
CLASS_WEIGHTS = ("none", "balanced")
# --max-seq-len auto: this percentile of the training texts' token lengths
AUTO_SEQ_PERCENTILE = 95
# the largest --seed: NumPy's generator, which `seed_everything` seeds, takes seeds below 2**32
MAX_SEED = 2**32 - 1
# --select-best: share of the training rows held out to choose the step
SELECT_HOLDOUT_SHARE = 0.1
CUDA_GRAPHS = ("auto", "on", "off")
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                "output.dense"]

# Each method's best on the default task in the README's sweep (MiniLM, batch 32, 300 steps);
# --lr overrides. IncreLoRA and AdaLoRA grow dW = B diag(lambda) A from lambda = 0 and small A, B,
# far slower per step than LoRA's B A, so they need a larger rate (README, "Comparison").
DEFAULT_LR = {"increlora": 8e-3, "lora": 1e-3, "adalora": 4e-3, "full": 5e-5}
# Scale numerator per method: IncreLoRA and AdaLoRA divide by the current rank, LoRA by r.
DEFAULT_ALPHA = {"increlora": 16.0, "lora": 16.0, "adalora": 16.0, "full": 0.0}


@dataclass
class RunSettings:
    """Settings of a run; ``None`` fields are resolved by `resolve` from the method and steps.

    Budget: LoRA uses rank ``target_rank``; AdaLoRA starts at ``adalora_init_r`` and prunes to
    ``target_rank``; IncreLoRA starts at ``init_r`` and grows to an average of ``target_rank``.
    """

    method: str = "increlora"
    task: Optional[str] = DEFAULT_TASK
    model: str = DEFAULT_MODEL
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # an int, or "auto": `AUTO_SEQ_PERCENTILE` of the training texts' token lengths within the
    # model's limit, chosen again (the same) when a run resumes
    max_seq_len: Union[int, str] = 64
    batch_size: int = 32
    eval_batch_size: int = 128
    max_steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    target_modules: List[str] = field(default_factory=lambda: list(BERT_TARGETS))
    modules_to_save: List[str] = field(default_factory=lambda: ["classifier"])
    target_rank: int = 2
    init_r: int = 1
    r_max: int = 8
    lora_alpha: Optional[float] = None
    lora_dropout: float = 0.0
    orth_reg_weight: float = 0.1
    init_warmup: Optional[int] = None
    incre_interval: Optional[int] = None
    top_h: Optional[int] = None
    advance_learning: bool = True
    adalora_init_r: int = 3
    adalora_tinit: Optional[int] = None
    adalora_tfinal: Optional[int] = None
    adalora_delta_t: Optional[int] = None
    # IncreLoRA controls and options beyond the authors' method (issue 15); off by default.
    score: str = "delta_w"
    scale_preserving_growth: bool = False
    reserve_in_penalty: bool = True
    reserve_lambda: float = 1e-5
    normalize_on_activation: bool = False
    schedule: str = "default"
    # how the classifier reads the encoder: "cls" (the model class's own head, e.g. BERT's CLS
    # pooler), "mean" (mean of the token states) or "auto" (what a sentence-transformers
    # model's 1_Pooling/config.json says, else cls)
    pooling: str = "cls"
    # "balanced": the training loss weighs class c by n / (classes x n_c)
    class_weights: str = "none"
    # keep the adapter state that scores best on `SELECT_HOLDOUT_SHARE` of the training rows
    # (held out from training), evaluated every select_every steps (None: 10 % of the steps)
    select_best: bool = False
    select_every: Optional[int] = None
    # where and how to compute (see `device`); kept as given, resolved when the run starts
    device: str = "auto"
    precision: str = "auto"
    # training batches padded to their longest input or to max_seq_len (None: max_length with
    # --cuda-graphs on, else longest; filled in by `resolve`)
    pad_to: Optional[str] = None
    # CUDA graphs for the training step (see `step_runner.resolve_cuda_graphs`); kept as given
    cuda_graphs: str = "auto"
    # The data's identity, filled in by `finetune.with_data_identity`: sha256 of each data file
    # (train_file and eval_file are then absolute paths), so a resume or a reused comparison run
    # notices changed data.
    train_file_sha256: Optional[str] = None
    eval_file_sha256: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "RunSettings":
        if not isinstance(data, dict):  # (ValueError: callers name the file it came from)
            raise ValueError(f"a JSON object is needed, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_ratio * self.max_steps))


def stored_model(model: str) -> str:
    """``--model`` as a run stores it: a local folder as its absolute path (a resume from
    another working folder loads it again), a hub id or packaged name as given."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else model


def _check(cond: bool, option: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{option} {value!r} is invalid: {allowed}")


def validate(s: RunSettings) -> None:
    """Reject settings no run can use, naming the command-line option."""
    _check(s.method in METHODS, "--method", s.method, f"use one of {METHODS}")
    for option, value in (("--batch-size", s.batch_size), ("--eval-batch-size", s.eval_batch_size),
                          ("--target-rank", s.target_rank)):
        _check(isinstance(value, int) and value >= 1, option, value, "use an integer >= 1")
    _check(isinstance(s.seed, int) and 0 <= s.seed <= MAX_SEED, "--seed", s.seed,
           f"use an integer >= 0 and <= {MAX_SEED}")
    _check(s.max_seq_len == "auto" or (isinstance(s.max_seq_len, int) and s.max_seq_len >= 8),
           "--max-seq-len", s.max_seq_len, "use an integer >= 8 (tokens) or auto")
    _check(s.pooling in POOLINGS, "--pooling", s.pooling, f"use one of {POOLINGS}")
    _check(s.class_weights in CLASS_WEIGHTS, "--class-weights", s.class_weights,
           f"use one of {CLASS_WEIGHTS}")
    _check(s.select_every is None or (isinstance(s.select_every, int) and s.select_every >= 1),
           "--select-every", s.select_every, "use an integer >= 1")
    if s.select_best:
        _check(s.method != "adalora", "--select-best", True,
               "it is for increlora, lora and full; AdaLoRA fixes its rank pattern only at the "
               "end of pruning, so an earlier state cannot be restored with it")
    columns = [("--text-column", s.text_column), ("--text-pair-column", s.text_pair_column),
               ("--label-column", s.label_column)]
    given = [(option, name) for option, name in columns if name is not None]
    for option, name in given:  # an empty --text-pair-column would train without the pairs
        _check(bool(name.strip()), option, name,
               "it is empty; name a column of the data file, or leave the option out")
    for i, (option, name) in enumerate(given):
        for other, other_name in given[i + 1:]:
            _check(name != other_name, other, name,
                   f"it names the same column as {option}; give each its own column")
    for option, value in (("--max-train-samples", s.max_train_samples),
                          ("--max-eval-samples", s.max_eval_samples)):
        _check(value is None or value >= 1, option, value, "use an integer >= 1 or leave it out")
    _check(s.max_steps is None or s.max_steps >= 1, "--max-steps", s.max_steps,
           "use an integer >= 1")
    _check(s.epochs is None or (math.isfinite(s.epochs) and s.epochs > 0), "--epochs", s.epochs,
           "use a finite number > 0")
    _check(s.lr is None or (math.isfinite(s.lr) and s.lr > 0), "--lr", s.lr, "use a number > 0")
    _check(0 <= s.warmup_ratio < 1, "--warmup-ratio", s.warmup_ratio, "use a number in [0, 1)")
    _check(math.isfinite(s.weight_decay) and s.weight_decay >= 0, "--weight-decay",
           s.weight_decay, "use a finite number >= 0")
    _check(s.grad_clip > 0, "--grad-clip", s.grad_clip, "use a number > 0")
    _check(bool(s.target_modules), "--target-modules", s.target_modules,
           "name at least one module suffix")
    # the adapter options, here rather than in the method's config: that is built only after
    # the model is loaded and the texts are tokenized
    for option, value in (("--init-r", s.init_r), ("--r-max", s.r_max)):
        _check(isinstance(value, int) and value >= 1, option, value, "use an integer >= 1")
    for option, value, low in (("--top-h", s.top_h, 1), ("--incre-interval", s.incre_interval, 1),
                               ("--init-warmup", s.init_warmup, 0),
                               ("--adalora-tinit", s.adalora_tinit, 0),
                               ("--adalora-tfinal", s.adalora_tfinal, 0),
                               ("--adalora-delta-t", s.adalora_delta_t, 1)):
        _check(value is None or value >= low, option, value, f"use an integer >= {low}")
    if s.method != "full":  # the full fine-tune has no adapter scale (its resolved alpha is 0)
        _check(s.lora_alpha is None or (math.isfinite(s.lora_alpha) and s.lora_alpha > 0),
               "--lora-alpha", s.lora_alpha, "use a finite number > 0")
    _check(0 <= s.lora_dropout < 1, "--lora-dropout", s.lora_dropout,
           "use a probability in [0, 1)")
    _check(math.isfinite(s.orth_reg_weight) and s.orth_reg_weight >= 0, "--orth-reg-weight",
           s.orth_reg_weight, "use a finite number >= 0")
    _check(s.score in SCORE_KINDS, "--score", s.score, f"use one of {SCORE_KINDS}")
    _check(s.schedule in SCHEDULES, "--schedule", s.schedule, f"use one of {tuple(SCHEDULES)}")
    _check(math.isfinite(s.reserve_lambda) and s.reserve_lambda >= 0, "--reserve-lambda",
           s.reserve_lambda, "use a finite number >= 0")
    from .device import PRECISIONS, validate_device_text
    validate_device_text(s.device)
    _check(s.precision in PRECISIONS, "--precision", s.precision, f"use one of {list(PRECISIONS)}")
    _check(s.pad_to is None or s.pad_to in PAD_TO, "--pad-to", s.pad_to, f"use one of {PAD_TO}")
    _check(s.cuda_graphs in CUDA_GRAPHS, "--cuda-graphs", s.cuda_graphs,
           f"use one of {CUDA_GRAPHS}")
    if s.cuda_graphs == "on":
        _check(s.method == "increlora", "--cuda-graphs", "on",
               f"it is for --method increlora only, not {s.method}; use --cuda-graphs off")
        _check(s.pad_to != "longest", "--cuda-graphs", "on",
               "graphs need batches of one shape, so it cannot be combined with --pad-to "
               "longest; use --pad-to max_length (or leave --pad-to out)")
    if s.method == "increlora":
        _check(s.init_r <= s.target_rank <= s.r_max, "--target-rank", s.target_rank,
               f"use a value from --init-r ({s.init_r}) to --r-max ({s.r_max}), the slot "
               "capacity of every module (or change those)")
        step = default_incre_rank_num(s.target_rank)
        _check(s.r_max >= s.init_r + step, "--r-max", s.r_max,
               f"use at least --init-r + the rank a growth round adds = {s.init_r} + {step} "
               "(room for the active and reserve slots)")
    if s.method == "adalora":
        _check(s.adalora_init_r > s.target_rank, "--adalora-init-r", s.adalora_init_r,
               f"AdaLoRA prunes from it to --target-rank {s.target_rank}, so it must be larger")


def resolve(s: RunSettings, train_size: int, graphed: Optional[bool] = None) -> RunSettings:
    """A copy with every ``None`` default filled in for the method and the number of steps.

    ``graphed`` says whether the run's steps are replayed from CUDA graphs, as
    `step_runner.resolve_cuda_graphs` decided it for the run's device (``auto`` included); the
    default ``--pad-to`` follows it: ``max_length`` (one batch shape) when graphed, ``longest``
    otherwise. ``None``, for callers that know no device, decides from the option's text
    (only ``on`` graphs)."""
    validate(s)
    r = dataclasses.replace(s)
    steps_per_epoch = max(1, train_size // r.batch_size)
    if r.max_steps is None:
        r.max_steps = math.ceil(r.epochs * steps_per_epoch) if r.epochs else DEFAULT_MAX_STEPS
    r.lr = DEFAULT_LR[r.method] if r.lr is None else r.lr
    if r.select_best and r.select_every is None:
        r.select_every = max(1, r.max_steps // 10)
    r.lora_alpha = DEFAULT_ALPHA[r.method] if r.lora_alpha is None else r.lora_alpha
    if r.pad_to is None:
        graphed = r.cuda_graphs == "on" if graphed is None else graphed
        r.pad_to = "max_length" if graphed else "longest"
    # IncreLoRA: a round every 5% of training after a first 5%; enough modules per round that
    # the budget is reached by mid-training, leaving the rest to train the final ranks.
    if r.incre_interval is None:
        r.incre_interval = max(1, r.max_steps // 20)
    if r.init_warmup is None:
        r.init_warmup = r.incre_interval
    if r.schedule == "authors":  # their scripts: warmup_steps = init_warmup = incre_interval
        r.warmup_ratio = min(r.incre_interval, r.max_steps - 1) / r.max_steps
    # AdaLoRA (its paper's shape): 10% dense warmup, prune until 70%, then fine-tune the pattern.
    if r.adalora_tinit is None:
        r.adalora_tinit = max(1, r.max_steps // 10)
    if r.adalora_tfinal is None:
        r.adalora_tfinal = max(1, (3 * r.max_steps) // 10)
    if r.adalora_delta_t is None:
        r.adalora_delta_t = max(1, r.max_steps // 100)
    if r.warmup_steps >= r.max_steps:  # every method: the warmup would never end
        raise ValueError(f"--warmup-ratio {r.warmup_ratio:g} is invalid with {r.max_steps} "
                         f"steps: its warmup ({r.warmup_steps} steps) leaves no step after it; "
                         "lower it or train longer")
    if r.method == "adalora" and r.adalora_tinit >= r.max_steps - r.adalora_tfinal:
        raise ValueError(f"--max-steps {r.max_steps} leaves AdaLoRA no pruning phase between "
                         f"tinit={r.adalora_tinit} and total - tfinal="
                         f"{r.max_steps - r.adalora_tfinal}; use more steps")
    return r


def default_top_h(s: RunSettings, num_modules: int, incre_rank_num: int) -> int:
    """Modules grown per IncreLoRA round so that the budget is met by mid-training (by 35 % of
    it with ``schedule="authors"``)."""
    if s.top_h is not None:
        return s.top_h
    needed = max(0, (s.target_rank - s.init_r) * num_modules)
    budget_step = s.max_steps * SCHEDULES[s.schedule] // 100
    rounds = max(1, (budget_step - s.init_warmup) // s.incre_interval)
    return max(1, math.ceil(needed / (rounds * incre_rank_num)))
