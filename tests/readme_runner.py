"""Runs README.md's code blocks in one Python process (one torch import for all of them).

Usage: python -m tests.readme_runner PLAN.json RESULT.json

PLAN.json: {"workdir": ..., "steps": [{"id", "kind": "shell" | "python", "code"}]}. A shell step
is one command line (as tests/test_readme.py runs it): `res2net ...` runs the console entry
point, `python SCRIPT ...` runs the script as `__main__`, anything else (make -n ...) runs in a
shell. A python step is exec'd in a fresh namespace. RESULT.json lists, per step (with the
plan's other keys), its exit code, its output (stdout and stderr as they came, with the log
lines), its stderr alone, its run time and its CPU time (user + system, of this process and the
processes it waited for).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import runpy
import shlex
import subprocess
import sys
import time
import traceback


def _reset_logging() -> None:
    """Each command configures logging afresh, onto the current stderr, as in its own process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)


class _Tee(io.TextIOBase):
    """stderr: written to the step's output, in order with stdout, and kept apart too."""

    def __init__(self, *streams: io.StringIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _run_shell(code: str) -> int:
    argv = shlex.split(code)
    if argv[0] == "res2net":
        from res2net.cli.main import main

        return main(argv[1:]) or 0
    if argv[0] == "python" and argv[1].endswith(".py"):
        sys.argv = argv[1:]
        try:
            runpy.run_path(argv[1], run_name="__main__")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    proc = subprocess.run(code, shell=True, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def main() -> None:
    plan_path, result_path = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    plan = json.loads(open(plan_path).read())
    os.chdir(plan["workdir"])
    own_argv = list(sys.argv)
    results = []
    for step in plan["steps"]:
        out, err = io.StringIO(), io.StringIO()
        _reset_logging()
        start, cpu = time.perf_counter(), _cpu_seconds()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(_Tee(out, err)):
            try:
                if step["kind"] == "python":
                    exec(
                        compile(step["code"], f"README block {step['id']}", "exec"),
                        {"__name__": "__main__"},
                    )
                    rc = 0
                else:
                    rc = _run_shell(step["code"])
            except BaseException:  # noqa: BLE001 - reported with the step, as a traceback
                traceback.print_exc()
                rc = 1
        sys.argv = list(own_argv)  # a script step replaced it
        results.append(
            {
                **step,
                "rc": rc,
                "output": out.getvalue(),
                "stderr": err.getvalue(),
                "seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(_cpu_seconds() - cpu, 1),
            }
        )
        with open(result_path, "w") as f:  # as we go: a crash still reports the steps before
            json.dump(results, f)


if __name__ == "__main__":
    main()
