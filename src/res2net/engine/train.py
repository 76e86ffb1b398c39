"""The training loop, readable top to bottom: data -> model -> optimizer -> epochs -> results.

One `Config` describes the whole run (MindCV's keys). Resuming (`resume: auto` or a path)
restores model, optimizer, GradScaler, EMA, schedule position, RNG state and the position in the
epoch, so a resumed run ends with the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import Config
from ..data import (
    BadImageReport,
    ImageFolderDataset,
    build_loader,
    build_shard_loader,
    eval_transform,
    is_shard_dir,
    mixup_cutmix,
    train_transform,
)
from ..factory import create_model
from ..profile import count_params
from . import distributed
from .checkpoint import CheckpointManager, load_training_state
from .evaluate import EvalResult, eval_loader, evaluate, reduce_result
from .optim import build_optimizer, set_lr
from .progress import MetricsLog, StepReporter, plot_run
from .tracking import Trackers, parse_backends
from .schedules import LrSchedule

log = logging.getLogger("res2net.train")


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


def build_loaders(cfg: Config, dist: distributed.DistInfo) -> tuple[Any, Any, Any]:
    """(train loader, train dataset, val loader or None) for an ImageNet-style folder or a
    folder/URL of WebDataset shards. Train: MindCV's train transform, this rank's share of each
    epoch. Val: the eval transform, the training classes, every image exactly once over ranks."""
    mean, std = cfg.mean, cfg.std
    train_tf = train_transform(
        cfg.image_resize, cfg.scale, cfg.ratio, cfg.interpolation, cfg.hflip, cfg.vflip, cfg.color_jitter,
        cfg.auto_augment, cfg.re_prob, cfg.re_scale, cfg.re_ratio, cfg.re_value, mean, std, cfg.fast_decode,
    )
    eval_tf = eval_transform(cfg.image_resize, cfg.crop_pct, cfg.interpolation, mean, std)
    workers = cfg.num_parallel_workers
    if is_shard_dir(cfg.data_dir, cfg.train_split):
        if cfg.num_samples is not None:
            raise ValueError("num_samples is not supported with sharded data; shard a subset instead")
        if cfg.aug_repeats > 1:
            raise ValueError("aug_repeats is not supported with sharded data; use an image folder")
        shard_kw = dict(rank=dist.rank, world_size=dist.world_size, on_bad_image=cfg.on_bad_image)
        train_loader, _ = build_shard_loader(
            cfg.data_dir, train_tf, cfg.batch_size, workers, cfg.seed, training=True, split=cfg.train_split,
            shuffle=cfg.shuffle, drop_last=cfg.drop_remainder, **shard_kw,
        )
        train_ds = train_loader.dataset
        val_loader = None
        if cfg.val_while_train:
            val_loader, _ = build_shard_loader(
                cfg.data_dir, eval_tf, cfg.batch_size, workers, cfg.seed, training=False, split=cfg.val_split,
                class_to_idx=train_ds.class_to_idx, **shard_kw,
            )
        return train_loader, train_ds, val_loader
    train_ds = ImageFolderDataset(
        cfg.data_dir, cfg.train_split, transform=train_tf, on_bad_image=cfg.on_bad_image,
        num_samples=cfg.num_samples, seed=cfg.seed,
    )
    train_loader = build_loader(train_ds, cfg.batch_size, cfg.shuffle, cfg.drop_remainder, workers, cfg.seed, dist.enabled,
                                aug_repeats=cfg.aug_repeats)
    val_loader = None
    if cfg.val_while_train:
        val_ds = ImageFolderDataset(
            cfg.data_dir, cfg.val_split, transform=eval_tf, class_to_idx=train_ds.class_to_idx,
            on_bad_image=cfg.on_bad_image,
        )
        val_loader = eval_loader(val_ds, cfg.batch_size, workers, dist)
    return train_loader, train_ds, val_loader


def check_num_classes(cfg: Config, dataset: ImageFolderDataset) -> int:
    """The class count to build the model with; a recipe that disagrees with the data is an error."""
    if cfg.num_classes is not None and cfg.num_classes != dataset.num_classes:
        raise ValueError(
            f"num_classes is {cfg.num_classes} but {cfg.data_dir}/{cfg.train_split} has {dataset.num_classes} "
            f"class folders; pass --num_classes {dataset.num_classes} (a new classifier is trained) or fix the data"
        )
    return dataset.num_classes


def train(cfg: Config) -> TrainResult:
    """Run the training described by `cfg`; see the module docstring."""
    with StopRequest() as stop:
        dist = distributed.setup(cfg.distribute, cfg.device, cfg.dist_timeout)
        try:
            return _train(cfg, dist, stop)
        except RuntimeError as e:
            clear = distributed.peer_failure(e, dist, cfg.dist_timeout)
            if clear is None:
                raise
            raise clear from e
        finally:
            distributed.teardown(dist)


def _train(cfg: Config, dist: distributed.DistInfo, stop: StopRequest) -> TrainResult:
    device = dist.device
    torch.manual_seed(cfg.seed)
    if dist.is_main:
        for note in cfg.notes():
            log.info("config: %s", note)
    ckpts = CheckpointManager(cfg.ckpt_save_dir, cfg.model, cfg.keep_checkpoint_max, cfg.ckpt_save_policy)
    if dist.is_main:
        ckpts.check_writable()  # before any work, not after an epoch
        for path in ckpts.remove_stale_files():
            log.info("removed %s (left by a write that never finished)", path)

    # ---- data
    train_loader, train_ds, val_loader = build_loaders(cfg, dist)
    num_classes = check_num_classes(cfg, train_ds)
    steps_per_epoch = len(train_loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_ds)} training images give no full step of batch_size {cfg.batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation; lower --batch_size or set --drop_remainder False"
        )
    mixer = mixup_cutmix(num_classes, cfg.mixup, cfg.cutmix, cfg.cutmix_prob, cfg.label_smoothing)

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
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm); use --freeze_bn True or --sync_bn False on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) if cfg.ema else None
    train_model: nn.Module = model
    if dist.enabled:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(train_model) if cfg.use_compile(device.type) else train_model

    # ---- optimizer, schedule, precision
    world = dist.world_size
    lr_factor = cfg.lr_scale_factor(world)
    global_batch = cfg.batch_size * world * cfg.gradient_accumulation_steps
    if dist.is_main and global_batch != 256:
        log.info("global batch is %d (recipe reference: 256)%s", global_batch,
                 f"; lr scaled by {lr_factor:.4g} (lr_scale: linear)" if lr_factor != 1 else
                 "; consider --lr_scale linear to scale lr with it")
    schedule = LrSchedule(
        scheduler=cfg.scheduler, lr=cfg.lr * lr_factor, steps_per_epoch=steps_per_epoch,
        min_lr=cfg.min_lr * lr_factor, warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor,
        decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate, milestones=cfg.multi_step_decay_milestones,
        num_cycles=cfg.num_cycles, cycle_decay=cfg.cycle_decay, lr_epoch_stair=cfg.lr_epoch_stair,
        epochs=cfg.epoch_size,
    )
    optimizer = build_optimizer(
        model, opt=cfg.opt, lr=schedule(0), weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        nesterov=cfg.use_nesterov, eps=cfg.eps, weight_decay_filter=cfg.weight_decay_filter,
        layer_decay=cfg.layer_decay,
    )
    amp_dtype = cfg.amp_dtype(device.type)
    val_amp_dtype = cfg.amp_dtype(device.type, validation=True)
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.grad_scaler_init_scale(), enabled=cfg.use_grad_scaler(device.type))

    # ---- resume
    start_epoch, start_batch, global_step, best_top1 = 0, 0, 0, None
    if resume_path is not None:
        state = load_training_state(resume_path)
        model.load_state_dict(state["model"])
        if cfg.resume or cfg.resume_opt:  # MindCV's resume_opt: also optimizer state and lr position
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            start_epoch, start_batch, global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
            best_top1 = state.get("best_top1")
            torch.set_rng_state(state["rng"]["torch"])
        if dist.is_main:
            log.info("resumed from %s at epoch %d, step %d", resume_path, start_epoch + 1, global_step)

    loss_fn = _loss(cfg, mixer is not None)
    trackers = None
    if dist.is_main and parse_backends(cfg.log):
        trackers = Trackers(Path(cfg.ckpt_save_dir), parse_backends(cfg.log), uri=cfg.log_uri,
                            project=cfg.log_project, run_name=Path(cfg.ckpt_save_dir).name)
        trackers.params(cfg.to_dict())
    metrics = MetricsLog(Path(cfg.ckpt_save_dir), enabled=dist.is_main, trackers=trackers)
    metrics.rewind(global_step)  # records of work after the checkpoint are redone, not repeated
    bad = BadImageReport(train_ds)
    n_params = count_params(model)
    step_times: list[float] = []
    interrupted = False
    epochs_done = start_epoch
    last_val: EvalResult | None = None

    def snapshot(epoch: int, batch_in_epoch: int) -> dict[str, Any]:
        return {
            "arch": cfg.model,
            "num_classes": num_classes,
            "classes": train_ds.classes,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_step": global_step,
            "best_top1": best_top1,
            "rng": {"torch": torch.get_rng_state()},
            "config": cfg.to_dict(),
        }

    for epoch in range(start_epoch, cfg.epoch_size):
        set_train_mode(model, cfg.freeze_bn)
        train_loader.sampler.set_epoch(epoch, start=start_batch * cfg.batch_size)
        reporter = StepReporter(len(train_loader), start_batch, cfg.log_interval, dist.is_main, f"epoch {epoch + 1}/{cfg.epoch_size}")
        loss_sum, loss_n = 0.0, 0
        t_step = time.perf_counter()
        batch_idx = start_batch
        lr = schedule(max(global_step - 1, 0))  # the last step's, if a resumed epoch has none left
        for batch in train_loader:
            images, labels = bad.filter(batch)
            batch_idx += 1
            if len(labels) == 0 and not dist.enabled:  # every image of the batch failed to decode
                continue
            accumulating = batch_idx % cfg.gradient_accumulation_steps != 0
            lr = schedule(global_step)
            set_lr(optimizer, lr)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixer is not None and len(labels) > 0:
                images, targets = mixer(images, labels)
            sync = contextlib.nullcontext()
            if dist.enabled and accumulating:
                sync = train_model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = forward(images)
                loss = loss_fn(logits.float(), targets)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {batch_idx} (global step {global_step}); "
                        f"stopping. The checkpoints in {cfg.ckpt_save_dir} are untouched; lower --lr or check the data"
                    )
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            loss_sum += loss.item() * len(labels)
            loss_n += len(labels)
            if accumulating:
                continue
            if cfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_value)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            global_step += 1
            now = time.perf_counter()
            step_times.append(now - t_step)
            t_step = now
            reporter.update(batch_idx, len(labels) * world, loss.item(), lr)
            if global_step % max(1, cfg.log_interval) == 0:
                metrics.write({"kind": "step", "epoch": epoch + 1, "global_step": global_step, "loss": loss.item(), "lr": lr})
            if _agreed_stop(stop.requested, dist, device):
                interrupted = True
                break
        reporter.close()
        if (msg := bad.summary()) is not None and dist.is_main:
            log.warning("epoch %d: %s", epoch + 1, msg)
        bad.reset()
        if interrupted:
            if dist.is_main:
                path = ckpts.save_last(snapshot(epoch, batch_idx))
                log.info("stopped at epoch %d, step %d: saved %s; continue with --resume auto", epoch + 1, batch_idx, path)
            distributed.barrier(dist)
            break
        start_batch = 0
        epochs_done = epoch + 1

        # ---- end of epoch: validate, checkpoint, log
        record: dict[str, Any] = {"kind": "epoch", "epoch": epoch + 1, "global_step": global_step,
                                  "train_loss": _mean_over_ranks(loss_sum, loss_n, dist, device), "lr": lr}
        if val_loader is not None and ((epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epoch_size):
            eval_model = ema.module if ema is not None else model
            last_val = reduce_result(
                evaluate(eval_model, val_loader, device, num_classes, val_amp_dtype, cfg.channels_last), dist
            )
            record.update(val_top1=last_val.top1, val_top5=last_val.top5, val_loss=last_val.loss, val_n=last_val.n)
        top1 = record.get("val_top1")
        is_best = top1 is not None and (best_top1 is None or top1 > best_top1)
        if is_best:
            best_top1 = top1
        if dist.is_main:
            metrics.write(record)
            save_now = (epoch + 1) % cfg.ckpt_save_interval == 0 or epoch + 1 == cfg.epoch_size
            state = snapshot(epoch + 1, 0)
            if save_now:
                ckpts.save_epoch(state, epoch + 1, top1, is_best=is_best)
            else:
                ckpts.save_last(state, is_best=is_best)
            val_text = f"  val top-1 {top1:.2f}  top-5 {record['val_top5']:.2f}" if top1 is not None else ""
            log.info("epoch %d/%d  train loss %.4f%s", epoch + 1, cfg.epoch_size, record["train_loss"], val_text)
        distributed.barrier(dist)

    result = TrainResult(
        ckpt_dir=Path(cfg.ckpt_save_dir),
        epochs_done=epochs_done,
        interrupted=interrupted,
        best_top1=best_top1,
        last_path=ckpts.latest(),
        best_path=ckpts.best if ckpts.best.is_file() else None,
    )
    if dist.is_main and not interrupted:
        result.plot_path = plot_run(metrics.read(), Path(cfg.ckpt_save_dir) / "training.png")
        ms = 1000.0 * statistics.median(step_times[1:] or step_times) if step_times else math.nan
        result.row = results_row(cfg, n_params, world, ms, last_val)
    metrics.close()
    if trackers is not None:
        trackers.finish(plot=result.plot_path, best=result.best_path, interrupted=interrupted)
    return result


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


def results_row(cfg: Config, n_params: int, cards: int, ms_per_step: float, val: EvalResult | None) -> dict[str, Any]:
    """The seed README's results columns for this run."""
    return {
        "model name": cfg.model,
        "params(M)": round(n_params / 1e6, 2),
        "cards": cards,
        "batch size": cfg.batch_size,
        "resolution": f"{cfg.image_resize}x{cfg.image_resize}",
        "ms/step": round(ms_per_step, 2),
        "img/s": round(cfg.batch_size * cards * cfg.gradient_accumulation_steps / (ms_per_step / 1000.0), 2) if ms_per_step else None,
        "acc@top1": round(val.top1, 2) if val is not None else None,
        "acc@top5": round(val.top5, 2) if val is not None else None,
    }


def format_row(row: dict[str, Any]) -> str:
    """A Markdown table (header + one row) of `results_row`."""
    head = "| " + " | ".join(row) + " |"
    sep = "|" + "---|" * len(row)
    return "\n".join([head, sep, "| " + " | ".join("-" if v is None else str(v) for v in row.values()) + " |"])


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


def _mean_over_ranks(total: float, n: int, dist: distributed.DistInfo, device: torch.device) -> float:
    t = distributed.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=device), dist)
    return (t[0] / t[1].clamp(min=1)).item()
