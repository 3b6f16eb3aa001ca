"""Checks shared by the command-line tests."""
from __future__ import annotations


def one_error_line(capsys) -> str:
    """The one line a refused command wrote to stderr (fails on none or several)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]
