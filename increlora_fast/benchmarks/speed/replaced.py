"""`replaced`: an attribute of a module or class set to another value within a block, for the
benchmarks that drive the library down a path it would not take on this machine (the fused
optimizer on CPU, per-tensor launches, one penalty path)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` within the block, and what it was again after it."""
    real = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)
