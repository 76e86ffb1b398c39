"""`res2net convert SRC DST`: between MindSpore .ckpt, torch .pth and .safetensors; or
`res2net convert SRC --to-hub-folder DIR` / `--push-to-hub ORG/NAME`: a Hugging Face Hub model."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..weights.loading import Checkpoint

from ..config import MAX_CONFIG_BYTES
from ..errors import ConfigError
from ..guards import check_output_file, check_regular_file, quoted, read_regular_file

HELP = (
    "convert weights between formats (.ckpt <-> .pth <-> .safetensors; the output format "
    "follows DST's extension and holds float32 values), or into a Hugging Face Hub model "
    "folder (timm loads it too)"
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint to read (format detected from its content)")
    p.add_argument(
        "dst", nargs="?", help="file to write: .safetensors, .ckpt (MindSpore/MindCV) or .pth"
    )
    p.add_argument("--model", help="architecture name (needed unless SRC stores it)")
    p.add_argument(
        "--source",
        help="where the weights come from, stored in .safetensors metadata "
        "(mindcv, official, timm...)",
    )
    hub = p.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--to-hub-folder",
        "--to_hub_folder",
        dest="hub_folder",
        help="write model.safetensors + config.json + README.md (model card) into this folder",
    )
    hub.add_argument(
        "--push-to-hub",
        "--push_to_hub",
        dest="repo_id",
        help="upload to this Hub repository (org/name)",
    )
    hub.add_argument(
        "--classes", help="class names: a training folder (one subfolder per class) or a text file"
    )
    hub.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metric for the model card, e.g. top1=79.3 "
        "(repeatable; published weights bring theirs)",
    )
    hub.add_argument("--recipe", help="recipe YAML to show in the model card")
    hub.add_argument(
        "--license", default="apache-2.0", help="license in the model card (default apache-2.0)"
    )
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private")


def _metrics(pairs: list[str], published: dict) -> dict[str, float | str]:
    metrics: dict[str, float | str] = {
        k: published[k] for k in ("top1", "top5") if published.get(k) is not None
    }
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--metric {pair!r}: write KEY=VALUE, e.g. top1=79.3")
        try:
            metrics[key] = float(value)
        except ValueError:
            metrics[key] = value
    return metrics


def to_hub(args: argparse.Namespace, checkpoint: Checkpoint) -> str:
    """Write (and optionally upload) the Hub folder; returns what was written or pushed."""
    from ..hub import push_to_hub, save_to_folder
    from ..inference import class_names
    from ..weights.convert import loaded_model, weights_metadata
    from ..weights.pretrained import pretrained_entries

    model, arch = loaded_model(checkpoint, args.model)
    meta = weights_metadata(checkpoint, arch, model, args.source)
    num_classes = int(meta["num_classes"])
    published = next((e for e in pretrained_entries(arch) if e["source"] == meta["source"]), {})
    kwargs = dict(
        arch=arch,
        classes=class_names(args.classes, num_classes, checkpoint),
        eval_args=json.loads(meta["eval"]),
        metrics=_metrics(args.metric, published),
        recipe=_recipe_text(args.recipe) if args.recipe else None,
        license=args.license,
        source=meta["source"],
        datasets=["imagenet-1k"] if num_classes == 1000 else [],
    )
    written = []
    if args.hub_folder:
        written.append(
            str(save_to_folder(model, args.hub_folder, repo_name=args.repo_id, **kwargs))
        )
    if args.repo_id:
        written.append(push_to_hub(model, args.repo_id, private=args.private, **kwargs))
    return ", ".join(written)


def _recipe_text(path: str) -> str:
    """The recipe to publish with the model, read like any recipe (bounded, UTF-8)."""
    try:
        return read_regular_file(path, "--recipe", MAX_CONFIG_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--recipe {quoted(path)}: not UTF-8 text") from None


def run(args: argparse.Namespace, extra: list[str]) -> int:
    hub = args.hub_folder or args.repo_id
    if bool(args.dst) == bool(hub):
        raise ConfigError(
            "give either DST (a file) or --to-hub-folder DIR / --push-to-hub ORG/NAME"
        )
    local = not args.src.startswith(("hf-hub:", "hf_hub:", "local-dir:"))  # a Hub model: no file
    if local:
        check_regular_file(args.src, "checkpoint")  # answers before torch is imported
    if args.dst:  # the output refused before SRC is read and converted, not after
        check_output_file(args.dst, "DST")
    if args.hub_folder:
        from ..hub import check_folder

        check_folder(args.hub_folder)
    from ..weights.convert import convert
    from ..weights.loading import read_checkpoint

    checkpoint = read_checkpoint(args.src, model=args.model)  # the one read of SRC
    if hub:
        out = to_hub(args, checkpoint)
    else:
        out = str(convert(checkpoint, args.dst, args.model, args.source))
    print(f"wrote {out}")
    flags = "" if hub or args.dst.lower().endswith(".safetensors") else eval_flags(checkpoint)
    if flags:
        print(
            f"note: {args.dst} cannot hold the eval transform (only .safetensors has a header); "
            f"validate it with {flags}"
        )
    return 0


def eval_flags(checkpoint: Checkpoint) -> str:
    """The flags that give back the checkpoint's eval transform where it differs from the
    defaults, so a `.ckpt` or `.pth` conversion scores what the checkpoint scores ("" when
    nothing differs)."""
    from ..weights.entry import EvalTransform

    if checkpoint.eval is None:
        return ""
    t, default = checkpoint.eval, EvalTransform()
    shown = {
        "image_resize": str(t.image_resize),
        "crop_pct": f"{t.crop_pct:g}",
        "interpolation": t.interpolation,
        "mean": "[" + ",".join(f"{v * 255:g}" for v in t.mean) + "]",  # recipes' 0..255 units
        "std": "[" + ",".join(f"{v * 255:g}" for v in t.std) + "]",
    }
    differ = [k for k in shown if getattr(t, k) != getattr(default, k)]
    return " ".join(f"--{k} {shown[k]}" for k in differ)
