"""The command line shared by the host-time measurements of one model point (`step_host`,
`replay_host`): its options, the refusal to replace a record, the one-line errors and the JSON
written."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence


def parse_point_args(argv: Optional[Sequence[str]], prog: str, description: str, model: str,
                     batch: int, seq_len: int, repeats: int) -> Optional[argparse.Namespace]:
    """``--json PATH --model --batch --seq-len --repeats`` with these defaults; None, after one
    line on stderr, when ``--json`` names a file that exists (never replace a record this run
    did not write)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--json", required=True, metavar="PATH", help="the records to write")
    parser.add_argument("--model", default=model, help=f"model preset (default {model})")
    parser.add_argument("--batch", type=int, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--seq-len", type=int, default=seq_len,
                        help=f"tokens per row (default {seq_len})")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"timed steps (default {repeats})")
    args = parser.parse_args(argv)
    if Path(args.json).exists():
        print(f"error: --json {args.json} exists; give a new path", file=sys.stderr)
        return None
    return args


def write_records(path: str, measure: Callable[[], List[dict]]) -> Optional[List[dict]]:
    """The records ``measure`` returns, written to ``path`` as JSON; None, after one line on
    stderr, when it raised ValueError or RuntimeError (bad options, a wrong environment)."""
    try:
        records = measure()
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return records
