"""`res2net cam IMAGE... --model NAME --ckpt_path FILE`: one PNG per image with the photo, its
class activation map and the top classes. A folder argument means every image in it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ConfigError
from ..guards import printable
from .predict import Skipped, add_eval_flags, add_pretrained_flag

HELP = "class activation maps (Grad-CAM / CAM): a PNG per image with the heat map and top classes"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "images", nargs="+", help="image files or folders (every image inside, recursively)"
    )
    p.add_argument("--model", required=True, help="architecture name, e.g. res2net50")
    p.add_argument(
        "--ckpt_path", "--ckpt-path", help="weights in any format (without them: random weights)"
    )
    add_pretrained_flag(p)
    p.add_argument(
        "--class",
        dest="target_class",
        type=int,
        help="class index to explain (default: each image's top class)",
    )
    p.add_argument(
        "--layer",
        help="stage to explain: layer1..layer4 (ResNet-style), level2..level5 (DLA); default: the "
        "last",
    )
    p.add_argument(
        "--method",
        choices=("gradcam", "cam"),
        default="gradcam",
        help="cam works on the last stage only",
    )
    p.add_argument("--out", default="cam", help="output folder (default: ./cam)")
    add_eval_flags(p)
    p.add_argument("--device", help="cuda, cpu... (default: cuda when available, else cpu)")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from .. import fileio
    from ..cam import class_activation_map, denormalize, grad_cam, save_cam_figure
    from ..inference import (
        find_images,
        load_found_image,
        model_classes_and_transform,
        planned_outputs,
        read_weights,
        trained_model,
    )

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.method == "cam" and args.layer is not None:
        raise ConfigError(
            "--method cam uses the last stage only; drop --layer or use --method gradcam"
        )
    files = find_images(args.images)
    out_dir = Path(args.out)
    targets = planned_outputs(out_dir, files, "_cam.png")  # before the model is read and built
    checkpoint = read_weights(args.model, ckpt_path=args.ckpt_path, pretrained=args.pretrained)
    model = trained_model(args.model, checkpoint)
    names, spec = model_classes_and_transform(
        model,
        checkpoint,
        classes=args.classes,
        image_resize=args.image_resize,
        crop_pct=args.crop_pct,
    )
    model = model.to(args.device)
    transform, resize = spec.transform(), spec.resize_crop()
    named, skipped = {Path(image) for image in args.images}, Skipped("cam")
    for (path, rel), target in zip(files, targets):
        image = load_found_image(path, named, resize)  # decoded straight to the input size
        if isinstance(image, str):
            skipped.add(image)
            continue
        x = transform(image).unsqueeze(0).to(args.device)
        if args.method == "cam":
            maps, logits = class_activation_map(model, x, args.target_class)
            layer = "last stage"
        else:
            maps, logits = grad_cam(model, x, args.target_class, args.layer)
            layer = args.layer or "last stage"
        probs = logits.softmax(dim=1)[0]
        p, idx = probs.topk(min(args.topk, len(names)))
        top = [(names[i], float(v)) for v, i in zip(p.tolist(), idx.tolist())]
        explained = args.target_class if args.target_class is not None else int(idx[0])
        title = f"{'CAM' if args.method == 'cam' else 'Grad-CAM'} ({layer}): {names[explained]}"
        fileio.make_subdirectory(out_dir, rel.parent)  # never a planted link
        written = save_cam_figure(target, denormalize(x)[0], maps[0], top, title)
        print(printable(str(written)), flush=True)
    return skipped.exit_code(len(files))
