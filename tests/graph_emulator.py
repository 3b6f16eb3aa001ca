"""CUDA-graph semantics on CPU, so graphed training steps can be tested without a GPU.

A CUDA graph records the kernels a block of code launches, with their arguments, and replays
exactly those launches later: on the same memory, with every scalar argument as it was at
capture, and none of the Python code around them. `EmulatedGraph` does the same with aten ops
and Triton launches: while capturing, a dispatch mode records every aten op (function, arguments,
outputs) and a patched `kernels.utils.launch` every kernel launch, in order; `replay` runs them
again on the very tensors of the capture and writes each op's results into the tensors the
capture produced (later ops read those). While capturing, `kernels.utils.stream_capturing`
says so, as torch.cuda.is_current_stream_capturing would. Python-side effects (a host counter, a
flag) are not replayed, and scalars baked into an op stay baked: exactly the mistakes a graphed
step can make.

A replay raises when a tensor the capture read or wrote has got new memory since (``p.data =
...``, ``set_``): CUDA would replay on the old memory, while the emulator would follow the
tensor object and give the right result by luck.

Unlike CUDA, capture executes the ops once (they are needed for their outputs); the replay that
follows a capture (CUDA needs it to run the captured step) is therefore skipped once. What the
captured ops allocated is poisoned (see below) from the end of the capture to that first replay,
which puts the computed values back: on CUDA it holds whatever its memory held until then, and
for ever in a graph never replayed, so a step that reads it too early fails here too. (Tensors
that existed before the capture and that its ops changed in place still change at the capture,
not at the first replay.)

A capture also refuses, as CUDA would, what syncs the stream or copies host data
(`capture_refuses`): a host read (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``,
``torch.equal``, ``torch.nonzero``, a boolean mask index, ...; and ``.tolist()``, ``.cpu()``,
``.numpy()``, ``.to("cpu")``, which on the CPU reach no aten op: `_HostCopies`),
``torch.tensor(data)``, pinning. On the CPU every tensor is a host tensor, so two copies to the
host go unseen: ``.to(torch.device("cpu"))``, which cannot be told from a move to the step's own
device (``x.to(y.device)``, as transformers' models do inside the step), and ``copy_`` into a
tensor made on the host, a copy between tensors of the one device here.

CUDA also refuses to load a kernel module while a stream captures (``cuModuleLoadData``: "operation
not permitted when stream is capturing"), so a Triton kernel must have run eagerly, with the same
specialization, before a capture launches it. Inside `kernels_loaded_before_capture` the emulator
records the specializations launched outside captures and a capture that launches another one
raises, as CUDA would. libtorch's own kernels load lazily too (torch sets CUDA_MODULE_LOADING=LAZY):
there the emulator records each aten op that computes (views and bare allocations do not) with
the dtypes of its tensors, in and out, outside captures, and a capture that runs another raises.
That is near the kernel CUDA would load: one per op and dtypes for elementwise ops and
reductions, while cuBLAS, which also picks kernels by shape, sees the same shapes in the eager
steps as in the captures.

Graphs may share one memory pool (`EmulatedPool`, as `training.cuda_graphs.CUDAGraphPool` shares
one among a run's graphs). CUDA's allocator then gives a later capture memory that an earlier
graph used for its temporaries, or for outputs the caller dropped: replaying the earlier graph
overwrites what the later one left there. The emulator assumes the worst: replaying a graph of
a pool poisons (NaN, or -7 in integers, True in booleans) every tensor that graphs captured
after it in that pool allocated, so a step that reads such a tensor before its own graph wrote
it again gives a wrong result instead of passing by luck.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# Host copies that reach no aten op on the CPU, where the emulated device's tensors already
# are; on a GPU each copies to the host and waits for the device.
_HOST_COPIES = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _to_cpu_by_name(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names the CPU by a string (``"cpu"``, ``device="cpu"``): a
    copy to the host on a GPU. A ``torch.device`` is not taken for one: the step's own device,
    the CPU here, reaches ``.to`` as one (``x.to(y.device)``, a no-op on CUDA too)."""
    return any(isinstance(d, str) and d.split(":")[0] == "cpu"
               for d in (*args[1:], kwargs.get("device")))


class _HostCopies(TorchFunctionMode):
    """Refuses `_HOST_COPIES`, and ``Tensor.to`` naming the CPU (`_to_cpu_by_name`), inside a
    capture (not the Triton interpreter's own)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _capture["paused"] and (func in _HOST_COPIES or (
                func is torch.Tensor.to and _to_cpu_by_name(args, kwargs))):
            raise RuntimeError(f"a host read (Tensor.{func.__name__}) inside a captured step: "
                               "CUDA graph capture would fail here")
        return func(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: List[tuple]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        paused = _capture["paused"]
        if not paused:
            refused = capture_refuses(func, args, kwargs)
            if refused is not None:
                raise RuntimeError(f"{refused} inside a captured step: CUDA graph capture "
                                   "would fail here")
        out = func(*args, **kwargs)
        if not paused:
            self.ops.append(("aten", func, args, kwargs, out))
        return out


# Host-side work a CUDA stream capture refuses beyond host reads: ``torch.tensor(data)`` (and
# ``as_tensor`` of Python data) copies host memory to the device from pageable memory, which
# synchronizes; pinning allocates host memory and queries events.
_HOST_TO_DEVICE = {"aten::lift_fresh": "a copy of host data to the device (torch.tensor)",
                   "aten::_pin_memory": "a pinned host allocation"}


def capture_refuses(func, args: tuple, kwargs: dict) -> Optional[str]:
    """What a CUDA capture would refuse in this aten call, named, or None: a host read or a
    data-dependent output shape (`host_reads.dispatch_read`: ``.item()``, ``torch.nonzero``,
    boolean-mask indexing, ...), or host data copied to the device (`_HOST_TO_DEVICE`). On the
    CPU these all run; on a GPU each syncs the stream or copies from pageable memory."""
    from host_reads import dispatch_read

    read = dispatch_read(func, args, kwargs)
    if read is not None:
        return f"a host read ({read})"
    if func._schema.name == "aten::lift_fresh" and args[0].numel() == 0:
        return None  # no bytes to copy: CUDA runs no copy (transformers' empty KV cache)
    return _HOST_TO_DEVICE.get(func._schema.name)


# Kernel specializations launched outside captures, while `kernels_loaded_before_capture` watches.
_loaded: Optional[Set[tuple]] = None
# Whether an `EmulatedGraph` captures now, and whether the aten ops seen now are the Triton
# interpreter's own (`_interpreter_ops`), neither recorded nor checked.
_capture = {"active": False, "paused": False}


@contextlib.contextmanager
def _interpreter_ops() -> Iterator[None]:
    """Around a Triton launch, or the emulator's own work (poisoning, copies): under the
    interpreter a launch runs tensor ops of its own; neither are aten kernels of the step."""
    _capture["paused"] = True
    try:
        yield
    finally:
        _capture["paused"] = False

# aten ops that launch no kernel (views are told by ``func.is_view``).
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
              "aten::new_empty_strided", "aten::detach", "aten::alias", "aten::lift_fresh",
              "aten::set_", "aten::resize_", "aten::_local_scalar_dense", "aten::is_nonzero",
              "aten::_pin_memory"}


# aten ops that fill their result with one value: all run libtorch's fill kernel of its dtype.
_FILLS = {"aten::fill_", "aten::zero_", "aten::zeros", "aten::zeros_like", "aten::ones",
          "aten::ones_like", "aten::full", "aten::full_like", "aten::new_zeros",
          "aten::new_ones", "aten::new_full"}


def aten_kernel(func, args: tuple, kwargs: dict, out: Any) -> Optional[tuple]:
    """Which libtorch kernel an aten call runs, as near as the host can tell (the op and the
    dtypes of its tensors, arguments then results; a fill by the dtype it fills), or None for a
    call that runs none."""
    name = func._schema.name
    if func.is_view or name in _NO_KERNEL:
        return None
    if name in _FILLS:
        return "fill", tuple(t.dtype for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    dtypes = tuple(t.dtype for t in tree_flatten((args, kwargs, out))[0]
                   if isinstance(t, torch.Tensor))
    return func, dtypes


class _AtenLoads(TorchDispatchMode):
    """Records the aten kernels run outside captures into ``seen`` and refuses, inside an
    `EmulatedGraph` capture, one not run before (see the module docstring)."""

    def __init__(self, seen: Set[tuple]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kernel = aten_kernel(func, args, kwargs, out)
        if kernel is not None and not _capture["paused"]:
            if not _capture["active"]:
                self.seen.add(kernel)
            elif kernel not in self.seen:
                raise RuntimeError(f"aten kernel {kernel[0]} {kernel[1]} run for the first time "
                                   "inside a captured step: CUDA cannot load a kernel while a "
                                   "stream captures (run it eagerly first)")
        return out


def specialization(kernel, args: tuple, kwargs: dict) -> tuple:
    """What decides which binary a Triton launch needs, as near as the host can tell: the kernel,
    tensor dtypes and whether their data pointers are 16-byte aligned (and None), and of integers
    whether they are 1 or divisible by 16 (Triton specializes on all three); constexpr keyword
    values as they are."""
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.dtype, a.data_ptr() % 16 == 0
        if isinstance(a, bool) or a is None:
            return a
        if isinstance(a, int):
            return ("int", a == 1, a % 16 == 0)
        if isinstance(a, float):
            return "float"
        return a
    return (kernel, tuple(one(a) for a in args),
            tuple(sorted((k, one(v)) for k, v in kwargs.items())))


@contextlib.contextmanager
def kernels_loaded_before_capture() -> Iterator[None]:
    """Within this block, an `EmulatedGraph` capture that launches a Triton kernel
    specialization, or runs an aten kernel (`aten_kernel`), not run eagerly before raises (CUDA
    cannot load a module while capturing)."""
    global _loaded
    from increlora_fast.kernels import utils as kutils
    real_launch = kutils.launch
    seen: Set[tuple] = set()

    def launch(kernel, grid, *args, **kwargs):
        seen.add(specialization(kernel, args, kwargs))
        with _interpreter_ops():
            real_launch(kernel, grid, *args, **kwargs)

    kutils.launch, _loaded = launch, seen
    try:
        with _AtenLoads(set()):
            yield
    finally:
        kutils.launch, _loaded = real_launch, None


class EmulatedPool:
    """A memory pool shared by the graphs it makes (call it for a new `EmulatedGraph`), used as
    a ``graph_factory``; see the module docstring for what sharing costs a replay."""

    def __init__(self) -> None:
        self.graphs: List["EmulatedGraph"] = []  # in capture order
        self.poisoned = 0  # tensors overwritten by replays so far

    def __call__(self) -> "EmulatedGraph":
        return EmulatedGraph(pool=self)

    def captured(self, graph: "EmulatedGraph") -> None:
        if graph in self.graphs:
            self.graphs.remove(graph)
        self.graphs.append(graph)

    def replaying(self, graph: "EmulatedGraph") -> None:
        """Overwrite what graphs captured after ``graph`` allocated (see the module docstring)."""
        later = self.graphs[self.graphs.index(graph) + 1:]
        with torch.no_grad(), _interpreter_ops():
            for other in later:
                for t in other.allocated:
                    _poison(t)
                    self.poisoned += 1


def _poison(t: torch.Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(-7)


def _addresses(ops: List[tuple]) -> List[Tuple[torch.Tensor, int]]:
    """Each tensor the captured ``ops`` read or wrote (once) with its data address: the memory a
    CUDA graph replays on."""
    seen: Dict[int, Tuple[torch.Tensor, int]] = {}
    for op in ops:
        for t in tree_flatten(op[2:])[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen[id(t)] = (t, t.data_ptr())
    return list(seen.values())


def _allocated(args: tuple, kwargs: dict, out: Any) -> List[torch.Tensor]:
    """The tensors of ``out`` an aten op allocated: those sharing no storage with an argument
    (not in-place results, ``out=`` tensors or views)."""
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()
    inputs = {storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    return [t for t in tree_flatten(out)[0]
            if isinstance(t, torch.Tensor) and t.numel() and storage(t) not in inputs]


class EmulatedGraph:
    """The `capture()` / `replay()` interface of `training.cuda_graphs.CUDAStepGraph`, in its own
    memory pool or in ``pool`` (an `EmulatedPool`) shared with other graphs."""

    def __init__(self, pool: Optional[EmulatedPool] = None) -> None:
        self.ops: List[tuple] = []
        self.pool = pool
        self.allocated: List[torch.Tensor] = []  # by the captured ops
        # every tensor the captured ops and launches read or wrote, with its address then
        self._addresses: List[Tuple[torch.Tensor, int]] = []
        self._skip_next_replay = False
        # what the captured ops allocated, as they computed it: put back by the first replay
        self._computed: List[torch.Tensor] = []
        self.replays = 0

    @contextlib.contextmanager
    def capture(self):
        from increlora_fast.kernels import utils as kutils
        recorder = _Recorder(self.ops)
        real_launch = kutils.launch

        def launch(kernel, grid, *args, **kwargs):
            if _loaded is not None and specialization(kernel, args, kwargs) not in _loaded:
                name = getattr(getattr(kernel, "fn", kernel), "__name__", kernel)
                raise RuntimeError(f"{name} launched for the first time inside a captured step: "
                                   "CUDA cannot load a kernel while a stream captures (run the "
                                   "step eagerly first)")
            with _interpreter_ops():
                real_launch(kernel, grid, *args, **kwargs)
            self.ops.append(("launch", kernel, grid, args, kwargs))

        real_capturing = kutils.stream_capturing
        kutils.launch = launch
        kutils.stream_capturing = lambda device: True
        _capture["active"] = True
        try:
            with recorder, _HostCopies(), _libraries_see_a_capture():
                yield
        finally:
            kutils.launch = real_launch
            kutils.stream_capturing = real_capturing
            _capture["active"] = False
        self.allocated = [t for op in self.ops if op[0] == "aten" and not op[1].is_view
                          for t in _allocated(op[2], op[3], op[4])]
        self._addresses = _addresses(self.ops)
        if self.pool is not None:
            self.pool.captured(self)
        with torch.no_grad(), _interpreter_ops():
            self._computed = [t.clone() for t in self.allocated]
            for t in self.allocated:
                _poison(t)
        self._skip_next_replay = True

    def replay(self) -> None:
        moved = [t for t, address in self._addresses if t.data_ptr() != address]
        if moved:
            raise RuntimeError(f"{len(moved)} tensor(s) the graph captured got new memory since "
                               f"its capture (the first: {tuple(moved[0].shape)} "
                               f"{moved[0].dtype}): a CUDA graph replays on the old memory")
        if self.pool is not None:
            self.pool.replaying(self)
        with torch.no_grad():
            if self._skip_next_replay:  # the capture ran the ops: their results put back
                self._skip_next_replay = False
                with _interpreter_ops():
                    for t, value in zip(self.allocated, self._computed):
                        t.copy_(value)
                self._computed = []
                return
            self.replays += 1
            self._run()

    def _run(self) -> None:
        from increlora_fast.kernels import utils as kutils
        for op in self.ops:
            if op[0] == "launch":
                _, kernel, grid, args, kwargs = op
                kutils.launch(kernel, grid, *args, **kwargs)
                continue
            _, func, args, kwargs, out = op
            new = func(*args, **kwargs)
            if func.is_view:
                continue
            _write_into(out, new)


@contextlib.contextmanager
def _libraries_see_a_capture():
    """transformers skips its host-side mask checks while a CUDA stream is capturing
    (`transformers.utils.import_utils.is_tracing`); make it see the emulated capture as one."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        yield
        return
    real = import_utils.is_cuda_stream_capturing
    import_utils.is_cuda_stream_capturing = lambda: True
    try:
        yield
    finally:
        import_utils.is_cuda_stream_capturing = real


def _write_into(old: Any, new: Any) -> None:
    """Copy each tensor of ``new`` into the matching tensor of ``old`` (the capture's)."""
    olds, _ = tree_flatten(old)
    news, _ = tree_flatten(new)
    for o, n in zip(olds, news):
        if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o is not n:
            o.copy_(n)


def record_eager_steps(monkeypatch) -> List[int]:
    """The steps `training.cuda_graphs.GraphedSteps` runs eagerly from now on, in order (the
    test's ``monkeypatch`` undoes the recording)."""
    from increlora_fast.training.cuda_graphs import GraphedSteps
    steps: List[int] = []
    real_eager = GraphedSteps._eager

    def eager(self, step, *halves):
        steps.append(step)
        return real_eager(self, step, *halves)
    monkeypatch.setattr(GraphedSteps, "_eager", eager)
    return steps
