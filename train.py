"""MindCV-compatible entry point: `python train.py -c CONFIG ...` (README:
"Training and validation").

Run from a clone, it uses the clone's package (src/), as hubconf.py does; its dependencies come
from the environment (`make demo` installs them into .venv: `. .venv/bin/activate` first)."""

import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

try:
    from res2net.cli.main import main
except ModuleNotFoundError as e:  # e.g. the system python, without the project's dependencies
    sys.exit(f"train.py: {e}: run `make demo` (it creates .venv), then `. .venv/bin/activate`")

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
