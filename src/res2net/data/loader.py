"""Deterministic DataLoaders: the order and the augmentations of epoch k depend only on
(seed, k), not on the number of workers or on what ran before.

How it works. `EpochSampler` draws, for each epoch, a permutation of the dataset and one random
seed per sample, both from a generator seeded with (seed, epoch), and yields (index, sample_seed)
keys. `SeededDataset` seeds torch's, Python's and NumPy's RNGs with `sample_seed` while it reads
and transforms that sample (and, in the main process, restores them afterwards). So:

* the same seed gives the same order and the same augmented images run to run, with any
  `num_workers` (0 included) and with persistent workers;
* resuming at epoch k (calling `loader.set_epoch(k)` before iterating, as on every
  epoch) reproduces epoch k's order and augmentations exactly;
* loading data never moves the training loop's own RNG state;
* with several ranks, each sample keeps its augmentation whatever rank it lands on.

Resuming in the middle of an epoch: `set_epoch(k, start=batches_done * batch_size)` skips
exactly the samples already seen, and the rest come with their original augmentations.

This replaces the usual `worker_init_fn` seeding: DataLoader already seeds each worker from its
`generator`, but a worker's RNG then carries over from epoch to epoch (persistent workers) and
its stream depends on how samples are spread over workers; per-sample seeds have neither issue.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import random
import signal
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ..errors import DataError

log = logging.getLogger("res2net.data")
_capped_notes: set[tuple[int, int]] = set()


def cap_workers(requested: int, *, announce: bool = True) -> int:
    """DataLoader workers: `requested`, at most the CPU cores this process may use (PyTorch's
    own suggested maximum; recipes written for 8-card servers ask for 8). Says so once."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    if requested <= cores:
        return requested
    if announce and (requested, cores) not in _capped_notes:
        _capped_notes.add((requested, cores))
        log.info(
            "num_parallel_workers %d > %d CPU cores here: using %d workers", requested, cores, cores
        )
    return cores


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch `epoch`'s order and sample seeds."""
    # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated streams
    # (seed + epoch, as DistributedSampler does, would make (0, 1) equal (1, 0)).
    state = np.random.SeedSequence([seed % 2**32, epoch % 2**32]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (index, sample_seed) keys for one epoch; call `set_epoch(epoch)` before each epoch.

    The order is a permutation seeded by (seed, epoch) (or 0..n-1 when `shuffle` is False). With
    `num_replicas` > 1 (distributed training), this rank gets every `num_replicas`-th index from
    position `rank`, after the order is padded by repeating its start to a multiple of
    `num_replicas` (or cut to one, with `drop_last`), as `DistributedSampler` does.

    `repeats` > 1 is repeated augmentation as MindCV's `RepeatAugSampler` does it: each index
    of the permutation appears `repeats` times in a row, the ranks take every
    `num_replicas`-th position, and each rank's epoch keeps the length of a plain epoch, so an
    epoch covers 1/`repeats` of the images, each `repeats` times. Every copy gets its own seed
    (its own augmentation), and consecutive copies land on different ranks.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        repeats: int = 1,
    ) -> None:
        if repeats < 1:
            raise DataError(f"repeats must be >= 1, not {repeats}")
        if not 0 <= rank < num_replicas:
            raise DataError(f"rank must be in [0, {num_replicas}), not {rank}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.repeats = repeats
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order and augmentations the next iteration produces; `start`
        skips that many of this rank's samples (resuming mid-epoch: batches done x batch size).
        `len()` still counts the whole epoch."""
        if start < 0:
            raise DataError(f"start must be >= 0, not {start}")
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        n, r = self.num_samples, self.num_replicas
        return n // r if self.drop_last else -(-n // r)

    def indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in order (from position 0)."""
        return self._order(epoch_generator(self.seed, self.epoch)).tolist()

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = self.num_samples
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        if self.repeats > 1:
            return order.repeat_interleave(self.repeats)[self._repeat_positions()]
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            if total > n:
                order = torch.cat([order] * (-(-total // n)))
            order = order[:total][self.rank :: self.num_replicas]
        return order

    def _repeat_positions(self) -> torch.Tensor:
        """This rank's positions in the repeated order (each index `repeats` times in a row),
        padded by wrapping to a multiple of the ranks, one in `num_replicas` from `rank`, cut to
        one epoch's length: MindCV's RepeatAugSampler."""
        r, size = self.num_replicas, self.num_samples * self.repeats
        total = -(-size // r) * r
        return (torch.arange(total) % size)[self.rank :: r][: len(self)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = epoch_generator(self.seed, self.epoch)
        if self.repeats > 1:
            # One seed per position of the repeated order: every copy is augmented anew.
            order = self._order(g).tolist()
            size = self.num_samples * self.repeats
            seeds = torch.randint(0, 2**62, (size,), generator=g).tolist()
            positions = self._repeat_positions().tolist()
            for i, pos in zip(order[self.start :], positions[self.start :]):
                yield i, seeds[pos]
            return
        order = self._order(g).tolist()
        # One seed per dataset index (not per position), drawn after the order.
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=g).tolist()
        for i in order[self.start :]:
            yield i, seeds[i]


# The signals that ask a run to stop. A terminal's Ctrl-C, `docker stop`, SLURM's scancel and
# torchrun deliver them to every process of the group, DataLoader workers included.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back while DataLoader workers start (wrap `iter(loader)`): a worker
    inherits the blocked mask, so no stop signal can kill it before `ignore_stop_signals` runs.
    A signal that arrives meanwhile is delivered to this process when the block ends."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    except ValueError:  # not available here (no such call on this platform)
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """`worker_init_fn` of every loader: a worker ignores SIGTERM/SIGINT, so that a signal sent
    to the whole process group reaches the main process alone, which stops at a step boundary
    and shuts its workers down (they also exit when the main process dies)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(ValueError):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones are dropped


def _end_leftover_workers() -> None:
    """At exit: kill the loader workers still alive. They ignore SIGTERM, the only signal
    multiprocessing's own exit handler sends them before it waits for them, so a loader
    iterator that outlives the run (kept by a reference somewhere) would hang the exit."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# registered after multiprocessing's exit handler (torch imported it above), so it runs first
atexit.register(_end_leftover_workers)


def seed_all(seed: int) -> None:
    """Seed torch's CPU, Python's and NumPy's RNGs."""
    # torch.default_generator, not torch.manual_seed: CPU only, and ~100x faster per call.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def rngs_restored() -> Iterator[None]:
    """The block may reseed torch's CPU, Python's and NumPy's RNGs: in the main process their
    previous states are restored afterwards. A DataLoader worker's RNGs are its own: nothing to
    restore. Saving and restoring NumPy's state costs ~50 us, so datasets do it once per batch."""
    if get_worker_info() is not None:
        yield
        return
    torch_state = torch.get_rng_state()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """The block runs with torch's CPU, Python's and NumPy's RNGs seeded by `seed`; in the main
    process their previous states are restored afterwards (see `rngs_restored`)."""
    with rngs_restored():
        seed_all(seed)
        yield


class EpochLoader(Protocol):
    """What the training loop needs of a loader, folder (`build_loader`) or shards
    (`build_shard_loader`): the batches of one epoch, chosen by `set_epoch` (`start`: samples
    of this rank to skip, when resuming mid-epoch), their number, and the dataset."""

    dataset: Any

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...


def end_workers(loader: object) -> None:
    """End the persistent workers of a DataLoader now (nothing to do for other loaders).

    Left to the garbage collector, a loader iterator caught in a reference cycle is collected
    together with its index queues, and the queues' weakref finalizers run first: their feeder
    threads stop, so the shutdown message the iterator then sends never reaches the workers,
    and ending them costs two 5-second join timeouts each (about 20 s with 2 workers)."""
    iterator = getattr(loader, "_iterator", None)
    if isinstance(loader, DataLoader) and iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()


class FolderLoader(DataLoader):
    """`build_loader`'s DataLoader: an `EpochLoader` whose `set_epoch` selects the epoch of its
    `EpochSampler`."""

    sampler: EpochSampler

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.sampler.set_epoch(epoch, start=start)


class SeededDataset(Dataset):
    """Wraps a map-style dataset to take (index, sample_seed) keys from `EpochSampler`: the
    sample is read with the RNGs (torch CPU, `random`, `numpy.random`) seeded by sample_seed;
    in the main process (num_workers=0) their previous state is restored afterwards. Other
    attributes (`classes`, `samples`, `num_classes`, ...) are those of the wrapped dataset,
    which is also available as `.dataset`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, sample_seed = key
        with seeded_rngs(sample_seed):
            return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Any]:
        """A batch (DataLoader asks for whole batches): each sample as `__getitem__` reads it,
        the main process's RNG states saved and restored once for the batch."""
        samples = []
        with rngs_restored():
            for index, sample_seed in keys:
                seed_all(sample_seed)
                samples.append(self.dataset[index])
        return samples

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = True,
    drop_remainder: bool = False,
    num_workers: int = 0,
    seed: int = 42,
    distributed: bool = False,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    collate_fn: Any = None,
    aug_repeats: int = 0,
) -> FolderLoader:
    """A DataLoader over `dataset` whose order and augmentations depend only on (seed, epoch).

    Call `loader.set_epoch(epoch)` before iterating each epoch (resume included).
    `distributed=True` splits every epoch across the ranks of the initialized default process
    group (`torch.distributed`); each rank gets len(dataset) / world_size samples, rounded up
    by repeating a few. `pin_memory` defaults to CUDA being available and `persistent_workers`
    to `num_workers > 0`. `loader.dataset` is a `SeededDataset` around `dataset`.
    `aug_repeats` > 1: repeated augmentation (see `EpochSampler`), MindCV's `aug_repeats`.
    """
    num_replicas, rank = 1, 0
    if distributed:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs an initialized process group")
        num_replicas, rank = dist.get_world_size(), dist.get_rank()
    sampler = EpochSampler(
        len(dataset),  # type: ignore[arg-type]
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        repeats=max(aug_repeats, 1),
    )
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return FolderLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_remainder,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # seeds the workers' own RNGs too
        collate_fn=collate_fn,
        worker_init_fn=ignore_stop_signals,
    )
