"""`IncreLoRAConfig`: every knob of the method, validated when it is built.

Field names follow peft where peft has the name (`target_modules`, `lora_alpha`, `lora_dropout`,
`modules_to_save`); the IncreLoRA names follow the authors' code (see `shared/INCRELORA.md`).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

# Name suffixes of the attention and FFN linears of the common transformers families
# (BERT/RoBERTa, DeBERTa-v2, GPT-2, Llama); used when `target_modules` is left as None.
DEFAULT_TARGET_MODULES = (
    "query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
    "query_proj", "key_proj", "value_proj",
    "c_attn", "c_proj", "c_fc",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)

# The fields that list module names (or hold one regex): normalised alike at construction, and
# compared as sets when an adapter is loaded (`persistence.load_adapter`).
MODULE_NAME_FIELDS = ("target_modules", "modules_to_save", "exclude_modules")

# The fields that decide what a saved adapter computes once loaded: which modules carry it, its
# shapes and dtypes, and its forward (the scale, and the lambda reserve slots compute with).
# `persistence.load_adapter` refuses a model injected with other values; the other fields steer
# training only (allocation, schedules, penalty, score, dropout) and may differ.
ADAPTER_FIELDS = (*MODULE_NAME_FIELDS, "r_max", "lora_alpha", "adapter_dtype", "reserve_lambda",
                  "advance_learning")

# incre_rank_num per target_rank in the authors' GLUE scripts (spec section 4).
_INCRE_RANK_NUM_BY_TARGET = {2: 1, 4: 2, 6: 3, 8: 4}


def default_incre_rank_num(target_rank: int) -> int:
    """``incre_rank_num`` when it is not given: the authors' value for ``target_rank``."""
    return _INCRE_RANK_NUM_BY_TARGET.get(target_rank, max(1, target_rank // 2))

SCORE_KINDS = ("delta_w", "triplet", "random")
ADAPTER_DTYPES = ("auto", "float32", "base")


# What IncreLoRAConfig offers for peft LoraConfig options it lacks (`_refuse_peft_options`).
_LAYER_SELECTION = ("select layers with a target_modules regex matched against the full module "
                    "name (e.g. r'.*[.]layers[.](0|1)[.].*(q_proj|v_proj)') or leave them out "
                    "with exclude_modules")
_PEFT_OPTION_ADVICE = {
    "layers_to_transform": _LAYER_SELECTION,
    "layers_pattern": _LAYER_SELECTION,
    "r": "the rank here is set by r_max (slots per module), init_r and target_rank",
    "task_type": "name the task head in modules_to_save to train it in full",
    "bias": ("make an adapted layer's bias trainable after inject_increlora "
             "(layer.base_layer.bias.requires_grad_(True)); export_peft writes it in peft's "
             "bias='lora_only' form"),
    "fan_in_fan_out": "not needed: transformers' Conv1D layers are recognised as they are",
}


def _refuse_peft_options(unknown: Sequence[str]) -> None:
    """TypeError, one line, when a keyword of ``unknown`` (those IncreLoRAConfig lacks) is a
    peft ``LoraConfig`` option, naming it and what to use instead; other keywords (or any,
    without peft installed) are left to the dataclass's own TypeError."""
    if not unknown:
        return
    try:
        from peft import LoraConfig
    except Exception:  # (not installed, or broken: the dataclass's own TypeError then)
        return
    options = {f.name for f in dataclasses.fields(LoraConfig)}
    name = next((n for n in unknown if n in options), None)
    if name is not None:
        advice = _PEFT_OPTION_ADVICE.get(name, "IncreLoRA has no equivalent")
        raise TypeError(f"IncreLoRAConfig has no {name} (a peft LoraConfig option): {advice}")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"IncreLoRAConfig.{name}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A real number (bool excluded); NaN and inf count, range checks reject them."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class IncreLoRAConfig:
    """Configuration of an IncreLoRA adapter and of its rank allocation.

    Args:
        target_modules: module-name suffixes (a name matches when it equals the suffix or ends with
            ``"." + suffix``; a list, tuple or set, kept as a list), or one regex string matched
            against the full module name. ``None`` targets the attention/FFN linears of common
            transformers families; ``"all-linear"`` (as in peft) every linear layer but the
            output layer, those inside ``modules_to_save`` and those whose parent reads their
            weight without calling them (one warning names them; a read on a branch this
            model's config rules out, e.g. Bloom's ``pretraining_tp > 1 and slow_but_exact``,
            does not count). The output layer is the one a transformers model's
            ``get_output_embeddings()`` returns: a model without one (a plain ``nn.Module``, a
            sequence classifier) has its head adapted too, as in peft; name the head in
            ``modules_to_save`` (trained in full) or ``exclude_modules`` (frozen).
        exclude_modules: modules never adapted, whatever ``target_modules`` selects (peft's
            field): module-name suffixes (a list, tuple or set, kept as a list), or one regex
            string matched against the full module name. An entry matches a target's own name,
            not its parents' (a whole block is left out with a regex, e.g.
            ``".*layer[.]0[.].*"``); one that leaves no target out, or that leaves none in, is an
            error.
        r_max: slot capacity per module; buffers are allocated with this many slots once.
        init_r: active rank every module starts with.
        target_rank: average active rank over modules at the end of allocation.
        target_total_rank: total active rank over all modules; overrides ``target_rank``.
        lora_alpha: scale numerator; the adapter output is scaled by ``lora_alpha / active_rank``.
        lora_dropout: dropout on the adapter input.
        init_warmup: no rank is added at or before this step.
        incre_interval: ranks are added every ``incre_interval`` steps after ``init_warmup``.
        top_h: at most this many modules grow per allocation round: the ``top_h`` highest
            scores, ties in module order, and no more than the remaining budget needs
            (``ceil(remaining / incre_rank_num)``; the authors' ``min(top_h, remaining)`` can
            overshoot the budget when ``incre_rank_num > 1``).
        incre_rank_num: ranks a module gains when selected (and size of its reserve); ``None``
            derives it from ``target_rank`` as the authors' scripts do (2, 4, 6, 8 -> 1, 2, 3, 4;
            for another ``target_rank``, which their table lacks, ``max(1, target_rank // 2)``:
            an extension, their code fails there). The last module of the
            last round gains only what the budget has left, and a module whose slots cannot hold
            a full reserve (``r_max``) gains what its reserve holds; a module with no reserve
            left (all ``r_max`` slots active) is not ranked.
        advance_learning: reserve components train before they are activated.
        reserve_lambda: fixed lambda of reserve components.
        beta1, beta2: smoothing of the importance score and of its uncertainty.
        orth_reg_weight: weight of the orthogonal regulariser.
        warmup_steps: learning-rate warmup of every newly added slot (restart warmup). A slot
            added or activated by the round at step t takes no step at t and its first at
            t + 1, as Adam's step 1 at ``1 / warmup_steps`` of the rate (for warmup_steps > 0).
            One step earlier than the authors' code, whose scheduler (``Multi_LambdaLR``) gives
            a group added at t a rate of 0 at t + 1 (Adam counts that step) and
            ``1 / warmup_steps`` at t + 2; so is the first reserve, which they add at step 0
            and we before it (on the base model's schedule, the same in both). A slot added
            fewer than ``warmup_steps`` steps before ``total_step`` takes the lower of its
            warmup and its decay to 0 at ``total_step``, so it trains little.
        total_step: step at which every learning rate reaches 0; ``None`` keeps it constant
            after warmup.
        modules_to_save: module-name suffixes trained in full and saved with the adapter
            (e.g. a classifier head); a list, tuple or set (kept as a list), not one string.
        score: ``"delta_w"`` (exact module score of the spec), ``"triplet"`` (AdaLoRA-style
            per-slot sensitivity of A, B and lambda) or ``"random"`` (a control: every round ranks
            the modules in an order drawn from ``seed`` and the step, with no score computed).
        exact_step_score: for ``score="delta_w"``, compute the score from the gradient of the
            whole optimizer step (all accumulated micro-batches, averaged over data-parallel
            ranks, every call of a layer called several times per forward: a shared block,
            ALBERT's layers) instead of summing per-pass and per-call scores, which is at
            least the step's and can rank shared layers otherwise. Opt-in, and costly: on every tracked step
            each target module holds a dense (out, in) float32 buffer (a float32 copy of every
            target weight) and, under torch.distributed, all-reduces it. ``None`` means False,
            with or without torch.distributed (there the per-module scores are averaged over
            ranks by one all-reduce of a (num_modules,) vector, as DDP averages gradients).
        adapter_dtype: dtype of A and B and so of their optimizer moments: ``"auto"`` (float32
            on bfloat16/float16 and quantized bases, the base dtype otherwise, as peft does),
            ``"float32"``, or ``"base"`` (the base weight's dtype). Lambda is float32 for every
            choice (float64 with float64 A and B): its gradient sums over every token.
        seed: seed of the choices the method draws itself: the controller's own generator,
            from which fresh reserve slots are drawn (saved in its state_dict, so a resume is
            exact without the global RNG and data-parallel ranks draw identical reserves), and
            ``score="random"``'s ranking.
        scale_preserving_growth: when a module grows, multiply its previously active lambdas by
            new_rank / old_rank so that its dW is unchanged at the moment of growth (the
            ``lora_alpha / active_rank`` scale otherwise shrinks it, e.g. halves it from rank 1
            to 2). The rescaled lambdas keep their Adam moments and step counts: the gradient
            reaching them carries the scale, which drops from lora_alpha / old_rank to
            lora_alpha / new_rank whether or not they are rescaled, so the optimizer sees the
            growth exactly as without the option and the option changes one thing, dW's
            continuity (rescaling the moments too, m / c and v / c^2 for c = new / old rank,
            would also undo the smaller gradient's damping of Adam's next updates). A departure
            from the authors' code.
        reserve_in_penalty: reserve slots count in the orthogonal penalty, and so do the
            reserves retired when the budget is reached (lambda 0, out of the output), which
            keep training through it with advance learning (the authors' code, which only
            zeroes their lambda). False leaves only active slots in it, so advance learning
            sees the task gradient alone (a departure from the authors' code); retired reserves
            then get no gradient at all (their A and B still take AdamW's momentum and weight
            decay, as any trainable parameter without a gradient would, which changes nothing
            the model computes).
        normalize_on_activation: rescale the A row and B column of every newly activated slot to
            unit norm (with ``advance_learning=False``: the norm-only control of advance learning,
            whose reserves otherwise reach about unit norm through the penalty).
        score_window: for ``score="delta_w"``, scores are tracked (and ipt/unc updated) only on
            the ``score_window`` optimizer steps before each allocation round, the round's own
            step included, and on every step while a round is pending; other steps run with
            tracking off and cost nothing. ``None`` derives the smallest window in which the
            EMAs' weight outside the window is under 1 %:
            ``ceil(log(0.01) / log(max(beta1, beta2)))`` (29 at 0.85). A window of
            ``incre_interval`` or more tracks every step of the allocation phase.

    A peft ``LoraConfig`` option this config lacks (``layers_to_transform``, ``use_dora``, ...)
    raises a TypeError naming it as one, and what to use instead where there is something.
    """

    target_modules: Optional[Union[List[str], str]] = None
    r_max: int = 8
    init_r: int = 1
    target_rank: int = 2
    target_total_rank: Optional[int] = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    init_warmup: int = 100
    incre_interval: int = 100
    top_h: int = 2
    incre_rank_num: Optional[int] = None
    advance_learning: bool = True
    reserve_lambda: float = 1e-5
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    warmup_steps: int = 0
    total_step: Optional[int] = None
    modules_to_save: Optional[List[str]] = None
    score: str = "delta_w"
    exact_step_score: Optional[bool] = None
    adapter_dtype: str = "auto"
    seed: int = 0
    scale_preserving_growth: bool = False
    reserve_in_penalty: bool = True
    normalize_on_activation: bool = False
    score_window: Optional[int] = None
    exclude_modules: Optional[Union[List[str], str]] = None

    def __new__(cls, *args: Any, **kwargs: Any) -> "IncreLoRAConfig":
        # (construction only: copies and pickles call __new__ without the keywords)
        _refuse_peft_options(sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)}))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        # lists of module names given as a tuple, or as a set (as peft's LoraConfig holds them)
        for name in MODULE_NAME_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                setattr(self, name, list(value))
            elif isinstance(value, (set, frozenset)):
                setattr(self, name, sorted(value))
        if self.incre_rank_num is None:
            self.incre_rank_num = default_incre_rank_num(self.target_rank)
        self.validate()

    def validate(self) -> None:
        """Check every field (done at construction; `inject_increlora` and
        `IncreLoRAController` check again, so a field changed on a constructed config is
        checked before it is used).

        Raises:
            ValueError: naming the first invalid field, its value and what is allowed.
        """
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:  # fullmatch of "" never matches a module name
                _fail("target_modules", tm, "a non-empty regex string, a list of module-name "
                      "suffixes, \"all-linear\", or None")
            try:
                re.compile(tm)
            except re.error as err:
                _fail("target_modules", tm, f"a valid regular expression ({err})")
        if tm is not None and not isinstance(tm, str):
            if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
                _fail("target_modules", tm, "a non-empty list of module-name suffixes, "
                      "one regex string, or None")
        ex = self.exclude_modules
        if isinstance(ex, str):
            try:
                re.compile(ex)
            except re.error as err:
                _fail("exclude_modules", ex, f"a valid regular expression ({err})")
        if not (ex is None or (isinstance(ex, str) and ex) or (
                isinstance(ex, list) and all(isinstance(t, str) and t for t in ex))):
            _fail("exclude_modules", ex, "None, a list of module-name suffixes, or one "
                  "non-empty regex string")
        mts = self.modules_to_save
        if mts is not None and not (isinstance(mts, list)
                                    and all(isinstance(t, str) and t for t in mts)):
            _fail("modules_to_save", self.modules_to_save, "a list of module-name suffixes")
        if not _is_int(self.target_rank):  # before incre_rank_num, derived from it
            _fail("target_rank", self.target_rank, "an integer >= 1")
        for name in ("r_max", "init_r", "incre_interval", "top_h", "incre_rank_num"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                _fail(name, value, "an integer >= 1")
        for name in ("init_warmup", "warmup_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                _fail(name, value, "an integer >= 0")
        if self.target_total_rank is None and self.target_rank < self.init_r:
            _fail("target_rank", self.target_rank, f"an integer >= init_r ({self.init_r})")
        if self.target_rank < 1:  # with target_total_rank it only derives incre_rank_num
            _fail("target_rank", self.target_rank, "an integer >= 1")
        if self.target_total_rank is not None and (
                not _is_int(self.target_total_rank) or self.target_total_rank < 1):
            _fail("target_total_rank", self.target_total_rank, "None or an integer >= 1")
        if self.total_step is not None and (
                not _is_int(self.total_step) or self.total_step <= self.warmup_steps):
            _fail("total_step", self.total_step,
                  f"None or an integer > warmup_steps ({self.warmup_steps})")
        if self.target_rank > self.r_max:
            _fail("target_rank", self.target_rank, f"use a value <= r_max ({self.r_max}), the "
                  "slot capacity of every module (or raise r_max to at least "
                  f"{self.target_rank})")
        if self.r_max < self.init_r + self.incre_rank_num:
            _fail("r_max", self.r_max, f"use a value >= init_r + incre_rank_num = "
                  f"{self.init_r} + {self.incre_rank_num} (room for the active and reserve slots)")
        if not (_is_real(self.lora_alpha) and math.isfinite(self.lora_alpha)
                and self.lora_alpha > 0):
            _fail("lora_alpha", self.lora_alpha, "a finite number > 0")
        if not (_is_real(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            _fail("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        for name in ("beta1", "beta2"):
            if not (_is_real(getattr(self, name)) and 0.0 <= getattr(self, name) < 1.0):
                _fail(name, getattr(self, name), "a number in [0, 1)")
        if not (_is_real(self.reserve_lambda) and math.isfinite(self.reserve_lambda)
                and self.reserve_lambda >= 0):
            _fail("reserve_lambda", self.reserve_lambda, "a finite number >= 0")
        if not (_is_real(self.orth_reg_weight) and math.isfinite(self.orth_reg_weight)
                and self.orth_reg_weight >= 0):
            _fail("orth_reg_weight", self.orth_reg_weight, "a finite number >= 0")
        if not isinstance(self.advance_learning, bool):
            _fail("advance_learning", self.advance_learning, "True or False")
        if self.exact_step_score is not None and not isinstance(self.exact_step_score, bool):
            _fail("exact_step_score", self.exact_step_score, "None, True or False")
        if self.score_window is not None and (not _is_int(self.score_window)
                                              or self.score_window < 1):
            _fail("score_window", self.score_window, "None or an integer >= 1")
        if self.score not in SCORE_KINDS:
            _fail("score", self.score, f"one of {SCORE_KINDS}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            _fail("adapter_dtype", self.adapter_dtype, f"one of {ADAPTER_DTYPES}")
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")
        for name in ("scale_preserving_growth", "reserve_in_penalty", "normalize_on_activation"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")

    def total_budget(self, num_modules: int) -> int:
        """Total active rank the allocation must reach for ``num_modules`` adapted modules.

        Raises ValueError when the budget is below the starting rank or above what the modules
        can hold.
        """
        total = self.target_total_rank if self.target_total_rank is not None \
            else self.target_rank * num_modules
        start = self.init_r * num_modules
        if total < start:
            _fail("target_total_rank" if self.target_total_rank is not None else "target_rank",
                  self.target_total_rank or self.target_rank,
                  f"a total rank >= init_r x modules = {start} ({num_modules} modules)")
        if total > self.r_max * num_modules:
            _fail("target_total_rank" if self.target_total_rank is not None else "target_rank",
                  self.target_total_rank or self.target_rank,
                  f"a total rank <= r_max x modules = {self.r_max * num_modules} "
                  f"({num_modules} modules of capacity {self.r_max})")
        return total

    def allocation_rounds(self, start_step: int, end_step: int) -> int:
        """Allocation rounds among optimizer steps ``start_step .. end_step - 1``: the steps
        after ``init_warmup`` that are multiples of ``incre_interval`` (spec section 4,
        `IncreLoRAController.allocation_due`)."""
        first = max(start_step, self.init_warmup + 1)
        if end_step <= first:
            return 0
        return (end_step - 1) // self.incre_interval - (first - 1) // self.incre_interval

    def reachable_total_rank(self, ranks: Sequence[int], start_step: int, end_step: int) -> int:
        """The most total rank the rounds among steps ``start_step .. end_step - 1`` can reach
        from the modules' active ``ranks``: each round grows at most ``top_h`` modules (and no
        more than there are), each once, by ``incre_rank_num`` or what is left of its capacity
        ``r_max``, and none goes past the budget (`total_budget`). Below the budget, a run of
        that length ends short of it whatever the scores.

        The bound takes the largest growths the rounds allow: per module its full growths of
        ``incre_rank_num`` then the last, partial one (a module at capacity has none), at most
        one per round; of all of them the ``rounds x min(top_h, modules)`` largest."""
        rounds = self.allocation_rounds(start_step, end_step)
        growths: List[int] = []
        for rank in ranks:
            left = max(0, self.r_max - rank)
            full, last = divmod(left, self.incre_rank_num)
            growths += ([self.incre_rank_num] * full + ([last] if last else []))[:rounds]
        growths.sort(reverse=True)
        grown = sum(growths[:rounds * min(self.top_h, len(ranks))])
        return min(self.total_budget(len(ranks)), sum(ranks) + grown)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "IncreLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"IncreLoRAConfig got unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# inspect.signature(IncreLoRAConfig) reads the class's own __new__ before its __init__: the fields
IncreLoRAConfig.__new__.__signature__ = inspect.signature(IncreLoRAConfig.__init__)
