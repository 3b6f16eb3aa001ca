"""Issue 7 (3): scores and allocation under gradient accumulation, activation checkpointing,
bf16 autocast, fp16 with GradScaler (skipped steps) and NaN losses.

Damaged adapter files and interrupted saves are covered in tests/test_persistence.py.
"""
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from increlora_fast import IncreLoRAConfig, IncreLoRAController, create_optimizer, increlora_layers
from increlora_fast import inject_increlora

from method_helpers import ParallelBranches, batch, branch_config, make_run


# ---------------------------------------------------------------- small-model loops
def _branches(**overrides):
    torch.manual_seed(0)
    return make_run(ParallelBranches(3, weights=[1.0, 0.4, 1.7]), branch_config(**overrides))


def _loop(model, optimizer, controller, steps, nan_steps=(), inf_steps=(), scaler=None):
    """The user loop; a step whose loss is not finite skips the optimizer (as GradScaler does)."""
    for step in steps:
        x, y = batch(step)
        if step in nan_steps:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = ((model(x) - y) ** 2).mean() + controller.regularization_loss()
        if step in inf_steps:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            controller.step(step)
            if torch.isfinite(loss):
                optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            controller.step(step, loss_scale=scaler.get_scale())
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad()


def _snapshot(model, controller):
    return {"ipt": controller.ipt.clone(), "unc": controller.unc.clone(),
            "log": [dict(e) for e in controller.allocation_log],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _assert_same(a, b):
    assert a["log"] == b["log"]
    assert torch.equal(a["ipt"], b["ipt"]) and torch.equal(a["unc"], b["unc"])
    for key, value in a["state"].items():
        assert torch.equal(value, b["state"][key]), key


# ---------------------------------------------------------------- gradient accumulation
def _dense_scores_float64(model, x, y):
    """The spec's score sum|dW * dL/d(dW)| / sqrt(out*in) per branch, re-derived in float64 with
    autograd through materialised dW, for the loss of the whole batch."""
    x, y = x.double(), y.double()
    layers = [layer for _, layer in increlora_layers(model)]
    deltas = [layer.delta_weight().double().requires_grad_() for layer in layers]
    out = sum(w.double() * (x @ (layer.base_layer.weight.double() + dw).t()
                            + layer.base_layer.bias.double())
              for w, layer, dw in zip(model.weights, layers, deltas))
    grads = torch.autograd.grad(((out - y) ** 2).mean(), deltas)
    return torch.stack([(dw * g).abs().sum() / math.sqrt(dw.numel())
                        for dw, g in zip(deltas, grads)]).detach()


@pytest.mark.parametrize("exact", [True, False])
def test_accumulated_score_is_the_score_of_the_whole_step(exact):
    model, _, controller = _branches(exact_step_score=exact)
    assert controller.exact_step_score is exact
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            layer.lora_lambda.normal_()
    x, y = batch(0)
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        (((model(xm) - ym) ** 2).mean() / 2).backward()
    controller.step(0)
    got = controller.ipt / (1 - controller.config.beta1)
    expected = _dense_scores_float64(model, x, y)
    assert torch.isfinite(expected).all() and (expected > 0).all()
    if exact:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    else:  # the per-pass scores summed over micro-batches are a different (larger) number
        assert ((got - expected) / expected > 1e-3).all()


# ---------------------------------------------------------------- tiny HF model runs
BERT_STEPS = 9  # allocation rounds at steps 4, 6, 8


def _bert_run(checkpointing=None, exact=False, autocast=None, steps=BERT_STEPS):
    """Train a tiny BERT; ``checkpointing``: None (off) or use_reentrant; ``autocast``: dtype
    (float16 runs with a GradScaler, as fp16 training must)."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = IncreLoRAConfig(target_modules=["query", "value", "intermediate.dense"], r_max=4,
                             target_rank=2, incre_rank_num=1, init_warmup=2, incre_interval=2,
                             top_h=1, modules_to_save=["classifier"], exact_step_score=exact)
    inject_increlora(model, config)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    model.train()
    optimizer = create_optimizer(model, config, lr=1e-2)
    controller = IncreLoRAController(model, config)
    scaler = torch.amp.GradScaler("cpu", enabled=autocast == torch.float16)
    calls = []
    first = next(layer for _, layer in increlora_layers(model))
    first.register_forward_hook(lambda *_: calls.append(1))
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 50, (8, 12), generator=g)
        labels = torch.randint(0, 2, (8,), generator=g)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=labels).loss + controller.regularization_loss()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        controller.step(step, loss_scale=scaler.get_scale())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return model, controller, len(calls)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_scores_and_allocation(reentrant, exact):
    plain_model, plain, plain_calls = _bert_run(exact=exact)
    model, controller, calls = _bert_run(checkpointing=reentrant, exact=exact)
    assert plain_calls == BERT_STEPS and calls == 2 * BERT_STEPS  # the forward was recomputed
    assert [e["step"] for e in controller.allocation_log] == [4, 6, 8]
    assert torch.isfinite(controller.ipt).all() and (controller.ipt > 0).all()
    assert [(e["step"], e["module"], e["new_rank"]) for e in controller.allocation_log] == \
        [(e["step"], e["module"], e["new_rank"]) for e in plain.allocation_log]
    torch.testing.assert_close(controller.ipt, plain.ipt, rtol=1e-5, atol=0)
    torch.testing.assert_close(controller.unc, plain.unc, rtol=1e-4, atol=0)
    reference = plain_model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_trains_and_allocates(dtype):
    model, controller, _ = _bert_run(autocast=dtype)
    assert [e["step"] for e in controller.allocation_log] == [4, 6, 8]
    assert all(math.isfinite(e["score"]) and e["score"] > 0 for e in controller.allocation_log)
    assert controller.current_total_rank() == 6 + 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # on the same weights, low precision perturbs the score but does not change what it measures
    _, fp32_first, _ = _bert_run(steps=1)
    _, first, _ = _bert_run(autocast=dtype, steps=1)
    torch.testing.assert_close(first.ipt, fp32_first.ipt, rtol=0.05, atol=0)


# ---------------------------------------------------------------- fp16 GradScaler
@pytest.mark.parametrize("exact", [False, True])
def test_grad_scaler_scores_are_unscaled(exact):
    model_a, opt_a, ctl_a = _branches(exact_step_score=exact)
    _loop(model_a, opt_a, ctl_a, range(10))
    model_b, opt_b, ctl_b = _branches(exact_step_score=exact)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14)
    _loop(model_b, opt_b, ctl_b, range(10), scaler=scaler)
    assert scaler.get_scale() == 2.0 ** 14  # no step was skipped
    assert [(e["step"], e["module"]) for e in ctl_b.allocation_log] == \
        [(e["step"], e["module"]) for e in ctl_a.allocation_log]
    torch.testing.assert_close(ctl_b.ipt, ctl_a.ipt, rtol=1e-5, atol=0)
    for key, value in model_a.state_dict().items():
        torch.testing.assert_close(model_b.state_dict()[key], value, rtol=1e-5, atol=1e-7)


def test_grad_scaler_skipped_step_does_not_advance_the_allocator():
    model, optimizer, controller = _branches()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _loop(model, optimizer, controller, range(4), scaler=scaler)
    before = _snapshot(model, controller)
    optimizer_step = optimizer.global_step
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _loop(model, optimizer, controller, [4], inf_steps={4}, scaler=scaler)  # a round is due
    # The step changed nothing (IncreLoRAAdamW masked every slot out on the device); its
    # schedule clock moved on with the training step, as the controller's slot stamps do.
    assert scaler.get_scale() == 2.0 ** 9 and optimizer.global_step == optimizer_step + 1
    _assert_same(_snapshot(model, controller), before)
    _loop(model, optimizer, controller, range(5, 10), scaler=scaler)
    steps = [e["step"] for e in controller.allocation_log]
    assert 4 not in steps and steps.count(5) == 2  # the round waited for the next finite step
    assert torch.isfinite(controller.ipt).all() and torch.isfinite(controller.unc).all()


# ---------------------------------------------------------------- NaN loss
@pytest.mark.parametrize("exact", [False, True])
def test_nan_loss_step_leaves_scores_and_allocation_as_if_skipped(exact):
    model, optimizer, controller = _branches(exact_step_score=exact)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _loop(model, optimizer, controller, range(12), nan_steps={5})
    skipped_model, skipped_opt, skipped = _branches(exact_step_score=exact)
    _loop(skipped_model, skipped_opt, skipped, [s for s in range(12) if s != 5])
    assert controller.allocation_log and controller.budget_reached
    _assert_same(_snapshot(model, controller), _snapshot(skipped_model, skipped))


@pytest.mark.parametrize("exact", [False, True])
def test_nan_loss_on_an_allocation_step_defers_the_round(exact):
    model, optimizer, controller = _branches(exact_step_score=exact)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _loop(model, optimizer, controller, range(8), nan_steps={6})
    steps = [e["step"] for e in controller.allocation_log]
    assert steps == [4, 4, 7, 7]
    assert torch.isfinite(controller.ipt).all() and torch.isfinite(controller.unc).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
