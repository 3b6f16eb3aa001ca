"""gpu-check part ``graphs``: does a training step replayed from CUDA graphs train what the eager
step trains, in fp32, bf16 and fp16?

A tiny random BERT classifier (no dropout, seeded weights, fixed-shape seeded batches) is trained
the same number of steps twice through the one `StepRunner`: eagerly, and with the step captured
in graphs and replayed (``cuda_graphs=True``). The IncreLoRA schedule puts allocation rounds
inside the run (they run eagerly) and replayed steps between and after them, both score-tracking
states included. fp16 starts its GradScaler high (2**22, growing after every good step), so
that steps overflow and back off all through the run: the skip path of `IncreLoRAAdamW`
(``_step_supports_amp_scaling``) and the scale the controller reads on the device
(`device_scalar.grad_scaler_scale`) run inside replays.

Then the fallback (`fallback_agreement`): the same tiny BERT with dropout and a host read in its
classifier's forward, which no capture allows, trained with ``cuda_graphs=True`` must warn,
step eagerly and equal the eager run exactly. On a GPU that shows what the CPU emulator cannot:
that a capture which fails inside CUDA leaves the process, its memory pools and its random
number generator (dropout) fit for eager steps.

Without CUDA (and without a ``graph_factory``, as tests pass the CPU graph emulator) every
precision is recorded as skipped, with the reason, never with numbers.
"""
from __future__ import annotations

import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .plan import GRAPH_STEPS, CheckPlan

PRECISIONS = ("fp32", "bf16", "fp16")
# max |graphed - eager| over trainable parameters and over per-step losses, relative to
# max(1, the largest eager magnitude). A replay launches the kernels its capture recorded, on
# the same inputs, so the runs should agree bit for bit; the margin covers kernels whose
# reduction order is not fixed (atomics), amplified by half-precision rounding in bf16/fp16.
TOLERANCES = {"fp32": 1e-5, "bf16": 1e-3, "fp16": 1e-3}
# fp16's GradScaler starts where the tiny BERT's scaled gradients overflow and grows after every
# good step, so the scale keeps probing the overflow edge: steps overflow all through the run,
# replayed ones included (on CPU under the emulator: 9 of 16, one of them replayed).
FP16_INIT_SCALE, FP16_GROWTH_INTERVAL = 2.0 ** 22, 1
BATCH, SEQ_LEN, VOCAB = 8, 16, 64


def tiny_bert(device: torch.device, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer, 32-wide random BERT classifier (2 labels), without dropout unless given, on
    ``device``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=SEQ_LEN, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, num_labels=2)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).to(device).train()


def tiny_batches(steps: int, seed: int = 1) -> List[Dict[str, torch.Tensor]]:
    """``steps`` host batches of one shape: random tokens, padded tails, random labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (BATCH,), generator=gen)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=gen) * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, 2, (BATCH,), generator=gen)})
    return out


def tiny_config(steps: int):
    """An IncreLoRA config whose rounds fall inside a run of ``steps`` steps: 6 adapted layers
    grow from rank 1 to an average of 2 in rounds at steps 4, 8 and 12, scores tracked on the
    three steps up to each round, so that a 16-step graphed run replays steps of both tracking
    states between rounds and untracked steps after the last."""
    from ...config import IncreLoRAConfig

    return IncreLoRAConfig(target_modules=["query", "value", "intermediate.dense"], r_max=4,
                           init_r=1, target_rank=2, top_h=2, init_warmup=2, incre_interval=4,
                           score_window=3, orth_reg_weight=0.1, total_step=steps,
                           modules_to_save=["classifier"])


def _host_read(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """A forward hook that reads its output on the host, as some models do: a CUDA capture
    refuses it (the stream synchronizes), eager steps are unchanged."""
    return out + 0.0 * float(out.detach().sum())


def train_tiny(device: torch.device, precision: str, steps: int, cuda_graphs: bool,
               graph_factory: Optional[Callable] = None, dropout: float = 0.0,
               host_read: bool = False) -> Dict[str, object]:
    """One run: per-step task losses, trainable parameters, rank pattern, the GradScaler's scale
    after each step (fp16; read between steps) and the runner's graph counters. ``dropout``:
    the BERT's dropout; ``host_read``: its classifier reads its output on the host
    (`_host_read`)."""
    from ...training.device import Placement
    from ...training.increlora_method import IncreLoRARun
    from ...training.step_runner import StepRunner

    model = tiny_bert(device, dropout=dropout)
    if host_read:
        model.classifier.register_forward_hook(_host_read)
    method = IncreLoRARun.from_config(model, tiny_config(steps), lr=1e-2, weight_decay=0.01)
    placement = Placement(device, precision)
    if precision == "fp16":
        placement.scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE,
                                                growth_interval=FP16_GROWTH_INTERVAL)
    runner = StepRunner(method, placement, grad_clip=1.0, cuda_graphs=cuda_graphs,
                        graph_factory=graph_factory)
    losses, scales, replayed = [], [], []  # replayed: whether each step was a replay
    with warnings.catch_warnings():  # overflowed fp16 steps leave non-finite scores, on purpose
        warnings.filterwarnings("ignore", message=".*non-finite importance scores")
        warnings.filterwarnings("ignore", message="CUDA graphs: .* cannot be captured")
        for step, batch in enumerate(tiny_batches(steps)):
            before = runner.graphed.replays if runner.graphed is not None else 0
            losses.append(runner.step(step, batch).task_loss)
            replayed.append(runner.graphed is not None and runner.graphed.replays > before)
            if placement.scaler is not None:
                scales.append(float(placement.scaler.get_scale()))
    graphed = runner.graphed
    return {"losses": torch.stack(losses).float().cpu(),
            "params": {n: p.detach().float().cpu() for n, p in method.model.named_parameters()
                       if p.requires_grad},
            "ranks": method.controller.rank_pattern(), "scales": scales,
            "rounds": len({e["step"] for e in method.controller.allocation_log}),
            "replayed": replayed,
            "replays": graphed.replays if graphed is not None else 0,
            "captures": graphed.captures if graphed is not None else 0,
            "fallback": graphed.fallback if graphed is not None else None}


def _max_diff(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> tuple:
    """(max |got - ref|, max finite |ref|) over tensors of the same shapes; equal values
    (infinities, NaN against NaN) differ by 0, any other non-finite difference is infinite."""
    diffs, scales = [], []
    for g, r in zip(got, ref):
        same = (g == r) | (g.isnan() & r.isnan())
        d = torch.where(same, torch.zeros_like(g), (g - r).abs())
        diffs.append(float(torch.nan_to_num(d, nan=float("inf")).max()))
        finite = r[r.isfinite()]
        scales.append(float(finite.abs().max()) if finite.numel() else 0.0)
    return max(diffs), max(scales)


def _backoffs(scales: List[float], init: float, among: Optional[List[bool]] = None) -> int:
    """Steps whose scale fell (an overflow), from the per-step scales of a run; with ``among``
    (a flag per step) only the flagged steps count."""
    among = among or [True] * len(scales)
    return sum(1 for before, after, counted in zip([init] + scales, scales, among)
               if counted and after < before)


def skipped(device: torch.device, precision: str, steps: int, why: str) -> Dict[str, object]:
    """The record of a precision that did not run on ``device``, with why."""
    return {"precision": precision, "steps": steps, "device": str(device),
            "device_type": device.type, "status": "skipped", "note": why, "ok": None,
            "replays": None, "ranks_equal": None, "max_param_diff": None,
            "max_loss_diff": None}


def graph_agreement(device: torch.device, precision: str, steps: int = GRAPH_STEPS,
                    graph_factory: Optional[Callable] = None) -> Dict[str, object]:
    """The tiny BERT trained ``steps`` steps eagerly and with replayed graphs, compared.

    ``ok`` when the rank patterns are equal, some steps were replayed, the max absolute
    difference of the trainable parameters and of the per-step task losses are each within
    ``TOLERANCES[precision]`` x max(1, the eager run's largest magnitude), and (fp16) both runs
    end on the same loss scale after the same number of overflows. ``graph_factory`` (tests: the
    CPU graph emulator) stands in for CUDA graphs; without it a device other than CUDA gives a
    skipped record.

    Raises:
        ValueError: an unknown precision or fewer than 4 steps (no replay could happen).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is invalid: use one of {list(PRECISIONS)}")
    if steps < 4:
        raise ValueError(f"steps={steps} is too few: give at least 4 (warm-up, then replays)")
    if graph_factory is None and device.type != "cuda":
        return skipped(device, precision, steps,
                       "skipped: needs CUDA (the steps replay CUDA graphs)")
    if precision == "bf16" and device.type == "cuda":
        from ...training.device import bf16_supported

        if not bf16_supported(device):
            return skipped(device, precision, steps, "skipped: no native bfloat16 on this "
                                                     "GPU (compute capability below 8.0)")
    eager = train_tiny(device, precision, steps, cuda_graphs=False)
    graphed = train_tiny(device, precision, steps, cuda_graphs=True, graph_factory=graph_factory)
    names = sorted(eager["params"])
    param_diff, param_max = _max_diff([graphed["params"][n] for n in names],
                                      [eager["params"][n] for n in names])
    loss_diff, loss_max = _max_diff([graphed["losses"]], [eager["losses"]])
    tol = TOLERANCES[precision]
    ranks_equal = graphed["ranks"] == eager["ranks"]
    record: Dict[str, object] = {
        "precision": precision, "steps": steps, "device": str(device),
        "device_type": device.type, "replays": graphed["replays"],
        "captures": graphed["captures"], "rounds": eager["rounds"],
        "rounds_graphed": graphed["rounds"], "ranks_equal": ranks_equal,
        "total_rank": sum(eager["ranks"].values()),
        "total_rank_graphed": sum(graphed["ranks"].values()),
        "max_param_diff": param_diff, "max_loss_diff": loss_diff, "tol": tol,
        "final_loss": float(eager["losses"][-1]),
        "final_loss_graphed": float(graphed["losses"][-1])}
    problems = [] if ranks_equal else ["rank patterns differ"]
    problems += [] if graphed["replays"] > 0 else ["no step was replayed"]
    problems += [] if graphed["fallback"] is None else \
        [f"the step could not be captured ({graphed['fallback']})"]
    problems += [f"{what} differ by {diff:.3g} > {tol:g} x {max(1.0, scale):.3g}"
                 for what, diff, scale in (("parameters", param_diff, param_max),
                                           ("losses", loss_diff, loss_max))
                 if not diff <= tol * max(1.0, scale)]
    notes: List[str] = []
    if precision == "fp16":
        record.update(loss_scale=eager["scales"][-1], loss_scale_graphed=graphed["scales"][-1],
                      overflows=_backoffs(eager["scales"], FP16_INIT_SCALE),
                      overflows_graphed=_backoffs(graphed["scales"], FP16_INIT_SCALE),
                      overflows_replayed=_backoffs(graphed["scales"], FP16_INIT_SCALE,
                                                   graphed["replayed"]))
        if record["loss_scale"] != record["loss_scale_graphed"] or \
                record["overflows"] != record["overflows_graphed"]:
            problems.append("loss scales differ")
        if not record["overflows"]:
            notes.append("no step overflowed: the overflow path was not exercised")
        elif not record["overflows_replayed"]:
            notes.append("no replayed step overflowed (only eager ones did)")
    record.update(ok=not problems, status="ok" if not problems else "failed",
                  note="; ".join(problems + notes) or None)
    return record


def _fallback_record(device: torch.device, steps: int) -> Dict[str, object]:
    """What every record of the fallback check holds, before its outcome."""
    return {"precision": "fp32", "check": "fallback", "steps": steps, "device": str(device),
            "device_type": device.type}


def fallback_agreement(device: torch.device, steps: int = GRAPH_STEPS,
                       graph_factory: Optional[Callable] = None) -> Dict[str, object]:
    """The tiny BERT with dropout 0.1 and a host read in its classifier (`_host_read`), trained
    ``steps`` steps in fp32 eagerly and with ``cuda_graphs=True``: ``ok`` when the graphed run
    gave its graphs up (``fallback``, the reason in ``note``), replayed nothing and equals the
    eager run exactly (parameters, per-step losses, rank pattern). Skipped off CUDA without a
    ``graph_factory``."""
    record = _fallback_record(device, steps)
    if graph_factory is None and device.type != "cuda":
        return dict(record, status="skipped", ok=None, replays=None,
                    note="skipped: needs CUDA (a capture that fails there)")
    eager = train_tiny(device, "fp32", steps, cuda_graphs=False, dropout=0.1, host_read=True)
    graphed = train_tiny(device, "fp32", steps, cuda_graphs=True, graph_factory=graph_factory,
                         dropout=0.1, host_read=True)
    names = sorted(eager["params"])
    param_diff, _ = _max_diff([graphed["params"][n] for n in names],
                              [eager["params"][n] for n in names])
    loss_diff, _ = _max_diff([graphed["losses"]], [eager["losses"]])
    problems = [] if graphed["fallback"] else ["the graphed run did not fall back"]
    problems += [] if graphed["replays"] == 0 else [f"{graphed['replays']} steps replayed"]
    problems += [] if graphed["ranks"] == eager["ranks"] else ["rank patterns differ"]
    problems += [f"{what} differ by {diff:.3g}" for what, diff in
                 (("parameters", param_diff), ("losses", loss_diff)) if diff != 0]
    return dict(record, status="ok" if not problems else "failed", ok=not problems,
                replays=graphed["replays"], captures=graphed["captures"],
                ranks_equal=graphed["ranks"] == eager["ranks"], max_param_diff=param_diff,
                max_loss_diff=loss_diff, tol=0.0,
                note="; ".join(problems + [f"fell back: {graphed['fallback']}"]
                               if graphed["fallback"] else problems) or None)


def check_graphs(device: torch.device, plan: CheckPlan, env: Dict, log: Callable,
                 graph_factory: Optional[Callable] = None,
                 precisions: Sequence[str] = PRECISIONS) -> Dict[str, object]:
    """`graph_agreement` in each precision for ``plan.graph_steps`` steps (``env`` is unused:
    the report holds it once); a precision that raises gets a failed record with its error and
    the others still run. Failed (``error``) when a precision that ran is not ok."""
    steps = plan.graph_steps
    records: List[Dict[str, object]] = []
    for precision in precisions:
        try:
            record = graph_agreement(device, precision, steps, graph_factory)
        except Exception as err:  # a graphed fp16 step nobody has run on this GPU may fail
            log(traceback.format_exc())
            record = dict(skipped(device, precision, steps, ""), status="failed", ok=False,
                          note=f"{type(err).__name__}: {err}")
        records.append(record)
        if record["status"] == "skipped":
            log(f"graphs {precision}: {record['note']}")
        else:
            log(f"graphs {precision}: {record['status']}, {record['replays']} replays, "
                f"param diff {record['max_param_diff']}, loss diff {record['max_loss_diff']}"
                + (f", {record['overflows']} overflows ({record['overflows_replayed']} "
                   "replayed)" if record.get("overflows") is not None else "")
                + (f" ({record['note']})" if record["note"] else ""))
    try:
        fallback = fallback_agreement(device, steps, graph_factory)
    except Exception as err:  # the eager steps after a failed capture may fail on this GPU
        log(traceback.format_exc())
        fallback = dict(_fallback_record(device, steps), status="failed", ok=False,
                        replays=None, note=f"{type(err).__name__}: {err}")
    log(f"graphs fallback: {fallback['status']} ({fallback['note']})")
    bad = [r for r in records + [fallback] if r["status"] != "skipped" and not r["ok"]]
    return {"records": records, "fallback": fallback,
            "error": "; ".join(f"{r.get('check', r['precision'])}: {r['note']}"
                               for r in bad) or None}
