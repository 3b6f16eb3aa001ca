"""Launch counter of the Triton kernels, so tests can prove the Triton path really ran, and
whether launches only build their kernels (`building_only_active`).

Every host launch function calls `count_launch` with its kernel's name right before launching.
This module does not import triton.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict

_LAUNCHES: Counter = Counter()
# True while `kernels.utils.building_only` is active: a launch then only builds its kernel
# (nothing runs), which the first-use checks must know (their results would be garbage).
_BUILDING_ONLY = [False]


def building_only_active() -> bool:
    """Whether launches currently only build their kernels (`kernels.utils.building_only`)."""
    return _BUILDING_ONLY[0]


def count_launch(kernel_name: str) -> None:
    _LAUNCHES[kernel_name] += 1


def launch_counts() -> Dict[str, int]:
    """A copy of {kernel name: launches since the last reset}."""
    return dict(_LAUNCHES)


def total_launches() -> int:
    """Launches of every kernel since the last reset (the sum of `launch_counts`)."""
    return sum(_LAUNCHES.values())


def reset_launch_counts() -> None:
    _LAUNCHES.clear()
