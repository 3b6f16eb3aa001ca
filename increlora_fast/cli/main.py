"""Entry point of the ``increlora-fast`` console command.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``.
Those modules keep torch, transformers and peft imports inside ``run`` so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import List, NoReturn, Optional, Set

DESCRIPTION = ("IncreLoRA fine-tuning with fused Triton kernels: fine-tune a model, benchmark its "
               "speed and memory, check the GPU path. `increlora-fast COMMAND -h` for a "
               "command's options.")
SUBCOMMANDS = {
    "finetune": ("increlora_fast.cli.finetune", "fine-tune a model with IncreLoRA (or a peer)"),
    "bench": ("increlora_fast.cli.bench", "layer- and model-level speed and memory benchmarks"),
    "gpu-check": ("increlora_fast.cli.gpu_check",
                  "one-shot check of the GPU path: kernels, layer, model step, fine-tune"),
    "memory": ("increlora_fast.cli.memory", "where the memory of a fine-tuning step goes, per "
               "method (will it fit?)"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse prints the whole usage above
    them: 45 lines for ``finetune``); its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="increlora-fast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


# Warnings of other libraries that a command's user cannot act on, hidden while it runs:
# peft's PeftModel reads ``model.is_gradient_checkpointing``, which transformers 5.x deprecates,
# so every peft LoRA/AdaLoRA model the command builds (finetune --method lora|adalora, --compare,
# memory, bench) said "use is_activation_checkpointing instead".
THIRD_PARTY_NOISE = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings of the command as one line each (no source location)."""
    return f"increlora-fast: warning: {message}\n"


def given_options(argv: Optional[List[str]]) -> Set[str]:
    """The ``dest`` of every option ``argv`` gives itself, a default's value included (a
    subcommand can then tell ``--batch-size 32`` from no ``--batch-size`` where 32 is the
    default): ``argv`` parsed again with every default suppressed."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_args(argv))) - {"command", "_module"}


def main(argv: Optional[List[str]] = None) -> int:
    """Run the subcommand of ``argv`` (default: the command line); returns the exit code.
    Warnings print as one line each while it runs (`THIRD_PARTY_NOISE` not at all). The
    subcommand's ``args._given`` holds the options ``argv`` gives (`given_options`)."""
    saved = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        with warnings.catch_warnings():
            for message, category in THIRD_PARTY_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            args = build_parser().parse_args(argv)
            args._given = given_options(argv)
            return int(importlib.import_module(args._module).run(args) or 0)
    finally:
        warnings.formatwarning = saved


if __name__ == "__main__":
    sys.exit(main())
