"""What users do with a PyTorch model over its life, on an injected model and its training
objects: deep copies, pickles, state dicts, a new run over a grown model, several models in one
process, evaluation passes between steps."""
import copy
import gc
import io
import warnings

import pytest
import torch

from increlora_fast import IncreLoRAController, create_optimizer, inject_increlora
from increlora_fast.model import increlora_layers
from method_helpers import ParallelBranches, batch, branch_config, make_run, train_steps


def grown_run(steps: int = 9, **overrides):
    """A run of ParallelBranches(3) whose rounds grew slots at steps 4, 6 and 8."""
    torch.manual_seed(0)
    config = branch_config(**{**dict(target_rank=4, r_max=5, top_h=1, warmup_steps=2),
                              **overrides})
    model, opt, ctl = make_run(ParallelBranches(3), config)
    train_steps(model, opt, ctl, range(steps))
    return model, opt, ctl, config


def new_run(model, config):
    """A new optimizer and controller over ``model``, as a new run builds them."""
    return create_optimizer(model, config, lr=1e-2, weight_decay=0.1), \
        IncreLoRAController(model, config)


def latest_stamps(model):
    return [int(max(layer.slot_alloc_step.max(), layer.slot_active_step.max()))
            for _, layer in increlora_layers(model)]


@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy"])
def test_a_new_optimizer_over_slots_stamped_by_an_earlier_run_is_named(how):
    """A grown model's state dict loaded into a freshly injected model (or a deep copy of it)
    and trained by a new optimizer: its slots keep the stamps of the earlier run (up to step
    8), where their per-slot schedules begin, so with warmup_steps > 0 they trained at a
    learning rate of 0 for the new run's first steps, silently after load_state_dict (which
    cleared the layer's host record of its stamps), and with a warning that named only a
    wrong step index after a copy. Both now name the stamps and restart_schedules."""
    model, _, _, config = grown_run()
    assert max(latest_stamps(model)) == 8
    if how == "deepcopy":
        target = copy.deepcopy(model)
    else:
        torch.manual_seed(1)
        target = inject_increlora(ParallelBranches(3), config)
        target.load_state_dict(model.state_dict(), strict=True)
    opt, ctl = new_run(target, config)
    with pytest.warns(RuntimeWarning, match=r"stamped at step [468] .*optimizer's step 0.*"
                                            r"restart_schedules\(\)"):
        train_steps(target, opt, ctl, range(2))


def test_restarted_schedules_train_every_loaded_slot_from_the_first_step():
    """After `restart_schedules` on every layer the loaded slots train at once, and the new
    run says nothing."""
    model, _, _, config = grown_run()
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    target.load_state_dict(model.state_dict())
    for _, layer in increlora_layers(target):
        layer.restart_schedules()
    opt, ctl = new_run(target, config)
    before = {n: layer.lora_lambda.detach().clone() for n, layer in increlora_layers(target)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(target, opt, ctl, range(2))
    for name, layer in increlora_layers(target):
        active = layer.active_mask
        assert (layer.lora_lambda.detach() != before[name])[active].all(), name


def test_a_resume_with_the_optimizer_state_says_nothing():
    """The same state dict loaded with the optimizer's state (a resume): the stamps lie
    before the optimizer's step, and nothing is said."""
    model, opt, ctl, config = grown_run()
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), ctl.state_dict()))
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    target.load_state_dict(saved[0])
    opt2, ctl2 = new_run(target, config)
    opt2.load_state_dict(saved[1])
    ctl2.load_state_dict(saved[2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(target, opt2, ctl2, range(9, 12))


def params(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_of_model_optimizer_and_controller_trains_on_as_the_original(how):
    """`copy.deepcopy((model, optimizer, controller))` (or a pickle of the three) taken between
    allocation rounds trains on through the next rounds exactly as the uninterrupted run; the
    copy has slot buffers, scores and state of its own, so its steps leave the original
    untouched, and the original then also ends as the uninterrupted run."""
    reference = grown_run(steps=12)[0]
    model, opt, ctl, _ = grown_run(steps=5)
    if how == "deepcopy":
        model2, opt2, ctl2 = copy.deepcopy((model, opt, ctl))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt, ctl), buffer)
        buffer.seek(0)
        model2, opt2, ctl2 = torch.load(buffer, weights_only=False)
    kept = params(model)
    train_steps(model2, opt2, ctl2, range(5, 12))
    assert_same(params(model), kept)
    assert_same(params(model2), params(reference))
    train_steps(model, opt, ctl, range(5, 12))
    assert_same(params(model), params(reference))
    assert ctl.allocation_log == ctl2.allocation_log and len(ctl.allocation_log) == 4


def test_a_grown_state_dict_loads_strictly_into_a_fresh_model_with_its_ranks_and_outputs():
    """`model.state_dict()` of a grown model carries the slot states and stamps (persistent
    buffers): a freshly injected model of the same config takes it with strict=True and then
    has the same ranks and outputs. One injected with another r_max is refused by torch's size
    check, naming the adapter tensor."""
    model, _, ctl, config = grown_run()
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    target.load_state_dict(model.state_dict(), strict=True)
    assert IncreLoRAController(target, config).rank_pattern() == ctl.rank_pattern()
    assert sum(ctl.rank_pattern().values()) > 3
    x = batch(0)[0]
    assert torch.equal(target(x), model(x))
    other = inject_increlora(ParallelBranches(3), branch_config(target_rank=4, r_max=4))
    with pytest.raises(RuntimeError, match=r"size mismatch for branches\.0\.lora_A"):
        other.load_state_dict(model.state_dict())


def test_two_models_trained_alternately_train_as_each_alone():
    """Two injected models of different configs (r_max, alpha, init_r, schedule, seed) trained
    step by step in turn in one process, each with its own optimizer and controller, end
    bitwise as each trained alone: no state is shared between them (module-level caches,
    class attributes)."""
    first = dict(target_rank=4, r_max=5, top_h=1)
    second = dict(target_rank=3, r_max=4, init_r=2, lora_alpha=8.0, incre_interval=3, top_h=2,
                  seed=7, orth_reg_weight=0.5)

    def build(overrides, seed):
        torch.manual_seed(seed)
        return make_run(ParallelBranches(3), branch_config(**overrides))

    alone = []
    for overrides, seed in ((first, 0), (second, 1)):
        run = build(overrides, seed)
        train_steps(*run, range(10))
        alone.append((params(run[0]), run[2].allocation_log))
    runs = [build(first, 0), build(second, 1)]
    for step in range(10):
        for run in runs:
            train_steps(*run, [step])
    for run, (state, log) in zip(runs, alone):
        assert_same(params(run[0]), state)
        assert run[2].allocation_log == log and log


def test_evaluation_passes_between_steps_change_nothing():
    """Evaluation between steps (eval mode under no_grad, and a forward with gradients on and
    no backward in train mode) leaves scores, rounds and parameters as a run without them."""
    def run(evaluate):
        torch.manual_seed(0)
        model, opt, ctl = make_run(ParallelBranches(3), branch_config(
            target_rank=4, r_max=5, top_h=1, lora_dropout=0.0))

        def evaluation(step):
            if evaluate:
                model.eval()
                with torch.no_grad():
                    model(batch(100 + step)[0])
                model.train()
                model(batch(200 + step)[0]).sum()
        train_steps(model, opt, ctl, range(10), on_step=evaluation)
        return params(model), ctl.ipt.clone(), ctl.allocation_log

    (state, ipt, log), (state2, ipt2, log2) = run(False), run(True)
    assert_same(state, state2)
    assert torch.equal(ipt, ipt2) and log == log2 and log


def test_merged_then_injected_again_trains_from_a_fresh_adapter():
    """inject, train, merge_and_unload, inject again (another config): the new adapter starts at
    init_r with its own schedule and the merged model's outputs; a second injection without
    merging is refused in one line."""
    from increlora_fast import merge_and_unload
    model, _, _, _ = grown_run()
    x = batch(0)[0]
    merged_out = model(x).detach()
    merge_and_unload(model)
    config = branch_config(target_rank=3, r_max=4, top_h=1, target_modules=r"branches\.[01]")
    opt, ctl = new_run(inject_increlora(model, config), config)
    assert ctl.rank_pattern() == {"branches.0": 1, "branches.1": 1}
    assert torch.allclose(model(x), merged_out, atol=1e-4)  # (reserves compute at 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(model, opt, ctl, range(12))
    assert sum(ctl.rank_pattern().values()) == 6
    with pytest.raises(ValueError, match="already holds IncreLoRA layers"):
        inject_increlora(model, config)


def test_a_state_dict_at_the_budget_loaded_under_a_built_controller_ends_allocation_quietly():
    """A state dict whose ranks reached the budget, loaded after the controller was built (a
    loop that builds everything, then restores the model): the next round found no reserve
    and warned that every module was full or had a frozen lora_lambda, neither of which was
    so. It ends allocation as reached, saying nothing."""
    model, _, ctl, config = grown_run(steps=10, target_rank=2)
    assert ctl.budget_reached
    torch.manual_seed(1)
    target = inject_increlora(ParallelBranches(3), config)
    opt, ctl2 = new_run(target, config)
    target.load_state_dict(model.state_dict())
    for _, layer in increlora_layers(target):
        layer.restart_schedules()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(target, opt, ctl2, range(6))
    assert ctl2.budget_reached and ctl2.rank_pattern() == ctl.rank_pattern()


def test_an_optimizer_over_unfrozen_base_weights_says_so():
    """``model.requires_grad_(True)`` after injection unfreezes the frozen base weights under
    the adapters: an optimizer made then would train every one of them in full, beside the
    adapters, and `save_adapter` would save them, all without a word. `create_optimizer` warns,
    naming how many and the first."""
    torch.manual_seed(0)
    config = branch_config()
    model, _, _ = make_run(ParallelBranches(3), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(model, config)  # frozen, as injected: no warning
    model.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"base weights of 3 adapted modules \(branches\.0\b.*"
                                         r"requires_grad_\(False\)"):
        optimizer = create_optimizer(model, config)
    bases = {id(layer.weight) for _, layer in increlora_layers(model)}
    assert bases <= {id(p) for g in optimizer.param_groups for p in g["params"]}


def test_a_base_weight_tied_to_a_module_to_save_is_not_called_unfrozen():
    """An adapted output layer whose weight is tied to an embedding in ``modules_to_save`` (as
    an LM's head shares its input embedding): the shared parameter trains in full because the
    config says so. `create_optimizer` does not call it unfrozen by mistake, whose advice
    (``layer.weight.requires_grad_(False)``) would freeze the embedding the config trains."""

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.mid = torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    config = branch_config(target_modules=["mid", "head"], modules_to_save=["emb"])
    model = inject_increlora(Tied(), config)
    assert model.head.weight is model.emb.weight and model.emb.weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_optimizer(model, config)
    model.mid.weight.requires_grad_(True)  # an adapted weight tied to nothing still is named
    with pytest.warns(UserWarning, match=r"base weights of 1 adapted modules \(mid\)"):
        create_optimizer(model, config)


@pytest.mark.parametrize("how", ["deepcopy", "deepcopy with its optimizer", "replaced"])
def test_adapters_trained_by_another_optimizer_are_named_also_in_a_copy(how):
    """A deep copy of a model whose layers an IncreLoRAAdamW holds, trained by a plain
    torch.optim.AdamW under a new controller: the copy's adapters are in no IncreLoRAAdamW, and
    the controller says so as it does for the original. The copies carried the original's
    "held by IncreLoRAAdamW" flag, so nothing was said; so did the original once its
    IncreLoRAAdamW was dropped for another optimizer. A copy taken together with its optimizer
    (``copy.deepcopy((model, optimizer))``) is held by the copied optimizer: nothing to say."""
    model, opt, ctl, config = grown_run(steps=3)
    if how == "deepcopy with its optimizer":
        model, opt = copy.deepcopy((model, opt))
    else:
        if how == "deepcopy":
            model = copy.deepcopy(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gc.collect()  # (the IncreLoRAAdamW of a replaced one is gone)
    state = ctl.state_dict()
    ctl = IncreLoRAController(model, config)
    ctl.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, opt, ctl, range(3, 9))
    named = [w for w in caught if "not IncreLoRAAdamW" in str(w.message)]
    assert len(named) == (0 if how == "deepcopy with its optimizer" else 1), \
        [str(w.message) for w in caught]


def test_a_new_run_over_a_model_restored_to_an_earlier_best_state_says_nothing():
    """`BestState.restore` (``--select-best``) puts back the slots of a step before any
    growth, all stamped at step 0; a new run over that model has nothing to be told. The
    layers kept the host record of the stamps they had before the restore (up to step 8), so
    the new optimizer warned about slots stamped at step 8 that no slot holds any more."""
    from types import SimpleNamespace

    from increlora_fast.training.loop import BestState, LoopState
    model, opt, ctl, config = grown_run(steps=3)
    assert max(latest_stamps(model)) == 0
    kept = {**{n: p for n, p in model.named_parameters() if p.requires_grad},
            **dict(model.named_buffers())}
    state = LoopState(step=9, best={"step": 3, "accuracy": 1.0, "loss": 0.0, "tensors": {
        n: t.detach().clone() for n, t in kept.items()}})
    train_steps(model, opt, ctl, range(3, 9))
    assert max(latest_stamps(model)) == 8
    BestState(SimpleNamespace(model=model), None, every=3, max_steps=9).restore(state)
    assert max(latest_stamps(model)) == 0
    opt, ctl = new_run(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps(model, opt, ctl, range(2))


@pytest.mark.parametrize("average", ["ema", "swa"])
def test_an_averaged_model_with_buffers_follows_the_slots_of_its_source(average):
    """EMA / SWA of a growing model with ``use_buffers=True``: torch's AveragedModel averages
    every buffer, the layers' integer slot states and stamps too, which rounds each growth
    away (0 + (1 - 0) / n is 0 in int8): the averaged model kept computing with the slots it
    was made with, silently. `IncreLoRAAveragedModel` copies them from the source instead,
    with the host record of the stamps."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    extra = dict(multi_avg_fn=get_ema_multi_avg_fn(0.5)) if average == "ema" else {}
    averaged = IncreLoRAAveragedModel(model, use_buffers=True, **extra)
    train_steps(model, opt, ctl, range(9), on_step=lambda _: averaged.update_parameters(model))
    assert max(latest_stamps(model)) == 8  # grown at steps 4, 6 and 8
    assert latest_stamps(averaged.module) == latest_stamps(model)
    for (name, layer), (_, copy_) in zip(increlora_layers(model),
                                         increlora_layers(averaged.module)):
        for key in ("slot_state", "slot_alloc_step", "slot_active_step"):
            assert torch.equal(getattr(copy_, key), getattr(layer, key)), (name, key)
        assert copy_.latest_stamp == layer.latest_stamp, name


def test_an_averaged_model_refuses_a_model_with_other_layers_in_one_line():
    """`IncreLoRAAveragedModel.update_parameters` given another model than its source names
    the mismatch before averaging anything (zip's own error said nothing of what was wrong)."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2)
    model, _, _ = make_run(ParallelBranches(3), config)
    other, _, _ = make_run(ParallelBranches(2), config)
    averaged = IncreLoRAAveragedModel(model)
    before = [p.clone() for p in averaged.parameters()]
    with pytest.raises(ValueError, match=r"^IncreLoRAAveragedModel\.update_parameters: the "
                                         r"model's IncreLoRA layers \(2\) are not the averaged "
                                         r"copy's \(3\): pass the model it was made from$"):
        averaged.update_parameters(other)
    assert all(torch.equal(a, b) for a, b in zip(before, averaged.parameters()))
    averaged.update_parameters(model)  # its source is averaged


def test_an_averaged_model_names_the_first_other_layer_of_as_many():
    """A model with as many IncreLoRA layers as the averaged copy, under other names, was
    refused with "the model's IncreLoRA layers (3) are not the averaged copy's (3)": the same
    count twice, naming nothing that differs. The message names the first layer that differs."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, _, _ = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    renamed = ParallelBranches(3)
    renamed.heads = renamed.branches
    del renamed.branches
    other, _, _ = make_run(renamed, branch_config(target_rank=4, r_max=5,
                                                  target_modules=r"heads\.\d+"))
    averaged = IncreLoRAAveragedModel(model)
    with pytest.raises(ValueError) as error:
        averaged.update_parameters(other)
    assert "(3)" in str(error.value) and "'heads.0'" in str(error.value) \
        and "'branches.0'" in str(error.value), str(error.value)


@pytest.mark.parametrize("average", ["ema multi_avg_fn", "ema avg_fn", "swa"])
@pytest.mark.parametrize("growth", ["plain", "normalize_on_activation",
                                    "scale_preserving_growth"])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_an_averaged_model_restarts_the_average_of_a_slot_allocated_or_activated(
        average, growth, use_buffers):
    """A slot the controller allocates (`add_reserve`: a fresh A row and B column, lambda at
    the reserve value) holds other values than before, and one it activates with
    ``normalize_on_activation`` gets A and B of unit norm. The averaged copy mixed the slot's
    earlier values (the never-trained draw of an unused slot, the reserve's small rows) into
    the new ones, so for many EMA updates its grown slot was mostly content the source never
    had there. A slot whose stamp moved since the last update now restarts from the source's
    values (A row, B column, lambda); every other value is averaged as torch averages it.

    ``scale_preserving_growth`` multiplies the lambdas of a growing module's earlier active
    slots by new rank / old rank, keeping their part of dW; the copy averaged the new lambdas
    with the unscaled earlier ones under the new rank's scale, so right after each growth its
    earlier slots computed about old / new of what they had (half, growing from rank 1). Their
    averages are now scaled as the source's lambdas were."""
    from torch.optim.swa_utils import get_ema_avg_fn, get_ema_multi_avg_fn

    from increlora_fast import IncreLoRAAveragedModel
    decay = 0.9
    if average == "swa":
        kwargs, rule = {}, lambda e, c, n: e + (c - e) / (n + 1)
    else:
        kwargs = dict(multi_avg_fn=get_ema_multi_avg_fn(decay)) if "multi" in average else \
            dict(avg_fn=get_ema_avg_fn(decay))
        rule = lambda e, c, n: decay * e + (1 - decay) * c  # noqa: E731
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2,
                           **({} if growth == "plain" else {growth: True}))
    model, opt, ctl = make_run(ParallelBranches(3), config)
    averaged = IncreLoRAAveragedModel(model, use_buffers=use_buffers, **kwargs)
    keys = ("lora_A", "lora_B", "lora_lambda")
    expected = {(n, k): getattr(layer, k).detach().clone()
                for n, layer in increlora_layers(model) for k in keys}
    restarted = []

    def update(step):
        n = int(averaged.n_averaged)
        for name, layer in increlora_layers(model):
            mine = dict(increlora_layers(averaged.module))[name]
            moved = (layer.slot_alloc_step > mine.slot_alloc_step) | \
                (layer.slot_active_step > mine.slot_active_step)
            restarted.extend((step, name, int(i)) for i in torch.nonzero(moved).flatten())
            if growth == "scale_preserving_growth" and layer.active_rank > mine.active_rank:
                earlier = mine.active_mask
                expected[name, "lora_lambda"][earlier] *= layer.active_rank / earlier.sum()
            for key in keys:
                current = getattr(layer, key).detach()
                new = current.clone() if n == 0 else rule(expected[name, key], current, n)
                slots = moved[:, None] if key == "lora_A" else moved
                expected[name, key] = torch.where(slots, current, new)
        averaged.update_parameters(model)
        for name, mine in increlora_layers(averaged.module):
            for key in keys:
                torch.testing.assert_close(getattr(mine, key).detach(), expected[name, key],
                                           msg=f"{name}.{key} after step {step}")

    train_steps(model, opt, ctl, range(12), on_step=update)
    grown = [(entry["step"], entry["module"]) for entry in ctl.allocation_log]
    assert len(grown) >= 3 and sorted({(s, n) for s, n, _ in restarted}) == grown, restarted


def test_saving_an_averaged_model_names_the_model_it_holds(tmp_path):
    """`save_adapter` (and everything reading the model's config) given the
    `IncreLoRAAveragedModel` itself said its layers were "built by hand" and told the user to
    call inject_increlora: wrong for a wrapper of an injected model. It names ``.module``, whose
    adapter saves and loads back as the averaged model computes."""
    from increlora_fast import IncreLoRAAveragedModel, load_adapter, save_adapter
    from increlora_fast.model import get_config
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    averaged = IncreLoRAAveragedModel(model)
    train_steps(model, opt, ctl, range(7), on_step=lambda _: averaged.update_parameters(model))
    with pytest.raises(ValueError, match=r"^model is an IncreLoRAAveragedModel wrapper of an "
                                         r"IncreLoRA model: pass the model it holds "
                                         r"\(model\.module\) instead$"):
        save_adapter(averaged, tmp_path / "ema")
    assert not (tmp_path / "ema").exists()
    assert get_config(averaged.module) == config  # (a deep copy)
    save_adapter(averaged.module, tmp_path / "ema")
    torch.manual_seed(1)
    fresh = ParallelBranches(3)
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                           if "base_layer" in k or k == "weights"})
    fresh = inject_increlora(fresh, config)
    load_adapter(fresh, tmp_path / "ema")
    x, _ = batch(0)
    torch.testing.assert_close(fresh.eval()(x), averaged.eval()(x))


@pytest.mark.parametrize("merged", ["the model", "the averaged copy"])
def test_an_averaged_model_refuses_a_merged_layer_in_one_line(merged):
    """A merged layer (`IncreLoRALinear.merge`, e.g. for a fast evaluation) holds its adapter
    in its base weight and skips the adapter. Averaging a merged source's base weights into
    the copy, whose adapters still compute, counted the adapter twice; averaging into a merged
    copy mixed the source's plain base into the merged one, and its `unmerge` then subtracted
    an adapter that was never all there. Both were silent; both are refused, changing
    nothing, and after `unmerge` the update goes on."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    averaged = IncreLoRAAveragedModel(model)
    train_steps(model, opt, ctl, range(2), on_step=lambda _: averaged.update_parameters(model))
    layer = dict(increlora_layers(model if merged == "the model" else averaged.module))[
        "branches.1"]
    reference = copy.deepcopy(averaged)
    layer.merge()
    before = [t.clone() for t in averaged.state_dict().values()]
    with pytest.raises(ValueError, match=rf"^IncreLoRAAveragedModel\.update_parameters: layer "
                                         rf"'branches\.1' of {merged} is merged \(its adapter "
                                         r"is in its base weight\): unmerge\(\) it first$"):
        averaged.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(before, averaged.state_dict().values()))
    layer.unmerge()
    averaged.update_parameters(model)
    reference.update_parameters(model)
    x, _ = batch(0)
    torch.testing.assert_close(averaged.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("exact", [False, True])
def test_an_averaged_model_made_in_a_score_window_tracks_no_score(exact):
    """The averaged copy is a deep copy of the model, taken with the layers' score tracking as
    it is: made inside a score window it tracked scores in every backward pass through it for
    good (no controller switches the copy's layers), and with ``exact_step_score`` it held a
    dense float32 (out, in) gradient per layer, as large as the base weights in float32. The
    copy tracks nothing and holds no score buffers."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2,
                           exact_step_score=exact)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    train_steps(model, opt, ctl, range(3))
    assert all(layer.score_enabled and (layer.score_grad is not None) == exact
               for _, layer in increlora_layers(model))
    averaged = IncreLoRAAveragedModel(model)
    x, y = batch(0)
    ((averaged(x) - y) ** 2).mean().backward()
    for name, layer in increlora_layers(averaged.module):
        assert not layer.score_enabled and layer.score_grad is None, name
        assert float(layer.score_sum) == 0.0, name  # (the score of the passes through it)
    assert all(layer.score_enabled for _, layer in increlora_layers(model))  # (untouched)


class _NoCopy(torch.Tensor):
    """A tensor that must not be deep-copied."""

    def __deepcopy__(self, memo):
        raise AssertionError("deep-copied")


@pytest.mark.parametrize("share_frozen", [True, False])
def test_an_averaged_model_does_not_copy_the_dense_score_buffers(share_frozen):
    """The copy deep-copied exact_step_score's dense (out, in) float32 buffers only to release
    them: a passing spike of an fp32 copy of every target weight, on the device."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2,
                           exact_step_score=True)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    train_steps(model, opt, ctl, range(3))
    for _, layer in increlora_layers(model):
        layer.score_grad = layer.score_grad.as_subclass(_NoCopy)
    averaged = IncreLoRAAveragedModel(model, share_frozen=share_frozen)
    assert all(layer.score_grad is None for _, layer in increlora_layers(averaged.module))
    assert all(type(layer.score_grad) is _NoCopy for _, layer in increlora_layers(model))


@pytest.mark.parametrize("growth", ["plain", "scale_preserving_growth"])
def test_an_averaged_model_reads_nothing_on_the_host_while_no_slot_changed(growth):
    """The restart of moved slots and the scaling of grown lambdas compared every layer's
    stamps and read its active rank (``int(mask.sum())``) on the host at every update: one
    device sync per layer per EMA step, which the training step must not make outside
    allocation rounds. An update after which no slot of the source changed (its
    ``slot_version`` the same) reads nothing beyond torch's own `AveragedModel` (its
    ``n_averaged`` checks); one after a growth still restarts its slots (tested above), as
    does one after an earlier state was loaded into the copy."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from host_reads import HostReads
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2,
                           **({} if growth == "plain" else {growth: True}))
    model, opt, ctl = make_run(ParallelBranches(3), config)
    averaged = IncreLoRAAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    quiet, changed = [], []

    def update(step):
        versions = [layer.slot_version for _, layer in increlora_layers(model)]
        with HostReads(allow=("torch.optim.swa_utils",)) as counter:
            averaged.update_parameters(model)
        (changed if versions != update.versions else quiet).append((step, counter.reads))
        update.versions = versions

    update.versions = [layer.slot_version for _, layer in increlora_layers(model)]
    train_steps(model, opt, ctl, range(12), on_step=update)
    assert len(changed) >= 3 and len(quiet) >= 6, (changed, quiet)
    assert all(reads == [] for _, reads in quiet), quiet
    # an earlier state loaded into the copy: its slots grown since then restart all the same
    earlier = IncreLoRAAveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    earlier.update_parameters(model)  # (n_averaged 0 would copy every value anew)
    state = copy.deepcopy(earlier.state_dict())
    train_steps(model, opt, ctl, range(12, 18), on_step=lambda _: earlier.update_parameters(model))
    earlier.load_state_dict(state)
    moved = {name: (layer.slot_alloc_step > mine.slot_alloc_step)
             | (layer.slot_active_step > mine.slot_active_step) for (name, layer), (_, mine)
             in zip(increlora_layers(model), increlora_layers(earlier.module))}
    assert any(bool(m.any()) for m in moved.values())
    earlier.update_parameters(model)
    for (name, layer), (_, mine) in zip(increlora_layers(model), increlora_layers(earlier.module)):
        torch.testing.assert_close(mine.lora_lambda[moved[name]], layer.lora_lambda[moved[name]])


def _bytes_not_shared(copy_: torch.nn.Module, source: torch.nn.Module) -> int:
    """Bytes of ``copy_``'s parameters whose storage is none of ``source``'s parameters'."""
    theirs = {p.data_ptr() for p in source.parameters()}
    return sum(p.numel() * p.element_size() for p in copy_.parameters()
               if p.data_ptr() not in theirs)


@pytest.mark.parametrize("use_buffers", [False, True])
def test_an_averaged_model_shares_the_frozen_base_with_its_source(use_buffers):
    """torch's AveragedModel deep-copies the whole model: for adapters over a large frozen base
    the copy held a second base, and every update averaged (or copied) each frozen weight,
    whose average never changes. The copy shares the parameters that were frozen when it was
    made; it holds only the trainable ones (adapters, modules to save) of its own, and averages
    them as before (`share_frozen=False`: the full copy, the same averages)."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    config = branch_config(target_rank=4, r_max=5, top_h=1, warmup_steps=2)
    model, opt, ctl = make_run(ParallelBranches(3), config)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert frozen and trainable
    kwargs = dict(use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    shared = IncreLoRAAveragedModel(model, **kwargs)
    full = IncreLoRAAveragedModel(model, share_frozen=False, **kwargs)
    assert _bytes_not_shared(shared.module, model) == trainable
    assert _bytes_not_shared(full.module, model) == trainable + sum(
        p.numel() * p.element_size() for p in frozen)

    def update(_):
        shared.update_parameters(model)
        full.update_parameters(model)

    train_steps(model, opt, ctl, range(9), on_step=update)
    for (name, mine), theirs in zip(shared.module.named_parameters(), full.module.parameters()):
        assert torch.equal(mine, theirs), name
    x, _ = batch(0)
    torch.testing.assert_close(shared.eval()(x), full.eval()(x), rtol=0, atol=0)


def test_an_averaged_model_refuses_a_shared_parameter_unfrozen_later():
    """A base weight the copy shares (frozen when it was made) and the user unfreezes later
    trains in the source, and the copy's "average" of it is the source's current value: named
    in one line before anything changes; ``share_frozen=False`` averages it."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, _, _ = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    averaged = IncreLoRAAveragedModel(model)
    full = IncreLoRAAveragedModel(model, share_frozen=False)
    averaged.update_parameters(model)
    before = [t.clone() for t in averaged.state_dict().values()]
    model.branches[1].base_layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"^IncreLoRAAveragedModel\.update_parameters: "
                                         r"'branches\.1\.base_layer\.weight' requires grad now "
                                         r"but was frozen .*share_frozen=False$"):
        averaged.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(before, averaged.state_dict().values()))
    full.update_parameters(model)


@pytest.mark.parametrize("merge", ["the copy", "the source"])
def test_merging_an_averaged_model_that_shares_the_base_leaves_the_other_as_it_was(merge):
    """The averaged copy and its source share their frozen base weights, and a merge writes the
    adapter into the base weight: merging one of them would add its adapter to the other's
    base, which then counts an adapter of another model. The merged side gets its own base
    weight first; the other computes as before, and the merged one as it did unmerged."""
    from increlora_fast import IncreLoRAAveragedModel, merge_and_unload
    from increlora_fast.model import increlora_layers as layers
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    averaged = IncreLoRAAveragedModel(model)
    train_steps(model, opt, ctl, range(3), on_step=lambda _: averaged.update_parameters(model))
    x, _ = batch(0)
    expected = {"the copy": averaged.eval()(x).detach(), "the source": model.eval()(x).detach()}
    merged, other = (averaged, model) if merge == "the copy" else (model, averaged)
    # a layer merged alone, then the whole model
    dict(layers(getattr(merged, "module", merged)))["branches.0"].merge()
    torch.testing.assert_close(other(x), expected["the source" if merge == "the copy"
                                                  else "the copy"], rtol=0, atol=0)
    merge_and_unload(merged)
    assert not list(layers(merged))
    for which, out in (("merged", merged(x)), ("other", other(x))):
        want = expected[merge] if which == "merged" else \
            expected["the source" if merge == "the copy" else "the copy"]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, msg=which)


def test_an_averaged_model_sharing_the_base_round_trips_and_keeps_the_source_on_its_device():
    """A deep copy, a pickle or a state dict of the averaged copy averages on as it does (a
    deep copy holds a base of its own, shared with nothing); ``device`` other than the
    source's copies the frozen parameters there and leaves the source's where they are."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    elsewhere = IncreLoRAAveragedModel(model, device="meta")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.device.type for p in elsewhere.parameters()} == {"meta"}
    averaged = IncreLoRAAveragedModel(model)
    train_steps(model, opt, ctl, range(4), on_step=lambda _: averaged.update_parameters(model))
    deep = copy.deepcopy(averaged)
    assert not {id(p) for p in deep.parameters()} & {id(p) for p in model.parameters()}
    buffer = io.BytesIO()
    torch.save(averaged, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    reloaded = IncreLoRAAveragedModel(model)
    reloaded.load_state_dict(averaged.state_dict())
    others = (deep, loaded, reloaded)
    train_steps(model, opt, ctl, range(4, 7),
                on_step=lambda _: [a.update_parameters(model) for a in (averaged, *others)])
    x, _ = batch(0)
    for other in others:
        torch.testing.assert_close(other.eval()(x), averaged.eval()(x), rtol=0, atol=0)


def test_moving_or_converting_an_averaged_copy_that_shares_the_base_is_refused():
    """The copy shares its model's frozen parameters: ``ema.double()`` (or ``.half()``, or
    ``.to()`` another device) converted the model's own base weights too, silently. It is
    refused in one line with both models left as they were; a ``.to()`` that changes nothing
    still works, and a copy made with share_frozen=False converts alone."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, _, _ = make_run(ParallelBranches(2), branch_config())
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    ema = IncreLoRAAveragedModel(model)
    with pytest.raises(ValueError, match="shares with its model.*share_frozen=False") as err:
        ema.double()
    assert "\n" not in str(err.value)
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes
    assert all(p.dtype == torch.float32 for p in ema.parameters())
    assert ema.to(torch.float32) is ema and ema.to("cpu") is ema
    full = IncreLoRAAveragedModel(model, share_frozen=False).double()
    assert all(p.dtype == torch.float64 for p in full.module.parameters())
    assert {n: p.dtype for n, p in model.named_parameters()} == dtypes



def test_an_averaged_model_made_with_the_sources_device_by_another_name_shares_the_base():
    """``device`` names where the copy lives, and the frozen parameters already there are
    shared: ``device="cuda"`` for a model on cuda:0 (here ``"cpu:0"`` for one on ``cpu``) is
    that device, but compared as written it matched none of them, and the copy silently held a
    second base."""
    from increlora_fast import IncreLoRAAveragedModel
    torch.manual_seed(0)
    model, _, _ = make_run(ParallelBranches(2), branch_config())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    averaged = IncreLoRAAveragedModel(model, device="cpu:0")
    assert _bytes_not_shared(averaged.module, model) == trainable


@pytest.mark.parametrize("source", ["merged", "deleted"])
def test_merging_one_of_two_averaged_models_leaves_the_others_base_as_it_was(source):
    """Two averaged copies of one model (two EMA decays) share its frozen base with it and with
    each other. Once the source no longer held a weight (merged into its own copy, or deleted),
    merging one copy wrote its adapter into the base weight the other still computed with."""
    from increlora_fast import IncreLoRAAveragedModel, merge_and_unload
    torch.manual_seed(0)
    model, opt, ctl = make_run(ParallelBranches(3), branch_config(target_rank=4, r_max=5))
    fast, slow = IncreLoRAAveragedModel(model), IncreLoRAAveragedModel(model)
    train_steps(model, opt, ctl, range(3), on_step=lambda _: fast.update_parameters(model))
    x, _ = batch(0)
    expected = slow.eval()(x).detach()
    if source == "merged":
        merge_and_unload(model)
    else:
        del model, opt, ctl
        gc.collect()
    merge_and_unload(fast)
    torch.testing.assert_close(slow(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("source", ["merged", "deleted"])
def test_converting_one_of_two_averaged_models_is_refused_where_the_other_shares_the_base(
        source):
    """Two averaged copies of one model share its frozen base with each other too: once the
    source no longer held a weight (merged, or deleted), ``fast.double()`` was let through and
    converted the base weights the other copy computes with, silently."""
    from increlora_fast import IncreLoRAAveragedModel, merge_and_unload
    torch.manual_seed(0)
    model, _, _ = make_run(ParallelBranches(2), branch_config())
    fast, slow = IncreLoRAAveragedModel(model), IncreLoRAAveragedModel(model)
    if source == "merged":
        merge_and_unload(model)
    else:
        del model
        gc.collect()
    with pytest.raises(ValueError, match="shares with its model.*share_frozen=False"):
        fast.double()
    assert {p.dtype for p in slow.parameters()} == {torch.float32}
