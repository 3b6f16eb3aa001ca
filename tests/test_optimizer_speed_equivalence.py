"""The stacked multi-tensor step of `IncreLoRAAdamW` against a per-tensor reference.

The reference follows the documented semantics tensor by tensor: fresh moments for slots whose
stamps changed, step counts, the per-slot schedule and `masked_adamw_torch_`. The optimizer must
give bitwise the same parameters and moments, and leave masked-out slots bitwise unchanged even
when they hold NaN, inf or -0.0 and their gradient is NaN. The fused-kernel path (CUDA; on CPU
forced through the Triton interpreter) must agree with it too.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before increlora_fast.kernels is first imported

import increlora_fast.optimizer as optimizer_module  # noqa: E402
from increlora_fast import IncreLoRAConfig, create_optimizer, increlora_layers  # noqa: E402
from increlora_fast import inject_increlora  # noqa: E402
from increlora_fast.functional import multi_adamw_ok, reset_kernel_checks  # noqa: E402
from increlora_fast.layer import SlotState  # noqa: E402
from increlora_fast.optim_functional import along_slot_dim, masked_adamw_torch_  # noqa: E402
from increlora_fast.optimizer import (ADAPTER_SLOT_DIM, IncreLoRAAdamW,  # noqa: E402
                                      schedule_multiplier)

R_MAX = 5
HYPER = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-8}


def _model(dtype, device="cpu"):
    """Linears of three shapes (two layers share one) and a trained head, in ``dtype``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 7),
                          nn.Linear(7, 3)).to(device=device, dtype=dtype)
    config = IncreLoRAConfig(target_modules=["0", "1", "2", "3"], r_max=R_MAX, init_r=1,
                             warmup_steps=2, total_step=30, modules_to_save=["4"])
    inject_increlora(model, config)
    layers = [layer for _, layer in increlora_layers(model)]
    layers[2].advance_learning = False  # its reserve A, B stay frozen
    return model, config, layers


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@torch.no_grad()
def _scramble(model, layers, step, gen):
    """A random valid slot layout with fresh stamps on some slots, fresh gradients, and hostile
    values (NaN, inf, -0.0) in the parameters and gradients of the slots that do not train."""
    for layer in layers:
        active = int(torch.randint(1, R_MAX, (), generator=gen))
        reserve = int(torch.randint(0, R_MAX - active + 1, (), generator=gen))
        layer.slot_state.fill_(SlotState.INACTIVE)
        layer.slot_state[:active] = SlotState.ACTIVE
        layer.slot_state[active:active + reserve] = SlotState.RESERVE
        renew = (torch.rand(R_MAX, generator=gen) < 0.3).to(layer.slot_state.device)
        layer.slot_alloc_step[renew] = step
        layer.slot_active_step[renew & layer.active_mask] = step
        layer.mark_slots_changed()  # edited in place, not through the layer's own methods
    _fresh_grads(model, layers, gen, hostile=True)


@torch.no_grad()
def _fresh_grads(model, layers, gen, hostile=False):
    """New gradients in the layout the layers have, NaN where slots do not train (alone: a step
    between rounds); with ``hostile``, NaN, inf or -0.0 in those slots' parameters too."""
    for layer in layers:
        ab, lam = layer.trainable_slot_masks()
        for kind, mask in (("lora_A", ab), ("lora_B", ab), ("lora_lambda", lam)):
            p = getattr(layer, kind)
            off = ~along_slot_dim(mask, ADAPTER_SLOT_DIM[kind], p.dim()).expand_as(p)
            p.grad = torch.randn(p.shape, generator=gen).to(p)
            p.grad[off] = float("nan")
            if hostile:
                values = torch.tensor([float("nan"), float("inf"), -0.0]).to(p)
                p[off] = values[torch.randint(0, 3, (int(off.sum()),), generator=gen)]
    for p in model[4].parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p)


def _expected(opt, layers, head, step, adamw=masked_adamw_torch_):
    """Per tensor: parameter and moments after one step, computed tensor by tensor from copies
    by ``adamw`` (`masked_adamw_torch_`'s arguments), the elements of slots that do not train,
    and the moments before the update."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    out = {}
    for layer in layers:
        ab, lam = layer.trainable_slot_masks()
        for kind, dim in ADAPTER_SLOT_DIM.items():
            p = getattr(layer, kind)
            st = opt.state[p]
            m, v = (st[k].clone() if st else torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq"))
            count = st["slot_count"].clone() if st else torch.zeros(R_MAX)
            seen_alloc = st["seen_alloc"] if st else torch.full((R_MAX,), -2)
            seen_active = st["seen_active"] if st else torch.full((R_MAX,), -2)
            fresh = seen_alloc != layer.slot_alloc_step
            # A and B: from their allocation, or without advance learning from their
            # activation (until then they do not train)
            start = layer.slot_alloc_step if layer.advance_learning else layer.slot_active_step
            mask = ab
            if kind == "lora_lambda":
                fresh |= seen_active != layer.slot_active_step
                start, mask = layer.slot_active_step, lam
            m.masked_fill_(along_slot_dim(fresh, dim, p.dim()), 0)
            v.masked_fill_(along_slot_dim(fresh, dim, p.dim()), 0)
            # a slot changed at this step (seen before) does not count this step: count 0
            # after it, no step at all (no weight decay, moments kept), as if masked out
            now = (layer.slot_alloc_step == step) | (layer.slot_active_step == step)
            count = count.masked_fill(fresh, 0).masked_fill(fresh & now & (seen_alloc != -2),
                                                            -1) + mask
            off = ~along_slot_dim(mask & (count >= 1), dim, p.dim()).expand_as(p)
            moments = (m.clone(), v.clone())
            lr = (group["lr"] * schedule_multiplier(step, start, group["warmup_steps"],
                                                    group["total_step"])).float()
            new = p.detach().clone()
            adamw(new, p.grad, m, v, mask, lr, count, dim, beta1, beta2,
                                group["eps"], group["weight_decay"])
            out[p] = (new, m, v, off, moments)
    # the head's bias is in the group without weight decay (`no_decay_parameters`)
    decay = {id(q): g["weight_decay"] for g in opt.param_groups for q in g["params"]}
    for p in head.parameters():
        st = opt.state[p]
        m, v = (st[k].clone() if st else torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq"))
        count = (st["step"].clone() if st else torch.zeros(())) + 1
        lr = group["lr"] * float(schedule_multiplier(step, 0, group["warmup_steps"],
                                                     group["total_step"]))
        new = p.detach().clone()
        one = torch.ones(1, dtype=torch.bool)
        adamw(new.view(1, -1), p.grad.view(1, -1), m.view(1, -1), v.view(1, -1),
                            one, torch.full((1,), lr), count.view(1), 0, beta1, beta2,
                            group["eps"], decay[id(p)])
        out[p] = (new, m, v, torch.zeros_like(p, dtype=torch.bool), (m, v))
    return out


def _assert_stepped_exactly(p, state, new, m, v):
    """The parameter ``p`` and its moments in ``state`` bitwise those of the reference."""
    assert torch.equal(_bits(p.detach()), _bits(new))
    assert torch.equal(_bits(state["exp_avg"]), _bits(m))
    assert torch.equal(_bits(state["exp_avg_sq"]), _bits(v))


# (seed 7 alone passed with a reference that started A and B's schedule at allocation on the
# layer without advance learning; other seeds give its active slots activation stamps of their
# own, where the optimizer, as documented, starts at activation)
@pytest.mark.parametrize("seed", [7, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_step_matches_per_tensor_reference_bitwise(dtype, seed):
    model, config, layers = _model(dtype)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(seed)
    updated = set()
    for step in range(6):
        _scramble(model, layers, step, gen)
        expected = _expected(opt, layers, model[4], step)
        before = {p: p.detach().clone() for p in expected}
        opt.step()
        for p, (new, m, v, off, moments) in expected.items():
            state = opt.state[p]
            _assert_stepped_exactly(p, state, new, m, v)
            # masked out: untouched, NaN, inf and -0.0 included (not only "as the reference")
            assert torch.equal(_bits(p.detach()[off]), _bits(before[p][off]))
            for got, old in zip((state["exp_avg"], state["exp_avg_sq"]), moments):
                assert torch.equal(_bits(got[off]), _bits(old[off]))
        updated |= {p for p in expected if not torch.equal(_bits(p.detach()), _bits(before[p]))}
    assert len(updated) == len(expected)  # not vacuous: every tensor took real steps


def _storage(t):
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("subclass", [False, True], ids=["plain", "subclass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moments_kept_stacked_stay_exact_when_a_stack_changes_or_is_loaded(dtype, subclass,
                                                                           monkeypatch):
    """The torch path keeps the moments of tensors of one shape in one stacked tensor (the
    state tensors are its views): no copy in or out per step. A tensor without a gradient (its
    stack made anew without it, then with it again) and a `load_state_dict` (the loaded moments
    are other tensors) still step bitwise as the per-tensor reference, and a tensor left out
    keeps its parameter and moments. Tensor subclasses (FSDP2's DTensor, whose address reads
    0) are stacked and copied back on every step instead, with the same results."""
    if subclass:
        monkeypatch.setattr(optimizer_module, "kernel_readable", lambda t: False)
    model, config, layers = _model(dtype)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(5)
    left_out = {2: [layers[1]], 3: [layers[1], layers[3]]}
    for step in range(7):
        _scramble(model, layers, step, gen)
        for layer in left_out.get(step, []):
            for kind in ADAPTER_SLOT_DIM:
                getattr(layer, kind).grad = None
        if step == 5:  # the same values as other tensors
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        stepped = [layer for layer in layers if layer not in left_out.get(step, [])]
        expected = _expected(opt, stepped, model[4], step)
        kept = {p: (p.detach().clone(), *(opt.state[p][k].clone()
                                          for k in ("exp_avg", "exp_avg_sq")))
                for layer in left_out.get(step, []) for p in map(layer.get_parameter,
                                                                 ADAPTER_SLOT_DIM)}
        opt.step()
        for p, (new, m, v, _, _) in expected.items():
            _assert_stepped_exactly(p, opt.state[p], new, m, v)
        for p, (param, m, v) in kept.items():
            for got, want in zip((p.detach(), opt.state[p]["exp_avg"],
                                  opt.state[p]["exp_avg_sq"]), (param, m, v)):
                assert torch.equal(_bits(got), _bits(want))
        # layers 1 and 2 share A's shape (5, 5): one stack, one storage, when both stepped
        a1, a2 = (opt.state[layers[i].lora_A]["exp_avg"] for i in (1, 2))
        assert (_storage(a1) == _storage(a2)) == (step not in left_out and not subclass)
        if step in left_out:  # the tensor left out holds its own copy, not the old stack
            assert a1.untyped_storage().nbytes() == a1.numel() * a1.element_size()


def _drop_grads(params):
    """Set the gradients of ``params`` aside (None on the parameters); returns them."""
    held = {p: p.grad for p in params}
    for p in params:
        p.grad = None
    return held


def _run(monkeypatch, switch_backend: bool):
    """Four steps of the test model: torch path (all tensors), fused path (all tensors), torch
    path with the lora_A of layers 1 and 2 left out (their (r, 5) stack shrinks to layer 3's
    lora_A alone), fused path (all tensors, no layout change). ``switch_backend``: steps 1 and
    3 on the fused kernel (as after INCRELORA_BACKEND changes and `refresh_settings`), else
    every step on the torch path. Returns (model, layers, optimizer)."""
    fused = [False]
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: fused[0])
    model, config, layers = _model(torch.float32, DEVICE)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(11)
    for step in range(4):
        if step == 0:
            _scramble(model, layers, step, gen)
        else:
            _fresh_grads(model, layers, gen)
        if step == 2:
            _drop_grads([layers[1].lora_A, layers[2].lora_A])
        fused[0] = switch_backend and step in (1, 3)
        opt.step()
    return model, layers, opt


def test_fused_plan_is_dropped_when_a_stack_of_one_replaces_the_state_moments(monkeypatch):
    """A stack shrinking to one tensor gives its former members copies of their moments
    (`_release_moment_stack`); a `_FusedPlan` kept from an earlier fused step (the backend
    switched during the run) held the old stacked views, so the next fused step updated those
    and read stale moments, and the state moments missed the update. The release drops it."""
    _fused_available()
    runs = [_run(monkeypatch, switch) for switch in (True, False)]
    (fused_model, fused_layers, fused_opt), (model, layers, opt) = runs
    for fl, l in zip(fused_layers, layers):
        for name in ("lora_A", "lora_B", "lora_lambda"):
            got, want = getattr(fl, name), getattr(l, name)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(fused_opt.state[got][key], opt.state[want][key],
                                           rtol=1e-5, atol=1e-9, equal_nan=True,
                                           msg=f"{name} {key}")
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True,
                                       msg=name)


def _held_bytes(opt) -> int:
    """Bytes of the distinct storages the optimizer object references outside its state,
    parameter groups and the parameters' gradients (its caches)."""
    skip = set()
    for group in opt.param_groups:
        for p in group["params"]:
            skip.add(p.untyped_storage().data_ptr())
            if p.grad is not None:
                skip.add(p.grad.untyped_storage().data_ptr())
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                skip.add(v.untyped_storage().data_ptr())
    seen, total, todo, visited = set(), 0, [v for k, v in vars(opt).items()
                                          if k not in ("state", "param_groups")], set()
    while todo:
        obj = todo.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in seen:
                seen.add(ptr)
                total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            todo.extend(obj)
    return total


def test_a_stack_whose_key_changes_frees_its_old_stacked_moments():
    """`model.to(dtype)` (or a move to another device, with the state moved by the caller)
    puts a parameter under another stack key: its state becomes views of a new stack, and the
    cache entry of the old key (its stacked exp_avg and exp_avg_sq) is never released, so the
    optimizer keeps a second full copy of those moments for the rest of the run."""
    model, config, layers = _model(torch.float32)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(2)
    _scramble(model, layers, 0, gen)
    opt.step()
    _fresh_grads(model, layers, gen)
    opt.step()
    held = _held_bytes(opt)
    model.to(torch.bfloat16)  # parameters now bfloat16, the moments stay float32
    for _ in range(2):
        _fresh_grads(model, layers, gen)
        opt.step()
    moments = sum(v.numel() * v.element_size() for st in opt.state.values()
                  for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    assert _held_bytes(opt) - held < moments // 4, (held, _held_bytes(opt), moments)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_an_optimizer_copied_with_its_model_steps_as_the_original(how, tmp_path):
    """`copy.deepcopy((model, optimizer))` and a pickle of both (found by a helper's review:
    torch's Optimizer pickles only its state and groups, so the copy lost ``global_step`` and
    the parameters' slot roles, and its first step raised AttributeError). The copy steps its
    own model bitwise as the original steps the original, caches rebuilt; the original is not
    touched by the copy's steps. A pickle without the roles is refused in one line."""
    model, config, layers = _model(torch.float32)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(9)
    for step in range(3):
        _scramble(model, layers, step, gen)
        opt.step()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        torch.save((model, opt), tmp_path / "both.pt")
        model2, opt2 = torch.load(tmp_path / "both.pt", weights_only=False)
    layers2 = [module for _, module in increlora_layers(model2)]
    assert opt2.global_step == 3
    for step in range(3, 6):
        state = gen.get_state()
        _scramble(model, layers, step, gen)
        gen.set_state(state)
        _scramble(model2, layers2, step, gen)
        opt.step()
        opt2.step()
        for p, p2 in zip(model.parameters(), model2.parameters()):
            assert torch.equal(_bits(p.detach()), _bits(p2.detach()))
            if p.requires_grad:
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(_bits(opt.state[p][key]), _bits(opt2.state[p2][key]))
    assert all(p2.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
               for p, p2 in zip(model.parameters(), model2.parameters()))
    old = opt.__getstate__()
    del old["slot_roles"]
    with pytest.raises(TypeError, match="slot roles.*create_optimizer"):
        IncreLoRAAdamW.__new__(IncreLoRAAdamW).__setstate__(old)


def test_fused_kernel_path_matches_stacked_path(monkeypatch):
    """Same slots, masks, learning rates and counts reach the kernel. Every step here changes
    the adapters' slots, so their plan is new each step and launches per tensor (12 tensors);
    the head's plans (its weight, and its bias in the group without weight decay) are kept from
    the second step on, one launch each."""
    _fused_available()
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    runs = []
    for fused, model, layers, opt, gen in _fused_then_stacked(monkeypatch, 3):
        reset_launch_counts()
        for step in range(4):
            _scramble(model, layers, step, gen)
            opt.step()
        assert launch_counts() == ({"_masked_adamw_kernel": 12 * 4 + 2,
                                    "_masked_adamw_multi_kernel": 2 * 3} if fused else {})
        runs.append((model, opt))
    (fused_model, fused_opt), (model, opt) = runs
    assert _assert_fused_matches_stacked(fused_model, model, fused_opt, opt) == 14


def test_resume_keeps_step_stamps_and_counts_exact_for_bfloat16():
    """torch casts loaded state to the parameter dtype; stamps and counts must not round."""
    model, config, layers = _model(torch.bfloat16)
    opt = create_optimizer(model, config, **HYPER)
    for layer in layers:
        layer.slot_alloc_step[:2] = 1001  # not a bfloat16 number
        layer.slot_active_step[:1] = 1001
    model(torch.randn(4, 6, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.global_step = 1001
    for _ in range(3):
        opt.step()
    resumed = create_optimizer(model, config, **HYPER)
    resumed.load_state_dict(opt.state_dict())
    resumed.step()
    for layer in layers:
        state = resumed.state[layer.lora_A]
        assert state["seen_alloc"].dtype == torch.long and int(state["seen_alloc"][0]) == 1001
        assert state["slot_count"].dtype == torch.float32
        assert float(state["slot_count"][0]) == 4.0  # not restarted by the load


def _fused_available():
    pytest.importorskip("triton")
    from increlora_fast.kernels.adamw import _masked_adamw_kernel
    from increlora_fast.kernels.utils import is_interpreted
    if DEVICE == "cpu" and not is_interpreted(_masked_adamw_kernel):
        pytest.skip("increlora_fast.kernels was imported before TRITON_INTERPRET=1 was set")


def _fused_run(monkeypatch, seed):
    """The test model with the fused kernel forced on, after one step that made its plan."""
    _fused_available()
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: True)
    model, config, layers = _model(torch.float32, DEVICE)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(seed)
    _scramble(model, layers, 0, gen)
    opt.step()
    return model, layers, opt, gen


def _fused_then_stacked(monkeypatch, seed):
    """(fused, model, layers, optimizer, generator): the test model with the fused kernel
    forced on, then a fresh one with it off, each with a generator seeded ``seed``."""
    for fused in (True, False):
        monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p, on=fused: on)
        model, config, layers = _model(torch.float32, DEVICE)
        yield (fused, model, layers, create_optimizer(model, config, **HYPER),
               torch.Generator().manual_seed(seed))


def _assert_fused_matches_stacked(fused_model, model, fused_opt=None, opt=None) -> int:
    """Every parameter of the fused run close to the stacked run's (float32: the kernel's
    beta**n may differ by one ulp) and, given the optimizers, the moments of the trained ones;
    how many were trained."""
    trained = 0
    for (name, got), want in zip(fused_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, equal_nan=True, msg=name)
        if got.requires_grad:
            trained += 1
            for key in ("exp_avg", "exp_avg_sq") if opt is not None else ():
                torch.testing.assert_close(fused_opt.state[got][key], opt.state[want][key],
                                           rtol=1e-5, atol=1e-9, msg=name)
    return trained


def test_fused_steps_between_rounds_and_after_a_resume_match_the_stacked_path(monkeypatch):
    """The fused path keeps its launches while the layout holds (`_prepare` runs only when
    slots change and after `load_state_dict`) and steps as the stacked path does: over steps
    without slot changes, a layout change, and a load of an earlier state."""
    _fused_available()
    prepared = []
    real_prepare = optimizer_module.IncreLoRAAdamW._prepare

    def counting_prepare(self, params, where):
        # (step, group: adapters 0, the head's weight 1, its bias 2, without weight decay)
        prepared.append((self.global_step, where[0]))
        return real_prepare(self, params, where)
    monkeypatch.setattr(optimizer_module.IncreLoRAAdamW, "_prepare", counting_prepare)
    runs = []
    for fused, model, layers, opt, gen in _fused_then_stacked(monkeypatch, 5):
        prepared.clear()
        for step in range(8):
            if step in (0, 4):
                _scramble(model, layers, step, gen)
            else:
                _fresh_grads(model, layers, gen)
            if step == 3:
                saved = copy.deepcopy(opt.state_dict())
            if step == 6:  # back to step 3's moments: the same optimizer's tensors replaced
                opt.load_state_dict(saved)
            opt.step()
        runs.append((model, opt, list(prepared)))
    (fused_model, fused_opt, fused_prepared), (model, opt, stacked_prepared) = runs
    # every group at the first step; the adapters' when their layout changed; all after the
    # load replaced the moments (and set the step count back to 3)
    assert fused_prepared == [(0, 0), (0, 1), (0, 2), (4, 0), (3, 0), (3, 1), (3, 2)]
    assert len(stacked_prepared) == 8 * 3
    assert _assert_fused_matches_stacked(fused_model, model, fused_opt, opt) == 14


def test_fused_plan_holds_no_gradient_and_refuses_a_noncontiguous_one(monkeypatch):
    """The kept launches hold no gradient (autograd makes new ones every step: the old ones are
    freed), and a gradient the kernel cannot read as a flat array is refused, by name."""
    import gc
    import weakref
    model, layers, opt, gen = _fused_run(monkeypatch, 2)
    _fresh_grads(model, layers, gen)
    opt.step()  # the plan kept from the first step
    refs = [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
    assert len(refs) == 14
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in refs)
    _fresh_grads(model, layers, gen)
    b = layers[1].lora_B
    b.grad = torch.randn(b.shape[1], b.shape[0]).to(b).t()  # same shape, transposed strides
    with pytest.raises(ValueError, match="gradient of shape \\(5, 5\\) is not contiguous"):
        opt.step()


def test_a_fused_step_between_rounds_costs_a_few_python_calls_per_tensor(monkeypatch):
    """Host work of the fused path once its launches are kept (launches stubbed, as in
    `increlora-fast bench --levels host`): Python calls per step grow by a small constant per
    tensor, not by the per-tensor checks and layout work a first step pays; a step whose
    gradients moved to other memory rebuilds only the kernel's table of addresses."""
    import sys
    _fused_available()
    from increlora_fast.benchmarks.speed.host_overhead import stubbed_launches
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: True)
    model, config, layers = _model(torch.float32, DEVICE)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(4)
    # the first-use check of the launch over many tensors, once per process, not counted here
    assert multi_adamw_ok(torch.device(DEVICE), torch.float32)
    calls = []
    with stubbed_launches():
        for step in range(5):
            (_scramble if step == 0 else _fresh_grads)(*((model, layers, step, gen) if step == 0
                                                         else (model, layers, gen)))
            if step == 1:
                held = {p: p.grad for p in model.parameters() if p.grad is not None}
            if step in (2, 3):  # new gradients in the memory of the last step's, as a GPU's
                for p, grad in held.items():  # caching allocator tends to give them
                    p.grad = grad.copy_(p.grad)
            count = [0]

            def profile(frame, event, arg):
                if event == "call":
                    count[0] += 1
            sys.setprofile(profile)
            try:
                opt.step()
            finally:
                sys.setprofile(None)
            calls.append(count[0])
    first, kept, moved_step = calls[0], calls[2], calls[4]
    assert calls[3] == kept
    # 14 tensors of 4 layers and a head in three groups (its bias without weight decay): a kept
    # step makes a call per layer (its layout key) and a fixed number per group for the
    # schedule and its launch (82 with two groups, 120 with three when this was written); the
    # first step pays the layout, the checks and 14 launches on top (766); the second looks up
    # the first-use check of each dtype combination and builds the groups and tables of
    # addresses (162); a step whose gradients moved builds the tables again (129)
    assert kept <= 40 * len(opt.param_groups) + 4 * 14, calls
    assert first > kept + 20 * 14, calls
    assert kept < calls[1] <= kept + 4 * 14 and kept < moved_step <= kept + 20, calls


def test_fused_steps_follow_a_parameter_whose_data_was_replaced(monkeypatch):
    """`Module.to` and ``p.data = ...`` give a parameter new storage in place: the kept launches
    step the parameter's current data (the head's dense tensors and the adapters' alike)."""
    model, layers, opt, gen = _fused_run(monkeypatch, 6)
    with torch.no_grad():
        for p in (model[4].weight, layers[0].lora_B):
            p.data = p.data.clone()
    before = {p: p.detach().clone() for p in (model[4].weight, layers[0].lora_B)}
    _fresh_grads(model, layers, gen)
    opt.step()
    head = model[4].weight
    assert not torch.equal(head.detach(), before[head])
    ab, _ = layers[0].trainable_slot_masks()
    b = layers[0].lora_B
    assert not torch.equal(b.detach()[:, ab], before[b][:, ab])


def test_a_launch_over_many_tensors_that_fails_its_first_use_check_is_not_used(monkeypatch):
    """Where the launch over many tensors fails its first-use check (a GPU whose compiler
    mistreats the table of addresses): one warning naming the versions, then the optimizer
    launches per tensor, and steps as the stacked path does."""
    import warnings
    from increlora_fast.kernels import checks, launch_counts, reset_launch_counts
    _fused_available()
    monkeypatch.delenv("INCRELORA_KERNEL_CHECK", raising=False)
    reset_kernel_checks()
    real = checks.check_adamw
    monkeypatch.setattr(checks, "check_adamw", lambda *a, **k: dict(
        real(*a, **k), ok=False, error="exp_avg 2: relative error 4.1e-01 > 1e-04"))
    try:
        runs = []
        for fused, model, layers, opt, gen in _fused_then_stacked(monkeypatch, 8):
            reset_launch_counts()
            for step in range(4):
                (_scramble if step == 0 else _fresh_grads)(
                    *((model, layers, step, gen) if step == 0 else (model, layers, gen)))
                if fused and step == 1:
                    with pytest.warns(RuntimeWarning, match="first-use check.*triton .*"
                                      r"variant masked AdamW over many tensors, \w+ "
                                      r"parameters, \w+ moments\): .*"
                                      "relative error 4.1e-01.*once per tensor"):
                        opt.step()
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    opt.step()
            assert launch_counts() == ({"_masked_adamw_kernel": 14 * 4} if fused else {})
            runs.append(model)
        assert _assert_fused_matches_stacked(*runs) == 14
    finally:
        reset_kernel_checks()


# The kernel and the torch path against the float64 reference (as in test_kernels_adamw.py): one
# ulp of the parameter's dtype, and float32's 1 - beta**n, up to 3e-5 of the step.
REF_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
BIAS_CORRECTION_RTOL = 3e-5


def _float64_adamw(p, g, m, v, mask, lr, count, dim, beta1, beta2, eps, weight_decay):
    """`masked_adamw_torch_`'s interface on `masked_adamw_float64`: the float64 step written
    into ``p``, ``m`` and ``v`` (rounded once, to their dtypes)."""
    from increlora_fast.kernels.reference import masked_adamw_float64
    new = masked_adamw_float64(p, g, m, v, mask, lr, count, dim, beta1, beta2, eps,
                               weight_decay)
    for t, value in zip((p, m, v), new):
        t.copy_(value)


@pytest.mark.parametrize("path", ["multi", "per-tensor", "stacked"])
def test_fused_launches_of_mixed_dtypes_match_the_float64_reference(monkeypatch, path):
    """Adapters in float32 and bfloat16 in one group (two dtype combinations of one launch over
    many tensors) and a float16 head, over steps that change slots and steps between rounds:
    the launch over many tensors, the per-tensor launches it falls back to where it may not be
    used (``multi_adamw_ok`` false; the first step of a plan launches per tensor too) and the
    stacked torch path all step every tensor as the float64 reference does, masked-out slots
    unchanged."""
    from increlora_fast.kernels import launch_counts, reset_launch_counts
    _fused_available()
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", lambda p: path != "stacked")
    if path == "per-tensor":
        monkeypatch.setattr(optimizer_module, "multi_adamw_ok", lambda *args: False)
    model, config, layers = _model(torch.float32, DEVICE)
    model[2].to(torch.bfloat16)
    model[3].to(torch.bfloat16)
    model[4].to(torch.float16)
    opt = create_optimizer(model, config, **HYPER)
    gen = torch.Generator().manual_seed(11)
    reset_launch_counts()
    moved = set()
    for step in range(6):
        (_scramble if step in (0, 3) else _fresh_grads)(
            *((model, layers, step, gen) if step in (0, 3) else (model, layers, gen)))
        expected = _expected(opt, layers, model[4], step, _float64_adamw)
        before = {p: p.detach().clone() for p in expected}
        opt.step()
        for p, (new, m, v, off, _) in expected.items():
            assert torch.equal(_bits(p.detach()[off]), _bits(before[p][off]))
            # hostile values (`_scramble`) a slot kept until it trains again stay what they are
            on = ~off & before[p].isfinite()
            torch.testing.assert_close(p.detach()[~on], new[~on], rtol=0, atol=0,
                                       equal_nan=True)
            if not on.any():
                continue
            moved.add(p)
            err = (p.detach().double() - new.double())[on].abs()
            step_size = (new.double() - before[p].double())[on].abs().max()
            assert (err <= REF_RTOL[p.dtype] * new.double()[on].abs()
                    + BIAS_CORRECTION_RTOL * step_size).all(), step
            for key, want in (("exp_avg", m), ("exp_avg_sq", v)):
                got = opt.state[p][key]
                err = (got.double() - want.double())[on].abs().max()
                assert err <= REF_RTOL[got.dtype] * want.double()[on].abs().max(), (key, step)
    assert len(moved) == 14  # not vacuous: every tensor took steps
    # the adapters' plans are new at steps 0 and 3 (14 and 12 launches per tensor); the launch
    # over many tensors: 4 a step between rounds (float32 and bfloat16 adapters, the head's
    # weight and its bias without weight decay), the head's 2 at step 3
    assert launch_counts() == {
        "multi": {"_masked_adamw_kernel": 14 + 12, "_masked_adamw_multi_kernel": 4 * 4 + 2},
        "per-tensor": {"_masked_adamw_kernel": 14 * 6}, "stacked": {}}[path]
