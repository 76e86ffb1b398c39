"""`res2net export FILE OUT`: a deployable file of checkpoint FILE (ONNX, a torch.export program
or OpenVINO IR), checked against PyTorch at export time. The architecture, classes and input size
come from the checkpoint, the format from OUT's extension (`--model`, `--num_classes`,
`--image_resize`, `--format` override them)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..guards import check_output_file, check_regular_file

if TYPE_CHECKING:
    from torch import nn

    from ..export import ExportCheck

# res2net.export.FORMATS, named here without importing torch (a test checks they agree)
FORMATS = ("onnx", "pt2", "openvino")

HELP = (
    "export to ONNX (checked in onnxruntime), a torch.export program (.pt2) or OpenVINO IR "
    "(.xml + .bin, checked in OpenVINO); dynamic batch"
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[FILE] OUT",
        help="the checkpoint to export (any format; without it: --model with random weights) "
        "and the file to write, e.g. best.safetensors best.onnx (or .pt2, or .xml: OpenVINO)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="default: from OUT's extension (.onnx, .pt2, .xml: openvino)",
    )
    p.add_argument(
        "--model", help="architecture name, e.g. res2net50 (default: the one FILE names)"
    )
    p.add_argument(
        "--ckpt_path", "--ckpt-path", help="the checkpoint, as FILE (default: random weights)"
    )
    p.add_argument(
        "--num_classes",
        "--num-classes",
        type=int,
        help="classifier size (default: the checkpoint's, else 1000)",
    )
    p.add_argument(
        "--image_resize",
        "--image-resize",
        type=int,
        help="square input size (default: the checkpoint's eval size, else 224)",
    )
    p.add_argument(
        "--features_only",
        "--features-only",
        action="store_true",
        help="export the feature maps instead of logits",
    )
    p.add_argument(
        "--dynamic_size",
        "--dynamic-size",
        action="store_true",
        help="dynamic height and width too (any size from 32 px), not only the batch",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the exporter's own progress lines and warnings, and the check's errors",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="largest accepted max relative error against PyTorch (default 1e-4; int8: 0.1)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="int8: static per-channel QDQ ONNX for onnxruntime, calibrated on --calibration",
    )
    p.add_argument(
        "--calibration", help="int8: folder of typical input images (e.g. the training set)"
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    ckpt_path, out = _paths(args)
    if args.format is None:  # from OUT's extension
        from ..export import format_for_path

        args.format = format_for_path(out)
    fmt = args.format
    if args.precision == "int8" and fmt != "onnx":
        raise ConfigError("--precision int8 writes ONNX (QDQ) only: use --format onnx")
    if args.precision == "int8" and not args.calibration:
        raise ConfigError(
            "--precision int8 needs --calibration DIR: a folder of typical input images"
        )
    if args.precision == "int8" and args.dynamic_size:
        raise ConfigError("--dynamic_size is for fp32 exports: an int8 file has a fixed size")
    # before the minutes an export can take
    check_output_file(out, "export output", keep=ckpt_path, kept="the checkpoint to export")
    if fmt == "openvino":  # and the weights file beside the graph
        weights = Path(out).with_suffix(".bin")
        check_output_file(weights, "export weights output", keep=ckpt_path, kept="the checkpoint")
    hub = ckpt_path is not None and ckpt_path.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if ckpt_path and not hub:  # answers before torch is imported
        check_regular_file(ckpt_path, "checkpoint")
    from ..export import export_onnx, export_openvino, export_program
    from ..factory import create_model
    from ..weights.loading import read_checkpoint

    checkpoint = read_checkpoint(ckpt_path, model=args.model) if ckpt_path else None
    name = args.model or (checkpoint.arch if checkpoint is not None else None)
    if not name:
        raise ConfigError(
            f"{ckpt_path} does not name its architecture; pass --model NAME"
            if ckpt_path
            else "give the checkpoint to export (FILE OUT), or --model NAME for random weights"
        )
    num_classes = args.num_classes
    if num_classes is None and checkpoint is not None and not args.features_only:
        num_classes = checkpoint.num_classes
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = create_model(
        name, checkpoint=checkpoint, features_only=args.features_only, **kwargs
    ).eval()
    size = args.image_resize
    if size is None:
        size = checkpoint.eval.image_resize if checkpoint and checkpoint.eval else 224
    if args.precision == "int8":
        check = _export_int8(args, model, out, size)
    else:
        rtol = 1e-4 if args.rtol is None else args.rtol
        if fmt == "onnx":
            check = export_onnx(
                model,
                out,
                image_size=size,
                rtol=rtol,
                dynamic_size=args.dynamic_size,
                verbose=getattr(args, "verbose", False),
            )
        elif fmt == "openvino":
            check = export_openvino(
                model, out, image_size=size, rtol=rtol, dynamic_size=args.dynamic_size
            )
        else:
            check = export_program(
                model, out, image_size=size, rtol=rtol, dynamic_size=args.dynamic_size
            )
    if getattr(args, "verbose", False):
        shape = "dynamic height/width" if args.dynamic_size else f"{size}x{size}"
        print(
            f"wrote {check.path} ({fmt}, {args.precision}, dynamic batch, {shape}); "
            f"checked at batch {check.batch_size}: max abs error {check.max_abs_err:.3g}, "
            f"max rel error {check.max_rel_err:.3g}"
        )
    return 0


def _paths(args: argparse.Namespace) -> tuple[str | None, str]:
    """(checkpoint or None, output) from `[FILE] OUT` and `--ckpt_path`."""
    if len(args.paths) > 2:
        raise ConfigError("give at most two paths: the checkpoint FILE and the output OUT")
    if len(args.paths) == 2:
        if args.ckpt_path:
            raise ConfigError("give the checkpoint once: as FILE or as --ckpt_path")
        return args.paths[0], args.paths[1]
    return args.ckpt_path, args.paths[0]


def _export_int8(args: argparse.Namespace, model: nn.Module, out: str, size: int) -> ExportCheck:
    """An int8 QDQ ONNX file calibrated on the images of --calibration."""
    from ..export import export_onnx_int8
    from ..lowprec import calibration_batches

    batches = calibration_batches(args.calibration, image_size=size)
    return export_onnx_int8(model, out, batches, rtol=0.1 if args.rtol is None else args.rtol)
