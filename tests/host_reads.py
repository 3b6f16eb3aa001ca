"""Counting host reads of tensors, for tests that a training step is free of device syncs.

On a GPU every read of a tensor's value on the host (``.item()``, ``bool(t)``, ``int(t)``,
``float(t)``, ``t.tolist()``, ``t.cpu()``, ``if t:``, a data-dependent shape such as
``torch.nonzero``) waits for the device and breaks CUDA-graph capture. On the CPU nothing waits,
so `HostReads` recognises the calls themselves:

- a ``TorchFunctionMode`` sees the Python-level reads: ``item``, ``tolist``, ``numpy``, ``cpu``,
  ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``__format__``, ``Tensor.to`` with an
  explicit CPU device (on the CPU a ``.to("cpu")`` is a read wherever the tensor lives on a GPU)
  unless torch's own code makes the call (``clip_grad_norm_`` moves per-tensor norms to the
  first gradient's device, which is no read), and ``copy_`` into a CPU tensor from a tensor on
  another device;
- a ``TorchDispatchMode`` is the backstop for reads that do not pass through Python methods:
  ``aten._local_scalar_dense`` (the op behind every scalar read), ``aten.equal`` and
  ``aten.is_nonzero`` (return Python bools), and ops whose output shape depends on the data
  (``nonzero``, ``masked_select``, ``unique``, boolean indexing, ``repeat_interleave`` without
  an output size).

A scalar read seen by the function mode is counted once, not again by the dispatch mode.
Reads made inside modules named in ``allow`` (e.g. a third-party model's own mask checks) are
listed apart, in ``allowed``.
Both modes are thread-local state that autograd carries into backward, so reads in backward
hooks are counted too. Use `HostReads.self_check` in a test first: a counter that misses reads
proves nothing.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READ_METHODS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
    torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
    torch.Tensor.__format__,
}
_SCALAR_OPS = {"aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero"}
_DATA_SHAPE_OPS = {"aten::nonzero", "aten::masked_select", "aten::_unique", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive", "aten::nonzero_static"}


def _is_cpu(device: Any) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] == "cpu"
    return isinstance(device, torch.device) and device.type == "cpu"


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to(*args, **kwargs)`` call names the CPU as its target device."""
    return any(_is_cpu(a) for a in args[1:]) or _is_cpu(kwargs.get("device"))


class _FunctionReads(TorchFunctionMode):
    def __init__(self, owner: "HostReads") -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        read = func in _READ_METHODS
        if func is torch.Tensor.to:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            read = _to_cpu(args, kwargs) and not caller.startswith("torch.")
        elif func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            read = dst.device.type == "cpu" and isinstance(src, torch.Tensor) \
                and src.device.type != "cpu"
        if not read:
            return func(*args, **kwargs)
        self.owner._record(f"Tensor.{name}")
        self.owner._inside += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.owner._inside -= 1


def dispatch_read(func, args: tuple, kwargs: dict) -> Optional[str]:
    """The host read an aten call makes on a GPU, named, or None: a scalar read
    (`_SCALAR_OPS`), an output shape that depends on the data (`_DATA_SHAPE_OPS`, boolean-mask
    indexing, ``repeat_interleave`` without an output size). `graph_emulator` refuses the same
    calls inside a capture."""
    name = func._schema.name
    if name in _SCALAR_OPS or name in _DATA_SHAPE_OPS:
        return str(func)
    if name == "aten::index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in args[1]):
        return f"{func} (boolean mask)"
    if name == "aten::repeat_interleave" and kwargs.get("output_size") is None \
            and isinstance(args[0], torch.Tensor) and len(args) < 3:
        return str(func)
    return None


class _DispatchReads(TorchDispatchMode):
    def __init__(self, owner: "HostReads") -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = dispatch_read(func, args, kwargs)
        if read is not None and not (func._schema.name in _SCALAR_OPS and self.owner._inside):
            self.owner._record(read)
        return func(*args, **kwargs)


class HostReads:
    """Context manager recording every host read of a tensor made inside it.

    ``reads`` lists them in order, each by the method or aten op that read (``Tensor.item``,
    ``aten._local_scalar_dense.default``, ...). ``len(counter)`` is their number. Reads made
    while a module whose ``__name__`` starts with one of ``allow`` is on the Python stack go to
    ``allowed`` instead.
    """

    def __init__(self, allow: Tuple[str, ...] = ()) -> None:
        self.reads: List[str] = []
        self.allowed: List[str] = []
        self.allow = tuple(allow)
        self._inside = 0
        self._modes: Optional[tuple] = None

    def _record(self, what: str) -> None:
        frame = sys._getframe(1)
        while self.allow and frame is not None:
            if frame.f_globals.get("__name__", "").startswith(self.allow):
                self.allowed.append(what)
                return
            frame = frame.f_back
        self.reads.append(what)

    def __len__(self) -> int:
        return len(self.reads)

    def __enter__(self) -> "HostReads":
        self._modes = (_DispatchReads(self), _FunctionReads(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = None

    @staticmethod
    def count(fn: Callable[[], Any]) -> List[str]:
        """The host reads ``fn()`` makes."""
        with HostReads() as counter:
            fn()
        return counter.reads

    @staticmethod
    def self_check() -> None:
        """Raise AssertionError unless each kind of read is seen, including one in a backward
        hook, and plain device arithmetic is not."""
        t = torch.tensor([1.5, 2.0])
        s = torch.tensor(2)
        reads = {
            "item": lambda: t[0].item(), "bool": lambda: bool(t[0]),
            "if": lambda: 1 if t[0] else 0, "int": lambda: int(s), "float": lambda: float(t[0]),
            "index": lambda: [0, 1, 2][s], "tolist": lambda: t.tolist(), "cpu": lambda: t.cpu(),
            "numpy": lambda: t.numpy(), "to cpu": lambda: t.to("cpu"),
            "to device cpu": lambda: t.to(device=torch.device("cpu")),
            "format": lambda: f"{t.sum():.2f}", "any": lambda: any(t > 1),
            "equal": lambda: torch.equal(t, t), "nonzero": lambda: torch.nonzero(t),
            "boolean index": lambda: t[t > 1.7],
            "isfinite all": lambda: bool(torch.isfinite(t).all()),
        }
        for what, fn in reads.items():
            assert len(HostReads.count(fn)) >= 1, f"HostReads missed a read: {what}"

        def in_backward() -> None:
            w = torch.ones(2, requires_grad=True)
            y = w * 2
            y.register_hook(lambda g: float(g.sum()) and None)
            y.sum().backward()

        assert HostReads.count(in_backward), "HostReads missed a read in a backward hook"
        quiet = HostReads.count(lambda: (t * 2 + s).sum().sqrt().to(torch.float64)
                                .where(t > 0, 0.0).clone().copy_(t))
        assert quiet == [], f"HostReads counted device arithmetic as reads: {quiet}"
