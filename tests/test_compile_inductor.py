"""torch.compile with the default inductor backend on CPU, the torch path (the CPU default): a
tiny BERT's training loop (controller, optimizer, allocation rounds) compiles as one graph with
score tracking on, grows ranks without recompiling, and trains the same run as eager.

One compile (about 30 s on 2 cores). Inductor draws dropout masks with its own RNG; its
``fallback_random`` draws them as eager does, so the runs can be compared.
"""
from __future__ import annotations

import torch

from increlora_fast import IncreLoRAController, create_optimizer
from trainer_helpers import TinyTask, tiny_increlora_bert

STEPS = 8  # allocation rounds at steps 4 and 6, tracking on throughout
# Float32 rounding of inductor's fused kernels against eager's: seen 1.2e-7 on the losses and
# 2.2e-8 on the parameters after 10 steps.
TOL = 1e-5


def _batch(data: TinyTask, step: int) -> dict:
    rows = [data[(step * 8 + i) % len(data)] for i in range(8)]
    return {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}


def _train(compiled: bool, backend: str = "inductor", penalty_in_graph: bool = False,
           **config):
    model, config = tiny_increlora_bert(warmup_steps=2, **config)
    # set now: BERT sets it on its first loss, a guard dynamo would recompile on
    model.config.problem_type = "single_label_classification"
    model.train()
    optimizer = create_optimizer(model, config, lr=1e-2, weight_decay=0.1)
    controller = IncreLoRAController(model, config)
    forward = torch.compile(model, backend=backend, fullgraph=True) if compiled else model

    def model_loss(batch: dict) -> torch.Tensor:
        return forward(**batch).loss + controller.regularization_loss()
    if penalty_in_graph:  # the penalty traced with the model: one graph of both
        forward = model
        model_loss = torch.compile(model_loss, backend=backend, fullgraph=True)
    data, losses = TinyTask(), []
    for step in range(STEPS):
        loss = model_loss(_batch(data, step))
        loss.backward()
        controller.step(step)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return (torch.stack(losses), model.state_dict(), controller.ipt.clone(),
            [(e["step"], e["module"], e["new_rank"]) for e in controller.allocation_log])


def test_inductor_trains_the_torch_path_as_eager(monkeypatch):
    from torch._dynamo.utils import counters
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    eager = _train(compiled=False)
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _train(compiled=True)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    (losses, state, ipt, log), (e_losses, e_state, e_ipt, e_log) = compiled, eager
    assert len(log) == 2 and log == e_log  # ranks grew twice, in the same modules
    torch.testing.assert_close(losses, e_losses, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ipt, e_ipt, rtol=1e-4, atol=0)
    for key, value in e_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, rtol=TOL, atol=TOL, msg=key)
        else:
            assert torch.equal(state[key], value), key


def test_exact_step_score_compiles_across_score_windows():
    """With ``exact_step_score`` the dense gradient accumulator (``score_grad``) is allocated
    by the controller when tracking turns on, not in the traced forward: a compiled model
    failed in AOT autograd ("Node ... was invalid, but is output"). Score windows switch
    tracking on and off (two graphs, dynamo keeps both) and the run is eager's (``aot_eager``:
    the failure was before any backend)."""
    from torch._dynamo.utils import counters

    settings = dict(exact_step_score=True, incre_interval=4, score_window=2)
    torch._dynamo.reset()
    eager = _train(compiled=False, **settings)
    counters.clear()
    try:
        compiled = _train(compiled=True, backend="aot_eager", **settings)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 2
    (losses, state, ipt, log), (e_losses, e_state, e_ipt, e_log) = compiled, eager
    assert len(log) == 1 and log == e_log
    torch.testing.assert_close(losses, e_losses, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ipt, e_ipt, rtol=1e-4, atol=0)
    for key, value in e_state.items():
        torch.testing.assert_close(state[key], value, rtol=TOL, atol=TOL, msg=key)


def test_the_penalty_compiled_with_the_model_stays_one_graph_across_rounds():
    """The forward and the orthogonal penalty in one compiled function (``aot_eager``): one
    graph over both allocation rounds, and eager's run. The penalty's mask cache guarded on
    each layer's slot_version (a recompile at each round) and the masks made in the trace
    counted every slot, unused ones too."""
    from torch._dynamo.utils import counters

    settings = dict(orth_reg_weight=0.1)
    torch._dynamo.reset()
    eager = _train(compiled=False, **settings)
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = _train(compiled=True, backend="aot_eager", penalty_in_graph=True,
                              **settings)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1
    (losses, state, _, log), (e_losses, e_state, _, e_log) = compiled, eager
    assert len(log) == 2 and log == e_log
    torch.testing.assert_close(losses, e_losses, rtol=TOL, atol=TOL)
    for key, value in e_state.items():
        torch.testing.assert_close(state[key], value, rtol=TOL, atol=TOL, msg=key)
