"""What the `gpu-check` fine-tune part needs on a machine without network, packed into one
folder (``increlora-fast gpu-check --pack-assets DIR``), laid out as the asset cache."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

PACKED_ASSETS = ("all-MiniLM-L6-v2", "rotten_tomatoes")


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
