"""`IncreLoRALinear`: a frozen linear plus an SVD-shaped adapter on fixed-shape slot buffers.

Every module owns ``r_max`` slots allocated once: ``lora_A`` (r_max, in), ``lora_B`` (out, r_max),
``lora_lambda`` (r_max,). A slot is inactive, reserve or active (`SlotState`); the slots that
compute are always the leading ones, active first, then reserve. Once the budget is reached the
reserves are retired (`retire_reserve`): inactive, right after the active slots, no longer
computing but still in the orthogonal penalty and trained (`retired_mask`). Growth flips slot
states and never changes a shape, so optimizers, DDP and compiled graphs stay valid.

The layer computes; when and where to grow is decided by `IncreLoRAController`, which calls
`activate_reserve`, `add_reserve` and `retire_reserve` here.

Every change of the slot states or stamps bumps the layer's host-side ``slot_version`` (see
`IncreLoRALinear.mark_slots_changed`), so consumers (the optimizer's restart detection, cached
masks) notice news without reading a tensor on the host.
"""
from __future__ import annotations

import contextlib
import enum
import inspect
import math
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from .config import ADAPTER_DTYPES, _is_int, _is_real
from .functional import adapted_linear
from .kernels.reference import effective_lambda as _effective_lambda
from .kernels.reference import lambda_dtype

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers is a dependency, but the layer works on nn.Linear without it
    Conv1D = None

INIT_STD = 0.02


class SlotState(enum.IntEnum):
    INACTIVE = 0
    RESERVE = 1
    ACTIVE = 2


def is_quantized_base(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (nn.Linear subclasses whose ``weight``
    holds quantized data): only ``module(x)`` computes with it."""
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def is_supported_base(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes 4-bit and 8-bit linears included), an nn.Linear subclass whose
    own forward is the linear map (`own_forward_problem`: Falcon's FalconLinear), or
    transformers Conv1D. A subclass whose forward is something else (a router returning a
    tuple, a scaled output) could not take an adapter added onto its output: not supported."""
    if isinstance(module, nn.Linear):
        return (type(module).forward is nn.Linear.forward or is_quantized_base(module)
                or own_forward_problem(module) is None)
    return Conv1D is not None and isinstance(module, Conv1D)


# The verdicts of `own_forward_problem`, by module: (weight dtype and device probed, verdict).
_PROBED: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Optional[str]]]" = \
    weakref.WeakKeyDictionary()


def own_forward_problem(module: nn.Linear) -> Optional[str]:
    """Why no adapter can be added onto the output of ``module``, an nn.Linear subclass with a
    forward of its own, or None when that forward is the linear map: it takes the input alone
    and returns one tensor equal to ``F.linear(x, weight, bias)``, computed from the weight
    and bias the module holds when called (so an adapter merged into the weight counts).

    Decided by calling the class's forward (hooks not run) without gradients on a small random
    input, with the module's own weight and then with a random weight and bias swapped in for
    the call (transient memory: one more weight and a copy of its buffers), from a generator
    of its own; the buffers the calls update (a QAT linear's fake-quant observer) and the
    global random state they draw from (CPU, and CUDA for a CUDA weight) are put back after
    them (`_state_kept`). Once per module and weight dtype and device, at injection.
    """
    forward = type(module).forward
    inputs = list(inspect.signature(forward).parameters.values())[1:]
    if len(inputs) != 1 or inputs[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return ("its forward takes arguments besides the input "
                f"({', '.join(str(p) for p in inputs)})")
    weight, bias = module.weight, module.bias
    if weight.is_meta or not weight.is_floating_point():
        return (f"its weight ({'on the meta device' if weight.is_meta else weight.dtype}) "
                "leaves its forward unchecked")
    key = (weight.dtype, weight.device)
    known = _PROBED.get(module)
    if known is None or known[0] != key:
        known = _PROBED[module] = (key, _probe_own_forward(module, forward, weight, bias))
    return known[1]


@torch.no_grad()
def _probe_own_forward(module: nn.Linear, forward: Callable, weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> Optional[str]:
    """`own_forward_problem`'s probe calls."""
    # on the weight's device where torch has a generator there, else drawn on the CPU and moved
    where = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    generator = torch.Generator(where).manual_seed(0)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=where,
                           dtype=weight.dtype).to(weight.device)

    x = draw(2, 3, weight.shape[1])
    with _state_kept(module, weight.device):
        return _probe_calls(module, forward, weight, bias, x, draw)


@contextlib.contextmanager
def _state_kept(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Runs the probe's calls of ``module``'s forward and puts back after them the buffers of
    ``module`` and its submodules (the same tensors, holding their values again) and the global
    random state of the CPU and of ``device`` when it is a CUDA device."""
    held = [(m, dict(m._buffers), {n: b.detach().clone() for n, b in m._buffers.items()
                                   if b is not None}) for m in module.modules()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        for m, buffers, values in held:
            m._buffers.clear()
            m._buffers.update(buffers)
            for name, value in values.items():
                buffers[name].data = value


def _probe_calls(module: nn.Linear, forward: Callable, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], x: torch.Tensor,
                 draw: Callable[..., torch.Tensor]) -> Optional[str]:
    """`_probe_own_forward`'s two calls of ``forward``, on ``x``."""
    try:
        out = forward(module, x)
    except Exception as error:  # any failure: not the linear map
        return f"its forward raised {type(error).__name__} on a (2, 3, in_features) input"
    if not isinstance(out, torch.Tensor):
        return f"its forward returns a {type(out).__name__}, not one tensor"
    differs = _differs(out, torch.nn.functional.linear(x, weight, bias))
    if differs:
        return f"its forward is not F.linear(x, weight, bias): {differs}"
    own = module._parameters
    if "weight" not in own or (bias is not None and "bias" not in own):
        return None  # parametrized: never merged (`IncreLoRALinear.has_derived_weight`)
    swapped = {"weight": nn.Parameter(draw(*weight.shape).mul_(weight.shape[1] ** -0.5),
                                      requires_grad=False)}
    if bias is not None:
        swapped["bias"] = nn.Parameter(draw(*bias.shape).to(bias.dtype), requires_grad=False)
    held = {name: own[name] for name in swapped}
    try:
        own.update(swapped)
        out = forward(module, x)
    except Exception:  # as above
        out = None
    finally:
        own.update(held)
    if not isinstance(out, torch.Tensor) or _differs(out, torch.nn.functional.linear(
            x, swapped["weight"], swapped.get("bias"))):
        return ("its forward does not compute with the weight and bias it holds when called "
                "(e.g. with a copy made before), so a merged adapter would be lost")
    return None


def _differs(out: torch.Tensor, expected: torch.Tensor) -> Optional[str]:
    """How ``out`` differs from ``expected`` beyond rounding (a few units of the dtype's
    epsilon, at least 1e-3, of the largest expected value), or None."""
    if out.shape != expected.shape or out.dtype != expected.dtype:
        return (f"it returns {tuple(out.shape)} {out.dtype} where F.linear returns "
                f"{tuple(expected.shape)} {expected.dtype}")
    error = float((out.float() - expected.float()).abs().max())
    scale = float(expected.float().abs().max())
    tolerance = max(4 * torch.finfo(expected.dtype).eps, 1e-3) * scale
    return None if error <= tolerance else f"off by up to {error:.3g} of {scale:.3g}"


# The forwards that compute exactly ``x W^T + b`` (nn.Linear) or ``x W + b`` (Conv1D) from the
# module's weight and bias: with one of them the adapted op may run that GEMM itself.
_PLAIN_FORWARDS = (nn.Linear.forward,) + ((Conv1D.forward,) if Conv1D is not None else ())


def _plain_base_operands(base: nn.Module, args: tuple, kwargs: dict
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(weight, bias) when the adapted op may compute ``base``'s output itself from them, else
    (None, None): the base then runs as a module (arguments beyond x, hooks or a replaced
    ``forward``, as accelerate's, a quantized or trainable base)."""
    if args or kwargs or type(base).forward not in _PLAIN_FORWARDS or (
            base._forward_pre_hooks or base._forward_hooks or base._backward_pre_hooks
            or base._backward_hooks or "forward" in base.__dict__):
        return None, None
    base_params = base._parameters
    weight, bias = base_params.get("weight"), base_params.get("bias")
    if weight is None or weight.requires_grad or (bias is not None and bias.requires_grad):
        return None, None
    return weight, bias


def class_name(kind: type) -> str:
    """``kind``'s name and the module it comes from, for an error message: a class of another
    library may share nn.Linear's name (torch.ao's quantized ``Linear``)."""
    return f"{kind.__name__} (from {kind.__module__})"


def adapter_dtype_for(weight: torch.Tensor, choice: str = "auto") -> torch.dtype:
    """The dtype of the adapter tensors on a base weight: ``"auto"`` float32 on 16-bit or
    non-float (quantized) bases and the base dtype otherwise, as peft does; ``"float32"``
    always float32; ``"base"`` the base weight's dtype."""
    if choice not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype={choice!r} is invalid: one of {ADAPTER_DTYPES}")
    if not weight.is_floating_point() or choice == "float32":
        return torch.float32
    if choice == "base":
        return weight.dtype
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _names_by_id(named: Iterable[Tuple[str, object]]) -> Dict[int, List[str]]:
    """Every name of each object (a module or parameter registered under several names)."""
    names: Dict[int, List[str]] = {}
    for name, obj in named:
        names.setdefault(id(obj), []).append(name)
    return names


def _other_names_of_base_weight(layer: "IncreLoRALinear", parameters: Dict[int, List[str]],
                                modules: Dict[int, List[str]]) -> List[str]:
    """The names, in a model with ``parameters`` and ``modules`` (`_names_by_id` of its
    ``named_parameters`` / ``named_modules`` without duplicate removal), under which the base
    weight of ``layer`` is registered other than the layer's own: the parameters tied to it."""
    own = {f"{alias}.base_layer.weight" if alias else "base_layer.weight"
           for alias in modules.get(id(layer), [])}
    return [n for n in parameters.get(id(layer.base_layer.weight), []) if n not in own]


_IN_PLACE = {"merge": "merging", "unmerge": "unmerging"}

# The frozen parameters each live `IncreLoRAAveragedModel` (made with ``share_frozen=True``)
# shares with its source: (a weak reference to the source, the ids of those parameters).
SHARED_FROZEN: "weakref.WeakKeyDictionary[nn.Module, Tuple[weakref.ReferenceType, frozenset]]" = \
    weakref.WeakKeyDictionary()


def shared_holders(weight: torch.Tensor) -> List[nn.Module]:
    """The live averaged copies and live sources registered in `SHARED_FROZEN` as sharing
    ``weight`` that hold it now (two copies of one model share it with each other too, with
    their source merged or gone): writing into it changes each of them."""
    holders: Dict[int, nn.Module] = {}
    for averaged, (source_ref, ids) in list(SHARED_FROZEN.items()):
        if id(weight) in ids:
            holders.update((id(m), m) for m in (averaged, source_ref()) if m is not None)
    return [m for m in holders.values() if any(p is weight for p in m.parameters())]


def derived_weight_message(names: List[str]) -> str:
    """The one-line refusal to merge the layers ``names``, whose base weights are computed from
    other tensors on every forward (`IncreLoRALinear.has_derived_weight`)."""
    return (f"cannot merge IncreLoRA layers {names[:3]}: their base weight is computed from "
            "other tensors on every forward (a parametrization, weight_norm, spectral_norm or "
            "pruning), so an adapter added to it would be lost; remove that from the base "
            "first (e.g. torch.nn.utils.parametrize.remove_parametrizations(layer.base_layer, "
            "'weight')), or keep the adapter unmerged, or export it with export_peft")


def _check_arguments(r_max: object, init_r: object, reserve_rank: object, lora_alpha: object,
                     lora_dropout: object, reserve_lambda: object,
                     advance_learning: object) -> None:
    """One-line ValueError naming the first argument of `IncreLoRALinear` out of its range (the
    checks `IncreLoRAConfig` makes, for a layer built by hand)."""
    def fail(name: str, value: object, allowed: str) -> None:
        raise ValueError(f"IncreLoRALinear: {name}={value!r} is invalid: {allowed}")

    for name, value, low in (("r_max", r_max, 1), ("init_r", init_r, 1),
                             ("reserve_rank", reserve_rank, 0)):
        if not _is_int(value) or value < low:
            fail(name, value, f"an integer >= {low}")
    if not (_is_real(lora_alpha) and math.isfinite(lora_alpha) and lora_alpha > 0):
        fail("lora_alpha", lora_alpha, "a finite number > 0")
    if not (_is_real(lora_dropout) and 0.0 <= lora_dropout < 1.0):
        fail("lora_dropout", lora_dropout, "a probability in [0, 1)")
    if not (_is_real(reserve_lambda) and math.isfinite(reserve_lambda) and reserve_lambda >= 0):
        fail("reserve_lambda", reserve_lambda, "a finite number >= 0")
    if not isinstance(advance_learning, bool):  # bool("no") is True
        fail("advance_learning", advance_learning, "True or False")


class IncreLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or transformers ``Conv1D`` with an IncreLoRA adapter.

    ``y = base(x) + dropout(x) @ A.T @ diag(lam_eff) @ B.T * lora_alpha / active_rank`` where
    ``lam_eff`` is lambda on active slots, the fixed reserve lambda on reserve slots and 0 on
    inactive ones.

    Args:
        base_layer: the layer to adapt; its parameters are frozen.
        r_max: slot capacity.
        init_r: number of slots active at the start.
        reserve_rank: number of reserve slots at the start (``incre_rank_num``).
        lora_alpha: scale numerator.
        lora_dropout: dropout probability on the adapter input.
        reserve_lambda: lambda of reserve slots.
        advance_learning: reserve slots train A and B before activation (and, once retired at
            the budget, through the orthogonal penalty); when False their lambda is 0 and they
            receive no gradient.
        adapter_dtype: dtype of A and B (and so of their optimizer moments):
            `adapter_dtype_for` of the base weight; ``"auto"`` keeps them float32 on bf16 and
            fp16 bases. Lambda is float32 whatever this says (float64 with float64 A and B,
            `reference.lambda_dtype`): its gradient sums over every token and overflows fp16.
    """

    def __init__(self, base_layer: nn.Module, r_max: int = 8, init_r: int = 1,
                 reserve_rank: int = 1, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 reserve_lambda: float = 1e-5, advance_learning: bool = True,
                 adapter_dtype: str = "auto") -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            why = (f": {own_forward_problem(base_layer)}" if isinstance(base_layer, nn.Linear)
                   else "")
            raise TypeError(f"IncreLoRALinear wraps nn.Linear (a subclass whose forward is "
                            "F.linear(x, weight, bias) included) or transformers Conv1D, got "
                            f"{class_name(type(base_layer))}{why}")
        _check_arguments(r_max=r_max, init_r=init_r, reserve_rank=reserve_rank,
                         lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         reserve_lambda=reserve_lambda, advance_learning=advance_learning)
        if init_r + reserve_rank > r_max:  # (`_check_arguments`: init_r >= 1, reserve_rank >= 0)
            raise ValueError(f"need 1 <= init_r and init_r + reserve_rank <= r_max, got "
                             f"init_r={init_r}, reserve_rank={reserve_rank}, r_max={r_max}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        if self.is_conv1d:
            self.in_features, self.out_features = weight.shape
        else:  # a quantized weight is packed: only the layer knows its feature sizes
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        self.r_max = r_max
        self.lora_alpha = float(lora_alpha)
        self.reserve_lambda = float(reserve_lambda)
        self.advance_learning = advance_learning
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        factory = dict(device=weight.device, dtype=adapter_dtype_for(weight, adapter_dtype))
        self.lora_A = nn.Parameter(torch.empty(r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r_max, **factory))
        self.lora_lambda = nn.Parameter(torch.zeros(r_max, device=weight.device,
                                                    dtype=lambda_dtype(factory["dtype"])))
        made_on = self.lora_A.device
        if made_on != weight.device:
            raise ValueError(
                f"IncreLoRALinear: its adapter parameters were created on {made_on}, not on its "
                f"base weight's {weight.device}: a context that moves new parameters elsewhere "
                "is active (accelerate's init_empty_weights moves them to meta); build the "
                "layer or call inject_increlora outside it")
        idx = dict(device=weight.device)
        self.register_buffer("slot_state", torch.zeros(r_max, dtype=torch.int8, **idx))
        self.register_buffer("slot_alloc_step", torch.full((r_max,), -1, dtype=torch.long, **idx))
        self.register_buffer("slot_active_step", torch.full((r_max,), -1, dtype=torch.long, **idx))
        # Exact module score of the backward passes since the controller last read it.
        self.register_buffer("score_sum", torch.zeros((), dtype=torch.float32, **idx),
                             persistent=False)
        # score_enabled: accumulate the module score during backward. With exact_step_score the
        # layer keeps the dense gradient G of the whole optimizer step in `score_grad` instead.
        self.score_enabled = False
        self.exact_step_score = False
        self.score_grad: Optional[torch.Tensor] = None
        self.merged = False
        # (B * lambda, A) as `merge` added them, which `unmerge` subtracts: the adapter may
        # change while merged (weight decay, the penalty), and the base must come back exact
        self._merged_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.adapter_enabled = True
        self.slot_version = 0
        # (step, slot_version) of the last slot stamp `add_reserve` or `activate_reserve` made
        # (None after loading a state dict): the optimizer checks its step count against it.
        self.last_stamp: Optional[Tuple[int, int]] = None
        # The latest step any slot is stamped at (`slot_alloc_step`, `slot_active_step`), known
        # on the host; also after loading a state dict (`note_loaded_stamps`). The optimizer
        # names stamps beyond its own step count: an earlier run's, whose schedules begin later.
        self.latest_stamp: Optional[int] = 0
        # Set by `inject_increlora` (`_attach_model`): a weak reference to the model, and the
        # layer's name and the parameters tied to its base weight there at injection.
        self._model_ref: Optional[weakref.ReferenceType] = None
        self._name_at_injection: Optional[str] = None
        self._tied_at_injection: Tuple[str, ...] = ()
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=INIT_STD)
            nn.init.normal_(self.lora_B, std=INIT_STD)
            self.slot_state[:init_r] = SlotState.ACTIVE
            self.slot_alloc_step[:init_r] = 0
            self.slot_active_step[:init_r] = 0
        self.add_reserve(reserve_rank, step=0)
        # the mode of the layer replaced: a model in eval mode (as from_pretrained returns it)
        # must not get adapters whose dropout runs until its next eval()
        self.train(base_layer.training)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.bfloat16()`` and the like convert A and B as asked, and
        lambda back to `reference.lambda_dtype` of A's dtype (never 16-bit), with its gradient;
        the layer's parameters stay the same objects. The score accumulator ``score_sum`` stays
        float32 (or float64) likewise: the kernels add into such a score only, and a 16-bit sum
        would lose the small per-pass scores. The dense score gradient of ``exact_step_score``
        (``score_grad``, float32) moves with the layer's device. Lambda, its gradient and the
        score are converted from their values before ``fn``, not back from a 16-bit result of
        it: that would round them to 16-bit resolution (and a lambda gradient past float16's
        range to inf)."""
        lam = self._parameters["lora_lambda"]
        old_lam = lam.detach()  # aliases of the values before fn: fn may replace them in place
        old_grad = lam.grad.detach() if lam.grad is not None else None
        old_score = self._buffers["score_sum"]
        result = super()._apply(fn, recurse)
        lam = self._parameters["lora_lambda"]
        want = lambda_dtype(self._parameters["lora_A"].dtype)
        if lam.dtype != want:
            lam.data = old_lam.to(device=lam.device, dtype=want)
            if lam.grad is not None:
                source = old_grad if old_grad is not None else lam.grad
                lam.grad = source.to(device=lam.grad.device, dtype=want)
        score = self._buffers["score_sum"]
        if score.dtype not in (torch.float32, torch.float64):
            source = old_score if old_score.dtype in (torch.float32, torch.float64) else score
            self._buffers["score_sum"] = source.to(device=score.device, dtype=torch.float32)
        if self.score_grad is not None:  # (a plain attribute: moved here, kept float32)
            self.score_grad = self.score_grad.to(self._parameters["lora_A"].device)
        return result

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy`` drop the weak reference to the model (a weakref does
        not pickle, and a copy's model is another one); the record made at injection stays."""
        state = super().__getstate__()
        state["_model_ref"] = None
        return state

    # ------------------------------------------------------------------ drop-in attributes
    def __setattr__(self, name: str, value: object) -> None:
        """``layer.weight = p`` and ``layer.bias = p`` set the base layer's, which the drop-in
        attributes `weight` and `bias` read: transformers' ``tie_weights`` ties an adapted
        ``lm_head`` to the input embedding so (``nn.Module`` alone refuses the assignment:
        "attribute 'weight' already exists"). A tensor of another shape is refused: the
        adapter's A and B keep theirs.

        A base layer put in place of the one wrapped at construction (transformers'
        ``model.dequantize()`` sets a new nn.Linear, its weight requiring grad, under every
        adapter) is frozen like that one: its weight would otherwise count as trained in full,
        and `save_adapter` would bundle it into the adapter."""
        if name == "base_layer" and isinstance(value, nn.Module) and \
                self.__dict__.get("_modules", {}).get("base_layer") not in (None, value):
            for p in value.parameters():
                p.requires_grad_(False)
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            old = getattr(self.base_layer, name)
            if isinstance(value, torch.Tensor) and old is not None and value.shape != old.shape:
                raise ValueError(
                    f"IncreLoRALinear.{name}: a {tuple(value.shape)} tensor cannot replace the "
                    f"base layer's {tuple(old.shape)} {name} under an adapter of that shape; "
                    "change the model's shapes (e.g. its vocabulary) before inject_increlora")
            setattr(self.base_layer, name, value)
            return
        super().__setattr__(name, value)

    @property
    def is_quantized(self) -> bool:
        """Whether the base layer is now a bitsandbytes 4-bit or 8-bit linear
        (`is_quantized_base`). Read from the base each time, not recorded at construction: a
        base swapped afterwards (transformers' ``model.dequantize()`` puts a full-precision
        nn.Linear under every adapter) is what counts for merging and the base fingerprint."""
        return is_quantized_base(self._modules["base_layer"])

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight itself (not a copy), for code that reads the attributes of
        the layer this one replaced (its dtype, device, shape). It does not include the
        adapter: code that computes with it directly bypasses the adapter."""
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The base layer's bias itself (None when it has none)."""
        return self.base_layer.bias

    # ------------------------------------------------------------------ slot bookkeeping
    @property
    def active_mask(self) -> torch.Tensor:
        # int(): torch.compile folds ``tensor == IntEnum`` to a Python bool (torch 2.13).
        return self.slot_state == int(SlotState.ACTIVE)

    @property
    def reserve_mask(self) -> torch.Tensor:
        return self.slot_state == int(SlotState.RESERVE)

    @property
    def retired_mask(self) -> torch.Tensor:
        """Former reserve slots retired when the budget was reached (`retire_reserve`): they no
        longer compute, yet their A rows and B columns still count in the orthogonal penalty
        and train as a reserve's did, as in the authors' code."""
        return (self.slot_state == int(SlotState.INACTIVE)) & (self.slot_alloc_step >= 0)

    @property
    def active_rank(self) -> int:
        return int(self.active_mask.sum())

    @property
    def reserve_rank(self) -> int:
        return int(self.reserve_mask.sum())

    @property
    def used_rank(self) -> int:
        """Active plus reserve slots: the leading slots the output's computation has to visit
        (and an inference adapter saves). Retired slots (`retired_mask`) are not among them:
        the penalty and the optimizer find them by mask."""
        return int((self.slot_state != SlotState.INACTIVE).sum())

    def trainable_slot_masks(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slots whose A row and B column train, slots whose lambda trains). With advance
        learning, reserve and retired slots train their A and B too (retired ones through the
        orthogonal penalty alone: they no longer compute)."""
        active = self.active_mask
        ab = active | self.reserve_mask | self.retired_mask if self.advance_learning else active
        return ab, active

    def reserve_value(self) -> float:
        """The fixed lambda every reserve slot computes with (0 without advance learning)."""
        return self.reserve_lambda if self.advance_learning else 0.0

    def restart_schedules(self) -> None:
        """Stamp every slot in use (active, reserve or retired) at step 0, keeping its state:
        for a new run over a model an earlier run grew, whose optimizer step count starts at 0
        again. The per-slot schedules start at a slot's stamp, so a slot grown at step N would
        otherwise train at a rate of 0 until the new run reaches N (`load_adapter` stamps
        the slots it loads the same way)."""
        with torch.no_grad():
            for stamps in (self.slot_alloc_step, self.slot_active_step):
                stamps.copy_(torch.where(stamps >= 0, 0, -1))
        self.mark_slots_changed()
        self.last_stamp = None  # the earlier run's step: a new optimizer would warn about it
        self.latest_stamp = 0

    def mark_slots_changed(self) -> None:
        """Bump ``slot_version``: call after changing ``slot_state``, ``slot_alloc_step`` or
        ``slot_active_step`` in place (this layer's own methods and loading a state dict do)."""
        self.slot_version += 1

    def note_loaded_stamps(self) -> None:
        """After the slot buffers were loaded (a state dict, an adapter): `mark_slots_changed`,
        no stamp of this run (`last_stamp`), and `latest_stamp` read from the loaded stamps (one
        host read; unknown, None, on the meta device)."""
        self.mark_slots_changed()
        self.last_stamp = None
        stamps = (self.slot_alloc_step, self.slot_active_step)
        self.latest_stamp = None if any(t.is_meta for t in stamps) else \
            max(int(t.max()) for t in stamps)

    def _note_stamp(self, step: int) -> None:
        """After `add_reserve` or `activate_reserve` stamped slots at ``step``."""
        self.mark_slots_changed()
        self.last_stamp = (int(step), self.slot_version)
        latest = self.__dict__.get("latest_stamp")  # (None: unknown, or an older pickle)
        self.latest_stamp = int(step) if latest is None else max(latest, int(step))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint of the model before injection names the base's entries as the replaced
        # layer's (``fc.weight``; a quantized base writes more, such as 8-bit's ``SCB``): they
        # load into the base layer (``fc.base_layer.weight``) instead of being dropped as
        # unexpected keys (silently under strict=False).
        names = {key.split(".", 1)[0] for key in self.base_layer.state_dict(keep_vars=True)}
        inner = f"{prefix}base_layer."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            name = key[len(prefix):]
            if name.split(".", 1)[0] in names and inner + name not in state_dict:
                state_dict[inner + name] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.note_loaded_stamps()

    @torch.no_grad()
    def activate_reserve(self, n: int, step: int) -> int:
        """Turn the first ``n`` reserve slots active; their trained A and B are kept and their
        lambda starts from the reserve value they computed with."""
        idx = torch.nonzero(self.reserve_mask).flatten()[:n]
        self.lora_lambda[idx] = self.reserve_value()
        self.slot_state[idx] = SlotState.ACTIVE
        self.slot_active_step[idx] = step
        self._note_stamp(step)
        return int(idx.numel())

    @torch.no_grad()
    def condition_growth(self, old_rank: int, preserve_scale: bool = False,
                         unit_norm: bool = False) -> None:
        """Growth options, applied right after `activate_reserve` took the module from
        ``old_rank`` active slots (the leading ones) to `active_rank`.

        ``preserve_scale`` multiplies the previously active lambdas by active_rank / old_rank,
        so that their part of dW (lambda x lora_alpha / active_rank) is what it was before the
        growth; ``unit_norm`` rescales the A rows and B columns of the newly activated slots to
        unit norm."""
        new_rank = self.active_rank
        if preserve_scale and new_rank > old_rank > 0:
            self.lora_lambda[:old_rank] *= new_rank / old_rank
        if unit_norm and new_rank > old_rank:
            grown = slice(old_rank, new_rank)
            self.lora_A[grown] /= self.lora_A[grown].norm(dim=1, keepdim=True).clamp(min=1e-12)
            self.lora_B[:, grown] /= self.lora_B[:, grown].norm(dim=0, keepdim=True).clamp(
                min=1e-12)

    @torch.no_grad()
    def add_reserve(self, n: int, step: int, generator: Optional[torch.Generator] = None) -> int:
        """Append up to ``n`` fresh reserve slots after the used ones; returns how many fit.

        Their A rows and B columns are drawn from ``generator`` (on its device, then moved) when
        given, from the global RNG otherwise."""
        start = self.used_rank
        idx = torch.arange(start, min(start + n, self.r_max), device=self.slot_state.device)
        if generator is None:
            fresh_a = torch.randn_like(self.lora_A[idx])
            fresh_b = torch.randn_like(self.lora_B[:, idx])
        else:
            draw = dict(generator=generator, device=generator.device, dtype=torch.float32)
            fresh_a = torch.randn((idx.numel(), self.in_features), **draw).to(self.lora_A)
            fresh_b = torch.randn((self.out_features, idx.numel()), **draw).to(self.lora_B)
        self.lora_A[idx] = fresh_a * INIT_STD
        self.lora_B[:, idx] = fresh_b * INIT_STD
        self.lora_lambda[idx] = self.reserve_value()
        self.slot_state[idx] = SlotState.RESERVE
        self.slot_alloc_step[idx] = step
        self.slot_active_step[idx] = -1
        self._note_stamp(step)
        return int(idx.numel())

    @torch.no_grad()
    def retire_reserve(self) -> None:
        """End of allocation (spec section 2): reserve slots stop affecting the output (lambda 0,
        no longer computed) and can no longer be activated. As in the authors' code, which only
        zeroes their lambda, their A rows and B columns stay in the orthogonal penalty and keep
        training (`retired_mask`).

        ``slot_alloc_step`` keeps its value, so a retired slot stays distinguishable from one that
        was never used (-1)."""
        idx = torch.nonzero(self.reserve_mask).flatten()
        self.lora_lambda[idx] = 0.0
        self.slot_state[idx] = SlotState.INACTIVE
        self.mark_slots_changed()

    # ------------------------------------------------------------------ computation
    def scale(self) -> torch.Tensor:
        return self.lora_alpha / self.active_mask.sum().clamp(min=1).to(self.lora_lambda.dtype)

    def effective_lambda(self) -> torch.Tensor:
        """lambda with the slot mask and the scale applied; only active entries carry gradient.

        Reserve slots use the fixed `reserve_value`, not what ``lora_lambda`` stores there, so
        an optimizer that touches those entries (weight decay) cannot change their effect.
        In lambda's dtype (float32, or float64 with float64 adapters).
        """
        return _effective_lambda(self.lora_lambda, self.slot_state, self.lora_alpha,
                                 self.reserve_value())

    def delta_weight(self) -> torch.Tensor:
        """The adapter as a dense (out, in) matrix, reserve slots included, without gradient,
        computed and returned in lambda's dtype (float32 also for 16-bit A and B; callers cast,
        as `merge` does to the base weight's dtype). Slots whose effective lambda is 0 are left
        out by value, as the kernels do: NaN or inf there never reaches the sum."""
        b, a = self._delta_factors()
        return b @ a

    def _delta_factors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B * effective lambda, A), new tensors in lambda's dtype whose product is
        `delta_weight`."""
        with torch.no_grad():
            lam = self.effective_lambda()
            live = lam != 0
            b = torch.where(live, self.lora_B.to(lam.dtype) * lam, 0.0)
            return b, torch.where(live[:, None], self.lora_A.to(lam.dtype), 0.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Parameters, buffers and submodules read from their dicts: nn.Module.__getattr__
        # costs host time on every call of every adapted layer.
        params, buffers = self._parameters, self._buffers
        base = self._modules["base_layer"]
        if self.merged or not self.adapter_enabled:
            return base(x, *args, **kwargs)
        # Not tied to self.training: a model trained in eval mode (no dropout) scores as in
        # train mode; the score is taken in backward, so a forward alone adds nothing.
        track = self.score_enabled and torch.is_grad_enabled()
        score_out = grad_out = None
        lora_A = params["lora_A"]
        if track and self.exact_step_score:
            if self.score_grad is None:
                self.score_grad = torch.zeros(self.out_features, self.in_features,
                                              dtype=torch.float32, device=lora_A.device)
            grad_out = self.score_grad
        elif track:
            score_out = buffers["score_sum"]
        dropout = self._modules["lora_dropout"]
        if not (self.training and isinstance(dropout, nn.Dropout)):
            dropout = None
        weight, bias = _plain_base_operands(base, args, kwargs)
        base_forward = None
        if weight is None:
            base_forward = (lambda t: base(t, *args, **kwargs))
        reserve = self.reserve_lambda if self.advance_learning else 0.0  # `reserve_value`
        try:
            return adapted_linear(
                x, weight, bias, lora_A, params["lora_B"], params["lora_lambda"],
                buffers["slot_state"], self.lora_alpha, reserve,
                weight_in_out=self.is_conv1d, base_forward=base_forward, dropout=dropout,
                score_out=score_out, grad_out=grad_out)
        except (RuntimeError, ValueError) as error:
            if x.is_nested:  # refused before anything was computed: no test on the hot path
                return self._forward_nested(x, args, kwargs)
            self._refuse_resized_base(error)
            if track and torch._C._are_functorch_transforms_active() and self._runs_untracked(
                    x, weight, bias, reserve, base_forward, dropout):
                name = self._tie_record()[0] or type(self).__name__
                raise RuntimeError(
                    f"IncreLoRA layer {name!r}: its importance score is tracked in this pass "
                    "(a step in the score window), which autograd's backward accumulates as a "
                    "side effect that torch.func transforms (grad, vjp, vmap) cannot run; take "
                    "those steps' gradients with loss.backward() (controller.is_tracked(step) "
                    "says which), or use score='triplet', which reads the .grad you assign"
                ) from error
            raise

    def _runs_untracked(self, x: torch.Tensor, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], reserve: float,
                        base_forward: Optional[Callable[[torch.Tensor], torch.Tensor]],
                        dropout: Optional[nn.Module]) -> bool:
        """Whether `forward`'s pass runs with no score tracked, so that tracking is what
        failed it under a torch.func transform, not the input (a wrong width, say). Runs only
        after a forward failed, so a forward pays nothing for it."""
        params = self._parameters
        try:
            adapted_linear(x, weight, bias, params["lora_A"], params["lora_B"],
                           params["lora_lambda"], self._buffers["slot_state"], self.lora_alpha,
                           reserve, weight_in_out=self.is_conv1d, base_forward=base_forward,
                           dropout=dropout)
        except (RuntimeError, ValueError):
            return False
        return True

    def _forward_nested(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """`forward` of a nested tensor (nn.TransformerEncoder's eval path packs a batch with a
        ``src_key_padding_mask`` so): its tensors padded with zero rows, computed at once and
        nested again in ``x``'s layout. Zero rows add nothing to the adapter's gradients or its
        exact score, and their outputs are dropped."""
        parts = x.unbind()
        out = self.forward(x.to_padded_tensor(0.0), *args, **kwargs)
        return torch.nested.as_nested_tensor(
            [y[tuple(slice(0, n) for n in t.shape[:-1])] for y, t in zip(out, parts)],
            layout=x.layout)

    def _refuse_resized_base(self, error: Exception) -> None:
        """ValueError naming the layer, raised from ``error``, when the base weight no longer
        has the shape the adapter was built for: resized in place after injection (e.g.
        transformers' ``resize_token_embeddings`` on an ``lm_head`` tied to the embedding,
        which swaps the shared tensor under the layer). Otherwise nothing: ``error`` is
        another failure. Runs only after a forward failed, so a forward pays nothing for it."""
        weight = getattr(self.base_layer, "weight", None)
        if self.is_quantized or not isinstance(weight, torch.Tensor):
            return  # a packed weight's shape is not (out, in)
        # the adapter's own shapes: a resize may have set ``out_features`` on the layer too
        out_in = (self.lora_B.shape[0], self.lora_A.shape[1])
        built = out_in[::-1] if self.is_conv1d else out_in
        if tuple(weight.shape) == built:
            return
        name = self._tie_record()[0] or type(self).__name__
        raise ValueError(
            f"IncreLoRA layer {name!r}: its base weight now has shape {tuple(weight.shape)}, "
            f"but the adapter was built for {built}; the base was resized after "
            "inject_increlora (e.g. resize_token_embeddings on an lm_head tied to the "
            "embedding), which a fixed-shape adapter cannot follow: resize before "
            "inject_increlora") from error

    def take_score(self) -> torch.Tensor:
        """Return the accumulated exact score and reset the accumulator."""
        value = self.score_sum.clone()
        self.score_sum.zero_()
        return value

    def take_score_grad(self) -> torch.Tensor:
        """Return the dense G accumulated since the last call (zeros if none) and reset it."""
        if self.score_grad is None:
            return torch.zeros(self.out_features, self.in_features, device=self.lora_A.device)
        value = self.score_grad.clone()
        self.score_grad.zero_()
        return value

    def release_score_buffers(self) -> None:
        self.score_sum.zero_()
        self.score_grad = None

    # ------------------------------------------------------------------ merging
    def _base_weight_delta(self, factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                           ) -> torch.Tensor:
        b, a = self._delta_factors() if factors is None else factors
        delta = b @ a
        return delta.t() if self.is_conv1d else delta

    def _attach_model(self, model: nn.Module, parameters: Dict[int, List[str]],
                      modules: Dict[int, List[str]]) -> None:
        """Called by `inject_increlora` with the model this layer was put into (and
        `_names_by_id` of its parameters and modules): `merge` and `unmerge` look the layer's
        ties up there, and fall back to what is recorded here when the model is gone."""
        self._model_ref = weakref.ref(model)
        self._name_at_injection = modules[id(self)][0]
        self._tied_at_injection = tuple(_other_names_of_base_weight(self, parameters, modules))

    def tied_parameters(self) -> List[str]:
        """Names of the parameters of other modules that are this layer's base weight itself
        (tied weights, e.g. an adapted ``lm_head`` sharing the input embedding), which an in-place
        `merge` or `unmerge` would change too.

        Looked up now in the model the layer was injected into (`inject_increlora`), so ties
        made or undone after injection count, as long as that model is alive and still holds the
        layer. Otherwise (a deep copy or an unpickled model, whose layers keep no reference to
        their model, or a layer taken out of it) the ties recorded at injection. Empty for a
        layer built by hand and never injected, whose model is unknown: its ties go unseen.
        """
        return self._tie_record()[1]

    def _tie_record(self) -> Tuple[Optional[str], List[str], bool]:
        """(the layer's name, the parameters tied to its base weight, whether both were looked
        up in the live model rather than recorded at injection)."""
        state = self.__dict__  # a layer pickled by an older release lacks the three entries
        ref = state.get("_model_ref")
        model = ref() if ref is not None else None
        if model is not None:
            modules = _names_by_id(model.named_modules(remove_duplicate=False))
            if id(self) in modules:
                parameters = _names_by_id(model.named_parameters(remove_duplicate=False))
                return (modules[id(self)][0],
                        _other_names_of_base_weight(self, parameters, modules), True)
        return state.get("_name_at_injection"), list(state.get("_tied_at_injection", ())), False

    def _refuse_tied(self, op: str) -> None:
        """ValueError, before anything changes, when ``op`` (merge or unmerge) would write into
        a base weight tied to another module's parameter (see `tied_parameters`)."""
        name, tied, live = self._tie_record()
        if not tied:
            return
        module = tied[0].rpartition(".")[0] or "<model>"
        seen = "" if live else " (as recorded at injection; the model is no longer reachable)"
        raise ValueError(
            f"cannot {op} IncreLoRA layer {name!r} in place: its base weight is tied to "
            f"{tied[0]!r} of module {module!r}{seen}, so {_IN_PLACE[op]} would change "
            f"{module!r} too; untie them first (give the layer its own copy: "
            "layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach().clone(), "
            "requires_grad=False), or tie_word_embeddings=False before injecting), or keep the "
            "adapter unmerged and export it with export_peft")

    def has_derived_weight(self) -> bool:
        """Whether the base's ``weight`` is computed from other tensors on every forward (a
        ``torch.nn.utils.parametrize`` parametrization such as ``parametrizations.weight_norm``,
        or the older ``weight_norm``, ``spectral_norm`` and ``prune``, which keep it out of the
        module's parameters and buffers): an adapter added to it in place would be lost."""
        base = self.base_layer
        stored = base._parameters.get("weight", base._buffers.get("weight"))
        return not isinstance(stored, torch.Tensor)

    def _refuse_derived_weight(self) -> None:
        """ValueError, before anything changes, when `has_derived_weight`."""
        if self.has_derived_weight():
            raise ValueError(derived_weight_message([self._tie_record()[0] or type(self).__name__]))

    def merge(self) -> None:
        """Fold the adapter into the base weight; forward then skips the adapter.

        Raises:
            RuntimeError: the layer is already merged, or its base is quantized.
            ValueError: the base weight is tied to another module's parameter
                (`tied_parameters`: checked for layers made by `inject_increlora`, against the
                model they were injected into): merging in place would change that module too;
                or it is computed from other tensors (`has_derived_weight`), so the merged
                adapter would be lost.
        Nothing changes when it raises.
        """
        if self.merged:
            raise RuntimeError("IncreLoRALinear is already merged")
        self._refuse_quantized_merge()
        self._refuse_derived_weight()
        self._refuse_tied("merge")
        self._merge_in_place()

    @torch.no_grad()
    def _merge_in_place(self) -> None:
        """`merge` without its checks (`merge_and_unload` checks the whole model once)."""
        self._unshare_base_weight()
        w = self.base_layer.weight
        factors = self._delta_factors()
        w.add_(self._base_weight_delta(factors).to(w.dtype))
        self._merged_factors = factors
        self.merged = True

    def _unshare_base_weight(self) -> None:
        """Give the base its own copy of a weight that averaged copies and their source share
        (`SHARED_FROZEN`) before writing into it: merging one of them leaves the others' bases
        as they were."""
        w = self.base_layer.weight
        if SHARED_FROZEN and len(shared_holders(w)) > 1:
            self.base_layer.weight = nn.Parameter(w.detach().clone(),
                                                  requires_grad=w.requires_grad)

    def _refuse_quantized_merge(self) -> None:
        if self.is_quantized:
            raise RuntimeError(f"cannot merge into a quantized {type(self.base_layer).__name__} "
                               "base: its weight holds quantized data; keep the adapter "
                               "unmerged, export it with export_peft, or dequantize the base "
                               "first (transformers' model.dequantize()) or load it in full "
                               "precision to merge")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again: the adapter as `merge` added it,
        so the base weight comes back as it was also when the adapter changed in between.

        Raises:
            RuntimeError: the layer is not merged.
            ValueError: the base weight is tied to another module's parameter (as in `merge`).
        Nothing changes when it raises.
        """
        if not self.merged:
            raise RuntimeError("IncreLoRALinear is not merged")
        self._refuse_tied("unmerge")
        self._unshare_base_weight()
        w = self.base_layer.weight
        factors = tuple(f.to(w.device) for f in self._merged_factors)  # (after a .to())
        w.sub_(self._base_weight_delta(factors).to(w.dtype))
        self._merged_factors = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"r_max={self.r_max}, lora_alpha={self.lora_alpha}")
