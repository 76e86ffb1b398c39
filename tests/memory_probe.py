"""Memory measurements of decodes, each in a process of its own, forked from one interpreter:
the tests' probes read the peak resident memory, which needs a process that has done nothing
else, and a fresh interpreter per measurement paid the imports (torch among them, ~3 CPU-s)
every time. A child forked after the imports starts where a fresh process does once it has
imported them (the same pages resident, the same peak), and has none of the memory the other
measurements took."""

from __future__ import annotations

import json
import subprocess
import sys

RUNNER = """
import json, os, sys, traceback
import res2net.data  # what every probe imports first, imported once here

probe = sys.argv[1]
results = []
for args in json.load(sys.stdin):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the measurement: the probe as `python -c probe *args` would run it
        code = 1
        try:
            os.close(read)
            os.dup2(write, 1)
            sys.argv = ["-c", *args]
            exec(compile(probe, "<probe>", "exec"), {"__name__": "__main__"})
            sys.stdout.flush()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as out:
        results.append(out.read())
    if os.waitpid(pid, 0)[1]:
        sys.exit(f"the probe failed for {args}")
print(json.dumps(results))
"""


def run_probes(probe: str, jobs: list[list[str]]) -> list[str]:
    """What `python -c probe *args` prints for each `args` of `jobs`, each run in a child
    forked from one interpreter that has imported `res2net.data`."""
    out = subprocess.run(
        [sys.executable, "-c", RUNNER, probe],
        input=json.dumps([[str(a) for a in args] for args in jobs]),
        capture_output=True,
        text=True,
        timeout=300,  # a hung probe fails its test instead of holding up the suite
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
