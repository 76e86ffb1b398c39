"""Weights from anywhere as one value, `Checkpoint`, and their loading into a model.

`read_checkpoint(source)` is the one way weights enter the program. It reads a file of any
supported format (see `formats`), a published entry of the pretrained table (`Weights`,
downloaded once into the torch hub cache) or a Hub model folder (`hf-hub:org/name[@rev]`,
`local-dir:/path`) exactly once, into memory, within `max_bytes`, and returns everything the
commands need from it: the state dict, its format, architecture, class count and names, eval
transform and origin. `load_checkpoint(model, checkpoint)` then loads it; nothing re-opens the
file. Memory: the file's bytes plus the tensors built from them, twice the file's size.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, MissingFile
from ..guards import short
from . import torchfile
from .entry import EvalTransform, Weights
from .formats import parse, state_num_classes
from .hubfolder import CONFIG_NAME, WEIGHTS_NAME, eval_args, hub_folder, is_hub_name, read_config
from .mindspore import mindcv_to_ours
from .pretrained import download_weights, pretrained_entries

log = logging.getLogger(__name__)

MAX_FILE_BYTES = torchfile.MAX_FILE_BYTES
_CLASSIFIER_PREFIXES = ("fc.",)


@dataclass(frozen=True)
class Checkpoint:
    """Weights read once from a file, a pretrained-table entry or a Hub model folder, with
    everything known about them (as torchvision's `Weights`: weights, transforms, categories).

    `state_dict` uses our names (prefixes stripped, OpenMMLab's mapped; MindCV's are mapped when
    loaded). `num_classes` is the classifier's size (None without one), checked against the
    architecture's features when one is known. `eval` is the evaluation transform the weights
    carry (a `.safetensors` header, a training run's config, the pretrained table or a Hub
    config; None when none does) and `eval_origin` says which. `origin` names the source in
    messages: the file's path, or the `hf-hub:`/`local-dir:` name."""

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    format: str
    origin: str
    path: Path | None = None
    arch: str | None = None
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    eval: EvalTransform | None = None
    eval_origin: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    weights: Weights | None = None
    hub_config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def eval_transform(self) -> tuple[EvalTransform, str] | None:
        """(transform, where it was read), as `resolve_eval_transform` takes it; or None."""
        return None if self.eval is None else (self.eval, self.eval_origin)


def read_checkpoint(
    source: Checkpoint | Weights | str | Path,
    *,
    model: str | None = None,
    max_bytes: int = MAX_FILE_BYTES,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Checkpoint:
    """The `Checkpoint` of `source`: a weights file (MindSpore `.ckpt`, torch `.pth`/`.pt`,
    `.safetensors`; the format detected from its content), a pretrained-table entry
    (`get_weights(name)`; downloaded into `cache_dir`, default the torch hub cache), or a Hub
    model folder (`hf-hub:org/name[@rev]`, `local-dir:/path`). A `Checkpoint` is returned as is.

    The weights file is read once, into memory, and refused (CheckpointError naming it) when
    larger than `max_bytes`, unreadable, or not loadable within twice its size. `model`, the
    architecture the weights are for when the file does not name it, checks the classifier's
    features and finds the pretrained table's eval transform for a published file name."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Weights):
        path = download_weights(source.entry(), cache_dir, progress=progress)
        found = _from_file(path, model=model or source.model, max_bytes=max_bytes)
        return replace(
            found,
            arch=found.arch or source.model,
            eval=source.eval,
            eval_origin=f"pretrained {source.source} {source.file_name}",
            weights=source,
        )
    if isinstance(source, str) and is_hub_name(source):
        return _from_hub(source, cache_dir=cache_dir, max_bytes=max_bytes)
    return _from_file(Path(source), model=model, max_bytes=max_bytes)


def _from_file(path: Path, *, model: str | None, max_bytes: int) -> Checkpoint:
    parsed = parse(torchfile.read_file(path, max_bytes), path)
    arch = parsed.metadata.get("arch") or None
    name = model or arch
    found = _file_eval(parsed.metadata, path, name)
    return Checkpoint(
        state_dict=parsed.state,
        format=parsed.format,
        origin=str(path),
        path=path,
        arch=arch,
        num_classes=state_num_classes(parsed.state, path, name),
        classes=parsed.classes,
        eval=found[0] if found else None,
        eval_origin=found[1] if found else "",
        metadata=parsed.metadata,
        skipped=tuple(parsed.skipped),
    )


def _file_eval(
    metadata: dict[str, str], path: Path, name: str | None
) -> tuple[EvalTransform, str] | None:
    """The eval transform a file carries: its metadata's `eval` (a `.safetensors` header or a
    training run's config), else the pretrained table's entry with the file's name."""
    try:
        if "eval" in metadata:
            settings = json.loads(metadata["eval"])
            if not isinstance(settings, dict):
                raise ValueError("not a mapping")
            return EvalTransform.from_dict(settings, f"{path} metadata"), f"checkpoint {path.name}"
        for entry in _entries(name):
            if entry["file_name"] == path.name:
                found = EvalTransform.from_dict(entry["eval"])
                return found, f"pretrained table ({entry['source']} {path.name})"
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: its 'eval' metadata cannot be used ({short(str(e), 120)})"
        ) from None
    return None


def _entries(name: str | None) -> list[dict[str, Any]]:
    if not name:
        return []
    try:
        return pretrained_entries(name)
    except ValueError:  # a name outside the zoo
        return []


def _from_hub(name: str, *, cache_dir: str | Path | None, max_bytes: int) -> Checkpoint:
    """A Hub model folder: its checked config, and its weights, which must be safetensors with
    the config's class count, so that a small config cannot size a huge classifier."""
    folder = hub_folder(name, cache_dir)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingFile(f"{folder}: no {WEIGHTS_NAME} there")
    parsed = parse(torchfile.read_file(weights, max_bytes), weights)
    if parsed.format != "safetensors":
        raise CheckpointError(
            f"{weights}: not a safetensors file; a model folder's weights must be"
        )
    arch = str(config["architecture"])
    n = state_num_classes(parsed.state, weights, arch)
    if n != config["num_classes"]:
        raise CheckpointError(
            f"{folder / CONFIG_NAME}: 'num_classes' is {config['num_classes']} but the "
            f"classifier in {WEIGHTS_NAME} has {n or 'no'} classes; the folder is inconsistent"
        )
    labels = config.get("label_names")
    return Checkpoint(
        state_dict=parsed.state,
        format=parsed.format,
        origin=name,
        path=weights,
        arch=arch,
        num_classes=n,
        classes=tuple(labels) if labels is not None else None,
        eval=EvalTransform.from_dict(eval_args(config, folder / CONFIG_NAME), name),
        eval_origin=name,
        metadata=parsed.metadata,
        hub_config=config,
    )


@dataclass
class LoadReport:
    """What `load_checkpoint` did: the format read, entries skipped as non-model state,
    keys the model lacked or the file lacked, and whether the classifier was re-initialised."""

    path: str
    format: str
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    head_reset: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def load_checkpoint(
    model: nn.Module,
    source: Checkpoint | str | Path,
    *,
    strict: bool = True,
    reset_head: bool = False,
) -> LoadReport:
    """Load a `Checkpoint` (or what `read_checkpoint` reads from `source`) into `model`, in place.

    MindCV and OpenMMLab names are mapped to ours; floating-point values are cast to the model's
    dtypes, and a tensor that is not floating-point where the model's is (integers, bools) is an
    error. A file none of whose tensors is one of the model's (empty, or another network's) is
    an error, `strict` or not. A classifier whose shape differs from the model's is an error,
    unless `reset_head` is True: then the model keeps its freshly initialised classifier,
    everything else is loaded, and one warning says so (the start of fine-tuning). `strict` as
    in `nn.Module.load_state_dict`, except that BatchNorm's `num_batches_tracked` counters,
    which other frameworks do not store, are never required. On any error the model is left
    unchanged.
    """
    checkpoint = read_checkpoint(source)
    path, fmt, skipped = checkpoint.origin, checkpoint.format, list(checkpoint.skipped)
    state = dict(checkpoint.state_dict)  # changed below; the checkpoint stays as it was
    if fmt == "mindspore" or any(
        k.endswith(".gamma") or k.startswith("classifier.") for k in state
    ):
        state = mindcv_to_ours(state, model)
    report = LoadReport(path=path, format=fmt, skipped=skipped, metadata=dict(checkpoint.metadata))

    own = model.state_dict()
    if not any(k in own for k in state):
        examples = short(list(state)[:3])
        found = (
            f"none of its {len(state)} tensors is one of the model's (e.g. {examples})"
            if state
            else "it holds no tensors"
        )
        raise CheckpointError(f"{path}: {found}; check the model name; nothing was loaded")
    head_keys = [k for k in state if k.startswith(_CLASSIFIER_PREFIXES)]
    own_head = [k for k in own if k.startswith(_CLASSIFIER_PREFIXES)]
    mismatched_head = [k for k in head_keys if k in own and own[k].shape != state[k].shape]
    if mismatched_head and not reset_head:
        n_file = state[mismatched_head[0]].shape[0]
        n_model = own[mismatched_head[0]].shape[0]
        raise CheckpointError(
            f"{path}: the checkpoint's classifier has {n_file} classes but the model has "
            f"{n_model}. "
            f"Build the model with num_classes={n_file} to use it as is, or ask for a new head "
            "(create_model(..., num_classes=N, checkpoint_path=...) or load_checkpoint(..., "
            "reset_head=True))."
        )
    head_fits = not mismatched_head and set(head_keys) == set(own_head)
    heads = ""  # the two classifiers, for the warning once a new head is loaded
    if reset_head and not head_fits:
        file_head = next(
            (f"{state[k].shape[0]} classes" for k in head_keys if k.endswith("weight")), "none"
        )
        model_head = f"{getattr(model, 'num_classes', '?')} classes" if own_head else "none"
        for k in head_keys:
            state.pop(k)
        for k in own_head:
            state[k] = own[k]
        report.head_reset = True
        heads = f"checkpoint's: {file_head}, model's: {model_head}"

    _check_dense(path, state)
    non_finite = []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)}: "
                "the checkpoint is for a different architecture"
            )
        if k in own and own[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(
                f"{path}: tensor {short(k)} holds {v.dtype} values where the model's "
                f"{own[k].dtype} weights go; nothing was loaded"
            )
        if k in own and not _all_finite(v):  # after the shape check: within the model's size
            non_finite.append(k)
        if k in own and v.is_floating_point():
            state[k] = v.to(own[k].dtype)
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)

    report.missing = [k for k in own if k not in state]
    report.unexpected = [k for k in state if k not in own]
    if strict and (report.missing or report.unexpected):
        # advice every caller can follow: a command-line user has no strict=False to pass
        mismatch = [
            f"{len(names)} {kind} keys (e.g. {names[:3]})"
            for kind, names in (("missing", report.missing), ("unexpected", report.unexpected))
            if names
        ]
        raise CheckpointError(
            f"{path}: does not match the model: {', '.join(mismatch)}. Is it a checkpoint of "
            "another model? Check the model name."
        )
    if non_finite:
        log.warning(
            "%s: %d tensors hold NaN or Inf values (%s%s); the model will compute NaN",
            path,
            len(non_finite),
            ", ".join(non_finite[:5]),
            ", ..." if len(non_finite) > 5 else "",
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if report.head_reset:  # said once loaded, so that it never precedes an error
        rest = (
            "all other weights loaded"
            if not report.missing
            else f"{len(report.missing)} other weights were not in the file"
        )
        log.warning(
            "%s: classifier not loaded (%s), the model's stays freshly initialised; %s",
            path,
            heads,
            rest,
        )
    if skipped:
        log.info(
            "%s: skipped %d non-model entries (%s...)", path, len(skipped), ", ".join(skipped[:3])
        )
    return report


def _check_dense(path: str | Path, state: dict[str, torch.Tensor]) -> None:
    """Before anything is copied: every tensor is dense and holds data on the CPU, so that
    `load_state_dict` cannot fail half-way."""
    for k, v in state.items():
        if v.layout != torch.strided or v.is_meta or v.is_quantized or v.device.type != "cpu":
            raise CheckpointError(
                f"{path}: tensor {short(k)} is not a dense CPU tensor ({v.layout}, "
                f"device {v.device}); nothing was loaded"
            )


def _all_finite(v: torch.Tensor) -> bool:
    """Whether `v` holds no NaN or Inf, checked on each stored element once: a dimension that
    repeats its elements (stride 0, an expanded view) is looked at once, not materialised."""
    if not (v.is_floating_point() or v.is_complex()):
        return True
    distinct = v.as_strided([1 if s == 0 else n for n, s in zip(v.shape, v.stride())], v.stride())
    return bool(torch.isfinite(distinct).all())
