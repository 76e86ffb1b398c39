"""`python tests/reliability_hook.py train ...`: the `res2net` command with faults on cue.

Used by tests/test_reliability.py to stop a training process at an exact point. It registers
a small architecture, `res2net_tiny` (a Res2Net with one block per stage), and reads:

- RELIABILITY_TRACE=FILE: append one line per event ("start", "step N", "eval", "save NAME",
  "replace NAME", "returned" when train() has returned) to FILE, with unbuffered O_APPEND
  writes that survive a SIGKILL.
- RELIABILITY_KILL=POINT:N: SIGKILL this process at the N-th occurrence of POINT:
  `backward` (inside the N-th backward pass: mid-step), `eval` (in the N-th validation, after
  its first batch), `save` (in the N-th checkpoint `torch.save`, after half its bytes reached
  the disk), `replace` (right after the N-th rename of a checkpoint or of `checkpoints.json`),
  `replace:NAME` (right after the N-th rename to NAME, e.g. `replace:checkpoints.json:2`).
  With RELIABILITY_KILL_RANK=R, only the process of rank R (torchrun's RANK) dies.
- RELIABILITY_HANG=RANK:STEP: the process of that rank sleeps for ever after step STEP.
- RELIABILITY_THREADS=N: torch.set_num_threads(N) (the same as the run it is compared with).
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time


def main() -> int:
    import torch

    from res2net.engine import checkpoint, progress
    from res2net.engine import train as train_mod
    from res2net.models import ARCHITECTURES, Res2Net

    ARCHITECTURES.setdefault(
        "res2net_tiny", (Res2Net, dict(layers=(1, 1, 1, 1), base_width=4, scale=4))
    )
    trace_path = os.environ.get("RELIABILITY_TRACE")
    trace_fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if trace_path else None
    point, _, nth = os.environ.get("RELIABILITY_KILL", "").rpartition(":")
    kill_at = int(nth) if nth else 0
    kill_rank = os.environ.get("RELIABILITY_KILL_RANK")
    if kill_rank is not None and os.environ.get("RANK", "0") != kill_rank:
        kill_at = 0
    if os.environ.get("RELIABILITY_THREADS"):
        torch.set_num_threads(int(os.environ["RELIABILITY_THREADS"]))
    counts: dict[str, int] = {}

    def event(name: str, detail: str = "") -> None:
        if trace_fd is not None:
            os.write(trace_fd, f"{name} {detail}".strip().encode() + b"\n")

    def due(name: str) -> bool:
        """Count one occurrence of `name`; True when it is the one to die at."""
        counts[name] = counts.get(name, 0) + 1
        return name == point and counts[name] == kill_at

    def die() -> None:
        event("killed", point)
        os.kill(os.getpid(), signal.SIGKILL)

    event("start")

    real_backward = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        if due("backward"):
            die()
        return real_backward(self, *args, **kwargs)

    torch.Tensor.backward = backward

    real_update = progress.StepReporter.update
    hang_rank, _, hang_step = os.environ.get("RELIABILITY_HANG", "").partition(":")

    def update(self, step, *args, **kwargs):
        real_update(self, step, *args, **kwargs)
        event("step", str(step))
        if hang_step and os.environ.get("RANK") == hang_rank and step == int(hang_step):
            event("hang")
            while True:  # a hung rank: ignores SIGTERM (the stop flag is never read again)
                time.sleep(3600)

    progress.StepReporter.update = update

    real_evaluate = train_mod.evaluate

    def evaluate(model, batches, *args, **kwargs):
        kill_here = due("eval")
        event("eval")

        def batches_then_die():
            for i, batch in enumerate(batches):
                if kill_here and i == 1:
                    die()
                yield batch
            if kill_here:
                die()

        return real_evaluate(model, batches_then_die(), *args, **kwargs)

    train_mod.evaluate = evaluate

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT):
            return real_save(obj, f, *args, **kwargs)
        event("save", os.path.basename(getattr(f, "name", "?")))
        if not due("save"):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    torch.save = save

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        name = os.path.basename(str(dst))
        if name.endswith(".pt") or name == "checkpoints.json":
            event("replace", name)
            if due("replace") | due(f"replace:{name}"):  # both counted
                die()

    os.replace = replace

    real_train = train_mod.train

    def train(cfg):
        result = real_train(cfg)
        event("returned")  # train() is done; what follows is the command printing its results
        return result

    train_mod.train = train

    from res2net.cli.main import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
