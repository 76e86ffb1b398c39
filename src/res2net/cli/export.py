"""`res2net export [--format onnx|pt2|openvino] --model NAME [--ckpt_path P] OUT`: a deployable
file, checked against PyTorch at export time; the format defaults to OUT's extension."""

from __future__ import annotations

import argparse
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
        "out", help="file to write, e.g. res2net50.onnx, res2net50.pt2 or res2net50.xml (OpenVINO)"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        help="default: from OUT's extension (.onnx, .pt2, .xml: openvino)",
    )
    p.add_argument("--model", required=True, help="architecture name, e.g. res2net50")
    p.add_argument(
        "--ckpt_path", "--ckpt-path", help="weights in any format (default: random weights)"
    )
    p.add_argument(
        "--num_classes",
        "--num-classes",
        type=int,
        help="classifier size (default: the checkpoint's, else 1000)",
    )
    p.add_argument(
        "--image_resize", "--image-resize", type=int, default=224, help="square input size"
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
        help="dynamic height and width too (any size above 32 px), not only the batch",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the exporter's own progress lines and warnings",
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
    if args.format is None:  # from OUT's extension
        from ..export import format_for_path

        args.format = format_for_path(args.out)
    if args.precision == "int8" and args.format != "onnx":
        raise ConfigError("--precision int8 writes ONNX (QDQ) only: use --format onnx")
    if args.precision == "int8" and not args.calibration:
        raise ConfigError(
            "--precision int8 needs --calibration DIR: a folder of typical input images"
        )
    if args.precision == "int8" and args.dynamic_size:
        raise ConfigError("--dynamic_size is for fp32 exports: an int8 file has a fixed size")
    # before the minutes an export can take
    check_output_file(
        args.out, "export output", keep=args.ckpt_path, kept="the checkpoint to export"
    )
    if args.ckpt_path:  # answers before torch is imported
        check_regular_file(args.ckpt_path, "checkpoint")
    from ..export import export_onnx, export_openvino, export_program
    from ..factory import create_model
    from ..weights.loading import checkpoint_num_classes

    num_classes = args.num_classes
    if num_classes is None and args.ckpt_path and not args.features_only:
        num_classes = checkpoint_num_classes(args.ckpt_path, args.model)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = create_model(
        args.model, checkpoint_path=args.ckpt_path, features_only=args.features_only, **kwargs
    ).eval()
    if args.precision == "int8":
        check = _export_int8(args, model)
    else:
        rtol = 1e-4 if args.rtol is None else args.rtol
        if args.format == "onnx":
            check = export_onnx(
                model,
                args.out,
                image_size=args.image_resize,
                rtol=rtol,
                dynamic_size=args.dynamic_size,
                verbose=getattr(args, "verbose", False),
            )
        elif args.format == "openvino":
            check = export_openvino(
                model,
                args.out,
                image_size=args.image_resize,
                rtol=rtol,
                dynamic_size=args.dynamic_size,
            )
        else:
            check = export_program(
                model,
                args.out,
                image_size=args.image_resize,
                rtol=rtol,
                dynamic_size=args.dynamic_size,
            )
    side = args.image_resize
    size = "dynamic height/width" if args.dynamic_size else f"{side}x{side}"
    print(
        f"wrote {check.path} ({args.format}, {args.precision}, dynamic batch, {size}); "
        f"checked at batch {check.batch_size}: max abs error {check.max_abs_err:.3g}, "
        f"max rel error {check.max_rel_err:.3g}"
    )
    return 0


def _export_int8(args: argparse.Namespace, model: nn.Module) -> ExportCheck:
    """An int8 QDQ ONNX file calibrated on the images of --calibration."""
    from ..export import export_onnx_int8
    from ..lowprec import calibration_batches

    batches = calibration_batches(args.calibration, image_size=args.image_resize)
    return export_onnx_int8(model, args.out, batches, rtol=0.1 if args.rtol is None else args.rtol)
