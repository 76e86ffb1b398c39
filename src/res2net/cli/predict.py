"""`res2net predict IMAGE... --model NAME --ckpt_path FILE`: top-k classes per image."""

from __future__ import annotations

import argparse
import json
import sys

from ..guards import check_regular_file, printable

HELP = "classify images: top-k classes with names (ImageNet's, or the training folder's)"


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 would print no class at all)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="+", help="image files or folders (every image inside, recursively)"
    )
    p.add_argument("--model", required=True, help="architecture name, e.g. res2net50")
    p.add_argument("--ckpt_path", "--ckpt-path", help="weights in any format")
    add_pretrained_flag(p)
    add_eval_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON lines")


def pretrained_source(value: str) -> bool | str:
    """`--pretrained`'s value as `create_model(pretrained=...)` takes it: True/False (as the
    recipes' `pretrained: True` and Python's `pretrained=True`) or a source name."""
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0", "none", ""):
        return False
    return lowered


def add_pretrained_flag(p: argparse.ArgumentParser, what: str = "weights") -> None:
    p.add_argument(
        "--pretrained",
        type=pretrained_source,
        default=False,
        help=f"download published {what}: True (the default source) or a source (mindcv, "
        "official, timm, openmmlab)",
    )


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    """The flags `predict` and `cam` share: class names, how many top classes, and the
    evaluation transform's size when the checkpoint's is not wanted."""
    add_classes_flag(p)
    p.add_argument("--topk", type=positive_int, default=5)
    add_transform_flags(p)


def add_classes_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--classes",
        help="class names: a training folder (one subfolder per class) or a text file, one per "
        "line",
    )


def add_transform_flags(p: argparse.ArgumentParser) -> None:
    """The evaluation transform's size, when the checkpoint's is not wanted (predict, cam,
    serve)."""
    p.add_argument(
        "--image_resize",
        "--image-resize",
        type=int,
        help="eval crop size (default: the checkpoint's, else 224)",
    )
    p.add_argument(
        "--crop_pct",
        "--crop-pct",
        type=float,
        help="crop fraction of the resized image (default: the checkpoint's, else 0.875)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.ckpt_path:  # answers before torch is imported
        check_regular_file(args.ckpt_path, "checkpoint")
    from ..inference import iter_predictions

    predictions = iter_predictions(
        args.images,
        args.model,
        ckpt_path=args.ckpt_path,
        pretrained=args.pretrained,
        classes=args.classes,
        topk=args.topk,
        image_resize=args.image_resize,
        crop_pct=args.crop_pct,
    )
    done, skipped = 0, Skipped("predict")
    for prediction in predictions:  # printed as they come: a long folder shows progress
        done += 1
        if prediction.error is not None:
            skipped.add(prediction.error)
        elif args.json:
            top = [{"class": c, "prob": p} for c, p in prediction.top]
            print(json.dumps({"image": prediction.image, "top": top}), flush=True)
        else:
            print(printable(prediction.image))
            for name, prob in prediction.top:
                print(f"  {prob * 100:6.2f}%  {printable(name)}", flush=True)
    return skipped.exit_code(done)


class Skipped:
    """The images a command skipped (found in a folder, and unreadable): one line on stderr
    each as it goes, then a count and exit code 1 at the end (`predict`, `cam`,
    `saliency predict`)."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.count = 0

    def add(self, error: str) -> None:
        self.count += 1
        print(f"res2net {self.command}: skipped: {printable(error)}", file=sys.stderr)

    def exit_code(self, total: int) -> int:
        """0, or 1 after one line on stderr when images were skipped."""
        if not self.count:
            return 0
        print(
            f"res2net {self.command}: {self.count} of {total} images could not be read (see above)",
            file=sys.stderr,
        )
        return 1
