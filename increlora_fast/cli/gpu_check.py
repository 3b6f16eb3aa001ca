"""`increlora-fast gpu-check`: check the GPU path in one command and write the evidence.

On one CUDA GPU (about 6.6 minutes): the kernel correctness suite, a tiny BERT trained eagerly
and with the step replayed from CUDA graphs in fp32, bf16 and fp16 (do they agree?), the main
fine-tune with and without CUDA graphs (eagerly also with the graphed run's padding) and with
LoRA (accuracy, tokens/s), model-level training steps against the frozen floor, peft LoRA
(eager and compiled) and AdaLoRA, the same on a 4-bit base, and the layer benchmark with
launches and host time per call, into ``--out DIR`` as ``gpu_check.json`` and
``gpu_check.md``. ``--dry-run`` runs the same code at toy sizes (on a
machine without CUDA: on CPU, Triton under its interpreter). Needs no network: the
fine-tune's model and data come from ``--assets`` (a copy of ``~/.cache/increlora_fast``, or a
compact one written by ``--pack-assets DIR``, which also packs bitsandbytes for the 4-bit part
from a wheel given with ``--bnb-wheel``).
Exit code 0 when every part passed, 1 when one failed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

from .option_checks import check_device, check_output_path

# The order they run in, the most important first (benchmarks.gpu_check.parts.PARTS).
PART_NAMES = ("kernels", "graphs", "finetune", "model", "qlora", "layer")


# The options of the check itself (flag, dest), which --pack-assets does not read.
CHECK_OPTIONS = (("--out", "out"), ("--dry-run", "dry_run"), ("--device", "device"),
                 ("--parts", "parts"), ("--assets", "assets"))


def _parts(text: str) -> Tuple[str, ...]:
    """The parts ``text`` names, each once, in the order the check runs them (`PART_NAMES`)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PART_NAMES]
    if not parts or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: give a comma-separated subset of "
                                         f"{','.join(PART_NAMES)}")
    return tuple(p for p in PART_NAMES if p in parts)


def _cuda_versions(text: str) -> Tuple[str, ...]:
    versions = tuple(v.strip() for v in text.split(",") if v.strip())
    if not versions or not all(v.isdigit() for v in versions):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: give CUDA versions as torch "
                                         "names its builds, without the dot, e.g. 130 or 128,130")
    return versions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR",
                        help="new folder for gpu_check.json, gpu_check.md and the fine-tune")
    parser.add_argument("--pack-assets", metavar="DIR",
                        help="instead of checking: write a compact copy (model weights in "
                             "float16, about 45 MB) of the assets the check needs into DIR, "
                             "for --assets on another machine (with none of the check's "
                             "options)")
    parser.add_argument("--bnb-wheel", metavar="WHEEL",
                        help="with --pack-assets: also unpack this bitsandbytes wheel (`pip "
                             "download bitsandbytes --no-deps`) into DIR/python for the 4-bit "
                             "part, keeping only the native libraries of --bnb-cuda and the "
                             "CPU (4.3 MiB instead of 123 MB for 0.50.2)")
    parser.add_argument("--bnb-cuda", metavar="V[,V]", type=_cuda_versions, default=None,
                        help="with --bnb-wheel: the CUDA versions of the GPU machine's torch, "
                             "as in its build name (default 130: torch 2.11.0+cu130)")
    parser.add_argument("--assets", metavar="DIR",
                        help="the asset cache to use instead of ~/.cache/increlora_fast (same "
                             "layout: unpacked/ and/or wheels/), read without network; its "
                             "python/ folder, where --pack-assets put one, goes on sys.path")
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes; without CUDA on CPU under the Triton interpreter")
    parser.add_argument("--device", default=None,
                        help="cuda | cuda:N (default: the current CUDA device; cpu for a dry "
                             "run without CUDA)")
    parser.add_argument("--parts", type=_parts, default=PART_NAMES,
                        help="comma-separated subset of " + ",".join(PART_NAMES) + " (default all)")


def _fail(message: str) -> int:
    print(f"increlora-fast gpu-check: error: {message}", file=sys.stderr)
    return 2


def _use_assets(path: str) -> None:
    """Point the asset loader at ``path`` and keep every loader offline; put its python/
    folder (bitsandbytes, packed by ``--bnb-wheel``) first on sys.path."""
    from ..benchmarks.gpu_check.asset_pack import PYTHON_DIR

    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise ValueError(f"--assets {path}: not a folder")
    if not ((root / "unpacked").is_dir() or (root / "wheels").is_dir()):
        raise ValueError(f"--assets {path}: holds neither unpacked/ nor wheels/ (copy "
                         "~/.cache/increlora_fast there after one `increlora-fast finetune`)")
    os.environ["INCRELORA_CACHE"] = str(root)
    python = root / PYTHON_DIR
    if python.is_dir() and str(python) not in sys.path:
        # before the parts ask whether bitsandbytes is importable (transformers and peft cache
        # the answer on their first question)
        sys.path.insert(0, str(python))
        importlib.invalidate_caches()


def _pack(dest: str, bnb_wheel: Optional[str], bnb_cuda: Optional[Tuple[str, ...]]) -> int:
    from ..benchmarks.gpu_check.asset_pack import (BNB_CUDA_DEFAULT, bnb_wheel_members,
                                                   pack_assets, pack_bitsandbytes)
    from ..data import AssetUnavailableError

    cuda = bnb_cuda or BNB_CUDA_DEFAULT
    try:
        check_output_path(dest, "--pack-assets", folder=True)
        if bnb_wheel:
            bnb_wheel_members(Path(bnb_wheel), cuda)  # its errors before the model's packing
        pack_assets(Path(dest))
        if bnb_wheel:
            pack_bitsandbytes(Path(bnb_wheel), Path(dest), cuda)
    except (ValueError, OSError, AssetUnavailableError) as err:
        return _fail(str(err))
    print(f"assets for `gpu-check --assets {dest}` written")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bnb_wheel and not args.pack_assets:
        return _fail("--bnb-wheel goes with --pack-assets DIR")
    if args.bnb_cuda and not args.bnb_wheel:
        return _fail("--bnb-cuda goes with --bnb-wheel WHEEL")
    if args.pack_assets:
        ignored = [option for option, dest in CHECK_OPTIONS
                   if dest in getattr(args, "_given", ())
                   or getattr(args, dest) not in (None, False, PART_NAMES)]
        if ignored:
            return _fail(f"{ignored[0]} sets the check, and --pack-assets DIR only packs the "
                         "assets (no check runs; they are read from ~/.cache/increlora_fast or "
                         "$INCRELORA_CACHE); leave it out")
        return _pack(args.pack_assets, args.bnb_wheel, args.bnb_cuda)
    if not args.out:
        return _fail("--out DIR is required (or --pack-assets DIR)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} is a file; give a new folder")
    try:  # the report is first written after the first part, minutes in
        check_output_path(args.out, "--out", folder=True)
    except ValueError as err:
        return _fail(str(err))
    for name in ("gpu_check.json", "gpu_check.md", "finetune"):  # what the check writes
        if (out / name).exists():
            return _fail(f"--out {out} already holds {name} from an earlier check; give a new "
                         "folder (nothing there is overwritten)")
    try:
        if args.assets:
            _use_assets(args.assets)
    except ValueError as err:
        return _fail(str(err))
    os.environ.setdefault("INCRELORA_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    notes = []
    cuda = torch.cuda.is_available()
    if args.dry_run and not cuda and args.device in (None, "cpu"):
        if "increlora_fast.kernels.lowrank" in sys.modules and \
                os.environ.get("TRITON_INTERPRET") != "1":
            notes.append("the kernels were imported before TRITON_INTERPRET=1 could be set; "
                         "run the dry run in a fresh process")
        os.environ["TRITON_INTERPRET"] = "1"  # before increlora_fast.kernels is imported
    from ..training.device import resolve_device

    try:
        text = args.device or ("cuda" if cuda else "cpu" if args.dry_run else "cuda")
        check_device(args.device, auto=True)
        if not (cuda or args.dry_run):
            raise ValueError(f"--device {text}{'' if args.device else ' (the default)'}: the "
                             f"full check needs a CUDA GPU, and torch {torch.__version__} sees "
                             "none here; --dry-run runs it at toy sizes on CPU")
        device = resolve_device(text)
        if device.type != "cuda" and not args.dry_run:
            raise ValueError(f"--device {text}: the full check needs a CUDA GPU; --dry-run runs "
                             "it at toy sizes on CPU")
    except ValueError as err:
        return _fail(str(err))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    from ..benchmarks.gpu_check.parts import JSON_FILE, MD_FILE, run_gpu_check

    report = run_gpu_check(out, device, args.dry_run, tuple(args.parts),
                           log=lambda line: print(line, flush=True), notes=notes)
    print(f"\ngpu-check {report['status'].upper()}"
          + (f" (failed: {', '.join(report['failed_parts'])})" if report["failed_parts"] else "")
          + (f" (skipped: {', '.join(report['skipped_parts'])})" if report["skipped_parts"]
             else "")
          + f" in {report['seconds']} s; {out / JSON_FILE}, {out / MD_FILE}")
    return 0 if report["status"] == "ok" else 1
