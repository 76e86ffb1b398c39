"""`res2net saliency train | predict | eval`: salient object detection on image/mask folders
(DIR/images/<name>.jpg with DIR/masks/<name>.png)."""

from __future__ import annotations

import argparse
import math
from functools import partial
from pathlib import Path

from ..errors import ConfigError
from ..guards import check_output_file, printable
from .predict import Skipped, add_pretrained_flag

DEVICE_HELP = "cuda, cpu... (default: cuda when available, else cpu)"
HELP = "salient object detection: train on image/mask folders, predict masks, evaluate MAE / max F"


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="saliency_command", required=True, metavar="ACTION")

    t = sub.add_parser(
        "train",
        help="train a saliency model",
        allow_abbrev=False,
        description="Train a saliency model on DIR/images/*.jpg + DIR/masks/*.png (same stems).",
    )
    t.add_argument("--data", required=True, help="training folder with images/ and masks/")
    t.add_argument(
        "--val", help="validation folder with images/ and masks/ (MAE and max F after training)"
    )
    t.add_argument(
        "--model", default="res2net50", help="backbone architecture name (default res2net50)"
    )
    t.add_argument(
        "--ckpt_path", "--ckpt-path", help="ImageNet weights for the backbone, any format"
    )
    add_pretrained_flag(t, "backbone weights")
    t.add_argument(
        "--out",
        default="saliency.pth",
        help="where to write the trained model (default saliency.pth)",
    )
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch_size", "--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight_decay", "--weight-decay", type=float, default=1e-4)
    t.add_argument("--image_size", "--image-size", type=int, default=352)
    t.add_argument("--decoder_channels", "--decoder-channels", type=int, default=64)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help=DEVICE_HELP)

    pr = sub.add_parser(
        "predict",
        help="write saliency masks for images",
        allow_abbrev=False,
        description="Write one grayscale PNG mask (0..255) per image, same size as the image.",
    )
    pr.add_argument(
        "images", nargs="+", help="image files or folders (every image inside, recursively)"
    )
    pr.add_argument("--weights", required=True, help="a model written by `res2net saliency train`")
    pr.add_argument("--out", default="saliency", help="output folder (default ./saliency)")
    pr.add_argument("--device", help=DEVICE_HELP)

    e = sub.add_parser(
        "eval", help="MAE and max F-measure on an image/mask folder", allow_abbrev=False
    )
    e.add_argument("--data", required=True, help="folder with images/ and masks/")
    e.add_argument("--weights", required=True, help="a model written by `res2net saliency train`")
    e.add_argument("--device", help=DEVICE_HELP)


def _print_metrics(name: str, m: dict[str, float]) -> None:
    print(
        f"{name}: MAE {m['mae']:.4f}  max F (beta^2=0.3) {m['max_f']:.4f}  ({m['images']} images)"
    )


def _train(args: argparse.Namespace) -> int:
    import torch

    from ..saliency import (
        SaliencyFolder,
        evaluate_saliency,
        saliency_res2net,
        save_saliency_model,
        train_saliency,
    )
    from ..saliency.engine import MAX_SIZE

    for name in ("epochs", "batch_size", "decoder_channels"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: give 1 or more")
    if not 32 <= args.image_size <= MAX_SIZE:
        raise ConfigError(f"--image_size {args.image_size}: give 32 to {MAX_SIZE}")
    if not 0 < args.lr < math.inf:  # NaN fails too; inf would end the first step in NaN
        raise ConfigError(f"--lr {args.lr}: give a positive finite number")
    if not 0 <= args.weight_decay < math.inf:
        raise ConfigError(f"--weight_decay {args.weight_decay}: give 0 or a positive finite number")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers}: give 0 or more")
    # before the training whose result it receives
    check_output_file(args.out, "--out", keep=args.ckpt_path, kept="the backbone checkpoint")
    torch.manual_seed(args.seed)
    dataset = SaliencyFolder(args.data, image_size=args.image_size, train=True)
    model = saliency_res2net(
        args.model,
        decoder_channels=args.decoder_channels,
        checkpoint_path=args.ckpt_path,
        pretrained=args.pretrained or False,
    )
    history = train_saliency(
        model,
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        device=args.device,
        workers=args.workers,
        seed=args.seed,
    )
    path = save_saliency_model(args.out, model, args.model, args.image_size)
    print(
        f"trained {args.epochs} epoch(s) on {len(dataset)} images: loss {history[0]:.4f} -> "
        f"{history[-1]:.4f}"
    )
    print(f"saved {path}")
    if args.val:
        _print_metrics(args.val, evaluate_saliency(model, args.val, args.image_size, args.device))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .. import fileio
    from ..inference import find_images, load_found_image, planned_outputs
    from ..saliency import load_saliency_model, saliency_geometry, saliency_mask

    files = find_images(args.images)
    out_dir = Path(args.out)
    targets = planned_outputs(out_dir, files, ".png")  # before the model is read and built
    model, meta = load_saliency_model(args.weights, args.device)
    named, skipped = {Path(image) for image in args.images}, Skipped("saliency predict")
    geometry = saliency_geometry(meta["image_size"])
    for (path, rel), out in zip(files, targets):
        image = load_found_image(path, named, geometry)  # decoded straight to the input size
        if isinstance(image, str):
            skipped.add(image)
            continue
        mask = saliency_mask(model, image, meta["image_size"], args.device)  # the image's size
        fileio.make_subdirectory(out_dir, rel.parent)  # never a planted link
        fileio.atomic_write(out, partial(mask.save, format="PNG"))
        print(printable(str(out)), flush=True)
    return skipped.exit_code(len(files))


def _eval(args: argparse.Namespace) -> int:
    from ..saliency import evaluate_saliency, load_saliency_model

    model, meta = load_saliency_model(args.weights, args.device)
    metrics = evaluate_saliency(model, args.data, meta["image_size"], args.device)
    _print_metrics(args.data, metrics)
    return 0


def run(args: argparse.Namespace, extra: list[str]) -> int:
    args.device = args.device or _device()
    actions = {"train": _train, "predict": _predict, "eval": _eval}
    return actions[args.saliency_command](args)
