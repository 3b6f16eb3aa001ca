"""`precompile_kernels`: it builds, before the first step, every Triton variant that a model's
training and evaluation calls launch, and it changes nothing of the model.

The calls run one after another while every launch only submits its kernel's build
(`kernels.utils.building_only`). Which variants: the coverage test records the launches of real
training steps (score tracked and not, dropout on, a first layer fed by frozen embeddings) and of
an evaluation pass, and those of `precompile_kernels`, each specialised by Triton's own binder
for sm_90 as the JIT would (`test_kernels_aot.variant_keys`), in a child process without
the interpreter and with the launches stubbed (no kernel runs, no GPU). Every variant of the
real calls must be among those built beforehand. The other tests run the calls under the
interpreter, where there is nothing to build.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from increlora_fast import IncreLoRAConfig, functional, inject_increlora
from increlora_fast.kernels.launches import launch_counts, reset_launch_counts
from increlora_fast.model import increlora_layers
from increlora_fast.precompile import precompile_kernels

# hidden 48, intermediate 80: three layer shapes (48 -> 48, 48 -> 80, 80 -> 48)
BERT = dict(vocab_size=50, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=80, max_position_embeddings=32, num_labels=3)


def tiny_bert(dropout: float) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT))
    config = IncreLoRAConfig(r_max=8, init_r=2, target_rank=3, lora_dropout=dropout,
                             modules_to_save=["classifier"])
    return inject_increlora(model, config)


# ----------------------------------------------------------------- child: record the variants
def recorded_variants() -> dict:
    """{"<dtype> real" | "<dtype> precompiled": ["<kernel>\t<variant key>"]} for fp32, bf16
    and fp16 autocast steps of a tiny BERT (fp16 with the overflow flag a GradScaler hands the
    optimizer's step, whose launches then read each tensor's slice of the kept mask)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    from increlora_fast import create_optimizer
    from increlora_fast.model import get_config
    from increlora_fast import optimizer as optimizer_module
    from increlora_fast.kernels import adamw, linear, orth_penalty, score
    from increlora_fast.kernels import utils as kutils
    from increlora_fast.penalty import OrthogonalPenalty
    from test_kernels_aot import variant_keys

    backend = make_backend(GPUTarget("cuda", 90, 32))
    found, bucket = {}, [""]

    def recorder(kernel, grid, *args, **kwargs):
        found.setdefault(bucket[0], set()).update(variant_keys(kernel, backend, args, kwargs))

    kutils.launch = kutils.build_only = recorder
    for mod in (linear, adamw, orth_penalty):
        mod.check_device = lambda kernel, op, **tensors: next(
            t.device for t in tensors.values() if t is not None)
    for mod in (linear, score):
        mod.multiprocessor_count = lambda device: 132
    # the optimizer's fused kernel steps CUDA tensors only: here CPU ones, its launches stubbed
    optimizer_module._fused_kernel_applies = functional.kernel_readable
    model = tiny_bert(dropout=0.1)
    layers = [layer for _, layer in increlora_layers(model)]
    penalty = OrthogonalPenalty(layers, get_config(model))
    ids = torch.randint(0, BERT["vocab_size"], (3, 7))
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
        bucket[0] = f"{name} real"
        model.train()
        # a first step (one launch per tensor) and a second (one per dtype combination)
        optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.01)
        for track in (True, False):
            for layer in layers:
                layer.score_enabled = track
            with autocast:
                loss = model(input_ids=ids).logits.float().sum() + penalty.loss()
            loss.backward()
            if dtype == torch.float16:  # as torch.amp.GradScaler.step, gradients unscaled
                optimizer.grad_scale, optimizer.found_inf = None, torch.zeros(())
            optimizer.step()
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.__dict__.pop("found_inf", None)
            model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), autocast:
            model(input_ids=ids)
        bucket[0] = f"{name} precompiled"
        result = precompile_kernels(model, dtype, optimizer=optimizer, penalty=penalty,
                                    workers=2)
        assert not result.errors, result.errors
    return {key: sorted(values) for key, values in found.items()}


@pytest.fixture(scope="module")
def variants() -> dict:
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", INCRELORA_BACKEND="triton", INCRELORA_KERNEL_CHECK="0")
    child = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_every_variant_a_step_launches_is_built_beforehand(variants, dtype):
    real, built = set(variants[f"{dtype} real"]), set(variants[f"{dtype} precompiled"])
    names = {key.split("\t")[0] for key in real}
    assert names >= {"_project_kernel", "_expand_kernel", "_backward_rows_kernel",
                     "_score_tiles_kernel", "_finish_kernel", "_masked_adamw_kernel",
                     "_masked_adamw_multi_kernel", "_orth_penalty_fwd_kernel",
                     "_orth_penalty_bwd_kernel"}
    missing = real - built
    assert not missing, f"{len(missing)} of {len(real)} variants not built beforehand: " + \
        ", ".join(sorted(key.split("\t")[0] for key in missing))


# --------------------------------------------------------------- in process, under the interpreter
@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    from increlora_fast.kernels.utils import interpreter_active
    if not interpreter_active():
        pytest.skip("the Triton path on CPU needs the interpreter")
    monkeypatch.setenv("INCRELORA_BACKEND", "triton")
    functional.reset_kernel_checks()


def _state(model: torch.nn.Module) -> dict:
    state = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"g:{n}": p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None})
    state.update({f"b:{n}": b.clone() for n, b in model.named_buffers()})
    state["rng"] = torch.get_rng_state()
    return state


def test_it_calls_every_layer_configuration_and_changes_nothing(triton_backend):
    """Under the interpreter there is nothing to build, but every call is made (and counted
    as launches) and leaves the model as it was."""
    model = tiny_bert(dropout=0.1)
    for _, layer in increlora_layers(model):
        layer.score_enabled = True
    ids = torch.randint(0, BERT["vocab_size"], (2, 5))
    model(input_ids=ids).logits.sum().backward()  # gradients and scores to keep
    before, checked = _state(model), functional.kernel_check_results()
    assert any(k.startswith("g:") for k in before) and checked
    assert any(float(layer.score_sum) != 0 for _, layer in increlora_layers(model))
    reset_launch_counts()
    result = precompile_kernels(model, workers=2)
    assert (result.configs, result.calls, result.errors) == (3, 12, [])
    assert functional.kernel_check_results() == checked
    # the optimizer's and the penalty's checks ran to build their kernels, and were not kept
    assert {("cpu", "masked_adamw_multi", torch.float32, torch.float32),
            ("cpu", "orth_penalty", torch.float32, 16)} <= functional._CHECKS_BUILT
    counts = launch_counts()
    assert counts["_score_tiles_kernel"] == 2 * 3  # tracked calls: with and without dx
    assert counts["_project_kernel"] == 4 * 3  # every call
    after = _state(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed


def _optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    return {"global_step": optimizer.global_step, "groups": repr(state["param_groups"]),
            **{f"s:{k}:{name}": v.clone() for k, per in state["state"].items()
               for name, v in per.items() if isinstance(v, torch.Tensor)}}


def test_the_optimizers_and_penaltys_kernels_are_built_and_nothing_changes(triton_backend,
                                                                            monkeypatch):
    """Given the run's optimizer and penalty, their kernels are launched too (a first step
    per tensor, a later one per dtype combination, the penalty forward and backward), while
    the first-use checks, which only build, say yes; the model, its gradients, the
    optimizer's state and the penalty's cached kernels are left as they were."""
    from increlora_fast import create_optimizer
    from increlora_fast import optimizer as optimizer_module
    from increlora_fast.model import get_config
    from increlora_fast.penalty import OrthogonalPenalty

    model = tiny_bert(dropout=0.0)
    layers = [layer for _, layer in increlora_layers(model)]
    optimizer = create_optimizer(model, lr=1e-3, weight_decay=0.01)
    penalty = OrthogonalPenalty(layers, get_config(model))
    ids = torch.randint(0, BERT["vocab_size"], (2, 5))
    (model(input_ids=ids).logits.sum() + penalty.loss()).backward()
    optimizer.step()  # a state to keep (the torch path: CPU tensors)
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.sum().backward()  # gradients to keep
    kernels = penalty._kernels
    assert kernels is not None  # the real penalty took its kernels (under the interpreter)
    # the fused kernel steps CUDA tensors only; under the interpreter its launches build nothing
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", functional.kernel_readable)
    functional.reset_kernel_checks()  # the first use of each check comes within the block
    before, opt_before = _state(model), _optimizer_state(optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    reset_launch_counts()
    result = precompile_kernels(model, optimizer=optimizer, penalty=penalty, workers=2)
    assert (result.configs, result.calls, result.errors) == (3, 14, [])
    counts = launch_counts()
    assert counts["_masked_adamw_kernel"] == len(trainable)  # the first step: one per tensor
    # the second: one per parameter group (all float32), which the multi check had to allow
    assert counts["_masked_adamw_multi_kernel"] == len(optimizer.param_groups)
    assert counts["_orth_penalty_fwd_kernel"] == counts["_orth_penalty_bwd_kernel"] == 1
    assert functional.kernel_check_results() == {}  # built only: not remembered
    after, opt_after = _state(model), _optimizer_state(optimizer)
    assert after.keys() == before.keys() and opt_after.keys() == opt_before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    changed += [k for k in opt_before if not (opt_before[k] == opt_after[k] if isinstance(
        opt_before[k], (int, str)) else torch.equal(opt_before[k], opt_after[k]))]
    assert not changed
    assert penalty._kernels is kernels


def test_build_kernels_leaves_large_parameters_to_the_first_step(triton_backend, monkeypatch):
    from increlora_fast import create_optimizer
    from increlora_fast import optimizer as optimizer_module
    from increlora_fast.kernels.utils import building_only

    model = tiny_bert(dropout=0.0)
    optimizer = create_optimizer(model, lr=1e-3)
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", functional.kernel_readable)
    monkeypatch.setattr(optimizer_module, "BUILD_MAX_NUMEL", 100)
    small = [p for p in model.parameters() if p.requires_grad and p.numel() <= 100]
    assert 0 < len(small) < sum(p.requires_grad for p in model.parameters())
    reset_launch_counts()
    with building_only(1):
        optimizer.build_kernels()
    assert launch_counts()["_masked_adamw_kernel"] == len(small)
    assert all(p.grad is None for p in model.parameters())


def test_build_kernels_refuses_to_step_outside_building_only():
    from increlora_fast import create_optimizer
    model = tiny_bert(dropout=0.0)
    optimizer = create_optimizer(model, lr=1e-3)
    with pytest.raises(RuntimeError, match="build_kernels: only within .*building_only"):
        optimizer.build_kernels()


def test_the_penaltys_pass_fires_no_hook_of_the_parameters(triton_backend):
    """The penalty's backward runs while no kernel runs: its gradients are garbage, so hooks
    registered on the adapter parameters (e.g. wandb.watch's, which the Trainer's WandbCallback
    registers before the IncreLoRA callback's train begin) must not see them."""
    from increlora_fast.model import get_config
    from increlora_fast.penalty import OrthogonalPenalty

    model = tiny_bert(dropout=0.0)
    layers = [layer for _, layer in increlora_layers(model)]
    penalty = OrthogonalPenalty(layers, get_config(model))
    seen = []
    for layer in layers:
        for t in (layer.lora_A, layer.lora_B):
            t.register_hook(lambda grad: seen.append(grad))
    reset_launch_counts()
    result = precompile_kernels(model, penalty=penalty, workers=1)
    assert result.errors == []
    assert launch_counts()["_orth_penalty_bwd_kernel"] == 1
    assert seen == []


def test_a_failed_call_is_reported_and_leaves_the_rest(triton_backend, monkeypatch):
    from increlora_fast import precompile
    model = tiny_bert(dropout=0.0)
    real = precompile._call_once

    def failing(layer, call, *args):
        if layer.out_features == 80:
            raise RuntimeError("out of resources")
        real(layer, call, *args)
    monkeypatch.setattr(precompile, "_call_once", failing)
    with pytest.warns(RuntimeWarning, match="4 of 12 calls failed.*48 -> 80.*out of resources"):
        result = precompile_kernels(model, workers=1)
    assert len(result.errors) == 4 and result.configs == 3


def test_within_building_only_a_launch_builds_and_runs_nothing(monkeypatch):
    """`kernels.utils.building_only`: every launch asks Triton to build the variant its
    arguments need (``warmup``, with the grid and the launch options) under Triton's
    AsyncCompileMode, runs no kernel, and the real launch is back afterwards; a first-use
    check met there runs (to build its kernels) but its result is not kept."""
    pytest.importorskip("triton")
    from increlora_fast import functional
    from increlora_fast.kernels import utils
    from increlora_fast.kernels.launches import building_only_active

    class Kernel:  # a jit kernel as the launch sees it: a warmup and a launch by grid
        __name__ = "_fake_kernel"

        def __init__(self):
            self.warmups, self.runs = [], []

        def warmup(self, *args, grid, **kwargs):
            from triton.runtime import _async_compile
            self.warmups.append((args, grid, kwargs, _async_compile.active_mode.get()))

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.runs.append(grid)

    kernel, x = Kernel(), torch.zeros(3)
    real = utils.launch
    checks = []
    key = ("cpu", "a variant")
    with utils.building_only(workers=2):
        assert building_only_active() and utils.launch is not real
        utils.launch(kernel, (4, 1), x, 7, BLOCK=16, num_warps=4)
        utils.launch(kernel, (0,), x)  # an empty grid: nothing to build
        for _ in range(2):  # run once, to build its kernels
            assert functional._checked_once(torch.device("cpu"), key, lambda: checks.append(1),
                                            "fallback", while_capturing=True)
    assert not building_only_active() and utils.launch is real
    assert kernel.runs == [] and len(kernel.warmups) == 1
    args, grid, kwargs, mode = kernel.warmups[0]
    assert args == (x, 7) and grid == (4, 1) and kwargs == dict(BLOCK=16, num_warps=4)
    assert mode is not None  # the builds were submitted to Triton's pool
    assert checks == [1] and key not in functional.kernel_check_results()
    utils.launch(kernel, (2,), x)
    assert kernel.runs == [(2,)]  # a real launch again


class _ModeRecorder:
    """A jit kernel as `build_only` sees it, recording the AsyncCompileMode of each warmup."""
    __name__ = "_fake_kernel"

    def __init__(self):
        self.modes = []

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile
        self.modes.append(_async_compile.active_mode.get())


def test_a_launch_from_another_thread_is_built_in_the_pool():
    """On CUDA the autograd engine runs a backward on its own device thread, where Triton's
    ``active_mode`` (a ContextVar set in the calling thread) is unset: the backward kernels
    (rows, score, finish) would be built one at a time there, in the launch itself. Every
    launch within `building_only`, whatever its thread, submits its build to the pool."""
    pytest.importorskip("triton")
    import threading
    from increlora_fast.kernels import utils
    kernel, x = _ModeRecorder(), torch.zeros(3)
    with utils.building_only(workers=2):
        utils.launch(kernel, (1,), x)
        thread = threading.Thread(target=utils.launch, args=(kernel, (1,), x))
        thread.start()
        thread.join()
    assert len(kernel.modes) == 2 and all(m is not None for m in kernel.modes)
    assert kernel.modes[0] is kernel.modes[1]


def test_each_device_builds_under_a_mode_of_its_own():
    """Triton's AsyncCompileMode merges builds by source and options, not by device. Under
    Triton 3.9 the second device's kernel cache then holds the first device's kernel object,
    whose module is loaded on one device only (a launch on the other cannot run it), or, where
    the build failed, a spent placeholder that the later launch trips on instead of building
    again (under 3.6 the second device is just not built). So the builds of each device go to
    an AsyncCompileMode of their own (one pool), those of one device to the same one."""
    pytest.importorskip("triton")
    from increlora_fast.kernels import utils
    kernel = _ModeRecorder()
    a, b = torch.zeros(3), torch.zeros(3, device="meta")
    with utils.building_only(workers=2):
        for t in (a, b, a, b):
            utils.launch(kernel, (1,), t)
    first, second, again_first, again_second = kernel.modes
    assert None not in kernel.modes
    assert first is not second and again_first is first and again_second is second


_TWO_DEVICES_CHILD = r"""
import json, threading
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import jit as jitmod
from increlora_fast.kernels import utils

class Driver:  # no GPU here: the current device is set by hand, the target is sm_90
    dev = 0
    def get_current_device(self): return self.dev
    def get_current_stream(self, device): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
driver = Driver()
jitmod.driver = type("Drivers", (), {"active": driver})

@triton.jit
def _store_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)

on = {0: torch.zeros(64), 1: torch.zeros(64, device="meta")}  # two devices to building_only
with utils.building_only(workers=2):
    for dev in (0, 1):
        driver.dev = dev
        utils.launch(_store_kernel, (1,), on[dev], 5, BLOCK=16)
    driver.dev = 0  # a backward's launch, from the autograd engine's thread
    thread = threading.Thread(target=utils.launch, args=(_store_kernel, (1,), on[0], 5),
                              kwargs=dict(BLOCK=32))
    thread.start()
    thread.join()
caches = [list(_store_kernel.device_caches[dev][0].values()) for dev in (0, 1)]
print(json.dumps({"types": [[type(k).__name__ for k in c] for c in caches],
                  "shared": any(a is vars(b).get("kernel", b)  # a FutureKernel's own
                                for a in caches[0] for b in caches[1])}))
"""


def test_with_real_triton_each_device_gets_kernels_of_its_own(tmp_path):
    """With Triton's own JIT and AsyncCompileMode (sm_90, compiled on this CPU, a stand-in
    driver for two GPUs): after `building_only` each device's kernel cache holds finished
    kernels of its own, also for a launch from another thread."""
    pytest.importorskip("triton")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + ([env["PYTHONPATH"]] if "PYTHONPATH" in env else []))
    script = tmp_path / "two_devices.py"  # Triton reads a kernel's source from its file
    script.write_text(_TWO_DEVICES_CHILD)
    child = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env=env, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found == {"types": [["CompiledKernel"] * 2, ["CompiledKernel"]], "shared": False}


def test_nothing_runs_where_the_layers_take_the_torch_path(monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("INCRELORA_BACKEND", "torch")
    reset_launch_counts()
    result = precompile_kernels(tiny_bert(dropout=0.0))
    assert (result.configs, result.calls) == (0, 0) and not launch_counts()


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers=0 must be >= 1"):
        precompile_kernels(torch.nn.Linear(2, 2), workers=0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(recorded_variants()))


@pytest.mark.parametrize("kind, activations", [
    ("4bit", torch.bfloat16), ("8bit", torch.bfloat16), ("4bit_bf16_storage", torch.float32)])
def test_a_quantized_base_is_called_with_the_models_activation_dtype(triton_backend,
                                                                     monkeypatch, kind,
                                                                     activations):
    """A quantized base layer (bitsandbytes) gets the activations of the model around it (its
    output comes back in their dtype, whatever its compute dtype): the kernels take their
    dtype from that input, so the one-token calls must use it. They used the 4-bit layer's
    compute dtype, or the (float32) adapter's for 8-bit, or the packed weight's storage dtype
    where it is a float (``quant_storage=torch.bfloat16``, as FSDP QLoRA sets it): in a
    bfloat16 model (a float32 one for that storage) every variant built was one no step
    launches."""
    bnb = pytest.importorskip("bitsandbytes")
    from torch import nn
    from increlora_fast import precompile

    if kind == "8bit":
        base = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    else:
        storage = torch.bfloat16 if kind == "4bit_bf16_storage" else torch.uint8
        base = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32,
                                 quant_storage=storage)
    model = nn.Sequential(nn.Embedding(10, 64, dtype=activations), base).to("cpu")
    inject_increlora(model, IncreLoRAConfig(target_modules=["1"], r_max=4, init_r=1,
                                            target_rank=2))
    seen = []
    real = precompile.adapted_linear

    def recording(x, *args, **kwargs):
        seen.append(x.dtype)
        return real(x, *args, **kwargs)
    monkeypatch.setattr(precompile, "adapted_linear", recording)
    result = precompile_kernels(model, workers=1)
    assert result.configs == 1 and not result.errors, result.errors
    assert seen and set(seen) == {activations}


def test_build_kernels_names_no_slot_stamp(triton_backend, monkeypatch):
    """The build's two steps are no training steps: slots stamped beyond the optimizer's count
    (a grown model at the start of a new run, as the Trainer callback precompiles before it
    restarts their schedules, or before a resume's optimizer state is loaded) draw no warning
    from them (the optimizer's own steps check the stamps)."""
    import warnings

    from increlora_fast import create_optimizer
    from increlora_fast import optimizer as optimizer_module
    from increlora_fast.kernels.utils import building_only

    model = tiny_bert(dropout=0.0)
    for _, layer in increlora_layers(model):
        layer.activate_reserve(1, 40)  # an earlier run's growth
    optimizer = create_optimizer(model, lr=1e-3)
    monkeypatch.setattr(optimizer_module, "_fused_kernel_applies", functional.kernel_readable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with building_only(1):
            optimizer.build_kernels()
    assert not [w for w in caught if "stamped at step" in str(w.message)]
