"""Export a model for deployment: ONNX (checked against PyTorch with onnxruntime at export
time), `torch.export` programs (.pt2) and OpenVINO IR (.xml + .bin, checked in OpenVINO's
runtime). All keep the batch dimension dynamic, and height and width on request."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import fileio
from .errors import ConfigError
from .extras import require
from .guards import check_output_file

FORMATS = ("onnx", "pt2", "openvino")
FORMAT_BY_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".xml": "openvino"}


def format_for_path(path: str | os.PathLike) -> str:
    """The export format an output file name asks for, by its extension; ConfigError when the
    extension names none."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_BY_SUFFIX:
        known = ", ".join(f"{s} ({f})" for s, f in FORMAT_BY_SUFFIX.items())
        raise ConfigError(
            f"export output '{path}': no format for the extension '{suffix}': use {known}, "
            "or name one with --format",
            key="format",
        )
    return FORMAT_BY_SUFFIX[suffix]


@dataclass(frozen=True)
class ExportCheck:
    """How far the exported program's outputs are from PyTorch's on a fresh random batch."""

    path: Path
    batch_size: int
    max_abs_err: float
    max_rel_err: float  # max |exported - torch| / max |torch|, the worst over the outputs


def _outputs(y: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [y] if isinstance(y, torch.Tensor) else list(y)


def compare_outputs(
    path: Path, batch_size: int, got: list[torch.Tensor], want: list[torch.Tensor], rtol: float
) -> ExportCheck:
    """The errors of an exported program's outputs `got` against PyTorch's `want`; RuntimeError
    when shapes differ or the max relative error exceeds `rtol`."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        raise RuntimeError(
            f"{path}: exported outputs have shapes {[tuple(g.shape) for g in got]}, "
            f"PyTorch's {[tuple(w.shape) for w in want]}"
        )
    abs_err = max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))
    rel_err = max(
        ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-12)).item()
        for g, w in zip(got, want)
    )
    check = ExportCheck(path, batch_size, abs_err, rel_err)
    if not rel_err <= rtol:
        raise RuntimeError(
            f"{path}: exported outputs differ from PyTorch's: max abs {abs_err:.3g}, max rel "
            f"{rel_err:.3g} > {rtol:g}"
        )
    return check


def _example(
    model: nn.Module, batch_size: int, height: int, width: int | None = None
) -> torch.Tensor:
    weight = next(model.parameters())
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    shape = (batch_size, in_chans, height, width or height)
    return torch.randn(*shape, device=weight.device, dtype=weight.dtype)


def _check_input(model: nn.Module, image_size: int, dynamic_size: bool) -> torch.Tensor:
    """The batch an export is checked on: 3 images (traced with 2), and with `dynamic_size` of
    another height and width (both above 32 px, see `_dynamic_shapes`)."""
    if dynamic_size:
        return _example(model, 3, image_size + 32, max(image_size, 48))
    return _example(model, 3, image_size)


def _batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=65536)


def _dynamic_shapes(dynamic_size: bool) -> tuple[dict[int, torch.export.Dim], ...]:
    """Batch always dynamic; height and width too with `dynamic_size`, above 32 px (the
    network's stride): at 32 px the last stage is 1x1, a case `torch.export` specialises and so
    refuses to cover with one graph; traced at 64 px or more for the same reason."""
    dims = {0: _batch_dim()}
    if dynamic_size:
        dims[2] = torch.export.Dim("height", min=33, max=8192)
        dims[3] = torch.export.Dim("width", min=33, max=8192)
    return (dims,)


ONNX_PROTO_LIMIT = 2 * 1024**3  # protobuf's limit: larger models need external data files


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the exporter's progress lines, logging and warnings unless `verbose`."""
    if verbose:
        yield
        return
    names = ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _replacing(path: Path, enabled: bool = True) -> Iterator[Path]:
    """Where to write and check an export of `path`: a temporary file next to it, renamed over
    `path` only when the block succeeds, so that a failed or rejected export leaves the file
    already there intact. `enabled=False` (ONNX weights in a side file named after the model
    file, which a rename would orphan) writes `path` itself."""
    if not enabled:
        fileio.check_in_place(path)
        fileio.check_in_place(path.with_name(path.name + ".data"))
        yield path
        return
    with fileio.replacing(path) as tmp:
        yield tmp


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int = 224,
    opset: int | None = None,
    rtol: float = 1e-4,
    dynamic_size: bool = False,
    verbose: bool = False,
) -> ExportCheck:
    """Write `model` (eval mode) as ONNX with a dynamic batch dimension (and dynamic height and
    width with `dynamic_size`), then run the file in onnxruntime on a batch of another size (and
    another image size) and compare with PyTorch. Raises RuntimeError when the max relative
    error exceeds `rtol`. The weights are inside the one `.onnx` file unless they exceed
    protobuf's 2 GB limit (then beside it, in `<name>.onnx.data`). The exporter prints nothing
    unless `verbose`. Needs the `onnx`, `onnxscript` and `onnxruntime` packages
    (`pip install 'res2net[export]'`)."""
    require("onnx", "export", "ONNX export")
    require("onnxscript", "export", "ONNX export")
    onnxruntime = require("onnxruntime", "export", "ONNX export")

    path = check_output_file(path, "export output")
    fileio.make_directory(path.parent)
    model = model.eval()
    out_indices = getattr(model, "out_indices", None)
    output_names = ["logits"] if out_indices is None else [f"features{i}" for i in out_indices]
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    external = size >= ONNX_PROTO_LIMIT - (64 << 20)  # room for the graph itself
    with _replacing(path, enabled=not external) as target:
        with torch.no_grad(), _quiet(verbose):
            torch.onnx.export(
                model,
                (_example(model, 2, max(image_size, 64) if dynamic_size else image_size),),
                str(target),
                dynamo=True,
                opset_version=opset,
                input_names=["image"],
                output_names=output_names,
                dynamic_shapes=_dynamic_shapes(dynamic_size),
                external_data=external,
                report=False,
                verbose=verbose,
            )
            x = _check_input(model, image_size, dynamic_size)
            want = _outputs(model(x))
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = [torch.from_numpy(y) for y in session.run(None, {"image": x.float().cpu().numpy()})]
        return compare_outputs(path, x.shape[0], got, [w.cpu() for w in want], rtol)


def export_program(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int = 224,
    rtol: float = 1e-4,
    dynamic_size: bool = False,
) -> ExportCheck:
    """Save `torch.export.export(model)` (eval mode, dynamic batch, and height/width with
    `dynamic_size`) with `torch.export.save`, load it back and compare its outputs with the
    model's on a batch of another size."""
    path = check_output_file(path, "export output")
    fileio.make_directory(path.parent)
    model = model.eval()
    with torch.no_grad(), _replacing(path) as target:
        example = _example(model, 2, max(image_size, 64) if dynamic_size else image_size)
        shapes = _dynamic_shapes(dynamic_size)
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
        # a file object: torch warns on names not ending in .pt2
        fileio.atomic_write(target, lambda f: torch.export.save(program, f))
        x = _check_input(model, image_size, dynamic_size)
        want = _outputs(model(x))
        with target.open("rb") as f:
            got = _outputs(torch.export.load(f).module()(x))
        return compare_outputs(path, x.shape[0], got, want, rtol)


def export_openvino(
    model: nn.Module,
    path: str | Path,
    *,
    image_size: int = 224,
    rtol: float = 1e-4,
    dynamic_size: bool = False,
) -> ExportCheck:
    """Write `model` (eval mode) as OpenVINO IR: the graph in `path` (which must end in .xml)
    and the float32 weights beside it in the same name with .bin, converted from its
    `torch.export` program (dynamic batch, and height/width with `dynamic_size`). The files are
    read back by OpenVINO's runtime and run in float32 on the CPU on a batch of another size
    (and another image size), against PyTorch; RuntimeError when the max relative error exceeds
    `rtol`. Both files are replaced only when the check passes. Needs the `openvino` package
    (`pip install 'res2net[openvino]'`)."""
    ov = require("openvino", "openvino", "OpenVINO export")

    path = check_output_file(path, "export output")
    if path.suffix.lower() != ".xml":
        raise ConfigError(
            f"export output '{path}': OpenVINO IR is a NAME.xml graph with its NAME.bin weights: "
            "give a path ending in .xml",
            key="format",
        )
    weights = check_output_file(path.with_suffix(".bin"), "export weights output")
    for name in (path, weights):  # refused before the conversion, not after it
        fileio.check_target(name)
    fileio.make_directory(path.parent)
    model = model.eval()
    with torch.no_grad():
        example = _example(model, 2, max(image_size, 64) if dynamic_size else image_size)
        program = torch.export.export(
            model, (example,), dynamic_shapes=_dynamic_shapes(dynamic_size)
        )
        converted = ov.convert_model(program)
        x = _check_input(model, image_size, dynamic_size)
        want = _outputs(model(x))
    # Serialization insists on a .xml name and the runtime finds NAME.bin beside NAME.xml, so
    # both are written in a temporary folder next to the outputs, checked, then renamed.
    with fileio.scratch_directory(path.parent, prefix=f".{path.name}.") as tmp:
        tmp_xml = tmp / "model.xml"
        ov.save_model(converted, tmp_xml, compress_to_fp16=False)
        compiled = ov.Core().compile_model(str(tmp_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        result = compiled(x.float().cpu().numpy())
        got = [torch.from_numpy(result[i]) for i in range(len(want))]
        check = compare_outputs(path, x.shape[0], got, [w.cpu() for w in want], rtol)
        fileio.rename_into(tmp_xml.with_suffix(".bin"), weights)
        fileio.rename_into(tmp_xml, path)
        return check


def quantize_onnx(
    fp32_path: str | Path,
    path: str | Path,
    batches: list[torch.Tensor],
    *,
    per_channel: bool = True,
) -> Path:
    """Write an int8 QDQ copy of the ONNX file `fp32_path`: onnxruntime's post-training static
    quantization (`quantize_static`), weights symmetric int8 per output channel, activations
    uint8 per tensor with ranges calibrated on `batches` (NCHW float tensors)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inputs = iter([{"image": b.float().cpu().numpy()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.inputs, None)

    path = Path(path)
    fileio.make_directory(path.parent)
    with fileio.replacing(path) as target:
        quantize_static(
            str(fp32_path),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    return path


def export_onnx_int8(
    model: nn.Module,
    path: str | Path,
    batches: list[torch.Tensor],
    *,
    opset: int | None = None,
    rtol: float = 0.1,
) -> ExportCheck:
    """Write `model` as an int8 QDQ ONNX file calibrated on `batches` (see `quantize_onnx`) and
    run it in onnxruntime on the first batch against PyTorch's fp32 outputs; RuntimeError when
    the max relative error exceeds `rtol` (int8 rounding moves logits by a few percent)."""
    import onnxruntime

    path = check_output_file(path, "export output")
    image_size = batches[0].shape[-1]
    with fileio.scratch_directory(path.parent if path.parent.is_dir() else None) as tmp:
        fp32_path = tmp / "fp32.onnx"
        export_onnx(model, fp32_path, image_size=image_size, opset=opset)
        with _replacing(path) as target:
            quantize_onnx(fp32_path, target, batches)
            x = batches[0].float()
            with torch.no_grad():
                want = _outputs(model.eval()(x))
            session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(y) for y in session.run(None, {"image": x.cpu().numpy()})]
            return compare_outputs(path, x.shape[0], got, [w.cpu() for w in want], rtol)
