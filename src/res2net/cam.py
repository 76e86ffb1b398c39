"""Class activation maps: where in the image a classifier finds the evidence for a class.

* `grad_cam` (Selvaraju et al., ICCV 2017): the chosen stage's feature maps weighted by the
  spatial mean of the class score's gradient, works on any stage.
* `class_activation_map` (Zhou et al., CVPR 2016): the last stage's maps weighted by the
  classifier's row for the class; exact for the global-pool + linear head of these models.

Stages are named as in the models: `layer1`..`layer4` (ResNet-style nets, strides 4..32) and
`level2`..`level5` (DLA nets). Any other submodule name (e.g. `layer4.2.conv3`) works too.
Maps are returned at input resolution, ReLU'd and scaled to 0..1 per image (all zeros when
nothing in the image supports the class). Call `model.eval()` first.

The figure helpers (`overlay`, `save_cam_figure`) draw with matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import fileio
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import ConfigError
from .models.base import Res2NetBase
from .models.dla import DLA


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The names of the four stages (strides 4, 8, 16, 32) of a Res2Net or DLA model."""
    if isinstance(model, DLA):
        return ("level2", "level3", "level4", "level5")
    return ("layer1", "layer2", "layer3", "layer4")


def find_layer(model: nn.Module, layer: str | nn.Module | None) -> nn.Module:
    """The submodule called `layer` (None: the last stage); a module is returned as is."""
    if isinstance(layer, nn.Module):
        return layer
    name = layer or stage_names(model)[-1]
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(
            f"the model has no layer {name!r}; its stages are {', '.join(stage_names(model))} "
            "(or give any submodule name, e.g. 'layer4.0.conv3')"
        ) from None


def _normalize_maps(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(N, h, w) raw maps -> (N, H, W): ReLU, bilinear upsampling, each map divided by its max."""
    maps = F.interpolate(F.relu(maps).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    maps = maps.squeeze(1)
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12)
    return maps / peak[:, None, None]


def _targets(
    logits: torch.Tensor, target_class: int | Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """Class index per image: the given one(s), or the top-scoring class."""
    if target_class is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target_class, device=logits.device).long().reshape(-1)
    t = t.expand(logits.shape[0]) if t.numel() == 1 else t
    if t.numel() != logits.shape[0]:
        raise ConfigError(f"got {t.numel()} target classes for {logits.shape[0]} images")
    if bool((t < 0).any()) or bool((t >= logits.shape[1]).any()):
        raise ConfigError(f"target class out of range: the model has {logits.shape[1]} classes")
    return t


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target_class: int | Sequence[int] | torch.Tensor | None = None,
    layer: str | nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of `images` (N, 3, H, W) at `layer` (default: the last stage).

    `target_class`: one class for all images, one per image, or None for each image's top class.
    Returns (maps (N, H, W) in 0..1, logits (N, num_classes)). Works for any classifier that
    maps images to logits, with any stage or submodule as `layer`.
    """
    module = find_layer(model, layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # a graph even when the weights are frozen
            logits = model(x)
            if not captured or not isinstance(captured[-1], torch.Tensor):
                raise ConfigError(f"layer {layer!r} produced no feature map in the forward pass")
            acts = captured[-1]
            targets = _targets(logits, target_class)
            score = logits.gather(1, targets[:, None]).sum()
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    maps = (weights * acts).sum(dim=1).detach()
    return _normalize_maps(maps, tuple(images.shape[-2:])), logits.detach()


@torch.no_grad()
def class_activation_map(
    model: Res2NetBase,
    images: torch.Tensor,
    target_class: int | Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM of `images` (N, 3, H, W): the last stage's maps weighted by the classifier's weights
    for the class. Needs the global-pool head (not a features_only model).

    Returns (maps (N, H, W) in 0..1, logits (N, num_classes)), like `grad_cam`; for these
    models it equals Grad-CAM at the last stage."""
    fc = getattr(model, "fc", None)
    if not isinstance(fc, (nn.Linear, nn.Conv2d)):
        raise ConfigError(
            "CAM needs a model with its classifier (a global-pool + linear/1x1-conv head)"
        )
    feats = model.forward_features(images)
    logits = model.forward_head(feats)
    targets = _targets(logits, target_class)
    weight = fc.weight.reshape(fc.weight.shape[0], -1)[targets]  # (N, C)
    maps = torch.einsum("nc,nchw->nhw", weight, feats)
    return _normalize_maps(maps, tuple(images.shape[-2:])), logits


def denormalize(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """Normalized (N, 3, H, W) tensors back to (N, H, W, 3) uint8 pictures (mean/std in 0..255
    units, as in `eval_transform`): exactly the pixels the model saw."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    pixels = (images.detach() * s + m).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def overlay(
    image: np.ndarray, cam: np.ndarray | torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a (H, W) map in 0..1 over an (H, W, 3) uint8 picture with a colour map."""
    from matplotlib import colormaps

    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    if cam.shape != image.shape[:2]:
        raise ConfigError(f"map shape {cam.shape} differs from the picture's {image.shape[:2]}")
    heat = colormaps[cmap](np.clip(cam, 0, 1))[..., :3]
    mixed = (1 - alpha) * image.astype(np.float64) / 255 + alpha * heat
    return (np.clip(mixed, 0, 1) * 255).round().astype(np.uint8)


def save_cam_figure(
    path: str | Path,
    image: np.ndarray,
    cam: np.ndarray | torch.Tensor,
    top: Sequence[tuple[str, float]],
    title: str = "",
) -> Path:
    """Write a PNG with three panels: the picture, the map over it, and the top classes with
    their probabilities. Returns the path written."""
    from matplotlib.figure import Figure

    path = Path(path)
    fileio.make_directory(path.parent)
    fig = Figure(figsize=(11, 3.8), dpi=100, layout="constrained")
    ax_img, ax_cam, ax_top = fig.subplots(1, 3, width_ratios=(1, 1, 1.1))
    ax_img.imshow(image)
    ax_img.set_title("input")
    ax_cam.imshow(overlay(image, cam))
    ax_cam.set_title(title or "class activation map")
    for ax in (ax_img, ax_cam):
        ax.set_axis_off()
    names = [_short(name) for name, _ in top][::-1]
    probs = [p for _, p in top][::-1]
    ax_top.barh(range(len(top)), probs, color="tab:blue")
    ax_top.set_yticks(range(len(top)), names)
    ax_top.set_xlim(0, max(1e-6, max(probs, default=0)) * 1.25)
    for i, p in enumerate(probs):
        ax_top.text(p, i, f" {p * 100:.1f}%", va="center")
    ax_top.set_title("top classes")
    fileio.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
