"""The training loop, readable top to bottom: data -> model -> optimizer -> epochs -> results.

One `Config` describes the whole run (MindCV's keys). `train` prepares the run folder (lock,
checks) and builds data, model and optimizer; then each epoch is `train_one_epoch` (steps of
micro-batches) and `end_epoch` (data check, validation, metrics, checkpoint). `TrainState` is
everything that changes while training; its `state_dict()` is `last.pt`. Resuming (`resume:
auto` or a path) restores model, optimizer, GradScaler, EMA, schedule position, RNG state, the
position in the epoch and the epoch's running sums, so a resumed run ends with the same weights
and metrics as an uninterrupted one (bit for bit on CPU).

The host waits for the device only at log intervals and at the end of an epoch (loss value,
NaN check), and, in distributed runs, once a step for the ranks to agree on a stop request.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import signal
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import fileio
from ..config import KEYS, Config
from ..data import (
    BadImageReport,
    ImageFolderDataset,
    build_loader,
    build_shard_loader,
    cap_workers,
    eval_transform,
    find_split,
    is_shard_dir,
    mixup_cutmix,
    train_transform,
)
from ..data.loader import EpochLoader, end_workers, stop_signals_blocked
from ..data.shards import ShardDataset
from ..errors import ConfigError
from ..factory import create_model
from ..guards import short
from ..profile import count_params
from ..schema import REFERENCE_BATCH_SIZE
from . import distributed
from .checkpoint import CheckpointManager, RunLock, load_training_state, new_run_id
from .evaluate import EvalResult, eval_loader, evaluate, reduce_result
from .optim import build_optimizer, set_lr
from .progress import MetricsLog, StepReporter, plot_run
from .schedules import LrSchedule
from .tracking import Trackers, parse_backends

log = logging.getLogger("res2net.train")
# an epoch's loss this many times an untrained model's (ln classes) means the run diverges
DIVERGED_FACTOR = 10.0


@dataclass
class TrainResult:
    """What a finished (or interrupted) run produced."""

    ckpt_dir: Path
    epochs_done: int
    interrupted: bool = False
    best_top1: float | None = None
    best_path: Path | None = None
    last_path: Path | None = None
    plot_path: Path | None = None
    row: dict[str, Any] = field(default_factory=dict)


class StopRequest:
    """Turns SIGTERM / Ctrl-C into a flag the loop checks at every step boundary. `train`
    holds it from its first line to its last, so a SIGTERM during setup stops the run at the
    first step boundary, and one after the last step lets it finish: exit code 0 either way."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def build_loaders(
    cfg: Config, dist: distributed.DistInfo
) -> tuple[EpochLoader, ImageFolderDataset | ShardDataset, Iterable[Any] | None]:
    """(train loader, train dataset, val loader or None) for an ImageNet-style folder or a
    folder/URL of WebDataset shards. Train: MindCV's train transform, this rank's share of each
    epoch. Val: the eval transform, the training classes, every image exactly once over ranks."""
    train_tf = train_transform(
        cfg.image_resize,
        scale=cfg.scale,
        ratio=cfg.ratio,
        interpolation=cfg.interpolation,
        hflip=cfg.hflip,
        vflip=cfg.vflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.auto_augment,
        re_prob=cfg.re_prob,
        re_scale=cfg.re_scale,
        re_ratio=cfg.re_ratio,
        re_value=cfg.re_value,
        mean=cfg.mean,
        std=cfg.std,
        fast_decode=cfg.fast_decode,
    )
    eval_tf = eval_transform(
        cfg.image_resize,
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
    )
    workers = cap_workers(cfg.num_parallel_workers, announce=dist.is_main)
    on_bad_image = cfg.on_bad_image
    train_loader: EpochLoader
    val_loader: Iterable[Any] | None
    if is_shard_dir(cfg.data_dir, cfg.train_split):
        if cfg.num_samples is not None:
            raise ConfigError(
                "num_samples is not supported with sharded data; shard a subset instead"
            )
        if cfg.aug_repeats > 1:
            raise ConfigError("aug_repeats is not supported with sharded data; use an image folder")
        shard_kw: dict[str, Any] = dict(
            rank=dist.rank,
            world_size=dist.world_size,
            on_bad_image=on_bad_image,
            batch_size=cfg.batch_size,
            num_workers=workers,
            seed=cfg.seed,
        )
        train_loader, _ = build_shard_loader(
            cfg.data_dir,
            transform=train_tf,
            training=True,
            split=cfg.train_split,
            shuffle=cfg.shuffle,
            drop_last=cfg.drop_remainder,
            **shard_kw,
        )
        train_ds = train_loader.dataset
        val_loader = None
        if cfg.val_while_train:
            val_loader, _ = build_shard_loader(
                cfg.data_dir,
                transform=eval_tf,
                training=False,
                split=cfg.val_split,
                class_to_idx=train_ds.class_to_idx,
                **shard_kw,
            )
        return train_loader, train_ds, val_loader
    train_ds = ImageFolderDataset(
        cfg.data_dir,
        cfg.train_split,
        transform=train_tf,
        on_bad_image=on_bad_image,
        num_samples=cfg.num_samples,
        seed=cfg.seed,
    )
    train_loader = build_loader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=cfg.shuffle,
        drop_remainder=cfg.drop_remainder,
        num_workers=workers,
        seed=cfg.seed,
        distributed=dist.enabled,
        aug_repeats=cfg.aug_repeats,
    )
    val_loader = None
    if cfg.val_while_train:
        val_ds = ImageFolderDataset(
            cfg.data_dir,
            cfg.val_split,
            transform=eval_tf,
            class_to_idx=train_ds.class_to_idx,
            on_bad_image=on_bad_image,
        )
        val_loader = eval_loader(val_ds, batch_size=cfg.batch_size, num_workers=workers, dist=dist)
    return train_loader, train_ds, val_loader


def check_num_classes(cfg: Config, dataset: ImageFolderDataset | ShardDataset) -> int:
    """The class count to build the model with; a recipe that disagrees with the data is an
    error."""
    if cfg.num_classes is not None and cfg.num_classes != dataset.num_classes:
        raise ConfigError(
            f"num_classes is {cfg.num_classes} but {cfg.data_dir}/{cfg.train_split} has "
            f"{dataset.num_classes} "
            f"class folders; pass --num_classes {dataset.num_classes} (a new classifier is "
            "trained) or fix the data"
        )
    return dataset.num_classes


def train(cfg: Config) -> TrainResult:
    """Run the training described by `cfg`; see the module docstring."""
    with StopRequest() as stop:
        dist = distributed.setup(cfg.distribute, cfg.device, cfg.dist_timeout)
        if not is_shard_dir(cfg.data_dir, cfg.train_split):
            # a wrong data_dir is refused before the run folder is made or locked
            find_split(cfg.data_dir, cfg.train_split)
        lock = RunLock(cfg.ckpt_save_dir)
        try:
            run = prepare_run_dir(cfg, lock) if dist.is_main else None
            return _train(cfg, dist, stop, run)
        except RuntimeError as e:
            clear = distributed.peer_failure(e, dist, cfg.dist_timeout)
            if clear is None:
                raise
            raise clear from e
        finally:
            lock.release()
            distributed.teardown(dist)
            # end this run's DataLoader workers now, in this process: a loader iterator left in
            # a reference cycle is inherited by the next loader's forked workers (the demo's
            # validation), whose garbage collection then fails to shut it down there. Without
            # workers there is nothing to end (a full collection costs ~0.1-0.4 s).
            if cfg.num_parallel_workers > 0:
                gc.collect()


@dataclass
class RunStart:
    """What `prepare_run_dir` found: the run's id and, when the run resumes from `last.pt`, the
    training state read from it there (read once; `take_resume_state` hands it over, so that it
    is not kept for the whole run)."""

    run_id: str
    resume_state: dict[str, Any] | None = None

    def take_resume_state(self) -> dict[str, Any] | None:
        state, self.resume_state = self.resume_state, None
        return state


def prepare_run_dir(cfg: Config, lock: RunLock) -> RunStart:
    """Before any work: `ckpt_save_dir` writable and locked for this run, no link or pipe at a
    name the run writes, its index agreeing with its files, and a fresh run never mixed into
    another run's files (`overwrite` moves them aside, never deletes). Returns the run's id,
    and the state of `last.pt` when the run resumes from it (the file is read once)."""
    ckpts = checkpoint_manager(cfg)
    ckpts.check_writable()
    lock.acquire()
    # a run continues only from a `last.pt` whose header names it; anything else is a fresh
    # run, which never takes an id from the index and never mixes into another run's files.
    # A damaged or foreign last.pt is refused here, naming it.
    last = None
    if resuming(cfg):
        if ckpts.holds_last():
            # a run that continues moves nothing aside: a planted name is refused before a
            # checkpoint of hundreds of MB is read
            ckpts.check_names(cfg.epoch_size)
        last = ckpts.read_last()
    run_id = ckpts.find_run_id() if last is not None else None
    if last is not None and run_id is None:
        run_id = new_run_id()  # a readable last.pt without a run id: continued as a new run
    if run_id is None:
        _start_fresh(cfg, ckpts)
        run_id = new_run_id()
    ckpts.run_id = run_id
    ckpts.check_names(cfg.epoch_size)
    ckpts.check_epoch_files(cfg.epoch_size)
    for path in ckpts.reconcile():
        log.info("removed %s (left by a write or a rotation that never finished)", path)
    resume_path = _resume_path(cfg, ckpts)
    same = last is not None and resume_path is not None and _same_file(resume_path, ckpts.last)
    return RunStart(run_id, last if same else None)


def _start_fresh(cfg: Config, ckpts: CheckpointManager) -> None:
    """Refuse a folder holding another run's files, or move them aside (`overwrite`, or
    `--resume auto` finding nothing at last.pt)."""
    found = ckpts.run_files()
    if not found:
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    if cfg.resume == "auto" and not os.path.lexists(ckpts.last):
        # no last.pt: nothing to continue (a run killed before its first commit leaves its log
        # and epoch file); starting over must neither refuse (a restart would fail forever)
        # nor lose what is there. Anything else at last.pt is refused below.
        aside = fileio.move_aside(ckpts.directory, [p.name for p in found])
        log.warning("--resume auto: no last.pt to continue; the files here moved to %s", aside)
        return
    if resuming(cfg):
        explicit = _resume_path(cfg, ckpts) if cfg.resume != "auto" else None
        if explicit is not None and any(_same_file(explicit, p) for p in found):
            raise ConfigError(
                f"ckpt_save_dir {cfg.ckpt_save_dir!r} has no last.pt to continue, and the file "
                f"to resume from ({explicit}) is one of its run's files; copy it elsewhere "
                "and resume from the copy, or choose a new --ckpt_save_dir"
            )
        if not cfg.overwrite:
            raise ConfigError(
                f"ckpt_save_dir {cfg.ckpt_save_dir!r} has no last.pt to continue but holds "
                f"another run's files ({names}); choose a new --ckpt_save_dir, or pass "
                "--overwrite True to move them aside and start over"
            )
    elif not cfg.overwrite:
        raise ConfigError(
            f"ckpt_save_dir {cfg.ckpt_save_dir!r} holds another run's files ({names}); "
            "continue it with --resume auto, choose a new --ckpt_save_dir, "
            "or pass --overwrite True to move them aside and start over"
        )
    aside = fileio.move_aside(ckpts.directory, [p.name for p in found])
    if aside is not None:
        log.warning("overwrite: the previous run's files were moved to %s", aside)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def checkpoint_manager(cfg: Config, run_id: str | None = None) -> CheckpointManager:
    return CheckpointManager(
        cfg.ckpt_save_dir,
        prefix=cfg.model,
        keep_max=cfg.keep_checkpoint_max,
        policy=cfg.ckpt_save_policy,
        run_id=run_id,
    )


def resuming(cfg: Config) -> bool:
    """Whether this run continues an earlier one (`--resume`, or MindCV's `resume_opt`)."""
    return bool(cfg.resume) or bool(cfg.ckpt_path and cfg.resume_opt)


def new_epoch_sums() -> dict[str, float]:
    """Running sums of an epoch over all ranks: training loss x images and trained images
    (for `train_loss`), images delivered and images unreadable (for `min_readable_images`)."""
    return {"loss_sum": 0.0, "loss_n": 0, "images": 0, "bad": 0}


@dataclass
class TrainState:
    """What changes while a run trains: `state_dict()` is the content of a training checkpoint,
    `load_state_dict()` continues from one (bit for bit on CPU, mid-epoch included)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    meta: dict[str, Any]  # arch, num_classes, classes, config: what the checkpoint describes
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch consumed (a multiple of accumulation)
    global_step: int = 0  # optimizer steps taken
    best_top1: float | None = None
    sums: dict[str, float] = field(default_factory=new_epoch_sums)  # the epoch so far

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.meta,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_top1": self.best_top1,
            "epoch_sums": dict(self.sums),
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step, self.best_top1 = state["global_step"], state.get("best_top1")
        self.sums = {**new_epoch_sums(), **state.get("epoch_sums", {})}  # older files: none
        torch.set_rng_state(state["rng"]["torch"])


@dataclass
class StepParts:
    """What one training step runs, built once per run."""

    train_model: nn.Module  # the model, DDP-wrapped when distributed (what `no_sync` is on)
    forward: Any  # train_model as called: compiled, or itself
    schedule: LrSchedule
    loss_fn: Any
    mixer: Any  # mixup/cutmix on the batch, or None
    amp_dtype: torch.dtype | None
    dist: distributed.DistInfo


def _train(
    cfg: Config, dist: distributed.DistInfo, stop: StopRequest, run: RunStart | None
) -> TrainResult:
    device = dist.device
    torch.manual_seed(cfg.seed)
    if dist.is_main:
        for note in config_notes(cfg):
            log.info("config: %s", note)
    ckpts = checkpoint_manager(cfg, run.run_id if run is not None else None)

    # ---- data
    train_loader, train_ds, val_loader = build_loaders(cfg, dist)
    num_classes = check_num_classes(cfg, train_ds)
    steps_per_epoch = len(train_loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{len(train_ds)} training images give no full step of batch_size {cfg.batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation; lower --batch_size or set "
            "--drop_remainder False"
        )
    mixer = mixup_cutmix(
        num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        cutmix_prob=cfg.cutmix_prob,
        label_smoothing=cfg.label_smoothing,
    )

    # ---- model
    resume_path = _resume_path(cfg, ckpts)
    init_ckpt = cfg.ckpt_path if cfg.ckpt_path and resume_path is None else None
    model = create_model(
        cfg.model,
        num_classes=num_classes,
        in_chans=cfg.in_channels,
        drop_rate=cfg.drop_rate or 0.0,
        drop_path_rate=cfg.drop_path_rate or 0.0,
        zero_init_last=cfg.zero_init_last,
        pretrained=cfg.pretrained,
        checkpoint_path=init_ckpt or None,
    ).to(device)
    if cfg.channels_last or (dist.enabled and device.type == "cpu"):
        # on CPU the nets compute in channels_last (create_model's CPU layout): weights in the same
        # layout give gradients whose strides match DDP's buckets
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ConfigError(
                "sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); use --freeze_bn True or "
                "--sync_bn False on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema
        else None
    )
    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(train_model) if use_compile(cfg, device.type) else train_model

    # ---- optimizer, schedule, precision
    world = dist.world_size
    lr_factor = lr_scale_factor(cfg, world)
    batch = global_batch(cfg, world)
    if dist.is_main and batch != REFERENCE_BATCH_SIZE and (lr_factor != 1 or cfg.opt in SGD_FAMILY):
        log.info(
            "global batch is %d (recipe reference: %d)%s",
            batch,
            REFERENCE_BATCH_SIZE,
            f"; lr scaled by {lr_factor:.4g} (lr_scale: linear)"
            if lr_factor != 1
            else "; consider --lr_scale linear to scale lr with it",
        )
    schedule = LrSchedule(
        scheduler=cfg.scheduler,
        lr=cfg.lr * lr_factor,
        steps_per_epoch=steps_per_epoch,
        min_lr=cfg.min_lr * lr_factor,
        warmup_epochs=cfg.warmup_epochs,
        warmup_factor=cfg.warmup_factor,
        decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate,
        milestones=cfg.multi_step_decay_milestones,
        num_cycles=cfg.num_cycles,
        cycle_decay=cfg.cycle_decay,
        lr_epoch_stair=cfg.lr_epoch_stair,
        epochs=cfg.epoch_size,
    )
    optimizer = build_optimizer(
        model,
        opt=cfg.opt,
        lr=schedule(0),
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        nesterov=cfg.use_nesterov,
        eps=cfg.eps,
        weight_decay_filter=cfg.weight_decay_filter,
        layer_decay=cfg.layer_decay,
    )
    scaler = torch.amp.GradScaler(
        device.type,
        init_scale=grad_scaler_init_scale(cfg),
        enabled=use_grad_scaler(cfg, device.type),
    )
    meta = {
        "arch": cfg.model,
        "num_classes": num_classes,
        "classes": train_ds.classes,
        "config": cfg.to_dict(),
    }
    state = TrainState(model=model, optimizer=optimizer, scaler=scaler, ema=ema, meta=meta)
    parts = StepParts(
        train_model=train_model,
        forward=forward,
        schedule=schedule,
        loss_fn=_loss(cfg, mixer is not None),
        mixer=mixer,
        amp_dtype=amp_dtype(cfg, device.type),
        dist=dist,
    )

    # ---- resume
    if resume_path is not None:
        # --resume, or MindCV's resume_opt with ckpt_path: weights, optimizer and position
        # (last.pt's state was read by prepare_run_dir: not read again)
        resumed = run.take_resume_state() if run is not None else None
        state.load_state_dict(resumed if resumed is not None else load_training_state(resume_path))
        del resumed
        if dist.is_main:
            log.info(
                "resumed from %s at epoch %d, step %d",
                resume_path,
                state.epoch + 1,
                state.global_step,
            )

    trackers = None
    if dist.is_main and parse_backends(cfg.log):
        trackers = Trackers(
            Path(cfg.ckpt_save_dir),
            parse_backends(cfg.log),
            uri=cfg.log_uri,
            project=cfg.log_project,
            run_name=Path(cfg.ckpt_save_dir).name,
        )
        trackers.params(cfg.to_dict())
    try:
        metrics = MetricsLog(Path(cfg.ckpt_save_dir), enabled=dist.is_main, trackers=trackers)
        metrics.rewind(state.global_step)  # work after the checkpoint is redone, not logged twice
        bad = BadImageReport(train_ds)
        n_params = count_params(model)
        step_times: list[float] = []
        interrupted = False
        last_val: EvalResult | None = None
        start_epoch = state.epoch
        if dist.is_main and start_epoch >= cfg.epoch_size:
            log.info(
                "the run in %s has finished its %d epochs: nothing to train",
                cfg.ckpt_save_dir,
                cfg.epoch_size,
            )

        while state.epoch < cfg.epoch_size:
            interrupted = train_one_epoch(
                cfg,
                state,
                parts=parts,
                loader=train_loader,
                bad=bad,
                metrics=metrics,
                stop=stop,
                step_times=step_times,
            )
            if interrupted:
                if dist.is_main:
                    path = ckpts.save_last(state.state_dict())
                    log.info(
                        "stopped at epoch %d, step %d: saved %s; continue with --resume auto",
                        state.epoch + 1,
                        state.batch_in_epoch,
                        path,
                    )
                distributed.barrier(dist)
                break
            last_val = (
                end_epoch(
                    cfg,
                    state,
                    lr=schedule(max(state.global_step - 1, 0)),
                    val_loader=val_loader,
                    bad=bad,
                    ckpts=ckpts,
                    metrics=metrics,
                    dist=dist,
                )
                or last_val
            )
        end_workers(train_loader)  # now, not by the garbage collector (see end_workers)

        result = TrainResult(
            ckpt_dir=Path(cfg.ckpt_save_dir),
            epochs_done=state.epoch,
            interrupted=interrupted,
            best_top1=state.best_top1,
            last_path=ckpts.latest(),
            best_path=ckpts.best if ckpts.best.is_file() else None,
        )
        if dist.is_main and not interrupted and state.epoch > start_epoch:
            result.plot_path = plot_run(metrics.read(), Path(cfg.ckpt_save_dir) / "training.png")
            ms = (
                1000.0 * statistics.median(step_times[1:] or step_times) if step_times else math.nan
            )
            result.row = results_row(
                cfg, n_params=n_params, cards=world, ms_per_step=ms, val=last_val
            )
        metrics.close()
        if trackers is not None:
            trackers.finish(plot=result.plot_path, best=result.best_path, interrupted=interrupted)
    except BaseException as e:  # a crash, or a second signal: the tracked run says so
        end_workers(train_loader)
        if trackers is not None:
            trackers.fail(stopped=isinstance(e, KeyboardInterrupt))
        raise
    return result


# the linear scaling rule (Goyal et al. 2017) is SGD's; Adam-type recipes are tuned as they are
SGD_FAMILY = ("momentum", "sgd", "nesterov")


class FiniteCheck:
    """Losses since the last check, tested for NaN/inf in one host sync (at log intervals and
    before any checkpoint), so that the CPU can run ahead of the device in between."""

    def __init__(self, ckpt_dir: str) -> None:
        self.ckpt_dir = ckpt_dir
        self.pending: list[tuple[str, torch.Tensor]] = []

    def add(self, loss: torch.Tensor, where: str) -> None:
        self.pending.append((where, loss.detach()))

    def check(self) -> None:
        if not self.pending:
            return
        losses = torch.stack([loss.float() for _, loss in self.pending]).cpu()
        pending, self.pending = self.pending, []
        finite = torch.isfinite(losses)
        if bool(finite.all()):
            return
        i = int((~finite).nonzero()[0])
        raise FloatingPointError(
            f"loss is {losses[i].item()} at {pending[i][0]}; stopping. The checkpoints in "
            f"{self.ckpt_dir} are untouched; lower --lr or check the data"
        )


def train_one_epoch(
    cfg: Config,
    state: TrainState,
    *,
    parts: StepParts,
    loader: EpochLoader,
    bad: BadImageReport,
    metrics: MetricsLog,
    stop: Any,
    step_times: list[float],
) -> bool:
    """Train `state` through the rest of epoch `state.epoch`; True when stopped by a signal.

    A step is `gradient_accumulation_steps` micro-batches, then one optimizer update. An epoch
    has len(loader) // accumulation steps; the last len(loader) % accumulation batches are not
    read (as `drop_remainder` drops a partial batch), so no gradient outlives its epoch and
    every checkpoint falls on a step boundary."""
    dist, device = parts.dist, parts.dist.device
    accum = cfg.gradient_accumulation_steps
    steps = len(loader) // accum
    epoch = state.epoch
    set_train_mode(state.model, cfg.freeze_bn)
    state.optimizer.zero_grad(set_to_none=True)
    loader.set_epoch(epoch, start=state.batch_in_epoch * cfg.batch_size)
    reporter = StepReporter(
        steps * accum,
        start_step=state.batch_in_epoch,
        enabled=dist.is_main,
        desc=f"epoch {epoch + 1}/{cfg.epoch_size}",
        later_steps=(cfg.epoch_size - epoch - 1) * steps * accum,
    )
    carried = state.sums if dist.is_main else new_epoch_sums()  # rank 0 holds the saved sums
    loss_sum = torch.tensor(carried["loss_sum"], dtype=torch.float64, device=device)
    counts = {k: int(carried[k]) for k in ("loss_n", "images", "bad")}
    finite = FiniteCheck(cfg.ckpt_save_dir)
    with stop_signals_blocked():  # loader workers start here
        batches = iter(loader)
    interrupted = False
    t_step = time.perf_counter()
    for step in range(state.batch_in_epoch // accum, steps):
        lr = parts.schedule(state.global_step)
        set_lr(state.optimizer, lr)
        last_loss, trained, data_wait = None, 0, 0.0
        for micro in range(accum):
            t_fetch = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t_fetch
            state.batch_in_epoch += 1
            counts["images"] += len(batch[1])
            counts["bad"] += len(batch[1]) - len(_valid(batch))
            images, labels, weight = _micro_batch(batch, bad, dist)
            if images is None:
                continue
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if dist.enabled and micro < accum - 1:
                assert isinstance(parts.train_model, nn.parallel.DistributedDataParallel)
                sync = parts.train_model.no_sync()
            with sync:
                loss = _forward_backward(cfg, state, parts, images, labels, weight=weight)
            if weight:
                where = f"epoch {epoch + 1}, step {state.batch_in_epoch}"
                finite.add(loss, f"{where} (global step {state.global_step})")
                loss_sum += loss.detach().double() * len(labels)
                counts["loss_n"] += len(labels)
                trained += len(labels)
                last_loss = loss
        if trained or dist.enabled:
            _optimizer_step(cfg, state)
        state.global_step += 1
        now = time.perf_counter()
        step_times.append(now - t_step)
        t_step = now
        loss_value = None
        at_log = state.global_step % max(1, cfg.log_interval) == 0
        if (at_log or step == steps - 1) and last_loss is not None:
            finite.check()  # the host syncs: at log intervals and at the end of the epoch
            loss_value = last_loss.item()
            if at_log:
                metrics.write(
                    {
                        "kind": "step",
                        "epoch": epoch + 1,
                        "global_step": state.global_step,
                        "loss": loss_value,
                        "lr": lr,
                    }
                )
        reporter.update(
            state.batch_in_epoch, trained * dist.world_size, loss_value, lr, data_wait=data_wait
        )
        if _agreed_stop(stop.requested, dist, device):
            interrupted = True
            break
    reporter.close()
    del batches  # the loader's workers end with the epoch (unless persistent)
    finite.check()  # never a checkpoint after a NaN
    totals = distributed.all_reduce_sum(
        torch.tensor(
            [loss_sum.item(), counts["loss_n"], counts["images"], counts["bad"]],
            dtype=torch.float64,
            device=device,
        ),
        dist,
    ).tolist()
    state.sums = {
        "loss_sum": totals[0],
        "loss_n": int(totals[1]),
        "images": int(totals[2]),
        "bad": int(totals[3]),
    }
    return interrupted


def _valid(batch: Any) -> Any:
    """The labels of the readable samples of a loader batch."""
    return batch[1] if len(batch) == 2 else batch[1][torch.as_tensor(batch[2], dtype=torch.bool)]


def _micro_batch(
    batch: Any, bad: BadImageReport, dist: distributed.DistInfo
) -> tuple[Any, Any, bool]:
    """(images, labels, counts) to train on from a loader batch. Unreadable images are dropped
    (and reported); a batch with fewer than two readable images never reaches BatchNorm, which
    cannot normalise one sample: alone, it is skipped ((None, None, False)); under DDP, where
    every rank must run each backward, the whole batch (substitutes included, doubled if it
    holds one image) runs with zero weight, so it adds nothing to the gradients."""
    images, labels = bad.filter(batch)
    if len(labels) >= 2:
        return images, labels, True
    if not dist.enabled:
        return None, None, False
    images, labels = batch[0], batch[1]
    if len(labels) < 2:
        images, labels = torch.cat([images, images]), torch.cat([labels, labels])
    return images, labels, False


def _forward_backward(
    cfg: Config,
    state: TrainState,
    parts: StepParts,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: bool,
) -> torch.Tensor:
    """One micro-batch: forward, loss, scaled backward (gradients add up over the step)."""
    device = parts.dist.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = labels
    if parts.mixer is not None:
        images, targets = parts.mixer(images, labels)
    with torch.autocast(device.type, dtype=parts.amp_dtype, enabled=parts.amp_dtype is not None):
        logits = parts.forward(images)
    loss = parts.loss_fn(logits.float(), targets)
    scaled = loss / cfg.gradient_accumulation_steps if weight else loss * 0.0
    state.scaler.scale(scaled).backward()
    return loss


def _optimizer_step(cfg: Config, state: TrainState) -> None:
    """The update after a step's micro-batches: clip, step, EMA; gradients cleared."""
    if cfg.clip_grad:
        state.scaler.unscale_(state.optimizer)
        nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_value)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.update_parameters(state.model)


def end_epoch(
    cfg: Config,
    state: TrainState,
    *,
    lr: float,
    val_loader: Any,
    bad: BadImageReport,
    ckpts: CheckpointManager,
    metrics: MetricsLog,
    dist: distributed.DistInfo,
) -> EvalResult | None:
    """After the last step of an epoch: check the data, validate, log, checkpoint; returns the
    validation result when there was one."""
    epoch, sums = state.epoch + 1, state.sums
    if (msg := bad.summary()) is not None and dist.is_main:
        log.warning("epoch %d: %s", epoch, msg)
    bad.reset()
    readable = sums["images"] - sums["bad"]
    if sums["images"] and readable < cfg.min_readable_images * sums["images"]:
        raise ConfigError(
            f"epoch {epoch}: only {readable} of {sums['images']} training images could be read "
            f"(min_readable_images {cfg.min_readable_images:g}); "
            f"{msg or 'see the warnings above'}. "
            f"Fix or remove the files in {cfg.data_dir}; no checkpoint of this epoch was written"
        )
    record: dict[str, Any] = {
        "kind": "epoch",
        "epoch": epoch,
        "global_step": state.global_step,
        "train_loss": sums["loss_sum"] / max(sums["loss_n"], 1),
        "lr": lr,
    }
    val = None
    if val_loader is not None and (epoch % cfg.val_interval == 0 or epoch == cfg.epoch_size):
        eval_model = state.ema.module if state.ema is not None else state.model
        val = reduce_result(
            evaluate(
                eval_model,
                val_loader,
                device=dist.device,
                num_classes=state.meta["num_classes"],
                amp_dtype=amp_dtype(cfg, dist.device.type, validation=True),
                channels_last=cfg.channels_last,
                progress=dist.is_main,
            ),
            dist,
        )
        record.update(val_top1=val.top1, val_top5=val.top5, val_loss=val.loss, val_n=val.n)
    top1 = record.get("val_top1")
    is_best = top1 is not None and (state.best_top1 is None or top1 > state.best_top1)
    if is_best:
        state.best_top1 = top1
    state.epoch, state.batch_in_epoch, state.sums = epoch, 0, new_epoch_sums()
    if dist.is_main:
        metrics.write(record)
        if epoch % cfg.ckpt_save_interval == 0 or epoch == cfg.epoch_size:
            ckpts.save_epoch(state.state_dict(), epoch, top1, is_best=is_best)
        else:
            ckpts.save_last(state.state_dict(), is_best=is_best)
        val_text = ""
        if top1 is not None:
            val_text = f"  val top-1 {top1:.2f}  top-5 {record['val_top5']:.2f}"
        log.info(
            "epoch %d/%d  train loss %.4f%s", epoch, cfg.epoch_size, record["train_loss"], val_text
        )
        if (problem := diverging(record, state.meta["num_classes"])) is not None:
            log.warning(
                "epoch %d: the run is diverging: %s. Lower --lr (the recipes' lr is for a global "
                "batch of 256; --lr_scale linear scales it to yours) or raise --batch_size",
                epoch,
                problem,
            )
    distributed.barrier(dist)
    return val


def diverging(record: dict[str, Any], num_classes: int) -> str | None:
    """What shows that the epoch of `record` diverged, or None: a validation loss that is not
    finite (outputs that overflow), or a loss `DIVERGED_FACTOR` times that of an untrained
    model, ln(num_classes) (a NaN/inf training loss has already stopped the run)."""
    val = record.get("val_loss")
    if val is not None and not math.isfinite(val):
        return f"the validation loss is {val} (the model's outputs overflow)"
    chance = math.log(max(num_classes, 2))
    loss, which = max((record["train_loss"], "training"), (val or 0.0, "validation"))
    if loss > DIVERGED_FACTOR * chance:
        return (
            f"the {which} loss {loss:.4g} is {loss / chance:.0f}x an untrained model's "
            f"(ln {num_classes} = {chance:.2f})"
        )
    return None


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with `freeze_bn`, BatchNorm layers stay in eval mode (running statistics
    are used and not updated), as when fine-tuning with small per-device batches."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def _agreed_stop(requested: bool, dist: distributed.DistInfo, device: torch.device) -> bool:
    """Whether any rank was asked to stop: all ranks stop at the same step boundary."""
    if not dist.enabled:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    return bool(distributed.all_reduce_sum(flag, dist).item() > 0)


def results_row(
    cfg: Config, *, n_params: int, cards: int, ms_per_step: float, val: EvalResult | None
) -> dict[str, Any]:
    """The seed README's results columns for this run."""
    return {
        "model name": cfg.model,
        "params(M)": round(n_params / 1e6, 2),
        "cards": cards,
        "batch size": cfg.batch_size,
        "resolution": f"{cfg.image_resize}x{cfg.image_resize}",
        "ms/step": round(ms_per_step, 2),
        "img/s": round(
            cfg.batch_size * cards * cfg.gradient_accumulation_steps / (ms_per_step / 1000.0), 2
        )
        if ms_per_step
        else None,
        "acc@top1": round(val.top1, 2) if val is not None else None,
        "acc@top5": round(val.top5, 2) if val is not None else None,
    }


def format_row(row: dict[str, Any]) -> str:
    """A Markdown table (header + one row) of `results_row`."""
    head = "| " + " | ".join(row) + " |"
    sep = "|" + "---|" * len(row)
    return "\n".join(
        [head, sep, "| " + " | ".join("-" if v is None else str(v) for v in row.values()) + " |"]
    )


def _resume_path(cfg: Config, ckpts: CheckpointManager) -> Path | None:
    if cfg.resume == "auto":
        return ckpts.latest()  # nothing yet: a fresh start
    if cfg.resume:
        return Path(cfg.resume)
    if cfg.ckpt_path and cfg.resume_opt:
        return Path(cfg.ckpt_path)
    return None


def _loss(cfg: Config, soft_targets: bool) -> Any:
    """Cross entropy with label smoothing (already inside soft targets under mixup/cutmix),
    or MindCV's BCE on (smoothed) one-hot targets."""
    smoothing = 0.0 if soft_targets else cfg.label_smoothing
    if cfg.loss == "BCE":

        def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            if targets.ndim == 1:
                n = logits.shape[1]
                targets = F.one_hot(targets, n).float() * (1 - smoothing) + smoothing / n
            return F.binary_cross_entropy_with_logits(logits, targets, reduction=cfg.reduction)

        return bce
    return nn.CrossEntropyLoss(label_smoothing=smoothing, reduction=cfg.reduction)


# ---- MindCV's precision, compile and batch keys as torch settings (``Key.mapped``)


def amp_dtype(
    cfg: Config, device_type: str, *, validation: bool = False, bf16_supported: bool | None = None
) -> torch.dtype | None:
    """The ``torch.autocast`` dtype for `device_type`, or None for fp32 (level O0).

    MindSpore's O1-O3 (``val_amp_level`` when `validation`) -> bfloat16 on CPU and on CUDA
    devices that support it, else float16; O3 is O2 here (BatchNorm stays float32).
    `bf16_supported` overrides the CUDA capability query (for tests and planning).
    """
    level = cfg.val_amp_level if validation else cfg.amp_level
    if level == "O0":
        return None
    if device_type == "cuda" and bf16_supported is None:
        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    bf16 = device_type == "cpu" or (device_type == "cuda" and bf16_supported)
    return torch.bfloat16 if bf16 else torch.float16


def use_grad_scaler(cfg: Config, device_type: str, *, bf16_supported: bool | None = None) -> bool:
    """Whether training needs ``torch.amp.GradScaler``: exactly when it autocasts to float16
    (it does dynamically what MindCV's fixed ``loss_scale`` does)."""
    return amp_dtype(cfg, device_type, bf16_supported=bf16_supported) == torch.float16


def grad_scaler_init_scale(cfg: Config) -> float:
    """GradScaler's ``init_scale``: ``loss_scale`` when > 1, else PyTorch's 2**16."""
    return cfg.loss_scale if cfg.loss_scale > 1 else 2.0**16


def use_compile(cfg: Config, device_type: str) -> bool:
    """``torch.compile`` with ``compile: true``, or with ``mode: 0`` (GRAPH_MODE) on CUDA: on
    CPU, warming it up takes longer than it saves."""
    return cfg.compile or (cfg.mode == 0 and device_type == "cuda")


def global_batch(cfg: Config, world_size: int = 1) -> int:
    """Images per optimizer step: batch_size x world_size x gradient_accumulation_steps."""
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    return cfg.batch_size * world_size * cfg.gradient_accumulation_steps


def lr_scale_factor(cfg: Config, world_size: int = 1) -> float:
    """Factor for ``lr`` and ``min_lr``: with ``lr_scale: linear``, global batch /
    REFERENCE_BATCH_SIZE; else 1."""
    batch = global_batch(cfg, world_size)
    return 1.0 if cfg.lr_scale == "none" else batch / REFERENCE_BATCH_SIZE


def config_notes(cfg: Config) -> list[str]:
    """Lines on MindCV keys that are ignored (when set) or mapped (the run logs them)."""
    d, out = Config(), []
    if cfg.mode == 0:
        out.append(
            "mode: 0 (MindSpore GRAPH_MODE) -> torch.compile on CUDA, eager on CPU; "
            "--mode 1 runs eager everywhere"
        )
    for name, k in KEYS.items():
        if k.ignored and getattr(cfg, name) != getattr(d, name):
            out.append(f"{name}: {short(getattr(cfg, name))} is ignored ({k.ignored})")
    if cfg.eps != d.eps and cfg.opt != "rmsprop":
        out.append(
            f"eps: {cfg.eps:g} is used by rmsprop only, as in MindCV; {cfg.opt} keeps its own "
            "epsilon"
        )
    if cfg.opt == "nesterov" and not cfg.use_nesterov:
        out.append("opt: 'nesterov' is momentum without Nesterov unless use_nesterov: True")
    for old, new in (("filter_bias_and_bn", "weight_decay_filter"),
                     ("dynamic_loss_scale", "loss_scale_type")):  # fmt: skip
        if getattr(cfg, old) is not None:
            value = getattr(cfg, new)
            out.append(f"{old}: {getattr(cfg, old)} (older MindCV key) -> {new}: {value!r}")
    for name in ("amp_level", "val_amp_level"):
        level = getattr(cfg, name)
        o3 = "; MindSpore's O3 casts BatchNorm too, here it stays float32" * (level == "O3")
        if level != "O0":
            out.append(
                f"{name}: {level} -> torch.autocast in bfloat16 (CPU, and CUDA with bf16 "
                f"support) else float16; weights stay float32{o3}"
            )
    scaling = cfg.loss_scale != d.loss_scale or cfg.loss_scale_type != d.loss_scale_type
    if cfg.amp_level != "O0" and scaling:  # no GradScaler without autocast
        out.append(
            f"loss_scale: {cfg.loss_scale:g} ({cfg.loss_scale_type}) -> dynamic torch GradScaler "
            f"starting at {grad_scaler_init_scale(cfg):g} when autocast runs in float16; unused "
            "in bfloat16/float32"
        )
    return out
