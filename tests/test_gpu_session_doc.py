"""docs/gpu_session.md's command lines work as written on the machines they run on.

A GPU session has 15 minutes of device time and a start costs one or two: the device command
must not fail on something this CPU can see (an interpreter the image lacks, an option that does
not parse, a pack folder the run does not carry, a report the run does not bring back)."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "gpu_session.md"


def _commands():
    """Each shell block of the doc as one line (continuations joined)."""
    blocks = re.findall(r"```\n(.*?)```", DOC.read_text(), flags=re.S)
    return [" ".join(line.strip().rstrip("\\").strip() for line in block.strip().splitlines())
            for block in blocks]


def _device_command():
    found = [c for c in _commands() if "$OUT" in c and "gpu-check" in c]
    assert len(found) == 1, found
    return found[0]


def _gpu_check_argv(command):
    """The arguments after ``-m increlora_fast`` of the gpu-check call in ``command``."""
    match = re.search(r"(\S+) -m increlora_fast (gpu-check[^|;&]*)", command)
    assert match, command
    return match.group(1), match.group(2).split(" 2>")[0].split()


def test_the_device_command_uses_the_images_python3():
    """The device image's interpreter with PyTorch is ``python3`` (KINDS.md of the device tool:
    'a plain python3 there is the one that holds PyTorch'); a bare ``python`` is not promised
    there, and a command that fails to start costs a machine start."""
    interpreter, _ = _gpu_check_argv(_device_command())
    assert interpreter == "python3", interpreter


def test_the_device_command_parses_and_reads_the_carried_pack(tmp_path):
    from increlora_fast.cli.main import build_parser

    command = _device_command()
    _, argv = _gpu_check_argv(command)
    args = build_parser().parse_args([a.replace("$OUT", str(tmp_path)) for a in argv])
    assert not args.dry_run and args.out and args.assets
    # the pack step writes the folder the device run reads
    packs = [c for c in _commands() if "--pack-assets" in c]
    assert packs and all(f"--pack-assets {args.assets}" in c for c in packs), packs
    # it is git-ignored (so it only travels when carried, and the doc says to carry it)
    ignored = subprocess.run(["git", "check-ignore", "-q", args.assets + "/x"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{args.assets} is not ignored: it would travel uncarried"
    assert re.search(r'carry: \[\s*"' + re.escape(args.assets) + r'"\s*\]', DOC.read_text())


def test_the_device_reports_come_back_from_out():
    """The device tool brings back files at most two folders under $OUT, named in letters,
    digits, '.', '_' and '-': gpu_check.json and gpu_check.md sit in the --out folder."""
    from increlora_fast.benchmarks.gpu_check.parts import JSON_FILE, MD_FILE

    command = _device_command()
    _, argv = _gpu_check_argv(command)
    out = argv[argv.index("--out") + 1]
    assert out.startswith("$OUT/"), out
    depth = out[len("$OUT/"):].strip("/").split("/")
    assert len(depth) <= 1 and all(re.fullmatch(r"[A-Za-z0-9._-]+", d) for d in depth), out
    for name in (JSON_FILE, MD_FILE):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name)


def test_the_device_command_keeps_its_whole_log_in_out():
    """The device tool's reply keeps only the last 12,000 characters of the output, and a
    method that fails inside the model, qlora or layer part leaves its traceback only in the log
    (its record holds one line): the command tees the log into $OUT, where it comes back, and
    keeps gpu-check's exit code (pipefail)."""
    command = _device_command()
    logs = re.findall(r"tee (\$OUT/[A-Za-z0-9._/-]+)", command)
    assert logs and logs[0].count("/") <= 2, command
    assert "pipefail" in command, "without pipefail the run's exit code is tee's"
    assert "PYTHONUNBUFFERED=1" in command, "the log of a run cut by the timeout loses its tail"


def test_the_device_call_names_the_h200_and_the_record_its_machine():
    """The device tool starts an H100 unless the call names ``kind: "nvidia-h200"``; both
    earlier records, the 60,000 tokens/s target and the first-steps comparison the report asks
    for are the H200's. The doc names the kind, and the record's file name says which machine
    ran it (an H100 run copied to ``h200_<date>`` would read as the H200's)."""
    text = DOC.read_text()
    assert 'kind: "nvidia-h200"' in text
    assert "bench/records/h200_<date>_gpu_check.json" not in text, \
        "the record's name must follow the machine the reply names"
