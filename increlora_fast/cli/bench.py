"""`increlora-fast bench`: layer- and model-level speed and memory of IncreLoRA and its baselines.

``--quick``: small shapes on CPU in a few minutes. Without it (full mode): DeBERTa-v3-base and
7B-class shapes, 2k-32k tokens, r_max 8/16/64, fp32 and bf16, and whole training steps of
DeBERTa-v3-base and MiniLM-L6, on a CUDA GPU. Prints the tables, appends every record to
``bench/results.csv``, draws the time-vs-tokens plot, and with ``--json`` / ``--results-md``
writes the records and ``bench/RESULTS.md``.

``--levels host``: the host overhead of one layer call with the Triton launches stubbed, on CPU
in a subprocess under the Triton interpreter (`benchmarks.speed.host_overhead`); it needs no GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..training.outputs import check_distinct_outputs
from .option_checks import (check_device, check_device_index, check_names, check_output_path,
                            check_replaceable_json)

if TYPE_CHECKING:
    from ..benchmarks.speed.host_overhead import HostPlan
    from ..benchmarks.speed.plans import LayerPlan, ModelPlan

DEFAULT_CSV = "bench/results.csv"
DEFAULT_RESULTS_MD = "bench/RESULTS.md"
DEFAULT_PLOT_DIR = "bench/plots"
LEVELS = ("layer", "model", "host")


def _csv_list(text: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
    return items


def _ints(text: str) -> List[int]:
    try:
        values = [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def _dims(text: str, n: int) -> Tuple[int, ...]:
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != n or any(d < 1 for d in dims):
        form = "x".join(["IN", "OUT", "TOKENS"][:n])
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form {form} (positive integers)")
    return dims


def _shapes(text: str) -> List[Tuple[int, int]]:
    return [_dims(t, 2) for t in _csv_list(text)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and MiniLM-L6 on CPU, a few minutes")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: cpu with --quick or --levels host, "
                             "else cuda)")
    parser.add_argument("--levels", type=_csv_list, default=["layer", "model"],
                        help="layer,model,host (default layer,model; host: the CPU host "
                             "overhead per layer call with the Triton launches stubbed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", dest="json_path", metavar="PATH",
                     help="write this run's records as a JSON list (not with "
                          "--report-only)")
    out.add_argument("--csv", default=DEFAULT_CSV, metavar="PATH",
                     help=f"append the records to this CSV (default {DEFAULT_CSV}; '' = off)")
    out.add_argument("--plot", default=None, metavar="PATH",
                     help=f"time-vs-tokens PNG of the measured run's layer level, two or more "
                          f"--tokens (default {DEFAULT_PLOT_DIR}/"
                          "layer_<device>_<mode>_<date>.png, as for included runs; '' = no "
                          "plot at all)")
    out.add_argument("--results-md", nargs="?", const=DEFAULT_RESULTS_MD, default=None,
                     metavar="PATH", help=f"write RESULTS.md (default {DEFAULT_RESULTS_MD}) "
                                          "from this run plus --include-json records")
    out.add_argument("--include-json", action="append", default=[], metavar="PATH",
                     help="with --results-md: records of other runs (e.g. a GPU run), or "
                          "a gpu-check's gpu_check.json, to put in RESULTS.md")
    out.add_argument("--notes", metavar="PATH",
                     help="with --results-md: a Markdown file of notes to put under the tables "
                          "of RESULTS.md")
    out.add_argument("--report-only", action="store_true",
                     help="measure nothing: build RESULTS.md from --include-json records")
    layer = parser.add_argument_group("layer level (overrides of the quick/full grid)")
    layer.add_argument("--methods", type=_csv_list, help="layer methods (default: all)")
    layer.add_argument("--shapes", type=_shapes, help="e.g. 768x768,768x3072 (IN x OUT)")
    layer.add_argument("--tokens", type=_ints, help="e.g. 2048,16384")
    layer.add_argument("--r-max", type=_ints, help="e.g. 8,16,64")
    layer.add_argument("--dtypes", type=_csv_list, help="fp32,bf16,fp16")
    layer.add_argument("--phases", type=_csv_list, help="fwd,bwd,fwd+bwd")
    layer.add_argument("--warmup", type=int, help="untimed runs per method before timing")
    layer.add_argument("--repeats", type=int, help="timed runs per method (median reported)")
    layer.add_argument("--interpreter-point", type=lambda t: _dims(t, 3),
                       help="IN x OUT x TOKENS where Triton runs under its interpreter on CPU "
                            "(not with a CUDA --device)")
    host = parser.add_argument_group("host level (--levels host)")
    host.add_argument("--host-point", type=lambda t: _dims(t, 3), default=None,
                      help="IN x OUT x TOKENS of the layer (default 768x3072x16)")
    host.add_argument("--host-r-max", type=int, default=None, help="adapter slots (default 16)")
    host.add_argument("--host-warmup", type=int, default=None,
                      help="untimed calls per method (default 20)")
    host.add_argument("--host-repeats", type=int, default=None,
                      help="timed calls per method, interleaved (default 200)")
    model = parser.add_argument_group("model level (overrides)")
    model.add_argument("--model-methods", type=_csv_list, help="default: all")
    model.add_argument("--models", type=_csv_list,
                       help="deberta-v3-base, minilm-l6, tiny-bert")
    model.add_argument("--batch-size", type=int)
    model.add_argument("--seq-len", type=int)
    model.add_argument("--model-steps", type=int, help="training steps per method")
    model.add_argument("--model-warmup-steps", type=int, help="of those, untimed")
    model.add_argument("--model-dtypes", type=_csv_list,
                       help="fp32,bf16,fp16 (bf16 and fp16: autocast)")


# The options of each level (argparse dests, all None unless given).
LEVEL_OPTIONS = {
    "layer": ("methods", "shapes", "tokens", "r_max", "dtypes", "phases", "warmup", "repeats",
              "interpreter_point"),
    "model": ("model_methods", "models", "batch_size", "seq_len", "model_steps",
              "model_warmup_steps", "model_dtypes"),
    "host": ("host_point", "host_r_max", "host_warmup", "host_repeats"),
}


def _check_options_used(args: argparse.Namespace) -> None:
    """Every option given sets something this run does: ValueError naming one it would ignore
    (a level's options where that level is not measured, the measuring options of
    ``--report-only``, ``--threads`` or a GPU ``--device`` of a host-only run, ``--plot`` of
    a run without the layer level)."""
    def option(dest: str) -> str:
        return "--" + dest.replace("_", "-")
    for level, dests in LEVEL_OPTIONS.items():
        given = [d for d in dests if getattr(args, d) is not None]
        if given and args.report_only:
            raise ValueError(f"{option(given[0])} sets the {level} level, and --report-only "
                             "measures nothing; leave it out")
        if given and level not in args.levels:
            raise ValueError(f"{option(given[0])} sets the {level} level, which --levels "
                             f"{','.join(args.levels)} does not measure; add {level} to "
                             "--levels or leave it out")
    if args.report_only:
        given = [d for d in ("quick", "device", "threads")
                 if getattr(args, d) not in (None, False)]
        if given:
            raise ValueError(f"{option(given[0])} sets the measuring, and --report-only measures "
                             "nothing; leave it out")
    if args.threads is not None and list(args.levels) == ["host"]:
        raise ValueError("--threads is not used by --levels host, which measures with one "
                         "torch thread in its own process; leave it out")
    if list(args.levels) == ["host"] and args.device is not None \
            and args.device.strip().lower() != "cpu":
        raise ValueError(f"--device {args.device} is not used by --levels host, which measures "
                         "on the CPU with the Triton launches stubbed; leave it out")
    if args.plot and "layer" not in args.levels:
        raise ValueError(f"--plot {args.plot} is the layer level's time-vs-tokens plot, which "
                         f"--levels {','.join(args.levels)} does not measure; add layer to "
                         "--levels or leave it out")


def _are_records(rows: list) -> bool:
    """Whether ``rows`` (a JSON list) are benchmark records `--json` wrote (none, or each with
    the record's required fields)."""
    from ..benchmarks.records import REQUIRED
    return all(isinstance(r, dict) and all(k in r for k in REQUIRED) for r in rows)


def _check_replaceable_results(path: Optional[str]) -> None:
    """``--results-md PATH`` may replace an earlier RESULTS.md of this command, never another
    file (the notes it is built with, a README): ValueError naming the option."""
    from ..benchmarks.report import written_by_report

    if path and os.path.isfile(path) and not written_by_report(path):
        raise ValueError(f"--results-md {path} exists and is not a RESULTS.md this command "
                         "wrote; give a new path (or delete the file)")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_replaceable_plot(path: Optional[str]) -> None:
    """``--plot PATH`` may replace an earlier plot (a PNG), never another file: ValueError
    naming the option."""
    if not path or not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as f:
            png = f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        png = False
    if not png:
        raise ValueError(f"--plot {path} exists and is not a PNG plot; give a new path (or "
                         "delete the file)")


def _check_appendable_csv(path: str) -> None:
    """``--csv PATH`` gets rows appended only where it is new, empty or an earlier CSV of these
    records (the same header): ValueError naming the option otherwise."""
    from ..benchmarks.records import appendable_csv

    if not appendable_csv(path):
        raise ValueError(f"--csv {path} exists and is not a CSV of benchmark records with this "
                         "version's columns; give a new path (or move the file)")


def _fail(message: str) -> int:
    print(f"increlora-fast bench: error: {message}", file=sys.stderr)
    return 2


def _plans(args: argparse.Namespace):
    from ..benchmarks.speed.plans import DTYPES, PHASES, full_plans, quick_plans

    layer, model = quick_plans() if args.quick else full_plans()
    for attr, name in (("shapes", "shapes"), ("tokens", "tokens"), ("r_max", "r_max"),
                       ("dtypes", "dtypes"), ("phases", "phases"), ("warmup", "warmup"),
                       ("repeats", "repeats"), ("interpreter_point", "interpreter_point")):
        if getattr(args, attr) is not None:
            setattr(layer, name, getattr(args, attr))
    for attr, name in (("models", "models"), ("batch_size", "batch_size"),
                       ("seq_len", "seq_len"), ("model_steps", "steps"),
                       ("model_warmup_steps", "warmup_steps"), ("model_dtypes", "dtypes")):
        if getattr(args, attr) is not None:
            setattr(model, name, getattr(args, attr))
    for option, dtypes in (("--dtypes", layer.dtypes), ("--model-dtypes", model.dtypes)):
        for d in dtypes:
            if d not in DTYPES:
                raise ValueError(f"{option} entry {d!r} is invalid: use {', '.join(DTYPES)}")
    for p in layer.phases:
        if p not in PHASES:
            raise ValueError(f"--phases entry {p!r} is invalid: use {list(PHASES)}")
    if layer.warmup < 0:
        raise ValueError(f"--warmup {layer.warmup} is invalid: use an integer >= 0")
    if layer.repeats < 1:
        raise ValueError(f"--repeats {layer.repeats} is invalid: use an integer >= 1")
    for option, value in (("--batch-size", model.batch_size), ("--seq-len", model.seq_len),
                          ("--model-steps", model.steps)):
        if value < 1:
            raise ValueError(f"{option} {value} is invalid: use an integer >= 1")
    if "model" in args.levels:
        from ..benchmarks.speed.model_presets import MODEL_PRESETS
        for name in model.models:
            limit = MODEL_PRESETS[name].max_seq_len()
            if limit is not None and model.seq_len > limit:
                raise ValueError(f"--seq-len {model.seq_len} is invalid: {name} has "
                                 f"{limit} positions; use at most {limit}")
    # `measure_models`: its peak memory is taken on the untimed steps, and two are timed
    if model.steps < 3:
        raise ValueError(f"--model-steps {model.steps} is invalid: use an integer >= 3 (one "
                         "untimed step and two timed at least)")
    if not 1 <= model.warmup_steps <= model.steps - 2:
        raise ValueError(f"--model-warmup-steps {model.warmup_steps} is invalid: use an integer "
                         f"from 1 to --model-steps - 2 ({model.steps - 2})")
    return layer, model


def _host_plan(args: argparse.Namespace) -> "HostPlan":
    """The `HostPlan` of ``--host-*``; ValueError naming the option that is out of range."""
    from ..benchmarks.speed.host_overhead import HostPlan

    plan = HostPlan()
    if args.host_point is not None:
        plan = dataclasses.replace(plan, in_features=args.host_point[0],
                                   out_features=args.host_point[1], tokens=args.host_point[2])
    for option, name, low in (("--host-r-max", "r_max", 1), ("--host-warmup", "warmup", 0),
                              ("--host-repeats", "repeats", 1)):
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            if value < low or (name == "r_max" and value > 128):
                bound = "between 1 and 128" if name == "r_max" else f">= {low}"
                raise ValueError(f"{option}={value} must be {bound}")
            plan = dataclasses.replace(plan, **{name: value})
    return plan


def _device(args: argparse.Namespace):
    import torch

    host_only = list(args.levels) == ["host"]
    name = args.device or ("cpu" if args.quick or host_only else "cuda")
    device = torch.device(name.strip().lower())
    if device.type == "cuda" and not torch.cuda.is_available():
        advice = ("leave --device out (--quick runs on cpu) or give --device cpu" if args.quick
                  else "the full mode is meant for a GPU (use --quick, or --device cpu to force "
                  "the full grid on CPU)")
        raise ValueError(f"--device {name}: CUDA is not available here; {advice}")
    check_device_index(device)
    return device


def _check_names(args: argparse.Namespace) -> None:
    """--methods, --model-methods and --models name known entries, and they and the grid
    (--shapes, --tokens, --r-max, --dtypes, --phases, --model-dtypes) give each entry once
    (checked before measuring)."""
    from ..benchmarks.speed.layer_methods import LAYER_METHODS
    from ..benchmarks.speed.model_level import MODEL_METHODS
    from ..benchmarks.speed.model_presets import MODEL_PRESETS

    check_names("--methods", args.methods, list(LAYER_METHODS))
    check_names("--model-methods", args.model_methods, list(MODEL_METHODS))
    check_names("--models", args.models, list(MODEL_PRESETS))
    if args.interpreter_point is not None and args.methods and \
            not any(LAYER_METHODS[m].needs_triton for m in args.methods):
        raise ValueError(f"--interpreter-point is where the Triton methods run under the "
                         f"interpreter, and --methods {','.join(args.methods)} names none; "
                         "add a Triton method to --methods or leave it out")
    for option, values in (("--shapes", args.shapes), ("--tokens", args.tokens),
                           ("--r-max", args.r_max), ("--dtypes", args.dtypes),
                           ("--phases", args.phases), ("--model-dtypes", args.model_dtypes)):
        repeated = [v for i, v in enumerate(values or []) if v in values[:i]]
        if repeated:
            shown = "x".join(map(str, repeated[0])) if option == "--shapes" else repeated[0]
            raise ValueError(f"{option} gives {shown} twice: give each once (its rows would be "
                             "measured twice)")


def _read_include(path: str):
    """(records, gpu-check report or None) of an --include-json file; ValueError naming it."""
    from ..benchmarks import records as rec_io

    try:
        return rec_io.read_report(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"--include-json {path} is not JSON ({err}); give a file written by "
                         "bench --json or gpu-check") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"--include-json {path} is not a text file; give a JSON file written "
                         "by bench --json or gpu-check") from err
    except OSError as err:
        raise ValueError(f"--include-json {path}: {err.strerror or err}") from err
    except ValueError as err:
        text = str(err)
        text = text[len(path) + 2:] if text.startswith(f"{path}: ") else text
        raise ValueError(f"--include-json {path}: {text}; give a file written by bench --json "
                         "or gpu-check") from err


def _read_notes(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--notes {path} cannot be read: "
                         f"{getattr(err, 'strerror', None) or err}") from err


def _measure(args: argparse.Namespace, device, mode: str, layer_plan: "LayerPlan",
             model_plan: "ModelPlan", host_plan: Optional["HostPlan"]
             ) -> Tuple[List[dict], Optional[str]]:
    """The records of every level of ``args.levels`` at the checked plans, and None; or, where
    a level fails, the records of the levels before it and a line naming the failure (its
    traceback printed), so that minutes of measuring are not lost to a later level's error."""
    import torch

    from ..benchmarks.speed.layer_level import run_layer_level
    from ..benchmarks.speed.layer_methods import LAYER_METHODS
    from ..benchmarks.speed.model_level import MODEL_METHODS, run_model_level
    from ..benchmarks.records import command_line, environment

    env = environment(device, mode)
    env.update(command=command_line("bench"), cpu_count=os.cpu_count(),
               load_start=os.getloadavg()[0])
    records: List[dict] = []
    log = lambda line: print(line, flush=True)  # noqa: E731
    failure = None
    for level in args.levels:
        try:
            if level == "layer":
                records += run_layer_level(layer_plan, args.methods or list(LAYER_METHODS),
                                           device, env, log)
            elif level == "model":
                records += run_model_level(model_plan,
                                           args.model_methods or list(MODEL_METHODS), device,
                                           env, log)
            else:
                records += _host_level(host_plan, env, log)
        except Exception as err:  # the levels measured before it are kept
            traceback.print_exc()
            failure = (f"--levels {level} failed ({type(err).__name__}: {err}); the "
                       f"{len(records)} record(s) of the levels before it are kept")
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()
    load_end = os.getloadavg()[0]
    for r in records:
        r["load_end"] = load_end
    return records, failure


def _host_level(plan: "HostPlan", env: dict, log) -> List[dict]:
    """The host-overhead records of ``plan`` (a `HostPlan`), measured in a subprocess, stamped
    with this run's date, commit and command so they join its report (their own threads and
    mode are kept)."""
    from ..benchmarks.speed.host_overhead import measure

    log(f"host: {plan.in_features}x{plan.out_features}, {plan.tokens} tokens, r_max "
        f"{plan.r_max}, {plan.repeats} calls per method in a subprocess (Triton interpreter, "
        "launches stubbed)")
    try:
        records = measure(plan)
    except RuntimeError as err:
        raise ValueError(f"--levels host: {err}") from err
    shared = {k: v for k, v in env.items() if k not in ("threads", "mode")}
    return [dict(r, **shared) for r in records]


def _plot_path(record: dict) -> str:
    """The plot of one run (runs are told apart by device and start date: two runs of one
    device type and mode must not share a file, or the earlier one shows the later's times)."""
    date = "".join(c for c in str(record.get("date", "")) if c.isalnum() or c in "-_")
    return os.path.join(DEFAULT_PLOT_DIR,
                        f"layer_{record['device_type']}_{record.get('mode', 'run')}_{date}.png")


def run(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    try:
        if args.report_only and not args.include_json:
            raise ValueError("--report-only needs at least one --include-json PATH")
        if args.report_only and args.plot:
            raise ValueError(f"--plot {args.plot} names the plot of the run being measured, and "
                             "--report-only measures none (the plots of included runs go to "
                             f"{DEFAULT_PLOT_DIR}/; --plot '' turns them off)")
        if args.report_only and args.json_path:
            raise ValueError(f"--json {args.json_path} gets the records of the run being "
                             "measured, and --report-only measures none; leave it out")
        if args.report_only and not args.results_md:
            args.results_md = DEFAULT_RESULTS_MD
        for option, path in (("--notes", args.notes),
                             ("--include-json", next(iter(args.include_json), None))):
            if path and not args.results_md:
                raise ValueError(f"{option} {path} goes into RESULTS.md, which only "
                                 "--results-md writes; add --results-md or leave it out")
        bad = [level for level in args.levels if level not in LEVELS]
        if bad:
            raise ValueError(f"--levels entry {bad[0]!r} is invalid: use {', '.join(LEVELS)}")
        check_names("--levels", args.levels, LEVELS)
        _check_options_used(args)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads {args.threads} is invalid: use an integer >= 1")
        check_device(args.device)
        # written after the measuring (--csv only gets measured rows: none with --report-only)
        for option, path in (("--json", args.json_path),
                             ("--csv", None if args.report_only else args.csv),
                             ("--plot", args.plot), ("--results-md", args.results_md)):
            check_output_path(path, option)
        check_distinct_outputs([("--json", args.json_path),
                                 ("--csv", None if args.report_only else args.csv),
                                 ("--plot", args.plot), ("--results-md", args.results_md)])
        if args.plot and not args.plot.lower().endswith(".png"):
            raise ValueError(f"--plot {args.plot} is not a .png path: the plot is a PNG; give "
                             "a path ending in .png")
        check_replaceable_json(args.json_path, "--json", _are_records, "benchmark records")
        _check_replaceable_results(args.results_md)
        _check_replaceable_plot(args.plot)
        if args.csv and not args.report_only:
            _check_appendable_csv(args.csv)
        device = None if args.report_only else _device(args)
        if device is not None and device.type == "cuda" and args.interpreter_point is not None:
            raise ValueError(f"--interpreter-point is where the Triton methods run under the "
                             f"interpreter on a device without CUDA; on {device} every point "
                             "runs the compiled kernels, so leave it out")
        if device is not None and device.type == "cpu":
            # Before increlora_fast.kernels is first imported, so Triton rows can run on CPU.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch

        from ..benchmarks import records as rec_io
        from ..benchmarks import report

        if device is not None:  # everything measuring needs is checked before it starts
            _check_names(args)
            layer_plan, model_plan = _plans(args)
            if args.plot and len(set(layer_plan.tokens)) < 2:
                raise ValueError(f"--plot {args.plot} draws the layer time against the token "
                                 f"count, and --tokens {','.join(map(str, layer_plan.tokens))} "
                                 "gives one count; give two or more, or leave --plot out")
            if args.plot and "fwd+bwd" not in layer_plan.phases:
                raise ValueError(f"--plot {args.plot} draws the layer's fwd+bwd time, and "
                                 f"--phases {','.join(layer_plan.phases)} leaves fwd+bwd out; "
                                 "add fwd+bwd to --phases, or leave --plot out")
            host_plan = _host_plan(args) if "host" in args.levels else None
        notes = _read_notes(args.notes) if args.notes else None
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        included, gpu_checks = [], []
        for path in args.include_json:
            found, check = _read_include(path)
            included += found
            if check is not None:
                gpu_checks.append(check)
        records, failure = ([], None) if device is None else _measure(
            args, device, mode, layer_plan, model_plan, host_plan)
    except (ValueError, OSError) as err:
        return _fail(str(err))
    if records:
        print()
        print(report.console_report(records))
    if args.json_path and (records or failure is None):
        rec_io.write_json(records, args.json_path)
        print(f"\nrecords: {args.json_path}")
    if records and args.csv:
        rec_io.append_csv(records, args.csv)
        print(f"appended {len(records)} rows to {args.csv}")
    if failure is not None:  # RESULTS.md and the plots are made from whole runs only
        return _fail(failure + (f" (in {args.json_path})" if args.json_path and records
                                else "") + "; no plot or RESULTS.md was written")
    plots = {}
    runs = report.group_runs(records + included)
    for key, run_records in runs.items():
        this_run = bool(records) and key == report.run_key(records[0])
        if not (this_run or args.results_md):
            continue
        # '' turns every plot off; a path names only this run's
        path = args.plot if args.plot == "" or (this_run and args.plot is not None) \
            else _plot_path(run_records[0])
        if path and report.plot_time_vs_tokens(run_records, path):
            plots[key] = path
            print(f"plot: {path}")
    if args.results_md:
        text = report.results_markdown(records + included, plots, args.results_md, notes,
                                       gpu_checks)
        os.makedirs(os.path.dirname(os.path.abspath(args.results_md)), exist_ok=True)
        with open(args.results_md, "w") as f:
            f.write(text)
        print(f"results: {args.results_md}")
    return 0
