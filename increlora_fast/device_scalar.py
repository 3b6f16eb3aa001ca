"""`DeviceScalar`: a host number mirrored in 0-d device tensors, for steps captured in CUDA
graphs. A captured step only reads the tensor; the host fills it (one launch, no read) whenever
the value it holds is stale, which outside a graph happens before the read and, for a replay,
through an explicit `sync` before it. So no step number or learning rate is baked into a
graph."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch


class DeviceScalar:
    """``value`` as a 0-d ``dtype`` tensor per device, filled only when it changed."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        # device -> (its tensor, the host value that tensor holds)
        self._tensors: Dict[torch.device, Tuple[torch.Tensor, float]] = {}

    def get(self, value: float, device: torch.device) -> torch.Tensor:
        """The tensor on ``device``, holding ``value`` (filled now if it held another)."""
        entry = self._tensors.get(device)
        if entry is None or entry[1] != value:
            t = entry[0] if entry is not None else torch.empty((), dtype=self.dtype,
                                                                device=device)
            t.fill_(value)
            entry = (t, value)
            self._tensors[device] = entry
        return entry[0]

    def sync(self, value: float) -> None:
        """Make every tensor made so far hold ``value`` (before replaying a graph)."""
        for device in list(self._tensors):
            self.get(value, device)


def grad_scaler_scale(scaler: "torch.amp.GradScaler") -> Union[float, torch.Tensor]:
    """The factor an enabled ``torch.amp.GradScaler`` multiplies losses by, as its 0-d device
    tensor, read without a host sync (``get_scale()`` reads it on the host); the float it starts
    from before its first ``scale()``, 1.0 when the scaler is disabled. A graphed step captures
    this tensor, which the scaler updates in place."""
    if not scaler.is_enabled():
        return 1.0
    scale = getattr(scaler, "_get_scale_async", lambda: None)()
    return scale if scale is not None else float(scaler.get_scale())


def unscale_once(scaler: "torch.amp.GradScaler", optimizer: torch.optim.Optimizer
                 ) -> Optional[torch.Tensor]:
    """``scaler.unscale_(optimizer)`` unless it ran since the scaler's last ``update()``
    (gradient clipping calls it first), then the step's overflow flag, read without a host
    sync: a 0-d float32 tensor on the scaler's device, nonzero when a gradient of
    ``optimizer`` is inf or NaN (``scaler.step`` then skips the step). None for a disabled
    scaler, or one that keeps no such record (the flag lives in the scaler's per-optimizer
    state, which torch does not publish)."""
    if not scaler.is_enabled():
        return None
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        scaler.unscale_(optimizer)
        return None
    from torch.amp.grad_scaler import OptState

    state = states[id(optimizer)]
    if state.get("stage") is not OptState.UNSCALED:
        scaler.unscale_(optimizer)
    found = list(state.get("found_inf_per_device", {}).values())
    if not found:
        return None
    scale = getattr(scaler, "_scale", None)  # on the scaler's device, as torch's step does
    device = scale.device if isinstance(scale, torch.Tensor) else found[0].device
    if len(found) == 1 and found[0].device == device:
        return found[0]
    return sum(f.to(device, non_blocking=True) for f in found)


def refresh_in_place(old: Optional[Tuple[torch.Tensor, ...]], new: Tuple[torch.Tensor, ...]
                     ) -> Tuple[Tuple[torch.Tensor, ...], bool]:
    """``new``'s values held by ``old``'s tensors, when there are old tensors of the same
    shapes, dtypes and devices: a CUDA graph that captured ``old`` then reads the new values.
    Otherwise ``new`` itself. Returns (the tensors, whether they are other objects than
    ``old``'s, which a captured graph does not read)."""
    if old is not None and len(old) == len(new) and all(
            o.shape == n.shape and o.dtype == n.dtype and o.device == n.device
            for o, n in zip(old, new)):
        for o, n in zip(old, new):
            o.copy_(n)
        return old, False
    return new, True
