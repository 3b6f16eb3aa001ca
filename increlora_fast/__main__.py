"""`python -m increlora_fast <command>`: the `increlora-fast` command, from a source tree without
installing (e.g. `python -m increlora_fast gpu-check --out DIR` on a bare CUDA image)."""
import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
