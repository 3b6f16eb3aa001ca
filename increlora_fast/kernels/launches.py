"""Launch counter of the Triton kernels, so tests can prove the Triton path really ran.

Every host launch function calls `count_launch` with its kernel's name right before launching.
This module does not import triton.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict

_LAUNCHES: Counter = Counter()


def count_launch(kernel_name: str) -> None:
    _LAUNCHES[kernel_name] += 1


def launch_counts() -> Dict[str, int]:
    """A copy of {kernel name: launches since the last reset}."""
    return dict(_LAUNCHES)


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
