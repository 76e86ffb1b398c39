"""Entry point of the `res2net` command: dispatch to a subcommand and turn errors into one line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from ..errors import Res2NetError
from ..guards import printable
from . import benchmark as benchmark_cmd
from . import cam as cam_cmd
from . import convert as convert_cmd
from . import data as data_cmd
from . import demo as demo_cmd
from . import export as export_cmd
from . import models as models_cmd
from . import predict as predict_cmd
from . import saliency as saliency_cmd
from . import serve as serve_cmd
from . import train as train_cmd
from . import validate as validate_cmd

# Exit codes (README, "Exit codes"): 0 success (also a run stopped by SIGTERM/Ctrl-C after
# saving), 1 training stopped on a NaN/inf loss, 2 bad input or environment (the project's own
# error types, `errors.Res2NetError`: one line on stderr), 130 interrupted outside training.
# Any other exception is a genuine bug and keeps Python's traceback (exit 1).
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

COMMANDS = {
    "train": train_cmd,
    "validate": validate_cmd,
    "predict": predict_cmd,
    "convert": convert_cmd,
    "export": export_cmd,
    "benchmark": benchmark_cmd,
    "data": data_cmd,
    "cam": cam_cmd,
    "saliency": saliency_cmd,
    "serve": serve_cmd,
    "models": models_cmd,
    "demo": demo_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="res2net",
        description="Res2Net models: train, validate, convert, inspect.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show debug logging and full tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(
            sub.add_parser(name, help=module.HELP, description=module.HELP, allow_abbrev=False)
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(COMMANDS[args.command], "ACCEPTS_EXTRA", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)  # interrupts any wait, like Ctrl-C
    try:
        return COMMANDS[args.command].run(args, extra) or 0
    except KeyboardInterrupt:
        print("res2net: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:  # training diverged: the run stopped, its checkpoints kept
        if args.verbose:
            raise
        print(f"res2net {args.command}: stopped: {_one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except Res2NetError as e:
        if args.verbose:
            raise
        print(f"res2net {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _one_line(e: BaseException) -> str:
    """The message of `e`, each line with control characters escaped (a file name cannot drive
    the terminal); for an error raised in a DataLoader worker, its last line, the cause."""
    message = str(e).strip()
    if message.startswith("Caught "):
        message = message.splitlines()[-1]
    return "\n".join(printable(line) for line in message.splitlines()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
