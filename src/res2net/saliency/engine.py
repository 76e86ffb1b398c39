"""Training, prediction, evaluation and checkpoints of saliency networks."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .. import fileio
from ..data import ResizeTo, cap_workers, load_image
from ..engine.progress import StepReporter
from ..errors import ConfigError
from ..factory import create_model
from ..guards import check_output_file, short
from ..models import list_models
from ..weights import torchfile
from .data import SaliencyFolder, find_pairs, load_mask, saliency_transform
from .losses import bce_iou_loss
from .metrics import SaliencyMetrics
from .model import SaliencyNet, saliency_res2net

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "res2net-saliency"
MAX_SIZE = 4096  # largest image_size a saved model may ask for


def train_saliency(
    model: SaliencyNet,
    dataset: SaliencyFolder,
    *,
    epochs: int = 10,
    batch_size: int = 8,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    device: str | torch.device = "cpu",
    workers: int = 0,
    seed: int = 0,
) -> list[float]:
    """Train `model` on `dataset` with AdamW and BCE + IoU loss; returns each epoch's mean loss."""
    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs={epochs} and batch_size={batch_size} must be >= 1")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=cap_workers(workers),
        generator=torch.Generator().manual_seed(seed),
        drop_last=len(dataset) > batch_size,
    )
    model.to(device).train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        reporter = StepReporter(
            len(loader),
            desc=f"epoch {epoch + 1}/{epochs}",
            later_steps=(epochs - epoch - 1) * len(loader),
        )
        log_every = max(1, len(loader) // 4)
        for step, (images, masks) in enumerate(loader, start=1):
            images, masks = images.to(device), masks.to(device)
            loss = bce_iou_loss(model(images), masks)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"the loss is {loss.item()} at epoch {epoch + 1}: lower the learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * images.shape[0]
            count += images.shape[0]
            shown = step % log_every == 0 or step == len(loader)
            reporter.update(step, images.shape[0], loss.item() if shown else None, lr)
        reporter.close()
        history.append(total / count)
        log.info("epoch %d/%d  loss %.4f", epoch + 1, epochs, history[-1])
    return history


_MASK_BAND_PIXELS = 1 << 18  # pixels of a saliency mask computed at once (1 MB of floats)


def saliency_geometry(image_size: int) -> ResizeTo:
    """The saliency transform's resize, for `load_image(resize=...)`: an image decoded straight
    to the model's input."""
    return ResizeTo(image_size, image_size)


def source_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the file `image` was decoded from: its own size unless it was decoded
    to a smaller one (`load_image(resize=...)`)."""
    width, height = image.info.get("source_size", image.size)
    return width, height


def _logits(
    model: SaliencyNet, image: Image.Image, image_size: int, device: str | torch.device
) -> torch.Tensor:
    """The model's (image_size, image_size) logits of an RGB PIL image, on the CPU."""
    model.to(device).eval()
    x = saliency_transform(image_size)(image).unsqueeze(0).to(device)
    return model(x)[0, 0].float().cpu()


@torch.no_grad()
def predict_saliency(
    model: SaliencyNet,
    image: Image.Image,
    image_size: int = 352,
    device: str | torch.device = "cpu",
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The saliency map (H, W) in 0..1 of an RGB PIL image at `size` (H, W): by default the
    size of the image's file (`source_size`), so that an image decoded straight to the model's
    input (`saliency_geometry`) gets its map at its own size."""
    height, width = size or source_size(image)[::-1]
    logits = _logits(model, image, image_size, device)[None, None]
    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return torch.sigmoid(logits)[0, 0]


@torch.no_grad()
def saliency_mask(
    model: SaliencyNet,
    image: Image.Image,
    image_size: int = 352,
    device: str | torch.device = "cpu",
) -> Image.Image:
    """`predict_saliency` as a grayscale mask (0..255, "L") at the size of the image's file,
    made a band of rows at a time: the logits resized by PIL's bilinear filter (the same
    samples as `F.interpolate(align_corners=False)`), then the sigmoid. Beside the 1-byte mask
    it holds one band, never a float map of the whole image."""
    width, height = source_size(image)
    logits = Image.fromarray(_logits(model, image, image_size, device).numpy())  # mode "F"
    scale = logits.height / height
    mask = Image.new("L", (width, height))
    rows = max(1, _MASK_BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        box = (0.0, top * scale, float(logits.width), bottom * scale)
        band = np.asarray(
            logits.resize((width, bottom - top), Image.Resampling.BILINEAR, box=box)
        ).copy()
        band = 127.5 * (1 + np.tanh(band / 2))  # the sigmoid in 0..255, without overflow
        mask.paste(Image.fromarray(band.round().astype(np.uint8)), (0, top))
    return mask


def evaluate_saliency(
    model: SaliencyNet,
    root: str | os.PathLike,
    image_size: int = 352,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """MAE and max F-measure of `model` on the image/mask folder `root`, each map compared with
    its mask at the mask's own resolution: {"mae", "max_f", "images"}."""
    metrics = SaliencyMetrics()
    for image_path, mask_path in find_pairs(root):
        gt = load_mask(mask_path)
        image = load_image(image_path, resize=saliency_geometry(image_size))
        pred = predict_saliency(model, image, image_size, device, size=(gt.shape[0], gt.shape[1]))
        metrics.update(pred.clamp(0, 1), gt)
    return metrics.compute()


def save_saliency_model(
    path: str | os.PathLike, model: SaliencyNet, backbone: str, image_size: int
) -> Path:
    """Write `model`'s weights with what `load_saliency_model` needs to rebuild it, atomically:
    an interrupted save leaves an earlier file at `path` as it was."""
    path = check_output_file(path, "saliency model")
    fileio.make_directory(path.parent)
    ckpt = {
        "kind": CHECKPOINT_KIND,
        "backbone": backbone,
        "decoder_channels": model.decoder.predict.in_channels,
        "image_size": image_size,
        "state_dict": model.state_dict(),
    }
    fileio.atomic_write(path, lambda f: torch.save(ckpt, f))
    return path


def load_saliency_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SaliencyNet, dict[str, Any]]:
    """A saliency network saved by `save_saliency_model`, in eval mode, with its metadata
    (backbone, decoder_channels, image_size). The file is untrusted: its metadata is checked,
    and the network is first built on the meta device to compare every shape with the file's,
    so that what is allocated is never more than the file holds. ValueError naming the file
    and the key otherwise."""
    ckpt = torchfile.load(path)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"'{path}' is not a saliency model saved by `res2net saliency train`")
    meta = {k: ckpt.get(k) for k in ("backbone", "decoder_channels", "image_size")}
    state = ckpt.get("state_dict")
    backbone, channels, size = meta.values()
    if not isinstance(backbone, str) or backbone not in list_models():
        raise ConfigError(f"'{path}': 'backbone' must be a model name, got {short(backbone)}")
    channels = _count(path, "decoder_channels", channels)
    if _count(path, "image_size", size) > MAX_SIZE:
        raise ConfigError(f"'{path}': 'image_size' is {size}, more than the {MAX_SIZE} allowed")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"'{path}': 'state_dict' must be a dict of tensors")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in _build(backbone, channels).state_dict().items()}
    missing = [k for k in shapes if k not in state]
    wrong = [k for k in state if k not in shapes or state[k].shape != shapes[k]]
    if missing or wrong:
        raise ConfigError(
            f"'{path}': does not match a {backbone} saliency network with {channels} decoder "
            f"channels: {len(missing)} missing tensors (e.g. {short(missing[:2])}), "
            f"{len(wrong)} unexpected or of another shape (e.g. {short(wrong[:2])})"
        )
    model = _build(backbone, channels)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def _count(path: str | os.PathLike, key: str, value: Any) -> int:
    """`value` when it is a positive integer; else ValueError naming the file and the key."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"'{path}': {key!r} must be a positive integer, got {short(value)}")
    return value


def _build(backbone: str, decoder_channels: int) -> SaliencyNet:
    """The untrained network `load_saliency_model` fills (trunk without weights, no warning)."""
    return saliency_res2net(
        create_model(backbone, features_only=True), decoder_channels=decoder_channels
    )
