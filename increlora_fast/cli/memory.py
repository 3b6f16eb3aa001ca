"""`increlora-fast memory`: will it fit? Where the memory of one fine-tuning step goes for
IncreLoRA next to peft LoRA (r = r_max and r = target_rank) and peft AdaLoRA (its init_r).

Weights, adapters, gradients, optimizer states, score buffers and the batch are exact from
shapes and dtypes (a meta-device copy of the model: no weights, works offline from a
``config.json``). Activations are measured by one real training step at the given size (on CUDA
when there is one, else per tensor on CPU), or with ``--estimate`` from small runs scaled up.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional, Tuple

from ..config import ADAPTER_DTYPES
from .option_checks import (check_device, check_device_index, check_output_path,
                            check_rank_budget, check_replaceable_json)

def _csv_list(text: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is an empty list")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="a local folder with config.json, a path to a config JSON file, "
                            "all-MiniLM-L6-v2 (packaged) or a hub id (needs the hub)")
    model.add_argument("--head", default="auto",
                       choices=("auto", "causal-lm", "masked-lm", "seq-cls"),
                       help="the head to train (auto: from the config's architectures)")
    model.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"),
                       help="dtype of the base weights and of the step (default bf16, a GPU "
                            "run's; finetune trains fp32 weights on CPU: give fp32 for that run)")
    model.add_argument("--quantized", default="none", choices=("none", "4bit", "8bit"),
                       help="bitsandbytes base weights (their size is exact in its layout; the "
                            "step is measured on a --dtype stand-in, so the total is estimated)")
    model.add_argument("--double-quant", action="store_true",
                       help="with --quantized 4bit: double quantization, the QLoRA recipe's "
                            "bnb_4bit_use_double_quant (the absmax quantized to 8 bits)")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--target-modules", type=_csv_list, default=None,
                         help="comma-separated module-name suffixes (default: the attention and "
                              "FFN linears of common families)")
    adapter.add_argument("--r-max", type=int, default=16, help="IncreLoRA slot capacity; LoRA's "
                                                               "larger rank")
    adapter.add_argument("--init-r", type=int, default=1, help="IncreLoRA starting rank")
    adapter.add_argument("--target-rank", type=int, default=2,
                         help="IncreLoRA's final average rank; LoRA's smaller rank; AdaLoRA's "
                              "target_r")
    adapter.add_argument("--adalora-init-r", type=int, default=None,
                         help="AdaLoRA's starting rank (default: --r-max)")
    adapter.add_argument("--adapter-dtype", default="auto", choices=ADAPTER_DTYPES,
                         help="IncreLoRA adapter dtype (auto: the library default, float32 on "
                              "bf16/fp16 bases)")
    adapter.add_argument("--gradient-checkpointing", action="store_true",
                         help="measure with gradient checkpointing on")
    step = parser.add_argument_group("step")
    step.add_argument("--batch-size", type=int, default=1)
    step.add_argument("--seq-len", type=int, default=512)
    step.add_argument("--estimate", action="store_true",
                      help="do not run the full size: measure 1- and 2-layer models at batch 1 "
                           "and three short sequences and scale by the measured growth")
    step.add_argument("--small-seq", type=int, default=None,
                      help="--estimate: shortest measured sequence (default: seq-len/8 in "
                           "[32, 128]); also 2x and 4x it")
    step.add_argument("--device", default=None,
                      help="where the step runs (default: cuda when available, else cpu)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None,
                     help="write the rows to this JSON file (a new one, or an earlier breakdown)")
    out.add_argument("--notes", action="store_true", help="print how every figure was obtained")
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _positive(args: argparse.Namespace, names: List[str]) -> Optional[str]:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} {value}: must be >= 1"
    return None


ROW_KEYS = ("method", "component", "bytes", "how")


def _is_breakdown(rows: list) -> bool:
    """Whether ``rows`` (a JSON list) is a breakdown `--json` wrote."""
    return bool(rows) and all(isinstance(r, dict) and all(k in r for k in ROW_KEYS)
                              for r in rows)


def _trained_head(spec, device) -> Tuple[str, ...]:
    """The layers of a classifier that `finetune` trains in full: the head, and with a
    checkpoint that is no sequence classifier (its config's ``architectures``), every layer
    outside the base model, which such a checkpoint has no weights for (DistilBERT's
    ``pre_classifier``, DeBERTa-v2's ``pooler``)."""
    from ..training.finetune_run import head_layers, head_name

    model = spec.build(device, meta=True)
    if any(arch.endswith("ForSequenceClassification")
           for arch in getattr(spec.config, "architectures", None) or []):
        head = head_name(model)
        return (head,) if head is not None else ()
    return tuple(head_layers(model))


def _run_fields(args: argparse.Namespace, head: str, device, modules_to_save) -> dict:
    """What every ``--json`` row records of its run: the model and step the table's header
    names, the device, date, versions and command."""
    from ..benchmarks.records import command_line, environment

    env = environment(device, "estimate" if args.estimate else "measured")
    return dict(model=args.model, head=head, dtype=args.dtype, quantized=args.quantized,
                double_quant=args.double_quant,
                batch_size=args.batch_size, seq_len=args.seq_len, estimate=args.estimate,
                gradient_checkpointing=args.gradient_checkpointing,
                target_modules=args.target_modules, r_max=args.r_max, init_r=args.init_r,
                target_rank=args.target_rank, adalora_init_r=args.adalora_init_r,
                adapter_dtype=args.adapter_dtype, modules_to_save=list(modules_to_save),
                **{k: env[k] for k in ("date", "git_commit", "device", "device_type", "torch",
                                       "triton", "peft", "transformers")},
                command=command_line("memory"))


def _fail(message: str) -> int:
    print(f"increlora-fast memory: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:  # the arguments first, before torch and the model are loaded
        problem = _positive(args, ["r_max", "init_r", "target_rank", "adalora_init_r",
                                   "batch_size", "seq_len", "small_seq"])
        if problem:
            raise ValueError(problem)
        if args.double_quant and args.quantized != "4bit":
            raise ValueError(f"--double-quant goes with --quantized 4bit (it quantizes a 4-bit "
                             f"base's absmax), not --quantized {args.quantized}")
        if args.small_seq is not None and not args.estimate:
            raise ValueError(f"--small-seq {args.small_seq} goes with --estimate (it sets the "
                             "shortest sequence --estimate measures); add --estimate or drop it")
        check_rank_budget(args.target_rank, args.r_max, args.init_r)
        check_device(args.device)
        check_output_path(args.json, "--json")  # written after the step is measured
        check_replaceable_json(args.json, "--json", _is_breakdown, "a breakdown")
    except ValueError as err:
        return _fail(str(err))
    import torch

    from ..benchmarks.memory.breakdown import (build_spec, check_estimate_sizes, format_notes,
                                               format_table, memory_breakdown, write_json)
    from ..benchmarks.memory.compared_methods import AdapterSetting, methods_for
    from ..data.assets import AssetUnavailableError, hub_access_off, hub_offline

    try:
        device = torch.device(args.device.strip().lower() if args.device else
                              ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here")
        check_device_index(device)
        setting = AdapterSetting(
            target_modules=tuple(args.target_modules) if args.target_modules else None,
            r_max=args.r_max, init_r=args.init_r, target_rank=args.target_rank,
            adalora_init_r=args.adalora_init_r,
            adapter_dtype=args.adapter_dtype,
            gradient_checkpointing=args.gradient_checkpointing)
        setting.increlora_config()  # validates r_max, init_r and target_rank with clear messages
        methods_for(setting)  # and --adalora-init-r, all before the model loads
        if args.estimate:
            check_estimate_sizes(args.seq_len, args.small_seq)
        with hub_offline(hub_access_off() is not None):  # a hub id not cached fails at once
            spec = build_spec(args.model, args.head, args.dtype)
        if spec.head == "seq-cls":  # trained in full, as `finetune` trains them
            setting = dataclasses.replace(setting, modules_to_save=_trained_head(spec, device))
        rows = memory_breakdown(spec, setting, args.batch_size, args.seq_len, device,
                                quantized=args.quantized, estimate=args.estimate,
                                small_seq=args.small_seq, progress=not args.no_progress,
                                double_quant=args.double_quant)
    except (ValueError, TypeError, AssetUnavailableError) as err:
        return _fail(str(err))
    print(f"{args.model} ({spec.head}, {args.dtype}"
          + (f", {args.quantized} base" if args.quantized != "none" else "")
          + (" (double quantization)" if args.double_quant else "")
          + f"), batch {args.batch_size} x seq {args.seq_len} on {device}"
          + (", gradient checkpointing" if args.gradient_checkpointing else "")
          + "".join(f", {name} trained in full" for name in setting.modules_to_save))
    print(format_table(rows))
    if args.notes:
        print(format_notes(rows))
    if args.json:
        run_fields = _run_fields(args, spec.head, device, setting.modules_to_save)
        print(f"rows written to {write_json([dict(r, **run_fields) for r in rows], args.json)}")
    return 0
