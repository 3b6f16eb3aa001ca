"""Model level: whole training steps (forward, backward, allocation, optimizer) per method.

Models are built from their configs with random weights (`model_presets`: offline, nothing
downloaded). Every method trains the same modules: the adapters on the preset's targets plus the
pooler and the classifier head. Each method runs one short training run of ``plan.steps`` steps;
the first ``plan.warmup_steps`` are not timed. The schedules are compressed so that a run of a
few dozen steps has both phases:

- IncreLoRA (ours): ``init_r`` active, an allocation round every `ROUND_EVERY` steps from
  step 2 and ``top_h`` chosen so that the budget (``target_rank`` per module on average) is
  reached in the middle of the timed steps. Until then every step tracks the exact importance score: ``round`` steps
  also run an allocation round, ``alloc`` steps only track; ``final`` steps do neither.
- peft AdaLoRA: ``init_r = r_max`` pruned to ``target_r = target_rank``; ``tinit = steps // 8``,
  ``tfinal = steps // 4``, ``deltaT = ROUND_EVERY`` (the same rhythm as ours);
  ``update_and_allocate(step)`` after every optimizer step, before ``zero_grad``, as a plain
  loop must call it. Before ``total - tfinal`` every step updates its sensitivity: ``round``
  steps (after ``tinit``, every ``deltaT``) also mask to the budget, ``alloc`` steps do not;
  step ``total - tfinal`` masks to the final budget (a ``round``), the steps after it are
  ``final``.
- peft LoRA: rank ``r_max`` everywhere, one phase; ``peft-lora-compiled`` the same model under
  ``torch.compile`` (default mode; measured on CUDA only: on CPU the first compile alone takes
  minutes).
- ``floor``: the frozen model with only its LayerNorms (RMSNorms) and the classification head
  trainable, so that backward still runs through every layer; what any adapter adds is above it.
- ``increlora-graphs``: ours with the whole training step replayed from CUDA graphs by
  `StepRunner` (`training/cuda_graphs.py`); CUDA only (`graphs_status`: elsewhere the method is
  recorded as skipped, with the reason). A model whose forward or backward cannot be captured
  makes the runner step eagerly (`GraphedSteps.fallback`); its record is then skipped too,
  naming the reason (DeBERTa-v3 failed so on 2026-12-05; its relative positions, the op
  refused then, are now computed once per training shape: `training/static_positions.py`).

A ``ModelPlan`` with ``base_4bit`` loads the preset's base in 4-bit NF4 (`quantized_base`).

A record's ``median_ms`` is the median step over the timed steps, ``mean_ms`` their mean (the
run average, allocation included), ``alloc_median_ms`` / ``round_median_ms`` /
``final_median_ms`` the medians of each phase's timed steps and ``steps_per_s`` =
1000 / ``mean_ms``. The timed steps of all methods are interleaved (`measure_models`). Peak memory is over the method's untimed warmup
steps (model, optimizer state, activations of allocation-phase steps) above what was allocated
before its model was built.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ...kernels.launches import total_launches
from ...training.cuda_graphs import GRAPH_POOL_KIND
from ...training.peft_methods import adalora_orth_penalty
from ...training.step_runner import forward_with_loss, takes_model_loss
from ..memory_probe import MIB
from .layer_methods import LORA_ALPHA, TORCH_PATH_NOTE, MethodEnv, triton_status
from .model_presets import MODEL_PRESETS, ModelPreset
from .plans import DTYPES, ModelPlan
from .timing import PeakMemory, Timer

ORTH_REG_WEIGHT = 0.1
# Steps between allocation rounds (ours) and budget masks (AdaLoRA's deltaT) in the compressed
# schedules: 2, so that tracking alone (``alloc``) and tracking with a round (``round``) are
# both timed
ROUND_EVERY = 2
MODEL_METHODS = ("floor", "increlora-torch", "increlora-triton", "increlora-graphs",
                 "peft-lora", "peft-lora-compiled", "peft-adalora")
COMPILE_CPU_NOTE = ("skipped: torch.compile is measured on CUDA only (on CPU its first compile "
                    "takes minutes even for a toy model)")


def increlora_schedule(plan: ModelPlan, n_targets: int) -> Dict[str, int]:
    """IncreLoRA settings that reach the budget in the middle of the timed steps: a round every
    `ROUND_EVERY` steps from step 2, so that the timed steps of the allocation phase hold
    rounds and steps that only track alike."""
    from ...config import IncreLoRAConfig

    incre = IncreLoRAConfig(r_max=plan.r_max, init_r=plan.init_r,
                            target_rank=plan.target_rank).incre_rank_num
    middle = plan.warmup_steps + (plan.steps - plan.warmup_steps) // 2
    rounds = max(1, len(range(2, middle, ROUND_EVERY)))
    grants = math.ceil((plan.target_rank - plan.init_r) * n_targets / incre)
    top_h = min(n_targets, max(1, math.ceil(grants / rounds)))
    return {"init_warmup": 1, "incre_interval": ROUND_EVERY, "top_h": top_h,
            "incre_rank_num": incre}


def adalora_schedule(plan: ModelPlan) -> Dict[str, int]:
    return {"total_step": plan.steps, "tinit": plan.steps // 8,
            "tfinal": max(1, plan.steps // 4), "deltaT": ROUND_EVERY}


def random_batches(preset: ModelPreset, batch_size: int, seq_len: int,
                   device: torch.device) -> List[dict]:
    """Four seeded batches of ``batch_size`` x ``seq_len`` random tokens of the preset's
    vocabulary, unpadded, with random binary labels, on ``device``."""
    gen = torch.Generator().manual_seed(2)
    shape = (batch_size, seq_len)
    return [{"input_ids": torch.randint(1, preset.vocab_size, shape, generator=gen).to(device),
             "attention_mask": torch.ones(shape, dtype=torch.long, device=device),
             "labels": torch.randint(0, 2, (batch_size,), generator=gen).to(device)}
            for _ in range(4)]


class _IncreLoRARun:
    """Ours as `finetune` builds it (`IncreLoRARun`), stepped by the one `StepRunner` without
    gradient clipping; ``phase(i)`` names the step about to run. The runner's placement is fp32:
    the caller's autocast covers the whole step, as it does for the peft methods."""

    def __init__(self, model: nn.Module, preset: ModelPreset, plan: ModelPlan,
                 device: torch.device, cuda_graphs: bool = False) -> None:
        from ... import IncreLoRAConfig, increlora_layers
        from ...training.device import Placement
        from ...training.increlora_method import IncreLoRARun
        from ...training.step_runner import StepRunner

        sched = increlora_schedule(plan, preset.n_targets)
        config = IncreLoRAConfig(
            target_modules=list(preset.targets), r_max=plan.r_max, init_r=plan.init_r,
            target_rank=plan.target_rank, lora_alpha=LORA_ALPHA, init_warmup=sched["init_warmup"],
            incre_interval=sched["incre_interval"], top_h=sched["top_h"],
            orth_reg_weight=ORTH_REG_WEIGHT, modules_to_save=list(preset.modules_to_save))
        self.method = IncreLoRARun.from_config(model, config, lr=plan.lr,
                                               weight_decay=plan.weight_decay)
        found = len(list(increlora_layers(self.method.model)))
        if found != preset.n_targets:
            raise RuntimeError(f"{preset.name}: {found} target modules injected, expected "
                               f"{preset.n_targets}; the preset's target names are stale")
        self.runner = StepRunner(self.method, Placement(device, "fp32"), cuda_graphs=cuda_graphs)
        self.settings = (f"r_max={plan.r_max} init_r={plan.init_r} target_rank="
                         f"{plan.target_rank} incre_rank_num={sched['incre_rank_num']} "
                         f"top_h={sched['top_h']} a round every {ROUND_EVERY} steps from step 2, "
                         f"orth_reg={ORTH_REG_WEIGHT}, IncreLoRAAdamW"
                         + (", whole step in CUDA graphs" if cuda_graphs else ""))

    def phase(self, i: int) -> str:
        controller = self.method.controller
        if controller.budget_reached:
            return "final"
        return "round" if controller.allocation_due(i) else "alloc"

    def step(self, i: int, batch: dict) -> None:
        if self.runner.graphed is not None:  # static inputs, replayed outside rounds
            self.runner.step(i, batch)
            return
        self.runner.forward_backward(i, batch)
        self.runner.update(i)


def graphs_status(device: torch.device) -> Tuple[bool, str]:
    """Whether ``increlora-graphs`` (the training step replayed from CUDA graphs by
    `StepRunner`) can be measured on ``device``, and if not why (its skip note)."""
    if device.type != "cuda":
        return False, "skipped: needs CUDA (the training step is captured in CUDA graphs)"
    return True, ""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm",
                                                                               "RMSNorm"))


class _FloorRun:
    """The frozen model, LayerNorms and the classification head trainable, torch AdamW."""

    def __init__(self, model: nn.Module, preset: ModelPreset, plan: ModelPlan) -> None:
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if _is_norm(module) or name.split(".")[-1] in preset.modules_to_save:
                module.requires_grad_(True)
        self.model = model
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=plan.lr,
            weight_decay=plan.weight_decay)
        self.settings = (f"frozen; LayerNorms and {'/'.join(preset.modules_to_save)} trainable, "
                         "torch AdamW")

    def phase(self, i: int) -> str:
        return "run"

    def step(self, i: int, batch: dict) -> None:
        forward_with_loss(self.model, batch)[1].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _PeftRun:
    """peft LoRA or AdaLoRA with torch AdamW in a plain loop; ``compiled``: LoRA's forward and
    backward under ``torch.compile`` (default mode)."""

    def __init__(self, model: nn.Module, preset: ModelPreset, plan: ModelPlan,
                 adalora: bool, compiled: bool = False) -> None:
        from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model

        common = dict(task_type=TaskType.SEQ_CLS, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(preset.targets),
                      modules_to_save=list(preset.modules_to_save))
        self.adalora = adalora
        if adalora:
            self.sched = adalora_schedule(plan)
            config = AdaLoraConfig(init_r=plan.r_max, target_r=plan.target_rank, beta1=0.85,
                                   beta2=0.85, orth_reg_weight=ORTH_REG_WEIGHT, **self.sched,
                                   **common)
            self.settings = (f"init_r={plan.r_max} target_r={plan.target_rank} tinit="
                             f"{self.sched['tinit']} tfinal={self.sched['tfinal']} deltaT="
                             f"{self.sched['deltaT']} "
                             f"orth_reg={ORTH_REG_WEIGHT}, torch AdamW")
        else:
            config = LoraConfig(r=plan.r_max, **common)
            self.settings = f"r={plan.r_max}, no penalty, torch AdamW"
        self.model = get_peft_model(model, config)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=plan.lr,
            weight_decay=plan.weight_decay)
        self.forward = torch.compile(self.model) if compiled else self.model
        if compiled:
            self.settings += ", torch.compile (default mode)"

    def phase(self, i: int) -> str:
        if not self.adalora:
            return "run"
        s = self.sched
        boundary = s["total_step"] - s["tfinal"]
        if i > boundary:
            return "final"
        # at the boundary peft updates the sensitivity and masks to the final budget: a round
        return "round" if i == boundary or (i > s["tinit"] and i % s["deltaT"] == 0) else "alloc"

    def step(self, i: int, batch: dict) -> None:
        loss = forward_with_loss(self.forward, batch)[1]
        # what peft adds to the model's own loss, when the step took the loss from the logits
        if self.adalora and not takes_model_loss(batch):
            loss = loss + adalora_orth_penalty(self.model, ORTH_REG_WEIGHT)
        loss.backward()
        self.optimizer.step()
        if self.adalora:
            self.model.base_model.update_and_allocate(i)
        self.optimizer.zero_grad(set_to_none=True)


Run = Union[_FloorRun, _IncreLoRARun, _PeftRun]


def _build_run(method: str, model: nn.Module, preset: ModelPreset, plan: ModelPlan,
               device: torch.device) -> Run:
    if method == "floor":
        return _FloorRun(model, preset, plan)
    if method == "increlora-graphs":
        runnable, why = graphs_status(device)
        if not runnable:
            raise ValueError(f"method='increlora-graphs' cannot run: {why}")
        return _IncreLoRARun(model, preset, plan, device, cuda_graphs=True)
    if method.startswith("increlora-"):
        return _IncreLoRARun(model, preset, plan, device)
    return _PeftRun(model, preset, plan, adalora=method == "peft-adalora",
                    compiled=method == "peft-lora-compiled")


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _check_args(method: str, preset_name: str) -> ModelPreset:
    if method not in MODEL_METHODS:
        raise ValueError(f"method={method!r} is not a model method: {list(MODEL_METHODS)}")
    if preset_name not in MODEL_PRESETS:
        raise ValueError(f"model={preset_name!r} is unknown: use one of {list(MODEL_PRESETS)}")
    return MODEL_PRESETS[preset_name]


def method_env(method: str) -> Dict[str, str]:
    """The environment a model method runs under (ours: its backend)."""
    if method.startswith("increlora-"):
        backend = "torch" if method == "increlora-torch" else "triton"
        return {"INCRELORA_BACKEND": backend, "INCRELORA_FUSED_LINEAR": "0"}
    return {}


def prepare_run(method: str, preset_name: str, plan: ModelPlan, device: torch.device
                ) -> Tuple[Run, List[dict]]:
    """A fresh model of the preset (seeded random weights; with ``plan.base_4bit`` loaded in
    4-bit NF4) set up for ``method``, and the batches to cycle through. Call it inside
    ``MethodEnv(method_env(method))``."""
    from .quantized_base import build_4bit

    preset = _check_args(method, preset_name)
    torch.manual_seed(0)
    model = (build_4bit(preset, device) if plan.base_4bit else preset.build(device)).train()
    return _build_run(method, model, preset, plan, device), random_batches(preset, plan.batch_size, plan.seq_len,
                                                                  device)


def step_past_allocation(run: Run, batches: List[dict], min_steps: int) -> int:
    """Step ``run`` (cycling through ``batches``) until its allocation phase is over and at
    least ``min_steps`` steps ran; the index of the next step."""
    i = 0
    while run.phase(i) in ("alloc", "round") or i < min_steps:
        run.step(i, batches[i % len(batches)])
        i += 1
    return i


def _step(run: Run, i: int, batches: List[dict],
          device: torch.device, dtype: str) -> None:
    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        run.step(i, batches[i % len(batches)])


def measure_models(methods: List[str], preset_name: str, plan: ModelPlan, dtype: str,
                   device: torch.device,
                   log: Optional[Callable[[str], None]] = None) -> Dict[str, dict]:
    """Train ``plan.steps`` steps of every method on the preset; the timing fields per method.
    ``log`` (if given) receives a line as each method is built and warmed up, and when the
    timed steps start (a preset on a GPU took about a minute, silent before).

    Each method is built and runs its ``warmup_steps`` alone (its peak memory is taken there,
    above what was allocated before its model was built, the other methods' models included;
    a graphed run adds its graphs' memory pools after the timed steps, an upper bound);
    then the timed steps go round-robin over the methods, so that load which comes and goes on
    a shared machine falls on all of them alike.
    """
    for method in methods:
        _check_args(method, preset_name)
    preset = MODEL_PRESETS[preset_name]
    if plan.warmup_steps < 1 or plan.steps < plan.warmup_steps + 2:
        raise ValueError(f"model steps={plan.steps}, warmup_steps={plan.warmup_steps}: need "
                         "warmup_steps >= 1 and steps >= warmup_steps + 2")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {list(DTYPES)}")
    preset.classes()  # import the model code (and peft) before any memory baseline
    if any(m.startswith("peft-") for m in methods):
        import peft  # noqa: F401
    runs, peaks = {}, {}
    for method in methods:
        with MethodEnv(method_env(method)):
            peak = PeakMemory(device)
            peak.start()
            run, batches = prepare_run(method, preset_name, plan, device)
            for i in range(plan.warmup_steps):
                _step(run, i, batches, device, dtype)
            peaks[method] = (peak.peak_mb(), peak.kind)
        runs[method] = (run, batches)
        if log is not None:
            log(f"model {preset_name} {dtype} {method}: built and warmed up "
                f"({plan.warmup_steps} untimed steps)")
    if log is not None:
        log(f"model {preset_name} {dtype}: {plan.steps - plan.warmup_steps} timed steps of "
            f"{len(methods)} method{'s' if len(methods) != 1 else ''}, round-robin")
    times = {m: {"alloc": [], "round": [], "final": [], "run": []} for m in methods}
    launched = {m: 0 for m in methods}  # Triton launches in the method's timed steps
    for n, i in enumerate(range(plan.warmup_steps, plan.steps)):
        shift = n % len(methods)
        for method in methods[shift:] + methods[:shift]:
            run, batches = runs[method]
            graphed = getattr(getattr(run, "runner", None), "graphed", None)
            captures = graphed.captures if graphed is not None else 0
            with MethodEnv(method_env(method)):
                phase = run.phase(i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                before = total_launches()
                with Timer(device) as timer:
                    _step(run, i, batches, device, dtype)
                launched[method] += total_launches() - before
            times[method]["run"].append(timer.ms)
            # a step that captured a graph is in the run's mean, not in a phase's median
            if phase != "run" and (graphed is None or graphed.captures == captures):
                times[method][phase].append(timer.ms)
    for method in methods:  # a graphed run also holds its graphs' memory pools
        graphed = getattr(getattr(runs[method][0], "runner", None), "graphed", None)
        if graphed is not None:
            peaks[method] = (peaks[method][0] + graphed.pool_bytes() / MIB,
                             peaks[method][1] + GRAPH_POOL_KIND)
    out = {}
    for method in methods:
        t = times[method]
        mean = statistics.fmean(t["run"])
        out[method] = {
            "median_ms": statistics.median(t["run"]), "mean_ms": mean,
            "steps_per_s": 1000.0 / mean,
            "tokens_per_s": plan.batch_size * plan.seq_len * 1000.0 / mean,
            "alloc_median_ms": _median(t["alloc"]), "round_median_ms": _median(t["round"]),
            "final_median_ms": _median(t["final"]), "alloc_steps": len(t["alloc"]),
            "round_steps": len(t["round"]), "final_steps": len(t["final"]),
            "peak_mem_mb": peaks[method][0],
            "mem_kind": peaks[method][1], "repeats": len(t["run"]),
            "settings": runs[method][0].settings, "n_targets": preset.n_targets,
            "triton_launches": launched[method]}
        graphed = getattr(getattr(runs[method][0], "runner", None), "graphed", None)
        if graphed is not None and graphed.fallback is not None:
            out[method]["graphs_fallback"] = graphed.fallback
    return out


def run_model_level(plan: ModelPlan, methods: List[str], device: torch.device, env: Dict,
                    log: Callable[[str], None] = print, interpreter: bool = False) -> List[dict]:
    """One record per (model, dtype, method). Triton runs on CUDA, and with ``interpreter`` also
    under the Triton interpreter on CPU (tiny models only: it shows the path runs). A method
    that cannot run here (``increlora-graphs`` per `graphs_status`, ``peft-lora-compiled`` off
    CUDA) gets a skipped record with the reason."""
    unknown = [m for m in methods if m not in MODEL_METHODS]
    if unknown:
        raise ValueError(f"unknown model methods {unknown}; known: {list(MODEL_METHODS)}")
    triton_ok, triton_note = triton_status(device)
    skipped = {}
    if "increlora-triton" in methods and device.type != "cuda" and not (interpreter and
                                                                         triton_ok):
        skipped["increlora-triton"] = ("skipped: Triton kernels need CUDA; the interpreter is "
                                       "far too slow for a whole model")
    elif "increlora-triton" in methods and not triton_ok:
        skipped["increlora-triton"] = triton_note
    graphs_ok, graphs_note = graphs_status(device)
    if "increlora-graphs" in methods and not graphs_ok:
        skipped["increlora-graphs"] = graphs_note
    if "peft-lora-compiled" in methods and device.type != "cuda":
        skipped["peft-lora-compiled"] = COMPILE_CPU_NOTE
    base = " nf4" if plan.base_4bit else ""
    common = (f"batch {plan.batch_size} x seq {plan.seq_len}, {plan.steps} steps "
              f"({plan.warmup_steps} untimed), lr {plan.lr}, weight decay {plan.weight_decay}")
    records = []
    for name in plan.models:
        for dtype in plan.dtypes:
            measured = measure_models([m for m in methods if m not in skipped], name, plan,
                                      dtype, device, log)
            for method in methods:
                rec = dict(env, level="model", method=method,
                           shape=f"{name}{base} b{plan.batch_size}x{plan.seq_len}",
                           tokens=plan.batch_size * plan.seq_len, r_max=plan.r_max,
                           dtype=dtype if dtype == "fp32" else f"{dtype}-autocast", phase="run",
                           status="ok", note="", median_ms=None, mean_ms=None, peak_mem_mb=None,
                           run_settings=common)
                fallback = measured.get(method, {}).get("graphs_fallback")
                if method in skipped:
                    rec.update(status="skipped", note=skipped[method])
                elif fallback is not None:  # its steps ran eagerly: not a graphed time
                    rec.update(status="skipped", note=f"skipped: {name}'s forward and backward "
                               f"cannot be captured in a CUDA graph ({fallback}); its steps "
                               "ran eagerly, as a graphed finetune of it does")
                    log(f"model {rec['shape']} {rec['dtype']} {method}: {rec['note']}")
                else:
                    rec.update(measured[method])
                    if method == "increlora-triton" and device.type != "cuda":
                        rec["note"] = triton_note
                    if method == "increlora-triton" and rec.get("triton_launches") == 0:
                        rec.update(status="failed",
                                   note=f"launched no Triton kernel in its timed steps: "
                                        f"{TORCH_PATH_NOTE}")
                    log(f"model {rec['shape']} {rec['dtype']} {method:18s} median "
                        f"{rec['median_ms']:9.1f} ms  mean {rec['mean_ms']:9.1f} ms  "
                        f"{rec['steps_per_s']:6.2f} steps/s  {rec['peak_mem_mb']:8.1f} MiB")
                records.append(rec)
    return records
