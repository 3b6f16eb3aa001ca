"""What `gpu-check` needs on a machine without network, packed into one folder
(``increlora-fast gpu-check --pack-assets DIR``): the fine-tune part's model and data, laid out
as the asset cache, and, from a bitsandbytes wheel (``--bnb-wheel``), the 4-bit part's
bitsandbytes under ``DIR/python``, which ``--assets DIR`` puts on ``sys.path``."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, List, Sequence

PACKED_ASSETS = ("all-MiniLM-L6-v2", "rotten_tomatoes")
# The folder of an asset pack that `gpu-check --assets` puts on sys.path.
PYTHON_DIR = "python"
# bitsandbytes loads the native library named after torch.version.cuda; the GPU machine's torch
# is 2.11.0+cu130 (docs/gpu_session.md).
BNB_CUDA_DEFAULT = ("130",)
_BNB_LIBRARY = re.compile(r"^bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def pack_assets(dest: Path, log: Callable[[str], None] = print) -> Path:
    """Write what the fine-tune part needs into ``dest``, laid out as the asset cache for
    ``--assets``: the packaged model with its weights as float16 (about 45 MB; the run loads
    them as float32) and the Rotten Tomatoes file, read from the local cache."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ...data.assets import ASSETS, locate_asset

    if dest.exists() and any(dest.iterdir()):
        raise ValueError(f"--pack-assets {dest}: the folder is not empty; give a new one")
    for name in PACKED_ASSETS:
        asset = ASSETS[name]
        src = locate_asset(name)
        target = dest / "unpacked" / f"{asset.module}-{asset.version}" / asset.member.rstrip("/")
        if not src.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        else:
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("*.safetensors"))
            for weights in src.glob("*.safetensors"):
                tensors = load_file(str(weights))
                save_file({k: v.half() if v.is_floating_point() else v
                           for k, v in tensors.items()}, str(target / weights.name),
                          metadata={"format": "pt"})
        log(f"{name}: {target}")
    return dest


def bnb_wheel_members(wheel: Path, cuda: Sequence[str]) -> List[str]:
    """The members of the bitsandbytes ``wheel`` that `pack_bitsandbytes` keeps: its Python
    files and metadata (not its RECORD, which lists every library) and, of its native
    libraries (one per CUDA, ROCm and XPU version: 123 MB in 0.50.2), the CPU one and those of
    the CUDA versions ``cuda`` ("130" for CUDA 13.0). ValueError, naming the option, where the
    wheel is not a bitsandbytes wheel or lacks one of those libraries."""
    if not wheel.is_file():
        raise ValueError(f"--bnb-wheel {wheel}: no such file")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        raise ValueError(f"--bnb-wheel {wheel}: not a wheel (not a zip file)") from None
    wanted = {f"cuda{v}" for v in cuda} | {"cpu"}
    keep, libraries = [], set()
    for name in names:
        path = PurePosixPath(name)
        if name.endswith("/") or ".." in path.parts or path.is_absolute():
            continue
        top = path.parts[0]
        library = _BNB_LIBRARY.match(name)
        if library:
            libraries.add(library.group(1))
            if library.group(1) in wanted:
                keep.append(name)
        elif top == "bitsandbytes" or (re.fullmatch(r"bitsandbytes-[^/]+\.dist-info", top)
                                       and path.name != "RECORD"):
            keep.append(name)
    if not any(n.startswith("bitsandbytes/") for n in keep) or \
            not any(".dist-info/" in n for n in keep):
        raise ValueError(f"--bnb-wheel {wheel}: not a bitsandbytes wheel (no bitsandbytes/ "
                         "package with its .dist-info)")
    missing = sorted(wanted - libraries)
    if missing:
        have = ", ".join(sorted(v[4:] for v in libraries if v.startswith("cuda"))) or "none"
        raise ValueError(f"--bnb-wheel {wheel.name}: no libbitsandbytes_{missing[0]} library "
                         f"(--bnb-cuda {','.join(cuda)}; the wheel's CUDA versions: {have})")
    return keep


def pack_bitsandbytes(wheel: Path, dest: Path, cuda: Sequence[str] = BNB_CUDA_DEFAULT,
                      log: Callable[[str], None] = print) -> Path:
    """Unpack the members of ``wheel`` that `bnb_wheel_members` keeps into
    ``dest/python`` (a new folder), importable from there as an installed package is, its
    version readable with importlib.metadata; 4.3 MiB for 0.50.2 with CUDA 13.0."""
    members = bnb_wheel_members(wheel, cuda)
    target = dest / PYTHON_DIR
    if target.exists():
        raise ValueError(f"--pack-assets {dest}: {target} exists already; give a new folder")
    with zipfile.ZipFile(wheel) as archive:
        for name in members:
            archive.extract(name, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"bitsandbytes ({wheel.name}, CUDA {', '.join(cuda)} and CPU libraries, "
        f"{size / 2 ** 20:.1f} MiB): {target}")
    return target
