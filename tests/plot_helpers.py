"""Shared by the plot tests."""
from __future__ import annotations


def break_savefig(monkeypatch) -> None:
    """Figure.savefig writes part of a figure to its target, then fails (a full disk, a kill)."""
    from matplotlib.figure import Figure

    def savefig(self, target, *args, **kwargs):
        if hasattr(target, "write"):
            target.write(b"half")
        else:
            with open(target, "wb") as f:
                f.write(b"half")
        raise OSError("No space left on device")
    monkeypatch.setattr(Figure, "savefig", savefig)
