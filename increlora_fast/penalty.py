"""`OrthogonalPenalty`: IncreLoRA's orthogonal regulariser over a model's adapted layers (spec
section 6), the loss `IncreLoRAController.regularization_loss` returns.

    orth_reg_weight x sum over modules of (||A A^T - I|| + ||B^T B - I||) / (2 x modules)

over the slots that count (active and reserve slots, and after the budget the retired
reserves, as in the authors' code; active only with ``reserve_in_penalty=False``), with
gradients only into the A rows and B columns that train (frozen reserve slots count but get
none). Two paths compute it:

- **Triton** (where the layers take their Triton kernels, `functional.penalty_on_triton`): one
  launch forward and one backward over every module (`kernels.orth_penalty.OrthPenalty`), which
  read each A and B where it lives, through a table of addresses on the device. Each dtype of
  slot buffers is checked once per device and slot tile against float64 first
  (`functional.orth_penalty_ok`).
- **torch** (CPU, float64 buffers, torch.compile, a failed check, a model split over devices,
  whose buffers one table of addresses cannot hold): batched over the modules of one shape,
  device and dtype, stacking their A and B at each call; each batch's term is added on the
  first layer's device.

Nothing is read on the host. The masks of which slots count and train are cached and rebuilt
only when a layer's ``slot_version`` or ``advance_learning`` changes, in place where they can be
(`refresh_cached_masks`, called by each allocation round), so a step replayed from a CUDA graph
reads the current masks; ``cache_epoch`` counts the times they had to be new tensors instead.
While dynamo traces, no cache is read: the compiled graph makes the masks from the slot states
at each call, so slot changes recompile nothing.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from . import functional
from .config import IncreLoRAConfig
from .device_scalar import refresh_in_place
from .layer import IncreLoRALinear, SlotState


class OrthogonalPenalty:
    """The penalty over ``layers`` with ``config.orth_reg_weight`` and
    ``config.reserve_in_penalty`` (reserve and retired reserve slots count, the authors' code,
    or only active ones), both read at each call."""

    def __init__(self, layers: List[IncreLoRALinear], config: IncreLoRAConfig) -> None:
        self.layers = list(layers)
        self.config = config
        # the torch path's groups of one shape, device and dtype (`_groups_now`), the devices
        # and dtypes of the layers' A and B they were made for, and per group its cached masks
        self._groups: List[List[IncreLoRALinear]] = []
        self._layout: Optional[tuple] = None
        self._group_masks: Dict[int, tuple] = {}
        # the Triton path's kernels (built on its first use) and its (key, masks); never where
        # a layer has more slots than they take (as the layers' own kernels), a refusal made
        # here once instead of at each call
        self._r_max = max(layer.r_max for layer in self.layers)
        self._kernels_take_r = self._r_max <= functional.TRITON_MAX_R
        self._kernels = None
        self._kernel_masks: Optional[Tuple[tuple, Tuple[torch.Tensor]]] = None
        self.cache_epoch = 0

    def loss(self) -> torch.Tensor:
        """The penalty as a 0-d tensor on the layers' device (0 when the weight is 0)."""
        weight = float(self.config.orth_reg_weight)
        if weight == 0:
            return torch.zeros((), device=self.layers[0].lora_A.device)
        on_kernels = self._kernel_loss(weight)
        return on_kernels if on_kernels is not None else self._stacked_loss(weight)

    def refresh_cached_masks(self) -> None:
        """Bring the cached masks made so far up to date with the layers' slots now, in place. An
        allocation round calls it, so that a step replayed from a CUDA graph captured before the
        round (which does not run the Python that would refresh them) reads the new masks."""
        for index, members in enumerate(self._groups_now()):
            if index in self._group_masks:
                self._masks_of_group(index, members)
        if self._kernel_masks is not None and self._kernels is not None:
            self._masks_of_kernels()

    # ------------------------------------------------------------------ Triton path
    def _kernel_loss(self, weight: float) -> Optional[torch.Tensor]:
        """The loss from the penalty's kernels, or None where they may not run now."""
        first = self.layers[0].lora_A
        if not self._kernels_take_r or not functional.penalty_on_triton(first):
            return None
        a = [layer.lora_A for layer in self.layers]
        b = [layer.lora_B for layer in self.layers]
        kernels = self._kernels
        if kernels is None or not kernels.ready(a + b):
            kernels = self._kernels = self._new_kernels(a + b)
            if kernels is None:
                return None
        masks = self._masks_of_kernels()
        return kernels(a, b, masks, weight / (2 * len(self.layers)))

    def _new_kernels(self, buffers: List[torch.Tensor]):
        """An `OrthPenalty` for ``buffers``, or None where they may not take it: a CUDA graph
        being captured (its tables would be copied inside the capture), a buffer that is a
        tensor subclass (an FSDP2 DTensor shard), not contiguous, on another device or of a
        dtype that failed (or may not take) the first-use check, CUDA tensors under the Triton
        interpreter. (More slots than the kernels take is refused once, at construction.)"""
        from .kernels.orth_penalty import OrthPenalty
        from .kernels.utils import interpreter_active, stream_capturing

        device = buffers[0].device
        if stream_capturing(device) or (device.type == "cuda" and interpreter_active()):
            return None
        if not all(functional.kernel_readable(t) and t.is_contiguous() and t.device == device
                   for t in buffers):
            return None
        if not all(functional.orth_penalty_ok(device, dtype, self._r_max)
                   for dtype in {t.dtype for t in buffers}):
            return None
        return OrthPenalty(self._r_max)

    def _masks_of_kernels(self) -> torch.Tensor:
        """The kernels' (modules, 2, r) float32 masks of the slots that count and that train."""
        first = self.layers[0].lora_A
        key = (tuple((m.slot_version, m.advance_learning) for m in self.layers), first.device,
               self.config.reserve_in_penalty)
        cached = self._kernel_masks
        if cached is None or cached[0] != key:
            from .kernels.orth_penalty import penalty_masks  # on a rebuild only: a hot path

            with torch.inference_mode(False), torch.no_grad():  # masks for training steps too
                used, trains = zip(*(self._counted_and_trained(m) for m in self.layers))
                masks, replaced = refresh_in_place(
                    None if cached is None else cached[1],
                    (penalty_masks(used, trains, self._kernels.r),))
            self.cache_epoch += replaced
            cached = self._kernel_masks = (key, masks)
        return cached[1][0]

    # ------------------------------------------------------------------ torch path
    def _groups_now(self) -> List[List[IncreLoRALinear]]:
        """The layers in groups that stack (`_grouped`), cached: regrouped, and the groups'
        masks made anew, when a layer's A or B moved or changed dtype since the last call."""
        layout = self._layout_now()
        if layout != self._layout:
            self._groups, self._layout = self._grouped(layout), layout
            self._group_masks.clear()
        return self._groups

    def _layout_now(self) -> tuple:
        """Per layer (A's device, A's dtype, B's device, B's dtype)."""
        return tuple((m._parameters["lora_A"].device, m._parameters["lora_A"].dtype,
                      m._parameters["lora_B"].device, m._parameters["lora_B"].dtype)
                     for m in self.layers)

    def _grouped(self, layout: tuple) -> List[List[IncreLoRALinear]]:
        """The layers in groups that stack: one shape, and A and B on one device in one dtype
        each (a model split over devices, device_map's, or with layers of other adapter
        dtypes, has several groups of one shape)."""
        groups: Dict[tuple, List[IncreLoRALinear]] = defaultdict(list)
        for layer, where in zip(self.layers, layout):
            groups[(where, layer.in_features, layer.out_features, layer.r_max)].append(layer)
        return list(groups.values())

    def _stacked_loss(self, weight: float) -> torch.Tensor:
        device = self.layers[0].lora_A.device
        total = torch.zeros((), device=device)
        # While dynamo traces, no cache is read (it guarded on each cached key, the layers'
        # slot_version included: the graph recompiled at every allocation round, and once when
        # traced before an eager call filled the cache): the graph makes the masks at each
        # call, from the slot states then.
        tracing = torch.compiler.is_dynamo_compiling()
        groups = self._grouped(self._layout_now()) if tracing else self._groups_now()
        for index, members in enumerate(groups):
            trains, w, eye = self._new_group_masks(members) if tracing else \
                self._masks_of_group(index, members)
            # Frozen reserve slots (no advance learning) count in the penalty but get no gradient.
            # In float32 at least, as the kernels accumulate: near orthonormality the entries of
            # A A^T - I are small differences of numbers near 1, lost in a 16-bit Gram matrix.
            a = torch.stack([m.lora_A for m in members]).to(w.dtype)
            a = torch.where(trains[:, :, None], a, a.detach()) * w[:, :, None]
            b = torch.stack([m.lora_B for m in members]).to(w.dtype)
            b = torch.where(trains[:, None, :], b, b.detach()) * w[:, None, :]
            term = torch.linalg.matrix_norm(a @ a.transpose(1, 2) - eye).sum() \
                + torch.linalg.matrix_norm(b.transpose(1, 2) @ b - eye).sum()
            # summed on the first layer's device (moved only from another: a copy to a CPU
            # device is a host transfer on a GPU machine, and the host-read tests count it)
            total = total + (term if term.device == device else term.to(device))
        return weight * total / (2 * len(self.layers))

    def _masks_of_group(self, index: int, members: List[IncreLoRALinear]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(trainable A/B slots, slot weights in the dtype the penalty is computed in (the
        adapter dtype, at least float32), their diagonal matrices) of one group, each stacked
        over its members; cached until a member's ``slot_version`` or ``advance_learning``,
        the adapter dtype or the device changes."""
        lora_a = members[0].lora_A
        key = (tuple((m.slot_version, m.advance_learning) for m in members), lora_a.dtype,
               lora_a.device, self.config.reserve_in_penalty)
        cached = self._group_masks.get(index)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # masks for training steps too
                masks, replaced = refresh_in_place(None if cached is None else cached[1],
                                                   self._new_group_masks(members))
            self.cache_epoch += replaced
            cached = (key, masks)
            self._group_masks[index] = cached
        return cached[1]

    def _new_group_masks(self, members: List[IncreLoRALinear]
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_masks_of_group`'s masks of one group, made now."""
        used, trains = (torch.stack(ms) for ms in
                        zip(*(self._counted_and_trained(m) for m in members)))
        w = used.to(torch.promote_types(members[0].lora_A.dtype, torch.float32))
        return trains, w, torch.diag_embed(w)

    def _counted_and_trained(self, layer: IncreLoRALinear) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slots that count in the penalty, slots whose A row and B column train), bool. (int():
        torch.compile folds ``tensor != IntEnum`` to a Python bool, torch 2.13.)"""
        counted = (layer.slot_state != int(SlotState.INACTIVE)) | layer.retired_mask \
            if self.config.reserve_in_penalty else layer.active_mask
        return counted, layer.trainable_slot_masks()[0]
