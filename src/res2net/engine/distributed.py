"""torch.distributed setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError, Res2NetError

log = logging.getLogger("res2net.distributed")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` -> this process's CUDA device when there is one, else the CPU."""
    if name == "auto":
        return (
            torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA device is available; use --device cpu")
    return device


def setup(distribute: bool, device: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) when `distribute`.

    A rank that dies or hangs makes collective calls in the others fail after `timeout_s`
    instead of waiting forever. Outside torchrun (the seed's `distribute: True` recipes run as
    one process) it says so in one line and runs one process."""
    if not distribute:
        return DistInfo(0, 1, 0, pick_device(device))
    if not 0 < timeout_s < float("inf"):  # NaN too: a job must never wait for ever
        raise ConfigError(f"dist_timeout is {timeout_s}; it must be a positive number of seconds")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        script = os.path.basename(sys.argv[0]) or "train.py"
        log.info(
            "distribute: True but not launched by torchrun: running one process "
            "(for more: torchrun --nproc_per_node N %s ...)",
            script,
        )
        return DistInfo(0, 1, 0, pick_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world_size, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of `t` over ranks (`t` itself when not distributed)."""
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


# what gloo and NCCL say when another rank died (connection lost) or hangs (timeout)
_PEER_FAILURE = (
    "timed out",
    "timeout",
    "timing out",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote process exited",
    "communicator was aborted",
)


def peer_failure(error: BaseException, info: DistInfo, timeout_s: float) -> Res2NetError | None:
    """A clear error for a collective call that failed because another rank died or hangs
    (None when `error` is something else)."""
    text = str(error)
    if not info.enabled or not isinstance(error, RuntimeError):
        return None
    if not any(s in text.lower() for s in _PEER_FAILURE):
        return None
    detail = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return Res2NetError(
        f"rank {info.rank}: another rank died or did not answer within "
        f"dist_timeout={timeout_s:g}s, so the job "
        f"stops; continue from the last checkpoint with --resume auto [{detail}]"
    )


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
