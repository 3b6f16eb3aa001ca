"""Issue 27's targets checked against one `gpu-check` report, and the ``--cuda-graphs auto``
decision it supports.

Every verdict comes from the records of that one run (ratios of one run, as the issue asks):
"met" or "missed" where the run holds what the target compares, "not measurable" with the
reason where it does not. The targets (H200, bf16):

- layer 768x3072, r_max 16, 16,384 tokens, fwd+bwd: ours (the default Triton path, tracking
  off) <= 1.3x the frozen layer, tracking on <= 1.6x; the adapter's pass over dy <= 1.5x the
  cuBLAS ``dy W`` GEMM of the same layer (the ``dy_pass`` records);
- host time per layer call <= peft LoRA's (the host records of the same run);
- model steps per preset: ours eager, untracked, <= peft LoRA eager (the 4-bit base included);
  graphed (untracked) <= 0.5x ``peft-lora-compiled`` and <= the eager frozen floor on MiniLM-L6
  and DeBERTa-v3-base; tracked <= 1.25x untracked; peak memory <= peft LoRA. "Tracked" is the
  median of the allocation phase's steps without a round (the score tracked; the model
  benchmark's compressed schedule runs a round every second step, timed apart as
  ``round_median_ms``: a graphed run replays those too, the round on the host between its two
  graphs), "untracked" the median after the budget is reached (steps that captured a graph
  left out of every median);
- the main job: >= 60,000 training tokens/s, dev accuracy 0.81 or more (to two decimals), >= 3x
  ``--method lora`` in the same check, and the graphed run and the eager one with its padding
  (``graphs-off-padded``) with the same rank pattern and dev accuracy within 0.005;
- the graphed step itself (the ``graphs`` part): a tiny BERT trained eagerly and replayed from
  CUDA graphs in fp32, bf16 and fp16 gives the same rank pattern, parameters and losses within
  the part's tolerances (`graphs.graph_agreement`). A precision that disagrees also turns
  ``--cuda-graphs auto`` off; one not checked on CUDA leaves it undecided. Graphs count as
  faster for ``auto`` when the graphed main job's training tokens/s (first steps included, as
  a run pays them) exceed the eager run's by `AUTO_MARGIN`, a margin for the noise between
  two single runs; the tokens/s after the first log point (``tokens_per_second_warm``) are
  printed beside them.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from ...training.cuda_graphs import GRAPH_POOL_KIND
from ..records import gpu_check_records
from ..speed.targets import TARGET_SHAPE, Verdict, _layer_point, _ok
from .graphs import PRECISIONS as GRAPH_PRECISIONS

LAYER_OFF, LAYER_ON, DY_PASS, HOST = 1.3, 1.6, 1.5, 1.0
GRAPHS_X_COMPILED, TRACKED_X_UNTRACKED = 0.5, 1.25
# Presets on which the graphed step must also beat the compiled peer and the frozen floor.
GRAPH_PRESETS = ("minilm-l6", "deberta-v3-base")
# Presets on which the eager step must beat peft LoRA ("every preset, the 4-bit base included")
EAGER_PRESETS = ("minilm-l6", "deberta-v3-base", "llama-7b-2l", "llama-7b-2l nf4")
MAIN_JOB_TOKENS_PER_S, MAIN_JOB_X_LORA, MAIN_JOB_ACCURACY = 60_000, 3.0, 0.805
GRAPHS_ACCURACY_DIFF = 0.005
# --cuda-graphs auto turns on only when graphs-on's tokens/s are at least this share above
# graphs-off's: one run of each, so a smaller difference is not told apart from noise
AUTO_MARGIN = 0.05

NAMES = {
    "layer_off": f"layer, tracking off, <= {LAYER_OFF}x frozen",
    "layer_on": f"layer, tracking on, <= {LAYER_ON}x frozen",
    "dy_pass": f"adapter's pass over dy <= {DY_PASS}x the cuBLAS dy W GEMM",
    "host": "host time per layer call <= peft LoRA's",
    "eager": "eager untracked step <= peft LoRA eager",
    "graphs_compiled": f"graphed step <= {GRAPHS_X_COMPILED}x peft-lora-compiled",
    "graphs_floor": "graphed step <= the eager frozen floor",
    "tracked": f"tracked step <= {TRACKED_X_UNTRACKED}x untracked",
    "memory": "peak memory <= peft LoRA",
    "job_speed": f"main job >= {MAIN_JOB_TOKENS_PER_S:,} training tokens/s",
    "job_accuracy": "main job dev accuracy 0.81 or more",
    "job_x_lora": f"main job >= {MAIN_JOB_X_LORA:g}x --method lora",
    "job_graphs_same": "graphed and eager main job: same rank pattern, accuracy within 0.005",
    "graphs_equal": "graphed steps equal eager (tiny BERT, fp32/bf16/fp16)",
}


def _verdict(key: str, ok: bool, detail: str) -> Verdict:
    return Verdict(NAMES[key], "GPU", "met" if ok else "missed", detail)


def _unmeasurable(key: str, why: str) -> Verdict:
    return Verdict(NAMES[key], "GPU", "not measurable", why)


def _by_method(rows: Iterable[dict]) -> Dict[str, dict]:
    return {r["method"]: r for r in rows}


def layer_verdicts(records: List[dict]) -> List[Verdict]:
    """Ours against the frozen layer at the target point, and the pass over dy against cuBLAS."""
    point, where = _layer_point(records, "cuda")
    rows = _by_method(point or [])
    out: List[Verdict] = []
    floor = rows.get("floor")
    for key, method, limit in (("layer_off", "increlora-triton", LAYER_OFF),
                               ("layer_on", "increlora-triton+score", LAYER_ON)):
        ours = rows.get(method)
        if floor is None or ours is None:
            out.append(_unmeasurable(key, f"{where}: floor or {method} not measured"))
            continue
        ratio = ours["median_ms"] / floor["median_ms"]
        fused = rows.get(method.replace("triton", "triton-fused"))
        extra = (f"; the fused path {fused['median_ms'] / floor['median_ms']:.2f}x"
                 if fused else "")
        out.append(_verdict(key, ratio <= limit, f"{where}: {method} {ratio:.2f}x floor{extra}"))
    dy = _ok(records, level="dy_pass", device_type="cuda", shape=TARGET_SHAPE)
    if not dy:
        out.append(_unmeasurable("dy_pass", f"{TARGET_SHAPE}: no dy-pass records in this run"))
    else:
        r = max(dy, key=lambda r: r.get("tokens", 0))
        aten = r.get("aten_ms")
        # the design the library takes there (`linear.GEMM_BACKWARD_ROWS`; before the
        # record said, always the kernels)
        if r.get("design") == "gemm" and aten is not None:
            ms, which = aten, "the cuBLAS-GEMM design (the library's at these rows)"
            other = f"; the row and finish kernels {r['ours_ms']:.3f} ms " \
                f"({r['ours_ms'] / r['cublas_ms']:.2f}x)"
        else:
            ms, which = r["ours_ms"], "the row and finish kernels"
            other = (f"; as cuBLAS skinny GEMMs and aten ops {aten:.3f} ms "
                     f"({aten / r['cublas_ms']:.2f}x)" if aten is not None else "")
        ratio = ms / r["cublas_ms"]
        out.append(_verdict("dy_pass", ratio <= DY_PASS,
                            f"{r['dtype']}, {TARGET_SHAPE}, {r['tokens']} tokens, r_max "
                            f"{r['r_max']}, {which}: {ms:.3f} vs {r['cublas_ms']:.3f} ms GPU "
                            f"time ({ratio:.2f}x){other}"))
    return out


def host_verdicts(records: List[dict]) -> List[Verdict]:
    """Host time per fwd+bwd layer call, ours (tracking off) against peft LoRA, on the GPU."""
    rows = _by_method(_ok(records, level="host", device_type="cuda"))
    ours, lora = rows.get("increlora-triton"), rows.get("peft-lora")
    if ours is None or lora is None:
        return [_unmeasurable("host", "no host time per call of ours and peft LoRA on CUDA")]
    ratio = ours["median_us"] / lora["median_us"]
    on = rows.get("increlora-triton+score")
    extra = f"; tracking on {on['median_us'] / lora['median_us']:.2f}x" if on else ""
    return [_verdict("host", ratio <= HOST,
                     f"{ours.get('shape', '')} {ours.get('tokens', '')} tokens: "
                     f"{ours['median_us']:.0f} vs {lora['median_us']:.0f} us ({ratio:.2f}x, "
                     f"{ours.get('launches_per_call')} launches){extra}")]


def _untracked(r: dict) -> Optional[float]:
    """A model record's untracked-step median (ours: steps that skip the score)."""
    return r.get("final_median_ms")


def model_verdicts(records: List[dict]) -> List[Verdict]:
    """Per preset (the 4-bit one included): eager and graphed steps against the peers."""
    groups: Dict[str, Dict[str, dict]] = {}
    unmeasured: Dict[str, List[str]] = {}  # a preset's records without a measurement: why
    for r in records:
        if r.get("level") == "model" and r.get("device_type") == "cuda":
            groups.setdefault(r["shape"], {})
            if r.get("status") != "ok":
                unmeasured.setdefault(r["shape"], []).append(
                    f"{r['method']} {r.get('status')}: {r.get('note') or 'no note'}")
    for r in _ok(records, level="model", device_type="cuda"):
        groups[r["shape"]][r["method"]] = r
    out: List[Verdict] = []
    for shape, rows in sorted(groups.items()):
        lora, floor = rows.get("peft-lora"), rows.get("floor")
        ours, graphs = rows.get("increlora-triton"), rows.get("increlora-graphs")
        compiled = rows.get("peft-lora-compiled")
        if ours is not None and lora is not None and _untracked(ours) is not None:
            ratio = _untracked(ours) / lora["median_ms"]
            out.append(_verdict("eager", ratio <= 1.0,
                                f"{shape}: untracked median {_untracked(ours):.1f} ms, "
                                f"{ratio:.2f}x peft LoRA's {lora['median_ms']:.1f} ms"))
        else:  # a preset the run tried and could not measure keeps its row
            why = "; ".join(unmeasured.get(shape, []))
            out.append(_unmeasurable("eager", f"{shape}: ours untracked or peft LoRA missing"
                                              + (f" ({why})" if why else "")))
        if shape.split()[0] in GRAPH_PRESETS:
            steps = _untracked(graphs) if graphs is not None else None
            for key, peer, name, limit in (("graphs_compiled", compiled, "peft-lora-compiled",
                                            GRAPHS_X_COMPILED),
                                           ("graphs_floor", floor, "floor", 1.0)):
                if steps is None or peer is None:
                    out.append(_unmeasurable(key, f"{shape}: increlora-graphs (untracked) or "
                                                  f"{name} not measured"))
                    continue
                ratio = steps / peer["median_ms"]
                out.append(_verdict(key, ratio <= limit,
                                    f"{shape}: {steps:.1f} ms, {ratio:.2f}x {name}'s "
                                    f"{peer['median_ms']:.1f} ms"))
        for method in ("increlora-triton", "increlora-graphs"):
            r = rows.get(method)
            if r is None:
                continue
            tracked, untracked = r.get("alloc_median_ms"), _untracked(r)
            if "round_median_ms" not in r:
                # a record from before round steps were timed apart (2026-12-05): a round ran
                # on every step of its allocation phase, so no step only tracked the score
                out.append(_unmeasurable("tracked", f"{shape} {method}: every tracked step "
                                                    "of this run also ran an allocation round"))
            elif tracked is None or untracked is None:
                out.append(_unmeasurable("tracked", f"{shape} {method}: a phase has no steps"))
            else:
                ratio = tracked / untracked
                out.append(_verdict("tracked", ratio <= TRACKED_X_UNTRACKED,
                                    f"{shape} {method}: {tracked:.1f} vs {untracked:.1f} ms "
                                    f"({ratio:.2f}x)"))
            if lora is not None and r.get("peak_mem_mb") is not None:
                ratio = r["peak_mem_mb"] / max(lora["peak_mem_mb"], 1e-9)
                out.append(_verdict("memory", ratio <= 1.0,
                                    f"{shape} {method}: {r['peak_mem_mb']:.0f} vs "
                                    f"{lora['peak_mem_mb']:.0f} MiB ({ratio:.2f}x)"
                                    + ("; tensor peak + graph pool, an upper bound"
                                       if GRAPH_POOL_KIND in (r.get("mem_kind") or "")
                                       else "")))
    if not out:
        return [_unmeasurable(k, "no CUDA model records")
                for k in ("eager", "graphs_compiled", "graphs_floor", "tracked", "memory")]
    # the targets name their presets: one the run has no records of keeps its rows
    presets = {" ".join(shape.split()[:-1]) for shape in groups}  # less the batch shape
    for preset in EAGER_PRESETS:
        if preset not in presets:
            out.append(_unmeasurable("eager", f"{preset}: no model records in this run"))
    for preset in GRAPH_PRESETS:
        if preset not in presets:
            out += [_unmeasurable(key, f"{preset}: no model records in this run")
                    for key in ("graphs_compiled", "graphs_floor")]
    return out


def _finetune_runs(report: Dict) -> Dict[str, dict]:
    """The main job's runs that finished, by name, with their metrics (a report from before
    the runs were named holds one eager run of the default job: "default")."""
    part = report.get("parts", {}).get("finetune", {})
    runs = part.get("runs")
    if runs is None:
        return {"default": part["metrics"]} if part.get("metrics") else {}
    return {r["name"]: r["metrics"] for r in runs if r.get("status") == "ok" and r.get("metrics")}


def graphs_match_eager(on: dict, off: dict) -> Tuple[bool, str]:
    """Whether the graphed and the eager main job trained the same run: the same final rank
    pattern and dev accuracy within 0.005; (verdict, the numbers)."""
    diff = on["eval_accuracy"] - off["eval_accuracy"]
    same_ranks = on.get("rank_pattern") is not None and \
        on.get("rank_pattern") == off.get("rank_pattern")
    ranks = ("same rank pattern" if same_ranks else
             "rank pattern not recorded" if on.get("rank_pattern") is None else
             "rank patterns differ")
    return (same_ranks and abs(diff) <= GRAPHS_ACCURACY_DIFF,
            f"accuracy {on['eval_accuracy']:.4f} graphed vs {off['eval_accuracy']:.4f} eager "
            f"({diff:+.4f}), {ranks}")


def main_job_verdicts(report: Dict) -> List[Verdict]:
    """The main job's speed, accuracy and graphed-vs-eager agreement."""
    runs = _finetune_runs(report)
    keys = ("job_speed", "job_accuracy", "job_x_lora", "job_graphs_same")
    # a dry run's main job on CPU (a few steps, Triton under the interpreter) is no measurement
    elsewhere = sorted({str(m["device"]) for m in runs.values()
                        if not str(m.get("device", "cuda")).startswith("cuda")})
    if elsewhere:
        return [_unmeasurable(k, f"the main job ran on {', '.join(elsewhere)}, not on CUDA")
                for k in keys]
    on, off, lora = runs.get("graphs-on"), runs.get("graphs-off"), runs.get("lora")
    ours = [(name, m) for name, m in (("graphs-on", on), ("graphs-off", off),
                                      ("graphs-off-padded", runs.get("graphs-off-padded")),
                                      ("default", runs.get("default"))) if m]
    if not ours:
        return [_unmeasurable(k, "no IncreLoRA main-job run finished") for k in keys]
    best_name, best = max(ours, key=lambda nm: nm[1]["tokens_per_second"] or 0)
    speeds = ", ".join(f"{n} {m['tokens_per_second']:,.0f}" for n, m in ours)
    out = [_verdict("job_speed", best["tokens_per_second"] >= MAIN_JOB_TOKENS_PER_S,
                    f"tokens/s: {speeds}"),
           _verdict("job_accuracy", all(m["eval_accuracy"] >= MAIN_JOB_ACCURACY for _, m in ours),
                    ", ".join(f"{n} {m['eval_accuracy']:.4f}" for n, m in ours))]
    if lora and lora.get("tokens_per_second"):
        ratio = best["tokens_per_second"] / lora["tokens_per_second"]
        out.append(_verdict("job_x_lora", ratio >= MAIN_JOB_X_LORA,
                            f"{best_name} {ratio:.2f}x lora's {lora['tokens_per_second']:,.0f} "
                            "tokens/s"))
    else:
        out.append(_unmeasurable("job_x_lora", "no --method lora run finished in this check"))
    twin, twin_name = _eager_twin(runs)
    if on and on.get("cuda_graphs_fallback"):
        out.append(_unmeasurable("job_graphs_same",
                                 "the graphs-on run stepped eagerly, its model could not be "
                                 f"captured ({on['cuda_graphs_fallback']})"))
    elif on and twin:
        same, detail = graphs_match_eager(on, twin)
        out.append(_verdict("job_graphs_same", same, f"against {twin_name}: {detail}"))
    else:
        out.append(_unmeasurable("job_graphs_same",
                                 "needs both the graphs-on and the graphs-off(-padded) run"))
    return out


def _eager_twin(runs: Dict[str, dict]) -> Tuple[Optional[dict], str]:
    """The eager main-job run the graphed one must equal: ``graphs-off-padded`` (the same
    padding); in reports from before it existed, ``graphs-off`` (whose padding to each batch's
    longest input changes the scores by itself)."""
    if runs.get("graphs-off-padded"):
        return runs["graphs-off-padded"], "graphs-off-padded"
    return runs.get("graphs-off"), "graphs-off (other padding)"


def _graph_records(report: Dict) -> List[dict]:
    """The records of the ``graphs`` part that ran on CUDA (skipped ones left out)."""
    records = report.get("parts", {}).get("graphs", {}).get("records", [])
    return [r for r in records if r.get("device_type") == "cuda" and r.get("status") != "skipped"]


def _graph_detail(r: dict) -> str:
    """One precision of the ``graphs`` part in words."""
    if r.get("status") == "failed" and r.get("replays") is None:  # it raised
        return f"{r['precision']} failed: {r.get('note')}"
    text = (f"{r['precision']} {'ok' if r.get('ok') else 'DIFFERS'} ({r.get('replays')} "
            f"replays, params {r.get('max_param_diff'):.2g}, losses "
            f"{r.get('max_loss_diff'):.2g}")
    if r.get("overflows") is not None:
        text += f", {r['overflows']} overflows ({r.get('overflows_replayed')} replayed)"
    return text + (f"; {r['note']}" if r.get("note") else "") + ")"


def graph_step_verdicts(report: Dict) -> List[Verdict]:
    """The graphed step against the eager one, per precision, from the ``graphs`` part."""
    ran = _graph_records(report)
    if not ran:
        return [_unmeasurable("graphs_equal", "the graphs part did not run on CUDA")]
    return [_verdict("graphs_equal", all(r.get("ok") for r in ran),
                     "; ".join(_graph_detail(r) for r in ran))]


def issue27_verdicts(report: Dict) -> List[Verdict]:
    """Every issue-27 target of one gpu-check report, in the issue's order, then the graphed
    step's agreement with the eager one."""
    records = gpu_check_records(report)
    return (layer_verdicts(records) + host_verdicts(records) + model_verdicts(records)
            + main_job_verdicts(report) + graph_step_verdicts(report))


def _rate(metrics: Dict, key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None else f"{value:,.0f}"


def cuda_graphs_auto(report: Dict) -> Tuple[Optional[bool], str]:
    """What this run says ``--cuda-graphs auto`` should do on CUDA: False when a precision of
    the ``graphs`` part disagreed with the eager run on CUDA (whatever the main job says);
    None (undecided) unless every precision of that part passed on CUDA; otherwise True (turn
    graphs on) when the graphed main job is `AUTO_MARGIN` faster than the default eager one
    (``graphs-off``) and trained the same run as the eager one with its padding
    (``graphs-off-padded``), False when it is not, None when the run cannot tell; with the
    reason."""
    ran = _graph_records(report)
    bad = [r for r in ran if not r.get("ok")]
    if bad:
        return False, ("off (graphed steps disagree with eager ones in "
                       f"{', '.join(r['precision'] for r in bad)}): "
                       + "; ".join(_graph_detail(r) for r in bad))
    passed = {r.get("precision") for r in ran}
    unchecked = [p for p in GRAPH_PRECISIONS if p not in passed]
    if unchecked:
        return None, ("undecided: the graphs part has no passing CUDA check of the graphed "
                      f"step in {', '.join(unchecked)}")
    runs = _finetune_runs(report)
    on, off, twin = runs.get("graphs-on"), runs.get("graphs-off"), runs.get("graphs-off-padded")
    if not (on and off and twin):
        return None, ("undecided: the graphs-on, graphs-off and graphs-off-padded main-job "
                      "runs did not all finish")
    if on.get("cuda_graphs_fallback"):
        return None, ("undecided: the graphs-on main job stepped eagerly, its model could not "
                      f"be captured ({on['cuda_graphs_fallback']})")
    same, detail = graphs_match_eager(on, twin)
    graphed, eager = on["tokens_per_second"] or 0, off["tokens_per_second"] or 0
    faster = graphed > 0 and graphed >= (1 + AUTO_MARGIN) * eager
    speed = (f"{_rate(on, 'tokens_per_second')} vs {_rate(off, 'tokens_per_second')} tokens/s "
             f"graphed vs eager ({_rate(on, 'tokens_per_second_warm')} vs "
             f"{_rate(off, 'tokens_per_second_warm')} after the first log point)")
    if faster and same:
        return True, f"on: {speed}; {detail}"
    why = [] if faster else [f"not {AUTO_MARGIN:.0%} faster"]
    why += [] if same else ["not the same run"]
    return False, f"off ({' and '.join(why)}): {speed}; {detail}"


def gemm_backward_rows(report: Dict) -> Tuple[Optional[int], str]:
    """What this run says `kernels.linear.GEMM_BACKWARD_ROWS` should be: the fewest rows from
    which the adapter's backward as cuBLAS GEMMs and aten ops (``aten_ms``) took less GPU time
    than the row and finish kernels (``ours_ms``) at every dy-pass point measured on CUDA with
    at least as many rows; None (the kernels always) where the GEMMs lost at the most rows
    measured or nothing was measured; with the reason. GPU time of graph replays: an eager
    step's host, which the GEMMs' more ops cost more of, is not in it."""
    points = [r for r in _ok(gpu_check_records(report), level="dy_pass", device_type="cuda")
              if r.get("ours_ms") is not None and r.get("aten_ms") is not None]
    if not points:
        return None, "GEMM_BACKWARD_ROWS = None (undecided: no dy-pass records on CUDA)"
    points.sort(key=lambda r: (r["tokens"], r["shape"]))
    listed = "; ".join(f"{r['shape']} {r['tokens']} tokens: GEMMs {r['aten_ms']:.3f} vs kernels "
                       f"{r['ours_ms']:.3f} ms" for r in points)
    rows = None
    for tokens in sorted({r["tokens"] for r in points}, reverse=True):
        if all(r["aten_ms"] < r["ours_ms"] for r in points if r["tokens"] >= tokens):
            rows = tokens
    if rows is None:
        return None, ("GEMM_BACKWARD_ROWS = None (the kernels: the GEMMs lose at the most rows "
                      f"measured): {listed}")
    return rows, (f"GEMM_BACKWARD_ROWS = {rows} (the GEMMs take less GPU time at every point "
                  f"from {rows} rows on): {listed}")
