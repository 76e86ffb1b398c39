"""Validation of any checkpoint (MindSpore .ckpt, torch .pth, .safetensors, training
checkpoints) on an ImageNet-style val split, with the checkpoint's own eval transform."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from .. import fileio
from ..config import Config
from ..data import (
    ImageFolderDataset,
    ShardLoader,
    build_shard_loader,
    cap_workers,
    is_shard_dir,
)
from ..errors import ConfigError, MissingFile
from ..factory import create_model
from ..guards import check_output_file
from ..weights.entry import EVAL_KEYS, EvalTransform, describe_sources, resolve_eval_transform
from ..weights.hubfolder import hub_folder, is_hub_name, read_config
from ..weights.loading import Checkpoint, load_checkpoint, read_checkpoint
from . import distributed
from .evaluate import EvalResult, eval_loader, evaluate, reduce_result
from .report import (
    PER_CLASS_COLUMNS,
    ClassMapHead,
    ReportOptions,
    TTAModel,
    check_targets,
    class_map_indices,
    finish,
    per_class_count_rows,
    read_real_labels,
    transform_settings,
)
from .train import amp_dtype

log = logging.getLogger("res2net.validate")


def eval_settings(
    cfg: Config, checkpoint: Checkpoint | str | Path, given: Mapping[str, str] | None = None
) -> tuple[EvalTransform, dict[str, str]]:
    """The eval transform for `checkpoint` and where each value came from: keys `given` on the
    command line, then those the recipe sets, then the checkpoint's own (training config,
    `.safetensors` metadata, pretrained table), then the defaults. Without `given` (a `Config`
    built in Python), the checkpoint's values win over the config's."""
    run = EvalTransform.from_config(cfg).to_dict()
    stored = read_checkpoint(checkpoint, model=cfg.model).eval_transform
    if given is None:
        return resolve_eval_transform(checkpoint=stored, defaults=(run, "config"))
    flags = {k: run[k] for k in EVAL_KEYS if given.get(k) == "command line"}
    recipe = {k: run[k] for k in EVAL_KEYS if k in given and given[k] != "command line"}
    recipe_name = next((given[k] for k in recipe), "recipe")
    return resolve_eval_transform(
        flags=flags, recipe=recipe, checkpoint=stored, recipe_name=recipe_name
    )


def architecture(model_name: str) -> str:
    """The zoo architecture behind `model_name`: a Hub model's (`local-dir:`, `hf-hub:`) is its
    config's. `validate` builds that architecture with the checkpoint's class count, so the
    checkpoint's classifier is checked against its features first. (Only for
    the command line's name: a checkpoint's own `arch` never makes anything read a folder.)"""
    if not is_hub_name(model_name):
        return model_name
    return str(read_config(hub_folder(model_name))["architecture"])


def validate(
    cfg: Config,
    ckpt_path: str | Path | Checkpoint,
    per_class_csv: str | Path | None = None,
    report: ReportOptions | None = None,
    *,
    given: Mapping[str, str] | None = None,
) -> EvalResult:
    """Top-1, top-5 and loss of the checkpoint on `cfg.data_dir/cfg.val_split`, with the eval
    transform of `eval_settings` (`given`: where each config key was set, see
    `cli.train.given_keys`); with `report`, also the reports, test-time augmentation and
    relabelling of `engine/report.py`."""
    dist = distributed.setup(cfg.distribute, cfg.device, cfg.dist_timeout)
    report = report or ReportOptions()
    try:
        if dist.is_main:  # the outputs, before the checkpoint is read and the model built
            if per_class_csv is not None:
                check_csv_target(Path(per_class_csv), ckpt_path)
            check_targets(report)
        # the one read of the file; its classifier checked against the model's features
        arch = architecture(cfg.model)  # a Hub model's: its weights are the checkpoint's here
        checkpoint = read_checkpoint(ckpt_path, model=arch)
        ckpt_path = checkpoint.origin
        spec, where = eval_settings(cfg, checkpoint, given)
        if dist.is_main:
            log.info(describe_sources(spec, where))
        settings = spec.to_dict()
        transform = EvalTransform.from_dict(transform_settings(settings, report.tta)).transform()
        workers = cap_workers(cfg.num_parallel_workers, announce=dist.is_main)
        on_bad_image = cfg.on_bad_image
        loader: ShardLoader | DataLoader[Any]
        if is_shard_dir(cfg.data_dir, cfg.val_split):
            loader, _ = build_shard_loader(
                cfg.data_dir,
                transform=transform,
                batch_size=cfg.batch_size,
                num_workers=workers,
                training=False,
                split=cfg.val_split,
                rank=dist.rank,
                world_size=dist.world_size,
                on_bad_image=on_bad_image,
            )
            dataset, n_images = loader.dataset, loader.dataset.total
        else:
            dataset = ImageFolderDataset(
                cfg.data_dir, cfg.val_split, transform=transform, on_bad_image=on_bad_image
            )
            loader = eval_loader(dataset, batch_size=cfg.batch_size, num_workers=workers, dist=dist)
            n_images = len(dataset)
        n_ckpt = checkpoint.num_classes
        if n_ckpt is None:
            raise ConfigError(
                f"{ckpt_path}: no classifier in this checkpoint, so nothing to validate; give a "
                "checkpoint of a whole classifier (a training checkpoint, or converted weights)"
            )
        if n_ckpt != dataset.num_classes and not report.class_map:
            raise ConfigError(
                f"{ckpt_path} classifies {n_ckpt} classes but {cfg.data_dir}/{cfg.val_split} has "
                f"{dataset.num_classes} class folders; validate on data with the checkpoint's "
                "classes"
            )
        if dist.is_main and per_class_csv is not None:
            check_class_names(dataset.classes)
        model: nn.Module = create_model(arch, num_classes=n_ckpt)
        load_checkpoint(model, checkpoint)  # strict: a classifier that does not fit is an error
        outputs = n_ckpt
        mapped = None
        if report.class_map:
            mapped = class_map_indices(report.class_map, dataset.classes, outputs)
        real = None
        if report.real_labels:
            files = [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else None
            if files is None:
                raise ConfigError(
                    "--real_labels needs an image folder evaluated in one process (not shards)"
                )
            real = read_real_labels(report.real_labels, files, outputs)
        params = sum(p.numel() for p in model.parameters())
        if mapped is not None:
            model = ClassMapHead(model, mapped)
        if report.tta:
            model = TTAModel(model, report.tta, int(settings["image_resize"]))
        model = model.to(dist.device)
        if dist.is_main:
            log.info(
                "validating %s (%s, %s) on %d images of %s",
                cfg.model,
                ckpt_path,
                checkpoint.format,
                n_images,
                cfg.val_split,
            )
        amp = amp_dtype(cfg, dist.device.type, validation=True)
        wants_report = report.report_dir or report.real_labels or report.results_csv
        if wants_report and dist.world_size > 1:
            raise ConfigError(
                "--report_dir/--real_labels/--results_csv need one process: "
                "validate without --distribute"
            )
        predictions: list | None = [] if wants_report else None
        result = evaluate(
            model,
            loader,
            device=dist.device,
            num_classes=dataset.num_classes,
            amp_dtype=amp,
            channels_last=cfg.channels_last,
            predictions=predictions,
            progress=dist.is_main,
        )
        result = reduce_result(result, dist)
        if result.n == 0:
            raise ConfigError(
                f"none of the {n_images} images of {cfg.data_dir}/{cfg.val_split} could be "
                "decoded: nothing was validated"
            )
        if result.n < n_images and dist.is_main:  # on_bad_image: skip
            log.warning(
                "%d of the %d images failed to decode and were not scored; the results are over "
                "the other %d",
                n_images - result.n,
                n_images,
                result.n,
            )
        if wants_report:
            assert predictions is not None
            finish(
                report,
                result,
                predictions,
                classes=dataset.classes,
                real=real,
                real_outputs=mapped,
                model_name=cfg.model,
                param_count=params,
                settings=settings,
            )
        if per_class_csv is not None and dist.is_main:
            write_per_class(result, dataset.classes, Path(per_class_csv))
        return result
    finally:
        distributed.teardown(dist)


def check_csv_target(path: Path, ckpt_path: str | Path | Checkpoint) -> None:
    """Before any validation: `path` is a file (new, or a regular file to replace; never a
    link) in an existing folder, not the checkpoint itself."""
    keep = ckpt_path.path if isinstance(ckpt_path, Checkpoint) else ckpt_path
    check_output_file(path, "--per_class_csv", keep=keep, kept="the checkpoint")
    if not path.parent.is_dir():
        raise MissingFile(f"--per_class_csv: the folder of {str(path)!r} does not exist")


def check_class_names(classes: list[str]) -> None:
    """Before any validation: the class names can be written to the per-class CSV as UTF-8."""
    for name in classes:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"--per_class_csv: the class folder name {name!r} is not valid UTF-8; rename it "
                "(or drop --per_class_csv)"
            ) from None


def write_per_class(result: EvalResult, classes: list[str], path: Path) -> None:
    """The report's per_class.csv columns (class, images, correct, precision, recall = top-1
    of the class, F1), written whole or not at all."""
    rows = per_class_count_rows(
        result.class_total.tolist(),
        result.class_correct.tolist(),
        result.class_predicted.tolist(),
        classes,
    )
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerows([PER_CLASS_COLUMNS, *rows])
    data = text.getvalue().encode("utf-8")
    fileio.write_bytes(path, data)
