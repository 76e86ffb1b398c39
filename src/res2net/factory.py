"""`create_model`: a name (and optionally weights) in, a ready model out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError
from .models import build_model, resolve_name
from .models.base import Res2NetBase
from .models.layers import channels_last_on_cpu
from .weights.entry import get_weights
from .weights.hubfolder import is_hub_name
from .weights.loading import Checkpoint, load_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

_NOT_GIVEN: Any = object()


def create_model(
    name: str,
    *,
    pretrained: bool | str = False,
    num_classes: int = _NOT_GIVEN,
    checkpoint_path: str | Path | None = None,
    checkpoint: Checkpoint | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (1, 2, 3, 4),
    cpu_channels_last: bool = True,
    **kwargs: Any,
) -> Res2NetBase:
    """Build model `name` (see `list_models()`), optionally with weights.

    - `pretrained`: True (default source) or a source name ("mindcv", "official", "timm",
      "openmmlab") downloads the published weights into the torch hub cache; their typed entry
      (`Weights`: URLs, hash, license, metrics, eval transform) is `model.pretrained_weights`.
    - `checkpoint_path`: a local file in any supported format (MindSpore .ckpt; torch .pth from
      the official repo, timm, OpenMMLab or this project's training; .safetensors), detected
      from its content; or `checkpoint`: one already read (`read_checkpoint`), so that a
      caller that also needs its class names or eval transform reads the file once.
    - `num_classes` (default 1000): when given and different from the checkpoint's classifier,
      the classifier is re-initialised and everything else loaded, with one warning
      (fine-tuning); without it, a checkpoint for another number of classes is an error.
    - `features_only=True`: no classifier; the model returns the maps at `out_indices`
      (0 = stem, stride 2; 1..4 = stages, strides 4, 8, 16, 32), with `feature_channels`.
    - `cpu_channels_last` (default True): 4-d CPU inputs are made channels_last before the
      first layer (a forward pre-hook), measurably faster with oneDNN; False keeps the caller's
      layout. The weights keep the standard layout either way.
    - Other keyword arguments go to the architecture: in_chans, drop_rate, drop_path_rate,
      zero_init_last, output_stride, norm_layer, act_layer.
    - `name` may also be `hf-hub:org/name[@revision]` (through huggingface_hub and its cache) or
      `local-dir:/path`: a model folder as `res2net.push_to_hub` writes it (see `res2net.hub`).
    """
    if is_hub_name(name):
        if pretrained or checkpoint_path is not None or checkpoint is not None or features_only:
            raise CheckpointError(
                f"{name}: a Hub model brings its weights; "
                "drop pretrained/checkpoint_path/features_only"
            )
        hub = read_checkpoint(name)
        classes = hub.num_classes if num_classes is _NOT_GIVEN else num_classes
        assert hub.arch is not None and classes is not None  # a checked Hub folder has both
        model = create_model(
            hub.arch,
            checkpoint=hub,
            num_classes=classes,
            cpu_channels_last=cpu_channels_last,
            **kwargs,
        )
        if hub.hub_config is not None:  # label names and eval transform, as timm keeps it
            model.hub_config = hub.hub_config
        return model
    resolve_name(name)
    if sum((bool(pretrained), checkpoint_path is not None, checkpoint is not None)) > 1:
        raise CheckpointError("give one of pretrained=, checkpoint_path= or checkpoint=")
    explicit_classes = num_classes is not _NOT_GIVEN
    num_classes = 1000 if num_classes is _NOT_GIVEN else int(num_classes)
    if num_classes < 0:
        raise CheckpointError(f"num_classes={num_classes} is invalid: it must be >= 0")
    if pretrained:
        checkpoint = read_checkpoint(get_weights(name, pretrained))
    elif checkpoint_path is not None:
        checkpoint = read_checkpoint(checkpoint_path, model=name)
    model = build_model(
        name,
        num_classes=num_classes,
        out_indices=tuple(out_indices) if features_only else None,
        **kwargs,
    )
    # the published entry it loaded (`Weights`), as timm's pretrained_cfg
    model.pretrained_weights = checkpoint.weights if checkpoint is not None else None
    if cpu_channels_last:
        model.register_forward_pre_hook(channels_last_on_cpu)
    if checkpoint is not None:
        # a new head only when asked for another class count than the checkpoint's
        new_head = explicit_classes and num_classes != checkpoint.num_classes
        load_checkpoint(model, checkpoint, strict=not features_only, reset_head=new_head)
    return model


def create_backbone(
    backbone: str | Res2NetBase,
    out_indices: Sequence[int],
    checkpoint_path: str | Path | None = None,
    pretrained: bool | str = False,
    **model_kwargs: Any,
) -> Res2NetBase:
    """A features_only trunk for detection, segmentation and saliency heads: built from a model
    name (with optional weights and architecture keyword arguments), or an already built
    features_only model, which is returned as is."""
    if isinstance(backbone, nn.Module):
        if checkpoint_path is not None or pretrained:
            raise CheckpointError(
                "give checkpoint_path/pretrained with a model name, not with a model"
            )
        if getattr(backbone, "fc", None) is not None:
            raise CheckpointError(
                "the backbone model has a classifier: build it with features_only=True"
            )
        return backbone
    return create_model(
        backbone,
        features_only=True,
        out_indices=tuple(out_indices),
        checkpoint_path=checkpoint_path,
        pretrained=pretrained,
        **model_kwargs,
    )
