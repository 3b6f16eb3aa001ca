"""Whole training steps replayed from graphs (`training.cuda_graphs.GraphedSteps`) give the eager
run's results exactly. On CPU the graphs are `graph_emulator.EmulatedGraph`: aten ops and Triton
launches replayed on the captured tensors with the captured scalars, none of the Python around
them, as a CUDA graph replays kernels; on a CUDA machine the same test also runs real graphs."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from graph_emulator import (EmulatedGraph, EmulatedPool, kernels_loaded_before_capture,
                            record_eager_steps)
from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, inject_increlora
from increlora_fast.training.cuda_graphs import CUDAGraphPool, GraphedSteps

STEPS = 24


def _setup(make_tiny_net, device: str, **overrides):
    torch.manual_seed(0)
    model = make_tiny_net().to(device)
    cfg = dict(target_modules=["fc", "proj"], r_max=4, init_r=1, target_rank=2, init_warmup=3,
               incre_interval=4, top_h=1, total_step=STEPS, score_window=2, orth_reg_weight=0.1)
    cfg.update(overrides)
    config = IncreLoRAConfig(**cfg)
    model = inject_increlora(model, config)
    optimizer = create_optimizer(model, config, lr=2e-2, weight_decay=0.01)
    controller = IncreLoRAController(model, config)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(STEPS)]
    static = [torch.zeros(16, 12, device=device), torch.zeros(16, dtype=torch.long, device=device)]
    return model, optimizer, controller, data, static


def _train(make_tiny_net, device, graph_factory=None, break_step_sync=False,
           skip_state_warmup=False, edit=None, **overrides):
    model, optimizer, controller, data, (x, y) = _setup(make_tiny_net, device, **overrides)
    params = [p for p in model.parameters() if p.requires_grad]
    graphed = None if graph_factory is None else GraphedSteps(optimizer, controller,
                                                              graph_factory)
    if break_step_sync:  # a graphed step that replays the captured step's lr schedule
        optimizer.sync_device_step = lambda: None
    if skip_state_warmup:  # capture a tracking state without running it eagerly first
        graphed._states_run.update((True, False))
    losses = []
    watch = kernels_loaded_before_capture() \
        if isinstance(graph_factory, EmulatedPool) or graph_factory is EmulatedGraph \
        else contextlib.nullcontext()
    with watch:
        _steps(model, optimizer, controller, data, x, y, params, graphed, losses, edit)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return dict(state=state, losses=torch.stack(losses), ipt=controller.ipt.clone(),
                unc=controller.unc.clone(), log=controller.allocation_log,
                ranks=controller.rank_pattern(), global_step=optimizer.global_step,
                graphed=graphed)


def _steps(model, optimizer, controller, data, x, y, params, graphed, losses, edit=None,
           preload=None) -> None:
    for step, (bx, by) in enumerate(data):
        if edit is not None:  # a change made between steps, in both runs alike
            edit(step, model)
        x.copy_(bx)
        y.copy_(by)

        def first():
            loss = F.cross_entropy(model(x), y) + controller.regularization_loss()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            controller.step(step)
            return (loss.detach(),)

        def second(zero_grad: bool, first_outputs=None) -> None:
            optimizer.step()
            if zero_grad:
                optimizer.zero_grad(set_to_none=True)
        if graphed is None:
            out = first()
            second(True)
        else:
            out = graphed.step(step, first, second, preload=preload)
        losses.append(out[0])


def _assert_same(got, ref):
    assert got["log"] == ref["log"] and got["ranks"] == ref["ranks"]
    assert got["global_step"] == ref["global_step"] == STEPS
    assert torch.equal(got["losses"], ref["losses"])
    assert torch.equal(got["ipt"], ref["ipt"]) and torch.equal(got["unc"], ref["unc"])
    for name, value in ref["state"].items():
        assert torch.equal(got["state"][name], value), name


# "triton+adamw": the optimizer's fused kernels too (on CUDA they step every tensor; on CPU they are
# forced), its launches kept between rounds and captured with the step
@pytest.mark.usefixtures("whole_loop_tiles")
@pytest.mark.parametrize("backend", ["torch", "triton", "triton+adamw"])
def test_replayed_steps_equal_eager_steps(make_tiny_net, monkeypatch, backend):
    if backend != "torch":
        pytest.importorskip("triton")
        from increlora_fast.kernels.utils import interpreter_active
        if not (torch.cuda.is_available() or interpreter_active()):
            pytest.skip("the Triton path needs CUDA or the interpreter")
    if backend == "triton+adamw":
        from increlora_fast import optimizer as optimizer_module
        monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: True)
    monkeypatch.setenv("INCRELORA_BACKEND", backend.split("+")[0])
    eager_steps = record_eager_steps(monkeypatch)
    ref = _train(make_tiny_net, "cpu")
    from increlora_fast.kernels.launches import launch_counts, reset_launch_counts
    reset_launch_counts()
    got = _train(make_tiny_net, "cpu", EmulatedPool())
    # the optimizer's kernel: per tensor in the plans' first steps and in captures, over all
    # tensors at once in the other eager steps
    fused = backend == "triton+adamw"
    assert (launch_counts().get("_masked_adamw_kernel", 0) > 0) == fused
    assert (launch_counts().get("_masked_adamw_multi_kernel", 0) > 0) == fused
    # the penalty on its kernels wherever the layers are (captured, replayed, its tables and
    # masks kept: the captures assert below)
    for kernel in ("_orth_penalty_fwd_kernel", "_orth_penalty_bwd_kernel"):
        assert (launch_counts().get(kernel, 0) > 0) == (backend != "torch")
    graphed = got["graphed"]
    # each tracking state captured once: the graphs survive the rounds (the cached masks are
    # refreshed in place), and no round runs eagerly: each is replayed (or, the first, captured)
    # with the round on the host between the step's two graphs
    rounds = sorted({e["step"] for e in ref["log"]})
    assert graphed.captures == 2 and len(rounds) >= 3, (graphed.captures, rounds)
    assert not [r for r in rounds if r in eager_steps], (rounds, eager_steps)
    assert graphed.replays == STEPS - len(eager_steps) - graphed.captures
    # the graphs share one pool: replays overwrote what graphs captured later allocated, and
    # nothing the run reads was among it
    assert graphed.graph_factory.poisoned > 0
    _assert_same(got, ref)


def test_a_shared_pool_overwrites_what_a_later_graph_allocated():
    """The emulator's model of a memory pool shared by graphs (`graph_emulator.EmulatedPool`):
    a tensor that a later-captured graph allocated does not survive a replay of an earlier one
    (CUDA may have given it that graph's memory) until its own graph replays; in private pools
    it does."""
    x = torch.ones(3)
    for shared in (True, False):
        pool = EmulatedPool()
        first, second = (pool(), pool()) if shared else (EmulatedGraph(), EmulatedGraph())
        with first.capture():
            _ = x * 2
        first.replay()
        with second.capture():
            kept = x + 1
        second.replay()
        first.replay()
        assert bool(torch.isnan(kept).all()) == shared
        second.replay()
        assert torch.equal(kept, x + 1)


def test_what_a_capture_allocated_holds_nothing_until_its_first_replay():
    """A CUDA capture records kernels and runs none: what the captured step allocated (its
    outputs, a cache made inside it) holds whatever its memory held until the graph's first
    replay, and forever for a graph never replayed (`GraphedSteps._probe`'s). The emulator's
    capture runs the ops; it then poisons what they allocated until that first replay, so a
    step that reads it too early gives a wrong result instead of the right one by luck."""
    x = torch.ones(3)
    graph = EmulatedGraph()
    with graph.capture():
        y = x * 2
    assert bool(torch.isnan(y).all())
    graph.replay()
    assert torch.equal(y, x * 2) and graph.replays == 0  # (the capture's own run, not counted)
    x.fill_(3.0)
    graph.replay()
    assert torch.equal(y, x * 2) and graph.replays == 1


def test_a_replay_refuses_a_captured_tensor_given_new_memory():
    """A CUDA graph replays on the addresses it captured: a tensor given new memory since its
    capture (``p.data = ...``, as ``Module.to`` converts parameters) is neither read nor written
    by the replay, which works on the old memory. The emulator's replay refuses it rather than
    follow the tensor object to its new memory and give the right result by luck."""
    w = torch.ones(3)
    graph = EmulatedGraph()
    with graph.capture():
        w.mul_(2)
    graph.replay()
    graph.replay()
    assert torch.equal(w, torch.full((3,), 4.0))
    w.data = torch.ones(3)
    with pytest.raises(RuntimeError, match="new memory since its capture"):
        graph.replay()


def test_a_round_at_every_step_is_captured_and_replayed(make_tiny_net, monkeypatch):
    """A round at every step from step 2 until the budget is reached (the benchmarks'
    compressed schedule until 2026-12-05, which now has one every second step), the densest
    schedule for the graphs. The tracked state is captured at a round (its round deferred to the host
    between the two graphs), every later round is replayed, and the run equals eager steps."""
    eager_steps = record_eager_steps(monkeypatch)
    schedule = dict(init_warmup=1, incre_interval=1, score_window=None, target_rank=3)
    ref = _train(make_tiny_net, "cpu", **schedule)
    got = _train(make_tiny_net, "cpu", EmulatedPool(), **schedule)
    rounds = sorted({e["step"] for e in ref["log"]})
    assert len(rounds) >= 4 and rounds[0] == 2
    assert eager_steps[:2] == [0, 1] and not set(rounds) & set(eager_steps), eager_steps
    assert got["graphed"].captures == 2
    _assert_same(got, ref)


def test_a_slot_change_outside_a_round_runs_the_next_step_eagerly(make_tiny_net, monkeypatch):
    """Slots changed between steps by other code than a round (here a reserve slot activated
    by hand before step 10, between rounds, a step the run replays otherwise) leave the cached
    masks stale until a step refreshes them: that step runs eagerly, and the run still equals
    the eager one."""
    eager_steps = record_eager_steps(monkeypatch)

    def edit(step, model):
        if step == 10:
            assert model.blocks[0].fc.activate_reserve(1, step) == 1
    _train(make_tiny_net, "cpu", EmulatedPool())
    assert 10 not in eager_steps
    ref = _train(make_tiny_net, "cpu", edit=edit)
    eager_steps.clear()
    got = _train(make_tiny_net, "cpu", EmulatedPool(), edit=edit)
    assert 10 in eager_steps and 11 not in eager_steps
    _assert_same(got, ref)


def test_caches_made_anew_are_captured_anew(make_tiny_net, monkeypatch):
    """When the optimizer has to make its cached masks as new tensors (here always), the graphs
    that read the old ones are captured again, and the run still equals the eager one."""
    from increlora_fast import optimizer as optimizer_module
    monkeypatch.setattr(optimizer_module, "refresh_in_place", lambda old, new: (new, True))
    ref = _train(make_tiny_net, "cpu")
    got = _train(make_tiny_net, "cpu", EmulatedPool())
    assert got["graphed"].captures > 2
    _assert_same(got, ref)


def test_replayed_steps_equal_eager_steps_with_the_exact_step_score(make_tiny_net):
    """exact_step_score keeps a dense (out, in) gradient buffer per module that the forward
    allocates (inside a capture: in the graph's pool) and the controller reads and clears:
    replayed steps still give the eager run exactly."""
    ref = _train(make_tiny_net, "cpu", exact_step_score=True)
    got = _train(make_tiny_net, "cpu", EmulatedPool(), exact_step_score=True)
    assert got["graphed"].replays >= 6 and len(ref["log"]) >= 2
    _assert_same(got, ref)


def test_emulator_sees_a_step_number_baked_into_the_graph(make_tiny_net):
    """The check can fail: without setting the device step before each replay, every replay
    applies the captured step's learning rate, and the results differ."""
    ref = _train(make_tiny_net, "cpu")
    got = _train(make_tiny_net, "cpu", EmulatedPool(), break_step_sync=True)
    assert not torch.equal(got["state"]["blocks.0.fc.lora_A"], ref["state"]["blocks.0.fc.lora_A"])


def test_each_tracking_state_runs_eagerly_before_its_capture(make_tiny_net, monkeypatch):
    """Tracked steps launch the score kernels, untracked steps do not. CUDA cannot load a kernel
    while a stream captures, so a tracking state whose first step is captured (here the first
    tracked step, after two untracked warm-up steps) fails on a GPU; the emulator raises the
    same way, and GraphedSteps runs each state's first step eagerly to avoid it."""
    pytest.importorskip("triton")
    from increlora_fast.kernels.utils import interpreter_active
    if not interpreter_active():
        pytest.skip("checked under the Triton interpreter")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="first time inside a captured step"):
        _train(make_tiny_net, "cpu", EmulatedPool(), skip_state_warmup=True)


@pytest.mark.parametrize("offset, refused", [(4, False), (1, True)])
def test_a_capture_refuses_a_kernel_first_launched_on_a_misaligned_pointer(offset, refused):
    """Triton specializes a pointer on 16-byte alignment: a kernel that ran eagerly on aligned
    tensors needs another binary for a view 4 bytes in, which CUDA cannot load while capturing;
    a view 16 bytes in reuses the loaded one."""
    pytest.importorskip("triton")
    from increlora_fast.kernels.utils import interpreter_active
    if not interpreter_active():
        pytest.skip("checked under the Triton interpreter")
    from increlora_fast.kernels.adamw import masked_adamw_triton_

    def step(n0: int, buffers) -> None:
        p, g, m, v = (b[n0:n0 + 6].view(2, 3) for b in buffers)
        masked_adamw_triton_(p, g, m, v, torch.ones(2, dtype=torch.bool), torch.full((2,), 0.1),
                             torch.ones(2), 0, 0.9, 0.999, 1e-8, 0.0)

    buffers = [torch.randn(16) for _ in range(4)]
    assert all(b.data_ptr() % 16 == 0 for b in buffers)
    with kernels_loaded_before_capture():
        step(0, buffers)
        graph = EmulatedGraph()
        watch = pytest.raises(RuntimeError, match="first time inside a captured step") \
            if refused else contextlib.nullcontext()
        with watch, graph.capture():
            step(offset, buffers)


_T = torch.tensor([0.5, 2.0, 3.0])
# What a CUDA capture refuses (it syncs the stream or copies from pageable host memory), each
# with the capture-safe form of the same work.
REFUSED_IN_A_CAPTURE = {
    "item": (lambda: _T.sum().item(), lambda: _T.sum()),
    "bool": (lambda: bool(_T.sum() > 1), lambda: _T.sum() > 1),
    "nonzero": (lambda: torch.nonzero(_T > 1), lambda: torch.where(_T > 1, _T, 0.0)),
    "boolean index": (lambda: _T[_T > 1], lambda: _T.index_select(0, torch.arange(1, 3))),
    "repeat_interleave": (lambda: _T.repeat_interleave(torch.arange(1, 4)),
                          lambda: _T.repeat_interleave(torch.arange(1, 4), output_size=6)),
    "unique": (lambda: torch.unique(_T), lambda: torch.sort(_T).values),
    "equal": (lambda: torch.equal(_T, _T), lambda: torch.eq(_T, _T).all()),
    "torch.tensor": (lambda: _T * torch.tensor([1.0, 2.0, 3.0]),
                     lambda: _T * torch.arange(1, 4, dtype=_T.dtype)),
    # copies to the host: on a GPU each waits for the device (no aten op on the CPU)
    "tolist": (lambda: (_T * 2).tolist(), lambda: _T * 2),
    "cpu": (lambda: (_T * 2).cpu(), lambda: (_T * 2).clone()),
    "numpy": (lambda: (_T * 2).numpy(), lambda: (_T * 2).clone()),
    "to cpu": (lambda: (_T * 2).to("cpu"), lambda: (_T * 2).to(torch.float64)),
    "to device cpu": (lambda: (_T * 2).to(device="cpu", dtype=torch.float64),
                      lambda: (_T * 2).to(device=_T.device, dtype=torch.float64)),
    "int": (lambda: int(_T.sum()), lambda: _T.sum().long()),
    "float": (lambda: float(_T.sum()), lambda: _T.sum().float()),
    "index": (lambda: [0, 1, 2, 3, 4, 5][_T.sum().long()], lambda: _T.sum().long()),
    "format": (lambda: f"{_T.sum():.2f}", lambda: _T.sum()),
    "if": (lambda: 1 if _T.sum() > 1 else 0, lambda: torch.where(_T.sum() > 1, 1, 0)),
}


@pytest.mark.parametrize("what", sorted(REFUSED_IN_A_CAPTURE))
def test_the_emulator_refuses_what_a_cuda_capture_refuses(what):
    """Host reads, data-dependent shapes and host data copied to the device fail a CUDA capture
    ("operation not permitted when stream is capturing"); the emulated capture raises on each,
    and not on its capture-safe form."""
    refused, safe = REFUSED_IN_A_CAPTURE[what]
    with EmulatedGraph().capture():
        safe()
    with pytest.raises(RuntimeError, match="inside a captured step"):
        with EmulatedGraph().capture():
            refused()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("exact_step_score", [False, True])  # True: every graph dropped at rounds
def test_cuda_graphs_equal_eager_steps_on_the_gpu(make_tiny_net, exact_step_score):
    ref = _train(make_tiny_net, "cuda", exact_step_score=exact_step_score)
    got = _train(make_tiny_net, "cuda", CUDAGraphPool(), exact_step_score=exact_step_score)
    assert got["graphed"].replays >= 6
    assert len(got["graphed"].graph_factory.handles) == 1  # one pool, also across dropped graphs
    assert got["log"] == ref["log"] and got["ranks"] == ref["ranks"]
    for name, value in ref["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_a_failed_capture_gives_the_caller_its_stream_back(monkeypatch):
    """`torch.cuda.graph` leaves the process on its capture stream when ending a capture raises;
    `CUDAStepGraph` captures on a stream of its own and restores the caller's stream either way.
    torch's CUDA calls are stood in for (no GPU here)."""
    from increlora_fast.training import cuda_graphs
    events = []

    class Stream:
        def __init__(self, name="fresh"):
            self.name = name

    current = [Stream("caller")]

    class FailingCapture:
        def __init__(self, graph, pool=None, stream=None):
            self.stream = stream

        def __enter__(self):
            events.append(("capture on", self.stream.name))
            current[0] = self.stream

        def __exit__(self, *exc):  # as torch: capture_end raises before the stream is restored
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))
    graph = cuda_graphs.CUDAStepGraph()
    with pytest.raises(RuntimeError, match="not permitted"):
        with graph.capture():
            assert current[0].name == "fresh"
    assert events == [("capture on", "fresh")] and current[0].name == "caller"


class _FakeCUDA:
    """Stands in for torch's CUDA graph, stream and pool calls (no GPU here): records the pool
    and stream of every capture; a capture of ``fail`` raises as ending a refused capture
    does."""

    def __init__(self, monkeypatch) -> None:
        self.captures = []
        self.pools = 0
        self.current = "caller"
        self.fail = None
        fake = self

        class Capture:
            def __init__(self, graph, pool=None, stream=None):
                self.graph, self.pool, self.stream = graph, pool, stream

            def __enter__(self):
                fake.captures.append((self.pool, self.stream))
                fake.current = self.stream

            def __exit__(self, *exc):  # as torch: capture_end raises before the stream is reset
                if self.graph is fake.fail:
                    raise RuntimeError("operation not permitted when stream is capturing")

        def handle():
            fake.pools += 1
            return (0, fake.pools)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
        monkeypatch.setattr(torch.cuda, "Stream", lambda: object())
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", handle)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake.current)
        monkeypatch.setattr(torch.cuda, "set_stream", lambda s: setattr(fake, "current", s))


def test_a_graph_pool_captures_on_one_stream_and_keeps_its_graphs(monkeypatch):
    """A run's graphs are captured into one memory pool on one stream (the allocator reuses a
    freed block only on its own stream); the pool keeps every graph alive, also those the
    runner dropped (torch refuses to capture into a pool whose graphs are all gone, and newer
    torch frees the stream's cuBLAS workspace with a dropped graph); a failed capture makes it
    take a new pool, on the same stream; the caller's stream comes back every time."""
    import gc
    import weakref

    from increlora_fast.training import cuda_graphs
    cuda = _FakeCUDA(monkeypatch)
    pool = cuda_graphs.CUDAGraphPool()
    graphs = [pool(), pool()]
    for graph in graphs:
        with graph.capture():
            assert cuda.current != "caller"
        assert cuda.current == "caller"
    (pool_a, stream_a), (pool_b, stream_b) = cuda.captures
    assert pool_a == pool_b == (0, 1) and stream_a is stream_b
    dropped = [weakref.ref(g) for g in graphs]
    del graphs, graph  # the runner dropped them (an exact-score round drops every graph)
    gc.collect()
    assert all(ref() is not None for ref in dropped)  # the pool still holds them
    later = pool()
    with later.capture():
        pass
    assert cuda.captures[-1] == (pool_a, stream_a)
    failing = pool()
    cuda.fail = failing.graph
    with pytest.raises(RuntimeError, match="not permitted"):
        with failing.capture():
            pass
    assert cuda.current == "caller"
    after = pool()
    with after.capture():
        pass
    assert cuda.captures[-1] == ((0, 2), stream_a)  # a new pool after the failed capture
    assert pool.handles == [(0, 1), (0, 2)] and later is not None


def test_a_graph_pool_counts_the_memory_of_its_segments(monkeypatch):
    """A run's graph pools' memory (the graphs' activations, reused at every replay, which
    ``max_memory_allocated`` does not count between replays, and their live tensors) is summed
    from the allocator's segments of those pools alone, and added to a graphed run's reported
    peak. torch's CUDA calls are stood in for (no GPU here)."""
    from increlora_fast.training import cuda_graphs, device
    cuda = _FakeCUDA(monkeypatch)
    pool = cuda_graphs.CUDAGraphPool()
    assert pool.reserved_bytes() == 0  # nothing captured yet: no pool
    graphs = [pool(), pool()]
    for graph in graphs:
        with graph.capture():
            pass
    assert cuda.pools == 1
    segments = [dict(segment_pool_id=(0, 1), total_size=10 << 20, allocated_size=4 << 20),
                dict(segment_pool_id=(0, 1), total_size=2 << 20, allocated_size=0),
                dict(segment_pool_id=(0, 0), total_size=50 << 20, allocated_size=1 << 20),
                dict(segment_pool_id=(0, 4), total_size=7 << 20, allocated_size=0)]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    assert pool.reserved_bytes() == 12 << 20
    steps = GraphedSteps(optimizer=None, controller=None, graph_factory=pool)
    assert steps.pool_bytes() == 12 << 20
    assert GraphedSteps(None, None, EmulatedPool()).pool_bytes() == 0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 100 << 20)
    gpu = torch.device("cuda")
    plain, graphed = device.peak_memory(gpu), device.peak_memory(gpu, pool.reserved_bytes())
    assert plain["peak_device_memory_mb"] == 100 and graphed["peak_device_memory_mb"] == 112
    assert "pool" in graphed["peak_device_memory_kind"]
    assert "pool" not in plain["peak_device_memory_kind"]


def test_graphed_steps_run_on_the_parameters_cuda_device(monkeypatch):
    """A run on ``cuda:1`` while another device is current (``--device cuda:1`` without
    `torch.cuda.set_device`) takes its steps, captures and streams included, with cuda:1
    current: a capture records only the work queued on its stream's device. torch's device
    context is stood in for (no GPU here); with another graph factory nothing is entered."""
    from types import SimpleNamespace

    entered, inside = [], []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()
    monkeypatch.setattr(torch.cuda, "device", device)
    params = [SimpleNamespace(device=torch.device("cpu")),
              SimpleNamespace(device=torch.device("cuda", 1))]
    optimizer = SimpleNamespace(param_groups=[{"params": params}])
    seen = []
    monkeypatch.setattr(GraphedSteps, "_step",
                        lambda self, step, *halves: seen.append((step, bool(inside))))
    steps = GraphedSteps(optimizer, controller=None, graph_factory=CUDAGraphPool())
    steps.step(0, None, None)
    steps.step(1, None, None)
    assert seen == [(0, True), (1, True)] and entered == [1, 1]
    GraphedSteps(optimizer, None, EmulatedPool()).step(2, None, None)
    assert seen[-1] == (2, False) and entered == [1, 1]


def _probed_steps(make_tiny_net, preload, steps: int = 4):
    """A few steps of the tiny net through `GraphedSteps` with emulated graphs and ``preload``
    as the step runner's forward and backward without effect."""
    model, optimizer, controller, data, (x, y) = _setup(make_tiny_net, "cpu")
    graphed = GraphedSteps(optimizer, controller, EmulatedPool())
    params = [p for p in model.parameters() if p.requires_grad]
    _steps(model, optimizer, controller, data[:steps], x, y, params, graphed, [],
           preload=lambda capture=None: preload(model, x, capture))
    return graphed


def test_only_an_error_inside_the_probes_capture_falls_back(make_tiny_net):
    """The probe falls back to eager steps (warning, ``fallback`` naming the cause) on an
    error raised inside its capture; an error its caller raises outside the capture (the
    preload's own checks) propagates."""
    def refused_inside(model, x, capture):
        with capture or contextlib.nullcontext():
            model(x).sum().backward()
            if capture is not None:
                raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="cannot be captured"):
        graphed = _probed_steps(make_tiny_net, refused_inside)
    assert graphed.fallback == "RuntimeError: operation not permitted when stream is capturing"
    assert graphed.captures == graphed.replays == 0

    def failing_check(model, x, capture):
        with capture or contextlib.nullcontext():
            model(x).sum().backward()
        if capture is not None:
            raise RuntimeError("the preload changed a slot buffer")
    with pytest.raises(RuntimeError, match="changed a slot buffer"):
        _probed_steps(make_tiny_net, failing_check)


def test_the_capture_failure_names_the_first_error_and_its_capture_line():
    from increlora_fast.training.cuda_graphs import capture_failure
    script = RuntimeError("The following operation failed in the TorchScript interpreter.\n"
                          "Traceback of TorchScript (most recent call last):\n"
                          "  File \"modeling.py\", line 62\n"
                          "RuntimeError: Cannot copy between CPU and CUDA tensors during CUDA "
                          "graph capture unless the CPU tensor is pinned.\n")
    try:  # torch.cuda.graph's exit raises again when the capture is invalid
        try:
            raise script
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture\nCUDA kernel errors might be asynchronously reported\n"
                               "Compile with `TORCH_USE_CUDA_DSA` to enable device-side "
                               "assertions.")
    except RuntimeError as error:
        got = capture_failure(error)
    assert got.startswith("RuntimeError: RuntimeError: Cannot copy between CPU and CUDA")
    cuda = RuntimeError("CUDA error: operation not permitted when stream is capturing\n"
                        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.")
    assert capture_failure(cuda) == ("RuntimeError: CUDA error: operation not permitted when "
                                     "stream is capturing")
    assert capture_failure(ValueError("first\nlast")) == "ValueError: last"
    assert capture_failure(MemoryError()) == "MemoryError"


def test_a_failed_capture_gives_the_cuda_generators_a_copy_of_their_state(monkeypatch):
    """After a failed probe on CUDA each device's default generator gets a copy of its state
    (a state some torch releases leave tied to the failed capture)."""
    from increlora_fast.training import cuda_graphs

    class Generator:
        def __init__(self):
            self.state, self.calls = "tied to the capture", []

        def clone_state(self):
            self.calls.append("clone")
            return "a copy"

        def graphsafe_set_state(self, state):
            self.calls.append(("set", state))
            self.state = state
    generators = [Generator(), Generator(), Generator()]
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    cuda_graphs.reset_cuda_rng_capture_state([0, 2])
    assert [g.state for g in generators] == ["a copy", "tied to the capture", "a copy"]
    assert generators[0].calls == ["clone", ("set", "a copy")]


def test_an_optimizer_state_loaded_between_replays_is_captured_anew(make_tiny_net):
    """``optimizer.load_state_dict`` gives the optimizer new state tensors; the graphs captured
    before it kept updating the old ones, so the loaded state (what a checkpoint saves next)
    stopped moving. It now counts as caches made anew (`cache_epoch`): the graphs are captured
    again and the run, its optimizer state included, equals the eager one."""
    def run(graph_factory):
        model, optimizer, controller, data, (x, y) = _setup(make_tiny_net, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        graphed = None if graph_factory is None else GraphedSteps(optimizer, controller,
                                                                  graph_factory)

        def edit(step, _model):
            if step == STEPS - 3:  # a round trip: the same values in new tensors
                optimizer.load_state_dict(optimizer.state_dict())
        _steps(model, optimizer, controller, data, x, y, params, graphed, [], edit)
        return optimizer, graphed

    ref, _ = run(None)
    got, graphed = run(EmulatedPool())
    assert graphed.captures > 2
    for p_ref, p_got in zip(ref.param_groups[0]["params"], got.param_groups[0]["params"]):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got.state[p_got][key], ref.state[p_ref][key]), key


@pytest.mark.parametrize("hyper", ["lr", "weight_decay", "orth_reg_weight"])
def test_hyperparameters_changed_between_replays_reach_the_replayed_steps(make_tiny_net, hyper):
    """A scheduler (or the user) that sets a group's ``lr`` between steps, or its weight decay,
    after the steps were captured: a replay must step with the new value, as the eager step
    does, not with the number the capture saw. The learning rate is read from a device tensor
    refreshed before each replay (no new capture); the other hyperparameters, numbers in the
    captured launches, make the graphs be captured anew, and so does a change of the
    controller's config (the penalty's weight)."""
    factors = torch.rand(STEPS, generator=torch.Generator().manual_seed(
        int(torch.randint(0, 2**31, ())))) + 0.25

    def run(graph_factory):
        model, optimizer, controller, data, (x, y) = _setup(make_tiny_net, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        graphed = None if graph_factory is None else GraphedSteps(optimizer, controller,
                                                                  graph_factory)

        def edit(step, _model):
            for group in optimizer.param_groups:
                if hyper == "lr" and step >= 6:  # every step, as a scheduler does
                    group["lr"] = 2e-2 * float(factors[step])
                elif hyper == "weight_decay" and step == STEPS - 6:
                    group["weight_decay"] = 0.3
            if hyper == "orth_reg_weight" and step == STEPS - 6:
                controller.config.orth_reg_weight = 3.0
        losses = []
        _steps(model, optimizer, controller, data, x, y, params, graphed, losses, edit)
        return model, torch.stack(losses), graphed

    ref_model, ref_losses, _ = run(None)
    model, losses, graphed = run(EmulatedPool())
    assert graphed.replays > 0
    assert graphed.captures == 2 if hyper == "lr" else graphed.captures > 2
    assert torch.equal(losses, ref_losses)
    for (name, got), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(got, ref), name
