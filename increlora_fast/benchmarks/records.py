"""Benchmark records: one flat dict per measurement, written as JSON and appended to a CSV.

Every record carries the environment it was measured in (device name, library versions, git
commit, date, threads), so records from different machines can sit in one file and one report.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..files import atomic_write_bytes

# The fields every record has; anything else a record holds goes to the CSV's "extra" column.
CSV_COLUMNS = [
    "date", "git_commit", "mode", "level", "method", "shape", "tokens", "r_max", "dtype", "phase",
    "device", "device_type", "status", "median_ms", "mean_ms", "steps_per_s", "peak_mem_mb",
    "mem_kind", "repeats", "torch", "triton", "peft", "transformers", "threads", "note",
]
REQUIRED = ("level", "method", "shape", "dtype", "device", "median_ms", "peak_mem_mb", "torch",
            "triton", "date", "git_commit")


def package_version(dist: str) -> Optional[str]:
    """The installed version of the distribution ``dist``, None where it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str:
    """HEAD of the checkout this package runs from, ``+dirty`` when tracked files differ."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def environment(device: torch.device, mode: str) -> Dict[str, object]:
    """The fields shared by every record of one run."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": _git_commit(),
        "mode": mode,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "peft": package_version("peft"),
        "transformers": package_version("transformers"),
        "threads": torch.get_num_threads(),
    }


def command_line(subcommand: str) -> str:
    """This process's ``increlora-fast <subcommand> ...`` command line, shell-quoted, for its
    records; ``"(called in-process)"`` when the process was not started as that command."""
    if len(sys.argv) > 1 and sys.argv[1] == subcommand:
        return f"increlora-fast {subcommand} " + " ".join(map(shlex.quote, sys.argv[2:]))
    return "(called in-process)"


def check_record(record: dict) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"a benchmark record is a JSON object, not {record!r}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"benchmark record lacks {missing}: {record}")


def write_json(records: List[dict], path: str) -> None:
    for r in records:
        check_record(r)
    text = json.dumps(records, indent=1)  # whole, before the file is touched
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), text.encode())  # never half-written, even when cut off


GPU_CHECK_KIND = "gpu_check"


def gpu_check_records(report: dict) -> List[dict]:
    """The layer, host, dy-pass, model and 4-bit model records inside a `gpu-check` report
    (``gpu_check.json``)."""
    parts = report.get("parts", {})
    layer = parts.get("layer", {})
    return ([r for name in ("layer", "model", "qlora")
             for r in parts.get(name, {}).get("records", [])]
            + layer.get("host_records", []) + layer.get("dy_pass_records", []))


def read_report(path: str) -> Tuple[List[dict], Optional[dict]]:
    """(records, gpu-check report or None) of a file written by ``bench --json`` (a JSON list
    of records) or by ``gpu-check`` (``gpu_check.json``: its layer and model records)."""
    with open(path) as f:
        data = json.load(f)
    report = None
    if isinstance(data, dict) and data.get("kind") == GPU_CHECK_KIND:
        report, records = data, gpu_check_records(data)
    elif isinstance(data, list):
        records = data
    else:
        raise ValueError(f"{path}: expected a JSON list of benchmark records or a gpu-check "
                         f"report ({GPU_CHECK_KIND}.json)")
    for r in records:
        check_record(r)
    return records, report


def read_json(path: str) -> List[dict]:
    """The benchmark records of ``path`` (see `read_report`)."""
    return read_report(path)[0]


CSV_HEADER = ",".join(CSV_COLUMNS + ["extra"])


def appendable_csv(path: str) -> bool:
    """Whether `append_csv` may add rows to ``path``: it does not exist, is empty, or begins
    with this module's CSV header (an earlier output of `append_csv`)."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return True
    try:
        with open(p, newline="", encoding="utf-8") as f:
            return f.readline().rstrip("\r\n") == CSV_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def append_csv(records: Iterable[dict], path: str) -> None:
    """Append records to ``path`` (header written when the file is new or empty)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    new = not p.exists() or p.stat().st_size == 0
    with open(p, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS + ["extra"])
        if new:
            writer.writeheader()
        for r in records:
            row = {k: r.get(k) for k in CSV_COLUMNS}
            extra = {k: v for k, v in r.items() if k not in CSV_COLUMNS}
            row["extra"] = json.dumps(extra, sort_keys=True) if extra else ""
            writer.writerow(row)
