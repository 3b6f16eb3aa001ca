"""`IncreLoRAAdamW`: one AdamW optimizer over fixed tensors with per-slot restart warmup.

For adapter tensors every slot (row of A, column of B, entry of lambda) has
- its own learning-rate schedule starting at the step the slot was allocated (A, B) or activated
  (lambda): linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_step`` (spec
  section 5, the authors' per-group schedulers on fixed shapes);
- fresh moments and bias correction whenever the layer re-allocates or activates it, detected by
  comparing the layer's ``slot_alloc_step`` / ``slot_active_step`` with what the optimizer last saw;
  that comparison runs on the device, and only for the tensors of layers whose host-side
  ``slot_version`` changed since their last step (every tensor on the first step and after
  `IncreLoRAAdamW.load_state_dict`);
- a mask (`IncreLoRALinear.trainable_slot_masks`): slots that do not train (never used, frozen
  reserves without advance learning, every lambda but the active ones) are left bitwise
  unchanged (no weight-decay drift), while the reserves retired at the budget (inactive) keep
  training their A rows and B columns, on the schedule begun at their allocation. Slots the
  controller changed at this step are left unchanged too (Adam step count 0: no step on their
  zero gradient, as for a parameter just added to AdamW, whatever their learning rate), a reserve
  appended and retired at once in the last round included.
Other trainable parameters (e.g. a classifier) follow the ordinary warmup + linear decay from step 0;
`create_optimizer` exempts biases and normalization weights among them from weight decay, as the
Hugging Face Trainer and the authors' trainer do (`no_decay_parameters`).

A step works per parameter group and device: the masks, stamps, step counts and schedules of all
its slots are handled at once as flat vectors. The masks and stamps are cached and rebuilt only
when a layer's ``slot_version`` changes, and the schedule is computed on the device, so a step
reads no tensor on the host (a step between allocation rounds can be captured in a CUDA graph).
On CUDA the tensors are stepped by one fused Triton kernel, launched once over all of them per
dtype combination (once per tensor while a CUDA graph is captured) from a plan kept while the
layout holds (`_FusedPlan`: no per-tensor checks or layout work between rounds); elsewhere (and with
``INCRELORA_BACKEND=torch``) tensors of one shape, slot dimension and dtype are stacked and
updated together (`masked_adamw_into`, the math of `masked_adamw_torch_`): a few stacked
operations per distinct shape instead of a dozen small ones per tensor. The moments of a stack are
kept stacked (the state tensors are views of them), so only parameters and gradients are stacked
and only parameters copied back.
"""
from __future__ import annotations

import math
import re
import warnings
import weakref
from collections import defaultdict
from itertools import chain
from typing import (Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Set,
                    Tuple, Union)

import torch
from torch import nn

from .config import IncreLoRAConfig
from .device_scalar import DeviceScalar, refresh_in_place
from .functional import kernel_readable, multi_adamw_ok, select_backend
from .layer import IncreLoRALinear
from .model import (frozen_adapters_message, fsdp1_sharded_adapter_message, get_config,
                    increlora_layers, keep_adapters_in_fast_paths, unfrozen_bases_message)
from .optim_functional import along_slot_dim, masked_adamw_into

ADAPTER_SLOT_DIM = {"lora_A": 0, "lora_B": 1, "lora_lambda": 0}
# State that keeps its own dtype; torch's load_state_dict casts the rest to the parameter's.
BOOKKEEPING_STATE = ("step", "slot_count", "seen_alloc", "seen_active")


def schedule_multiplier(step: Union[int, torch.Tensor], start: Union[int, torch.Tensor],
                        warmup_steps: int, total_step: Optional[int]) -> torch.Tensor:
    """Learning-rate multiplier at optimizer step ``step`` of a schedule that began at ``start``.

    Linear warmup from 0 over ``warmup_steps``, then linear decay reaching 0 at ``total_step``
    (constant 1 when ``total_step`` is None), as transformers' linear schedule shifted to ``start``.
    Computed in float64 on the device of ``start`` (a Python ``step`` is filled in there, not
    copied from the host).
    """
    start = torch.as_tensor(start, dtype=torch.float64)
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.float64 or step.device != start.device:
            step = step.to(dtype=torch.float64, device=start.device)
    else:
        step = torch.full_like(start, step)
    since = step - start
    if warmup_steps > 0:
        warm = since / warmup_steps
    else:
        warm = torch.ones_like(since)
    if total_step is None:
        decay = torch.ones_like(since)
    else:
        decay = ((total_step - step) / (total_step - start - warmup_steps).clamp(min=1)).clamp(min=0)
    # min(): a schedule that starts within warmup_steps of the end still reaches 0 there.
    return torch.where(since < warmup_steps, torch.minimum(warm, decay), decay).clamp(min=0)


# The parameter names the Hugging Face Trainer exempts from weight decay
# (`Trainer.get_decay_parameter_names`, transformers 5), matched on the lower-cased name:
# biases and normalization weights. The authors' trainer (an older Trainer) exempts biases and
# nn.LayerNorm parameters, which these cover.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                     r"_norm(?:$|\.)")
# The parameter groups `create_optimizer` makes, by name.
GROUP_NAMES = ("increlora", "other", "other_no_decay")


def no_decay_parameters(model: nn.Module) -> Set[int]:
    """The ids of ``model``'s parameters that take no weight decay, by the Hugging Face
    Trainer's rule: those inside an ``nn.LayerNorm`` (at any depth: a parametrized weight
    lives in a submodule of it) and those whose name (the first one ``named_parameters`` gives
    a shared parameter) matches `NO_DECAY_PATTERNS`."""
    patterns = [re.compile(pattern) for pattern in NO_DECAY_PATTERNS]
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    exempt = set()
    for name, p in model.named_parameters():
        parts = name.split(".")
        inside = any(".".join(parts[:i]) in norms for i in range(len(parts)))
        if inside or any(pt.search(name.lower()) for pt in patterns):
            exempt.add(id(p))
    return exempt


def split_weight_decay(model: nn.Module, params: List[torch.Tensor]
                       ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """``params`` (parameters of ``model``) split, in their order, into those that take weight
    decay and those `no_decay_parameters` spares."""
    exempt = no_decay_parameters(model)
    return ([p for p in params if id(p) not in exempt], [p for p in params if id(p) in exempt])


# `IncreLoRAAdamW.build_kernels` steps parameters up to this size (64 MB in float32).
BUILD_MAX_NUMEL = 1 << 24


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: itself there, else copied without blocking the host."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _layout_key(layer: IncreLoRALinear) -> Tuple[int, bool]:
    """What a layer's masks and schedule starts depend on, known on the host: its
    ``slot_version`` and whether its reserve slots train (``advance_learning``)."""
    return layer.slot_version, layer.advance_learning


def _fused_kernel_applies(p: torch.Tensor) -> bool:
    """Whether ``p`` is stepped by the fused Triton kernel (`_FusedPlan`): a plain CUDA tensor
    (not an FSDP2 DTensor, `functional.kernel_readable`) where the layers take Triton."""
    return p.is_cuda and kernel_readable(p) and select_backend(p) == "triton"


class _Slots(NamedTuple):
    """A parameter seen as slots along ``slot_dim``; a dense parameter is one slot (1, numel)."""

    tensors: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # p, grad, m, v
    slot_dim: int
    mask: torch.Tensor   # (r,) bool: slots that train this step
    start: torch.Tensor  # (r,) long: step each slot's schedule began at
    count: torch.Tensor  # (r,) float32 Adam step count, a view of the state


def _step_stack(members: List[_Slots], moments: Optional[Tuple[torch.Tensor, torch.Tensor]],
                per_slot: List[torch.Tensor], hyper: tuple) -> None:
    """One step of tensors of one shape, slot dimension and dtypes, stacked: ``moments`` their
    stacked moments, which the state tensors are views of (`IncreLoRAAdamW._moment_stacks`),
    updated in place, or None to stack them here and copy them back; ``per_slot`` their (mask,
    lr, count), one row per tensor. A stack of one plain tensor steps it in place; otherwise
    parameters and gradients are stacked and the parameters copied back."""
    dim, ndim = members[0].slot_dim, members[0].tensors[0].dim()
    params = [s.tensors[0] for s in members]
    in_place = moments is not None and len(members) == 1
    if in_place:
        param, grad = params[0].unsqueeze(0), members[0].tensors[1].unsqueeze(0)
    else:
        param, grad = torch.stack(params), torch.stack([s.tensors[1] for s in members])
    stacked = moments or tuple(torch.stack([s.tensors[i] for s in members]) for i in (2, 3))
    masked_adamw_into(param, grad, *stacked, *(along_slot_dim(v, dim, ndim) for v in per_slot),
                      *hyper, out=(param, *stacked))
    if not in_place:
        torch._foreach_copy_(params, param.unbind(0))
    if moments is None:
        for i, values in zip((2, 3), stacked):
            torch._foreach_copy_([s.tensors[i] for s in members], values.unbind(0))


class _FusedPlan:
    """The fused kernel's launches over the tensors of one group and device, for one layout:
    per tensor what does not change between steps (parameter, moments, the slot mask viewed as
    uint8, step counts, launch constants), in the order of the flat per-slot vectors. A step
    reads only each parameter's gradient, which autograd allocates anew; the plan holds none.
    The arguments are checked in full at the first launch, then only the gradients' layout.

    Between rounds an eager step launches once per dtype combination over all tensors
    (`MultiTensorAdamW`). The plan's first step launches once per tensor, and so does a step
    under CUDA graph capture: the graph then holds no table of the addresses of that moment
    (launches cost nothing at replay), and the per-tensor kernel it launches was loaded by the
    first step (CUDA cannot load a kernel while a stream captures)."""

    def __init__(self, key: tuple, order: List[torch.Tensor], slots: List[_Slots],
                 sizes: List[int], mask: torch.Tensor, mask_parts: List[torch.Tensor],
                 start: torch.Tensor) -> None:
        from .kernels.adamw import MultiTensorAdamW, adamw_launch

        self.key, self.sizes, self.mask, self.mask_parts, self.start = (key, sizes, mask,
                                                                        mask_parts, start)
        # the parameters themselves, not views: `Module.to` swaps a parameter's data in place
        self.params = order
        self.slots = [(s.tensors[0].shape, s.tensors[2], s.tensors[3], s.count, s.mask,
                       s.slot_dim, adamw_launch(s.tensors[0], s.slot_dim)) for s in slots]
        self.counts = [s.count for s in slots]
        self.masks_u8 = [s.mask.view(torch.uint8) for s in slots]
        device = order[0].device
        self.multi = MultiTensorAdamW(
            order, [(m, v) for _, m, v, *_ in self.slots], self.counts,
            [launch for *_, launch in self.slots],
            # (param, grad, exp_avg, exp_avg_sq) dtypes: moments of one dtype, checked once
            lambda dt: dt[2] == dt[3] and multi_adamw_ok(device, dt[0], dt[2]))
        self.checked = False

    def launch(self, mask: torch.Tensor, lr: torch.Tensor, hyper: tuple,
               masks_u8: Optional[List[torch.Tensor]] = None) -> None:
        """This step's launches: ``mask`` and ``lr`` the flat per-slot mask and learning rates,
        ``masks_u8`` the mask per tensor viewed as uint8 when it is not the kept one."""
        from .kernels import utils
        from .kernels.adamw import (check_flat_grad, check_masked_adamw_args,
                                    launch_masked_adamw_)

        if self.checked and not utils.stream_capturing(mask.device) and \
                self.multi.step(mask.view(torch.uint8), lr, *hyper):
            return
        slot_lrs = lr.split(self.sizes)
        if not self.checked:  # once per tensor, which also loads the kernel a capture launches
            for p, (shape, m, v, count, _, slot_dim, _), slot_mask, slot_lr in zip(
                    self.params, self.slots, mask.split(self.sizes), slot_lrs):
                check_masked_adamw_args(p.view(shape), p.grad.reshape(shape), m, v, slot_mask,
                                        slot_lr, count, slot_dim, *hyper[:2])
            self.checked = True
        for p, (_, m, v, count, _, _, launch), mask_u8, slot_lr in zip(
                self.params, self.slots, masks_u8 or self.masks_u8, slot_lrs):
            grad = p.grad
            check_flat_grad("IncreLoRAAdamW", grad)
            launch_masked_adamw_(launch, p, grad, m, v, mask_u8, slot_lr, count, *hyper)


# Each IncreLoRA layer -> the live IncreLoRAAdamWs holding its adapters: a record the layer does
# not carry, so a deep copy or an unpickled layer is held only by an optimizer copied with it,
# and a layer whose optimizer is gone by none.
_HOLDERS: "weakref.WeakKeyDictionary[IncreLoRALinear, weakref.WeakSet]" = \
    weakref.WeakKeyDictionary()


def in_increlora_optimizer(layer: IncreLoRALinear) -> bool:
    """Whether a live `IncreLoRAAdamW` holds the adapters of ``layer`` (read by the controller:
    `IncreLoRAController._warn_other_optimizer`)."""
    return bool(_HOLDERS.get(layer))


class IncreLoRAAdamW(torch.optim.Optimizer):
    """AdamW with per-slot schedules and masks for IncreLoRA adapters; build it with
    `create_optimizer`. ``lr`` in each group is the base learning rate; the schedule is applied
    inside `step`, so no separate LR scheduler is needed (or wanted)."""

    def __init__(self, params: Iterable[dict], slots: Dict[int, Tuple[IncreLoRALinear, str]],
                 lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, warmup_steps: int = 0,
                 total_step: Optional[int] = None) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"IncreLoRAAdamW got lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}: need lr > 0, eps > 0, "
                             "weight_decay >= 0 and betas in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, total_step=total_step)
        super().__init__(params, defaults)
        self._slots = slots
        self._hold_layers()
        self.global_step = 0
        # Counts the cached masks and starts made as new tensors rather than refreshed in place
        # (`device_scalar.refresh_in_place`): a CUDA graph captured at another count reads
        # tensors the step no longer uses.
        self.cache_epoch = 0
        self._reset_caches()

    def _hold_layers(self) -> None:
        """Record this optimizer as a holder of its layers (`in_increlora_optimizer`)."""
        for layer, _ in self._slots.values():
            _HOLDERS.setdefault(layer, weakref.WeakSet()).add(self)

    def _reset_caches(self) -> None:
        """The caches a step builds from the parameters, their state and their layers (every
        one rebuilt on the next step; a fresh optimizer and an unpickled or copied one)."""
        # id(adapter tensor) -> the layer's slot_version at that tensor's last step.
        self._seen_version: Dict[int, int] = {}
        # layer -> (its _layout_key, its trainable_slot_masks()).
        self._layer_masks: Dict[IncreLoRALinear, Tuple[tuple, Tuple[torch.Tensor, ...]]] = {}
        # (group index, device) -> (key, (flat mask, its float32 copy, flat start), that copy
        # split per tensor).
        self._flat: Dict[tuple, tuple] = {}
        # (group index, device) -> ids of the parameters its last step updated.
        self._stepped: Dict[tuple, List[int]] = {}
        # (group index, device) -> (ids and global_step of its step before the last one, -1 if
        # none): the last step known of a tensor whose layer changed (`_check_clocks`).
        self._stepped_before: Dict[tuple, Tuple[List[int], int]] = {}
        # (group index, device) -> global_step of its last step.
        self._stepped_at: Dict[tuple, int] = {}
        self._clock_warned = False  # `_check_clocks`
        # (group index, device) -> its fused kernel launches (CUDA), kept while the layout holds.
        self._fused: Dict[tuple, _FusedPlan] = {}
        # (group index, device, stack key) -> (addresses of the moment views, the stacked
        # exp_avg and exp_avg_sq the state tensors of that stack are views of, its parameters).
        self._moments: Dict[tuple, tuple] = {}
        # id(parameter) -> the key in `_moments` of the stack its moments are views of (a
        # parameter whose stack key changes, `model.to(dtype)`, frees the old stack with it).
        self._moment_keys: Dict[int, tuple] = {}
        # device -> (mask, start) of a dense parameter seen as one slot.
        self._dense_slot: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        # global_step on the devices of the parameters, read by the per-slot schedule.
        self._device_steps = DeviceScalar(torch.float64)
        # group index -> its ``lr`` on the devices of its parameters (a captured step reads the
        # tensor, so a replay steps with the lr the group has then: `sync_device_step`).
        self._device_lrs: Dict[int, DeviceScalar] = {}

    def __getstate__(self) -> dict:
        """Pickling and ``copy.deepcopy``: torch's state plus the step count and each
        parameter's (layer, kind), stored beside the parameter groups (ids of parameters do not
        survive a copy); the caches are rebuilt by the copy's first step. Copy the model with
        the optimizer (``copy.deepcopy((model, optimizer))``) for a copy that trains that
        model: an optimizer copied alone steps copies of the parameters and layers."""
        state = super().__getstate__()
        state["global_step"] = self.global_step
        state["cache_epoch"] = self.cache_epoch
        state["slot_roles"] = [[self._slots.get(id(p)) for p in group["params"]]
                               for group in self.param_groups]
        if hasattr(self, "_dense_order"):  # `_regrouped` needs it in the copy too
            state["dense_order"] = self._dense_order
        return state

    def __setstate__(self, state: dict) -> None:
        # torch's load_state_dict also calls this, with only "state" and "param_groups": an
        # update of a live optimizer, whose own attributes stay.
        if "_slots" in self.__dict__:
            super().__setstate__(state)
            return
        state = dict(state)
        roles = state.pop("slot_roles", None)
        if roles is None:
            raise TypeError("IncreLoRAAdamW: this pickled optimizer lacks its slot roles (made "
                            "by an older release); build a new one with create_optimizer and "
                            "load_state_dict the old one's state_dict")
        self.global_step = state.pop("global_step", 0)
        self.cache_epoch = state.pop("cache_epoch", 0)
        if "dense_order" in state:
            self._dense_order = state.pop("dense_order")
        super().__setstate__(state)
        self._slots = {id(p): role for group, group_roles in zip(self.param_groups, roles)
                       for p, role in zip(group["params"], group_roles) if role is not None}
        self._hold_layers()
        self._reset_caches()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` plus the step count and the slots' bookkeeping. A state
        saved before biases and normalization weights had a group of their own (one group
        ``"other"`` for all non-adapter parameters, until 2026-12-06) is split like this
        optimizer's groups, when `create_optimizer` made it.

        Raises:
            ValueError: the state's parameter groups do not match this optimizer's."""
        state_dict = self._regrouped(dict(state_dict))
        self.global_step = int(state_dict.pop("global_step", 0))
        super().load_state_dict(state_dict)
        self._seen_version.clear()  # the loaded stamps are compared with the layers' anew
        self._stepped_at.clear()  # (steps of the replaced state)
        self._stepped_before.clear()
        self._fused.clear()  # (they hold the replaced moments)
        self._moments.clear()
        self._moment_keys.clear()
        self.cache_epoch += 1  # new state tensors: a captured step would update the old ones
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key in BOOKKEEPING_STATE:  # e.g. bfloat16 would round step stamps above 256
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _regrouped(self, state_dict: dict) -> dict:
        """``state_dict`` with a saved group ``"other"`` of every non-adapter parameter split
        into this optimizer's ``"other"`` and ``"other_no_decay"`` (their moments follow their
        parameters); any other state as it is."""
        saved = [g.get("name") for g in state_dict["param_groups"]]
        names = [g.get("name") for g in self.param_groups]
        if saved == names or saved != ["increlora", "other"] or \
                not set(names) <= set(GROUP_NAMES) or names[0] != "increlora":
            return state_dict
        dense = getattr(self, "_dense_order", None)
        old = state_dict["param_groups"][1]
        if dense is None or len(dense) != len(old["params"]):
            raise ValueError(
                f"IncreLoRAAdamW.load_state_dict: the state has parameter groups {saved}, this "
                f"optimizer {names}; it was saved before biases and normalization weights got "
                "a group of their own without weight decay (2026-12-06), and only an optimizer "
                "made by create_optimizer on the same model can take it")
        saved_id = {id(p): i for p, i in zip(dense, old["params"])}
        groups = [state_dict["param_groups"][0]]
        for group in self.param_groups[1:]:
            groups.append({**old, "name": group["name"], "weight_decay": group["weight_decay"],
                           "params": [saved_id[id(p)] for p in group["params"]]})
        return {**state_dict, "param_groups": groups}

    def current_lr_multiplier(self, start: int = 0) -> float:
        """Schedule multiplier the next step applies to a schedule that began at ``start``."""
        g = self.param_groups[0]
        return float(schedule_multiplier(self.global_step, start, g["warmup_steps"], g["total_step"]))

    # torch.amp.GradScaler.step calls `step` on every step, with the attributes ``grad_scale``
    # (the scale still on the gradients, or None once unscaled) and ``found_inf`` (non-zero when
    # the scaled gradients overflowed) set, instead of reading found_inf on the host to decide
    # whether to call it: an fp16 step then reads nothing on the host.
    _step_supports_amp_scaling = True

    # Never traced by dynamo (`torch.compile(optimizer.step)`, or a compiled training step that
    # calls it): it runs eagerly there. Its host-side caches, counters and first-use checks
    # traced into many graphs and graph breaks, and the run silently fell behind eager's (a
    # step lost). (torch's lazy form of torch.compiler.disable, as Optimizer.zero_grad's: no
    # import of dynamo before the first step.)
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None
             ) -> Optional[torch.Tensor]:
        """One step of every parameter with a gradient that requires grad; the schedules move
        on by one step. Run eagerly under torch.compile (not traced).

        Under ``torch.amp.GradScaler.step`` the gradients are unscaled here if the scaler has
        not done it, and a step whose scaled gradients overflowed changes no parameter, moment
        or Adam step count, decided on the device (the schedule still moves on: its clock is the
        training step, as the controller's slot stamps are)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if "initial_lr" in self.param_groups[0]:  # a torch LR scheduler was built over it
            self._note_outer_schedule()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for index, by_device in self._params_by_group_and_device():
            group = self.param_groups[index]
            for device, params in by_device.items():
                if grad_scale is not None:
                    inverse = _on(grad_scale, device).double().reciprocal().float()
                    torch._foreach_mul_([p.grad for p in params], inverse)
                keep = None if found_inf is None else _on(found_inf, device) == 0
                self._step_params(params, group, (index, device), keep)
        self.global_step += 1
        return loss

    def _note_outer_schedule(self) -> None:
        """Warn once when a torch LR scheduler (it writes ``initial_lr`` into the groups) runs
        over this optimizer while its own schedules are on: its factor multiplies into them
        (the warmup applied twice, the decay squared). `integrations.trainer.ConstantSchedule`
        (a factor of 1) marks the optimizer as scheduled by it (``outer_schedule_ok``)."""
        if getattr(self, "outer_schedule_ok", False) or getattr(self, "_outer_warned", False):
            return
        self._outer_warned = True
        group = self.param_groups[0]
        if group["warmup_steps"] > 0 or group["total_step"] is not None:
            warnings.warn("IncreLoRAAdamW: a learning-rate scheduler runs over it, and its factor "
                          "multiplies into the optimizer's own per-slot warmup and decay "
                          f"(warmup_steps={group['warmup_steps']}, total_step="
                          f"{group['total_step']}): the warmup is applied twice and the decay "
                          "squared; leave the scheduler out (with the HF Trainer: "
                          "IncreLoRATrainer, or optimizers=increlora_optimizers(model, lr)), or "
                          "set IncreLoRAConfig warmup_steps=0 and total_step=None to let it "
                          "schedule alone (new slots then get no restart warmup)",
                          RuntimeWarning, stacklevel=3)

    def sync_device_step(self) -> None:
        """Before replaying a CUDA graph captured from another step: set the device copies of
        `global_step` and of each group's ``lr`` (a scheduler or the user may have changed it
        since the capture) that the captured step reads (one fill per device and value that
        changed, outside the graph)."""
        self._device_steps.sync(self.global_step)
        for index, lrs in self._device_lrs.items():
            lrs.sync(self.param_groups[index]["lr"])

    def captured_hyperparameters(self) -> tuple:
        """The settings of the parameter groups (all but ``params`` and ``lr``: betas, eps,
        weight decay, the schedule's steps, ...) that a step captured in a CUDA graph holds as
        numbers: a graph captured while they had other values would replay those. (The
        captured step reads ``lr`` from a device tensor, `sync_device_step`.)"""
        return tuple(tuple((k, v) for k, v in sorted(group.items()) if k not in ("params", "lr"))
                     for group in self.param_groups)

    def note_replayed_step(self) -> None:
        """The host side of a step whose device work was replayed from a CUDA graph: the step
        count moves on, as `step` moves it."""
        self.global_step += 1

    def prepare_replay(self) -> None:
        """Before replaying a captured step after slots changed on the host (an allocation
        round between the replays of a step's two graphs): what `step` does first, eagerly and
        in place: moments and counts of fresh slots restarted, cached masks refreshed, so that
        the replayed update reads the new layout."""
        found = {(index, device): members
                 for index, by_device in self._params_by_group_and_device()
                 for device, members in by_device.items()}
        if {where: [id(p) for p in members] for where, members in found.items()} != self._stepped:
            raise RuntimeError("IncreLoRAAdamW.prepare_replay: the parameters with a gradient are "
                               "not those the captured step updated (were gradients set to None "
                               "after it?); the replayed update would read stale masks")
        for where, members in found.items():
            self._prepare(members, where)

    def build_kernels(self, scaled: bool = False) -> None:
        """Within `kernels.utils.building_only` only (`precompile.precompile_kernels`): two
        steps of a new optimizer like this one (the same parameter groups, settings and slot
        roles, no state), each parameter the fused Triton kernel steps given a stand-in
        gradient, so that the kernels of a first step (one launch per tensor, as under CUDA
        graph capture) and of the steps after it (one per dtype combination) are built; with
        ``scaled`` (fp16 under a GradScaler) the steps get the overflow flag the scaler hands
        `step`, whose per-tensor launches read each tensor's slice of the kept mask (another
        alignment, so other variants than an unscaled step's). Within
        that block no kernel runs: nothing of this optimizer, the parameters or their gradients
        changes. Parameters the kernel does not step (the torch path) get no gradient, so the
        new optimizer does not step them either; nor do parameters of more than
        `BUILD_MAX_NUMEL` elements (a trained embedding or head: their stand-in gradient and
        moments would be three copies; the first step builds their launch). A parameter left
        out also moves the others' slices of the per-slot vectors (another alignment), so a
        few of their variants may be left to the first step too. Global optimizer step hooks
        (``torch.optim.optimizer.register_optimizer_step_post_hook``) see the two steps.

        Raises:
            RuntimeError: outside `building_only`, where the steps would change parameters.
        """
        from .kernels.launches import building_only_active
        if not building_only_active():
            raise RuntimeError("IncreLoRAAdamW.build_kernels: only within "
                               "kernels.utils.building_only, where no kernel runs; here its "
                               "steps would change the parameters")
        fused = [p for group in self.param_groups for p in group["params"]
                 if p.requires_grad and p.numel() <= BUILD_MAX_NUMEL and _fused_kernel_applies(p)]
        if not fused:
            return
        twin = IncreLoRAAdamW(
            [{**{k: v for k, v in group.items() if k != "params"},
              "params": list(group["params"])} for group in self.param_groups],
            self._slots, **self.defaults)
        twin.global_step = self.global_step  # the layers' slot stamps count on this clock
        twin._clock_warned = True  # its steps build kernels: no step count to check stamps on
        if scaled:  # as torch.amp.GradScaler.step sets them (gradients already unscaled)
            twin.grad_scale = None
            twin.found_inf = torch.zeros((), dtype=torch.float32, device=fused[0].device)
        grads = [(p, p.grad) for p in chain.from_iterable(g["params"] for g in self.param_groups)]
        try:
            for p, _ in grads:
                p.grad = None
            for p in fused:
                p.grad = torch.empty_like(p)
            twin.step()
            twin.step()
        finally:
            for p, grad in grads:
                p.grad = grad

    def _params_by_group_and_device(self) -> Iterator[Tuple[int, Dict[torch.device,
                                                                      List[torch.Tensor]]]]:
        """(group index, device -> the group's parameters with a gradient there). A parameter
        that no longer requires grad is left out: frozen mid-run, it keeps the zero gradient
        tensor of its last step under ``zero_grad(set_to_none=False)``, and stepping it would
        move it on its moments and weight decay."""
        for index, group in enumerate(self.param_groups):
            by_device: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None and p.requires_grad:
                    by_device[p.device].append(p)
            yield index, by_device

    def _prepare(self, params: List[torch.Tensor], where: tuple) -> tuple:
        """The layout-dependent part of a step of ``params`` (one group and device): fresh
        slots restarted, and (stacks of (parameter, its slots) by shape, slot dimension and
        dtypes, the slots in stack order, their sizes,
        the flat mask, its float parts, the flat starts, the parameters in stack order), cached
        masks refreshed in place."""
        stacks: Dict[tuple, List[Tuple[torch.Tensor, _Slots]]] = defaultdict(list)
        for p in params:
            s = self._as_slots(p)
            stacks[(s.slot_dim, s.tensors[0].shape, *(t.dtype for t in s.tensors))].append((p, s))
        self._restart_fresh_slots([p for p in params if id(p) in self._slots], where)
        # Slots in stack order: each stack's per-slot values are one slice of the flat vectors.
        order = [p for members in stacks.values() for p, _ in members]
        slots = [s for members in stacks.values() for _, s in members]
        sizes = [len(s.mask) for s in slots]
        return (stacks, slots, sizes, *self._flat_slots(where, order, slots), order)

    def _step_params(self, params: List[torch.Tensor], group: dict, where: tuple,
                     keep: Optional[torch.Tensor] = None) -> None:
        """One step of ``params``, all of one group and one device (``where``: the group's
        index and the device); where the 0-d bool ``keep`` is given and false, nothing
        changes."""
        self._stepped_before[where] = (self._stepped.get(where, []),
                                       self._stepped_at.get(where, -1))
        self._stepped[where] = [id(p) for p in params]
        self._stepped_at[where] = self.global_step
        fused = self._fused_plan(params, where) if _fused_kernel_applies(params[0]) else None
        if fused is None:
            stacks, slots, sizes, mask, mask_parts, start, _ = self._prepare(params, where)
            counts = [s.count for s in slots]
        else:
            sizes, mask, mask_parts, start, counts = (fused.sizes, fused.mask, fused.mask_parts,
                                                      fused.start, fused.counts)
        floors = None
        if keep is not None:  # an overflowed fp16 step: every slot masked out, on the device
            # 0 on the slots this step trains, -1 elsewhere (a count is never below -1)
            floors = torch._foreach_sub(mask_parts, 1.0)
            mask = mask & keep
            mask_parts = list(mask.to(torch.float32).split(sizes))
        torch._foreach_add_(counts, mask_parts)
        if floors is not None:
            # A slot this step would train that was changed at this step kept its count of -1
            # (`_restart_fresh_slots`) if the step overflowed: 0 now, as after a step that
            # counted, so that its next gradient, its first real one, is counted as step 1
            # (not left uncounted, and every later bias correction one step short). Other
            # counts keep their values, so a step that did not overflow counts as an unscaled
            # one does, bit for bit.
            torch._foreach_maximum_(counts, floors)
        step = self._device_steps.get(self.global_step, start.device)
        mult = schedule_multiplier(step, start, group["warmup_steps"], group["total_step"])
        base_lr = self._device_lrs.setdefault(where[0], DeviceScalar(torch.float64))
        lr = (base_lr.get(group["lr"], start.device) * mult).to(torch.float32)
        beta1, beta2 = group["betas"]
        hyper = (beta1, beta2, group["eps"], group["weight_decay"])
        if fused is not None:
            fused.launch(mask, lr, hyper, None if keep is None else
                         [m.view(torch.uint8) for m in mask.split(sizes)])
            return
        per_slot = (mask, lr, torch.cat(counts))
        offset = 0
        for key, members in stacks.items():
            n, r = len(members), len(members[0][1].mask)
            _step_stack([s for _, s in members], self._moment_stacks((where, key), members),
                        [v[offset:offset + n * r].view(n, r) for v in per_slot], hyper)
            offset += n * r

    def _moment_stacks(self, key: tuple, members: List[Tuple[torch.Tensor, _Slots]]
                       ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(exp_avg, exp_avg_sq) of the tensors of one stack (``key``: where and the stack's
        key), stacked along a new first dimension, for the torch path to update in place.

        The state tensors of a stack of several are views of one pair of stacked tensors, made
        when the stack is first seen or its members' moments are other tensors than those views
        (a member more or less, `load_state_dict`); a stack then needs no copy of its moments
        in or out. A stack of one is its state tensors, viewed. None for tensor subclasses
        (an FSDP2 DTensor has no address to recognise the views by): `_step_stack` stacks
        their moments on every step and copies them back."""
        if not all(kernel_readable(s.tensors[i]) for _, s in members for i in (0, 2, 3)):
            return None
        if len(members) == 1:
            (p, s), = members
            self._release_moment_stack(self._moment_keys.get(id(p)))
            state = self.state[p]  # anew: the release may have given it copies
            return tuple(state[name].view_as(s.tensors[i]).unsqueeze(0)
                         for i, name in ((2, "exp_avg"), (3, "exp_avg_sq")))
        ptrs = tuple(s.tensors[i].data_ptr() for i in (2, 3) for _, s in members)
        cached = self._moments.get(key)
        if cached is None or cached[0] != ptrs:
            # this stack's old one, and those its members were in under another key
            for old in {key, *(self._moment_keys.get(id(p)) for p, _ in members)}:
                self._release_moment_stack(old)
            stacked = tuple(torch.stack([s.tensors[i] for _, s in members]) for i in (2, 3))
            for j, (p, _) in enumerate(members):
                state = self.state[p]
                state["exp_avg"], state["exp_avg_sq"] = (t[j].view(p.shape) for t in stacked)
            ptrs = tuple(t[j].data_ptr() for t in stacked for j in range(len(members)))
            cached = (ptrs, *stacked, [p for p, _ in members])
            self._moments[key] = cached
            self._moment_keys.update((id(p), key) for p, _ in members)
            self._fused.pop(key[0], None)  # a fused plan holds the moments it was made with
            self.cache_epoch += 1  # new tensors: a captured step would update the old ones
        return cached[1], cached[2]

    def _release_moment_stack(self, key: Optional[tuple]) -> None:
        """Forget the stacked moments kept for ``key`` (None: none), giving each of their
        former members whose state still views them a copy of its own, so that the stack's
        memory is freed (a member left out of the next stack would otherwise keep all of it
        alive). The state tensors are then other tensors: a fused plan of that group and
        device (which holds them) is dropped, and a captured step is stale (`cache_epoch`)."""
        cached = self._moments.pop(key, None)
        if cached is None:
            return
        self._fused.pop(key[0], None)
        self.cache_epoch += 1
        for p in cached[3]:
            if self._moment_keys.get(id(p)) == key:
                del self._moment_keys[id(p)]
            state = self.state.get(p, {})
            for name, stacked in zip(("exp_avg", "exp_avg_sq"), cached[1:3]):
                t = state.get(name)
                if t is not None and t.untyped_storage().data_ptr() == \
                        stacked.untyped_storage().data_ptr():
                    state[name] = t.clone()

    def _fused_plan(self, params: List[torch.Tensor], where: tuple) -> "_FusedPlan":
        """The fused kernel's launches for ``params`` (one group and device), made by
        `_prepare` and kept while the parameters and their layers' `_layout_key` stay the same:
        between allocation rounds a step then does no per-tensor work on the host beyond reading
        each gradient and launching. While the key holds, `_prepare` would change nothing: the
        cached masks and starts are current and no slot is fresh (`_restart_fresh_slots`
        compares the same slot versions; `load_state_dict` drops the plans)."""
        ids = tuple(map(id, params))
        plan = self._fused.get(where)
        if plan is None or plan.key[0] != ids or \
                plan.key[2] != [_layout_key(m) for m in plan.key[1]]:
            # the distinct layers of the adapter tensors, whose `_layout_key`s the plan holds to
            layers = list(dict.fromkeys(self._slots[i][0] for i in ids if i in self._slots))
            key = (ids, layers, [_layout_key(m) for m in layers])
            _, slots, sizes, mask, mask_parts, start, order = self._prepare(params, where)
            plan = _FusedPlan(key, order, slots, sizes, mask, mask_parts, start)
            self._fused[where] = plan
        return plan

    def _flat_slots(self, where: tuple, order: List[torch.Tensor],
                    slots: List[_Slots]) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """(flat mask, its float32 parts per tensor, flat schedule starts) of ``slots`` (the
        slots of the tensors ``order``), cached until the tensors or a layer's `_layout_key`
        change."""
        key = tuple((id(p), _layout_key(self._slots[id(p)][0]) if id(p) in self._slots else None)
                    for p in order)
        cached = self._flat.get(where)
        if cached is None or cached[0] != key:
            mask = torch.cat([s.mask for s in slots])
            new = (mask, mask.to(torch.float32), torch.cat([s.start for s in slots]))
            tensors, replaced = refresh_in_place(None if cached is None else cached[1], new)
            self.cache_epoch += replaced
            parts = list(tensors[1].split([len(s.mask) for s in slots]))
            cached = (key, tensors, parts)
            self._flat[where] = cached
        (mask, _, start), parts = cached[1], cached[2]
        return mask, parts, start

    def _masks(self, layer: IncreLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
        """The layer's `trainable_slot_masks`, recomputed only when its `_layout_key`
        changed."""
        cached = self._layer_masks.get(layer)
        if cached is None or cached[0] != _layout_key(layer):
            masks, replaced = refresh_in_place(None if cached is None else cached[1],
                                               layer.trainable_slot_masks())
            self.cache_epoch += replaced
            cached = (_layout_key(layer), masks)
            self._layer_masks[layer] = cached
        return cached[1]

    def _as_slots(self, p: torch.Tensor) -> _Slots:
        """``p`` as slots, its state created on its first step."""
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if id(p) not in self._slots:
            if p.device not in self._dense_slot:
                self._dense_slot[p.device] = (torch.ones(1, dtype=torch.bool, device=p.device),
                                              torch.zeros(1, dtype=torch.long, device=p.device))
            return _Slots(tuple(t.view(1, -1) for t in tensors), 0, *self._dense_slot[p.device],
                          state["step"].view(1))
        layer, kind = self._slots[id(p)]
        ab_mask, lam_mask = self._masks(layer)
        if kind == "lora_lambda":
            return _Slots(tensors, 0, lam_mask, layer.slot_active_step, state["slot_count"])
        # Without advance learning, A and B only start training when their slot is activated.
        ab_start = layer.slot_alloc_step if layer.advance_learning else layer.slot_active_step
        return _Slots(tensors, ADAPTER_SLOT_DIM[kind], ab_mask, ab_start,
                      state["slot_count"])

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if id(p) not in self._slots:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            return
        r = self._slots[id(p)][0].r_max
        state["slot_count"] = torch.zeros(r, dtype=torch.float32, device=p.device)
        # -2: never seen, so every slot starts fresh (an unused slot's stamp is -1)
        state["seen_alloc"] = torch.full((r,), -2, dtype=torch.long, device=p.device)
        state["seen_active"] = torch.full((r,), -2, dtype=torch.long, device=p.device)

    def _restart_fresh_slots(self, params: List[torch.Tensor], where: tuple) -> None:
        """Zero moments and step counts of the slots each adapter tensor has not seen yet: A and
        B slots (re-)allocated since its last step, lambda slots also newly activated.

        Only tensors whose layer changed its ``slot_version`` since their last step are
        compared (all of them on the first step and after `load_state_dict`); the comparison
        and the zeroing are masked operations on the device, so nothing is read on the host."""
        for p in params:
            layer, kind = self._slots[id(p)]
            if self._seen_version.get(id(p)) == layer.slot_version:
                continue
            self._check_clocks(p, layer, where)
            state = self.state[p]
            fresh = state["seen_alloc"] != layer.slot_alloc_step
            if kind == "lora_lambda" or not layer.advance_learning:
                fresh |= state["seen_active"] != layer.slot_active_step
            fresh_along = along_slot_dim(fresh, ADAPTER_SLOT_DIM[kind], p.dim())
            state["exp_avg"].masked_fill_(fresh_along, 0)
            state["exp_avg_sq"].masked_fill_(fresh_along, 0)
            # A slot the controller changed at this step (between its backward and now: the
            # stamp is this step) got this step's gradient in its old state: zero (an unused
            # slot, a reserve lambda, a frozen reserve). Like a parameter just added to AdamW,
            # which has no gradient yet, it takes no Adam step on it: its count starts at -1, so
            # this step leaves it at 0, a count that takes no step at all (not even weight
            # decay: the kernels leave it unchanged, as a masked-out slot), and its first real
            # gradient gets the bias correction of step 1 (not of step 2 after a zero gradient:
            # a first update 0.74x as large). A
            # slot changed at an earlier step that this tensor missed (no gradient then) has its
            # first real gradient now and counts this step, as do slots never seen (-2: the
            # first step).
            now = self.global_step
            changed_now = (layer.slot_alloc_step == now) | (layer.slot_active_step == now)
            state["slot_count"].masked_fill_(fresh, 0)
            state["slot_count"].masked_fill_(fresh & changed_now & (state["seen_alloc"] != -2),
                                             -1)
            state["seen_alloc"].copy_(layer.slot_alloc_step)
            state["seen_active"].copy_(layer.slot_active_step)
            self._seen_version[id(p)] = layer.slot_version

    def _check_clocks(self, p: torch.Tensor, layer: IncreLoRALinear, where: tuple) -> None:
        """Warn once when the layer's last slot stamp (`IncreLoRALinear.last_stamp`), new to
        ``p`` (of group and device ``where``), was not made at one of the steps since ``p``'s
        last known step (`_stepped_before`), up to this one: the index given to
        ``controller.step`` is not this optimizer's step count (`global_step`), so new slots
        would take their warmup, decay and first Adam step at other steps than the controller
        meant. Also when a slot holds a stamp beyond this step (`IncreLoRALinear.latest_stamp`):
        the stamps of an earlier run (a grown model's state dict loaded, or a copy of it) under
        a new optimizer, whose per-slot schedules would begin only at those steps (with
        warmup_steps > 0 a learning rate of 0 until then). Host values only."""
        if self._clock_warned:
            return
        stamp = getattr(layer, "last_stamp", None)  # (a layer pickled by an older release)
        latest = getattr(layer, "latest_stamp", None)
        if latest is not None and latest > self.global_step:
            step, stepped = latest, ""
        else:
            seen = self._seen_version.get(id(p))
            if stamp is None or (seen is not None and seen >= stamp[1]):
                return
            ids, at = self._stepped_before.get(where, ([], -1))
            step, last = stamp[0], at if id(p) in ids else -1
            if last < step <= self.global_step:
                return
            stepped = f" (it stepped them last at step {last})" if step <= last else ""
        self._clock_warned = True
        warnings.warn(f"IncreLoRAAdamW: slots were stamped at step {step} by controller.step, "
                      f"but this is the optimizer's step {self.global_step}{stepped}: the two "
                      "step counts differ, so new slots take their warmup, decay and first "
                      "Adam step at other steps than meant. Pass controller.step the "
                      "optimizer's step index (optimizer.global_step, 0, 1, 2, ...), call "
                      "both once per step, and resume both from one checkpoint (the "
                      "optimizer's load_state_dict too); for a new run over a model an "
                      "earlier run grew (its state_dict loaded, or a copy), call "
                      "restart_schedules() on each IncreLoRA layer first; warned once",
                      RuntimeWarning, stacklevel=4)


def create_optimizer(model: nn.Module, config: Optional[IncreLoRAConfig] = None, lr: float = 1e-3,
                     weight_decay: float = 0.0, betas: Tuple[float, float] = (0.9, 0.999),
                     eps: float = 1e-8) -> IncreLoRAAdamW:
    """One `IncreLoRAAdamW` over every trainable parameter of an injected model.

    Adapter slots get restart warmup (``config.warmup_steps``, ``config.total_step``); other
    trainable parameters get the same warmup and decay from step 0. Three parameter groups
    (`GROUP_NAMES`, an empty one left out): the adapters (``"increlora"``), the other
    parameters with ``weight_decay`` (``"other"``), and their biases and normalization
    weights without it (``"other_no_decay"``, `no_decay_parameters`: the Hugging Face
    Trainer's rule and the authors'). Adapter tensors always take ``weight_decay``. The
    update is ``torch.optim.AdamW``'s (eps added to the bias-corrected ``sqrt(v)``, weight
    decay applied before the update); the authors' trainer runs transformers' former
    ``AdamW``, which adds eps before the bias correction (an eps larger by
    ``1 / sqrt(1 - beta2**step)`` in effect) and decays the updated weights (a difference of
    order lr^2 x weight_decay). An nn.TransformerEncoderLayer holding an IncreLoRA layer built by
    hand gets its inference fast path kept off (`keep_adapters_in_fast_paths`), as injection does.

    Raises:
        ValueError: ``lr``, ``eps``, ``weight_decay`` or ``betas`` are not finite numbers in
            range, the model holds no IncreLoRA layer, or every adapter tensor in it is frozen
            (`frozen_adapters_message`: peft's ``prepare_model_for_kbit_training`` called after
            `inject_increlora`), so that nothing would train, or FSDP1 shards the adapter
            tensors (`fsdp1_sharded_adapter_message`).
    """
    for name, value, low in (("lr", lr, "> 0"), ("eps", eps, "> 0"),
                             ("weight_decay", weight_decay, ">= 0")):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and (value >= 0 if low == ">= 0" else value > 0)
        if not ok:
            raise ValueError(f"create_optimizer {name}={value!r} is invalid: use a finite "
                             f"number {low}")
    config = config or get_config(model)
    if not any(True for _ in increlora_layers(model)):
        raise ValueError("create_optimizer: the model holds no IncreLoRA layer; call "
                         "inject_increlora(model, config) first")
    frozen = frozen_adapters_message(model)
    if frozen is not None:
        raise ValueError(f"create_optimizer: {frozen}")
    sharded = fsdp1_sharded_adapter_message(model)
    if sharded is not None:
        raise ValueError(f"create_optimizer: {sharded}")
    unfrozen = unfrozen_bases_message(model)
    if unfrozen is not None:
        warnings.warn(f"create_optimizer: {unfrozen}", UserWarning, stacklevel=2)
    keep_adapters_in_fast_paths(model)  # layers built by hand, not injected
    slots: Dict[int, Tuple[IncreLoRALinear, str]] = {}
    adapter, dense = [], []
    for _, layer in increlora_layers(model):
        for kind in ADAPTER_SLOT_DIM:
            param = getattr(layer, kind)
            slots[id(param)] = (layer, kind)
            adapter.append(param)
    for p in model.parameters():
        if p.requires_grad and id(p) not in slots:
            dense.append(p)
    decayed, spared = split_weight_decay(model, dense)
    groups = [{"params": adapter, "name": "increlora"},
              {"params": decayed, "name": "other"},
              {"params": spared, "name": "other_no_decay", "weight_decay": 0.0}]
    optimizer = IncreLoRAAdamW([g for g in groups if g["params"]], slots, lr=lr, betas=betas,
                               eps=eps, weight_decay=weight_decay,
                               warmup_steps=config.warmup_steps, total_step=config.total_step)
    optimizer._dense_order = dense  # `_regrouped`: a state saved with one group of them
    return optimizer
