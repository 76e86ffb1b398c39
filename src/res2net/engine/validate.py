"""Validation of any checkpoint (MindSpore .ckpt, torch .pth, .safetensors, training
checkpoints) on an ImageNet-style val split, with the checkpoint's own eval transform."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from ..config import Config
from ..data import ImageFolderDataset, build_shard_loader, eval_transform, is_shard_dir
from ..factory import create_model
from ..weights.loading import read_checkpoint, state_num_classes
from . import distributed
from .evaluate import EvalResult, eval_loader, evaluate, reduce_result
from .report import (
    ClassMapHead,
    ReportOptions,
    TTAModel,
    class_map_indices,
    finish,
    transform_settings,
)

log = logging.getLogger("res2net.validate")


def eval_settings(cfg: Config, metadata: dict[str, str]) -> dict[str, Any]:
    """The eval transform: the checkpoint's own (stored by `res2net convert`) or the config's."""
    settings = dict(image_resize=cfg.image_resize, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation,
                    mean=cfg.mean, std=cfg.std)
    if "eval" in metadata:
        own = json.loads(metadata["eval"])
        settings.update({k: own[k] for k in ("image_resize", "crop_pct", "interpolation") if k in own})
        if "mean" in own and "std" in own:  # stored in 0..1 units
            settings["mean"] = tuple(255 * m for m in own["mean"])
            settings["std"] = tuple(255 * s for s in own["std"])
    return settings


def validate(
    cfg: Config,
    ckpt_path: str | Path,
    per_class_csv: str | Path | None = None,
    report: ReportOptions | None = None,
) -> EvalResult:
    """Top-1, top-5 and loss of the checkpoint on `cfg.data_dir/cfg.val_split`; with `report`,
    also the reports, test-time augmentation and relabelling of `engine/report.py`."""
    dist = distributed.setup(cfg.distribute, cfg.device, cfg.dist_timeout)
    report = report or ReportOptions()
    try:
        state, fmt, _, metadata = read_checkpoint(ckpt_path)
        settings = eval_settings(cfg, metadata)
        transform = eval_transform(**transform_settings(settings, report.tta))
        if is_shard_dir(cfg.data_dir, cfg.val_split):
            loader, _ = build_shard_loader(
                cfg.data_dir, transform, cfg.batch_size, cfg.num_parallel_workers, training=False, split=cfg.val_split,
                rank=dist.rank, world_size=dist.world_size, on_bad_image=cfg.on_bad_image,
            )
            dataset, n_images = loader.dataset, loader.dataset.total
        else:
            dataset = ImageFolderDataset(cfg.data_dir, cfg.val_split, transform=transform, on_bad_image=cfg.on_bad_image)
            loader, n_images = eval_loader(dataset, cfg.batch_size, cfg.num_parallel_workers, dist), len(dataset)
        n_ckpt = state_num_classes(state)
        if n_ckpt is not None and n_ckpt != dataset.num_classes and not report.class_map:
            raise ValueError(
                f"{ckpt_path} classifies {n_ckpt} classes but {cfg.data_dir}/{cfg.val_split} has "
                f"{dataset.num_classes} class folders; validate on data with the checkpoint's classes"
            )
        model = create_model(cfg.model, num_classes=n_ckpt or dataset.num_classes, checkpoint_path=ckpt_path)
        outputs = n_ckpt or dataset.num_classes
        mapped = None
        if report.class_map:
            mapped = class_map_indices(report.class_map, dataset.classes, outputs)
        params = sum(p.numel() for p in model.parameters())
        if mapped is not None:
            model = ClassMapHead(model, mapped)
        if report.tta:
            model = TTAModel(model, report.tta, int(settings["image_resize"]))
        model = model.to(dist.device)
        if dist.is_main:
            log.info("validating %s (%s, %s) on %d images of %s", cfg.model, ckpt_path, fmt, n_images, cfg.val_split)
        amp = cfg.amp_dtype(dist.device.type, validation=True)
        wants_report = report.report_dir or report.real_labels or report.results_csv
        if wants_report and dist.world_size > 1:
            raise ValueError(
                "--report_dir/--real_labels/--results_csv need one process: "
                "validate without --distribute"
            )
        predictions: list | None = [] if wants_report else None
        result = evaluate(
            model, loader, dist.device, dataset.num_classes, amp, cfg.channels_last, predictions
        )
        result = reduce_result(result, dist)
        if wants_report:
            files = [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else None
            finish(
                report, result, predictions, classes=dataset.classes, files=files,
                real_outputs=mapped, num_outputs=outputs, model_name=cfg.model,
                param_count=params, settings=settings,
            )
        if per_class_csv is not None and dist.is_main:
            write_per_class(result, dataset.classes, Path(per_class_csv))
        return result
    finally:
        distributed.teardown(dist)


def write_per_class(result: EvalResult, classes: list[str], path: Path) -> None:
    """CSV of per-class top-1: class, images, correct, top1 (%)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "correct", "top1"])
        for name, n, c in zip(classes, result.class_total.tolist(), result.class_correct.tolist()):
            w.writerow([name, n, c, f"{100.0 * c / n:.2f}" if n else ""])
