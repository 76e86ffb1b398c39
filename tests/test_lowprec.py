"""Low-precision inference: bf16 and int8 outputs close to fp32 on a tiny model, the int8 QDQ
ONNX export in onnxruntime, the CLI flags and the refusal messages."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import res2net
from res2net import lowprec
from res2net.cli import benchmark as benchmark_cmd
from res2net.cli import export as export_cmd
from res2net.profile import benchmark_model

from .test_inference import tiny
from .test_models import rel_err


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def write_images(folder, n: int = 6, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(
            sub / f"{i}.png"
        )


def test_bf16_is_close_to_fp32_and_takes_float32(monkeypatch):
    monkeypatch.setattr(
        lowprec, "bf16_supported", lambda device="cpu": True
    )  # the math runs anyway
    model = tiny("classic")
    x = torch.randn(4, 3, 32, 32)
    fast = res2net.optimize_for_inference(model, precision="bf16")
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert y.dtype == torch.float32 and rel_err(y, ref) < 0.05
    assert next(fast.parameters()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="eval-only"):
        fast.train()


def test_bf16_refused_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(
        ValueError, match="precision='bf16' needs native bfloat16 math.*use precision='fp32'"
    ):
        res2net.optimize_for_inference(tiny("classic"), precision="bf16")


def test_int8_quantized_graph_is_close_to_fp32():
    model = tiny("classic")
    torch.manual_seed(1)
    calibration = torch.randn(16, 3, 32, 32)
    fused = res2net.optimize_for_inference(model)
    quantized = lowprec.quantize_int8(fused, lowprec.calibration_batches(calibration))
    x = calibration[:8]
    with torch.no_grad():
        y, ref = quantized(x), model(x)
        y3 = quantized(x[:3])  # the batch dimension stays dynamic
    assert rel_err(y, ref) < 0.1 and agreement(y, ref) >= 0.75
    assert torch.allclose(y3, y[:3], atol=1e-5)
    quantize_ops = [n for n in quantized.graph.nodes if "quantize_per_channel" in str(n.target)]
    assert quantize_ops  # weights really are quantized, per output channel
    # the channel splits read int8 too, so the conv before each writes int8, not float32
    splits = [n for n in quantized.graph.nodes if n.target in lowprec.SPLITS]
    assert splits and all("dequantize" in str(n.args[0].target) for n in splits)


@pytest.mark.slow
def test_int8_optimize_for_inference_compiles_and_matches():
    torch.set_num_threads(1)
    model = tiny("classic")
    calibration = torch.randn(16, 3, 32, 32)
    fast = res2net.optimize_for_inference(model, precision="int8", calibration=calibration)
    x = calibration[:8]
    with torch.no_grad():
        y, ref = fast(x), model(x)
    assert rel_err(y, ref) < 0.1 and agreement(y, ref) >= 0.75


def test_int8_needs_calibration_and_refuses_bad_ones(tmp_path):
    with pytest.raises(ValueError, match="needs calibration="):
        res2net.optimize_for_inference(tiny("classic"), precision="int8")
    with pytest.raises(ValueError, match="not one of fp32, bf16, int8"):
        res2net.optimize_for_inference(tiny("classic"), precision="fp16")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        lowprec.calibration_batches(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lowprec.calibration_batches(tmp_path / "missing")


def test_calibration_batches_from_a_folder(tmp_path):
    write_images(tmp_path, n=6)
    batches = lowprec.calibration_batches(tmp_path, image_size=32, batch_size=4, max_images=5)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (1, 3, 32, 32)]
    assert -3 < batches[0].mean() < 3  # normalized as in evaluation


def test_int8_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from res2net.export import export_onnx_int8

    model = tiny("classic")
    write_images(tmp_path / "cal", n=8, size=36)
    batches = lowprec.calibration_batches(tmp_path / "cal", image_size=32, batch_size=4)
    check = export_onnx_int8(model, tmp_path / "tiny-int8.onnx", batches)
    assert check.max_rel_err < 0.1
    session = ort.InferenceSession(
        str(tmp_path / "tiny-int8.onnx"), providers=["CPUExecutionProvider"]
    )
    ops = {
        node.op_type
        for node in __import__("onnx").load(str(tmp_path / "tiny-int8.onnx")).graph.node
    }
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (y,) = session.run(None, {"image": batches[1].numpy()[:1]})  # another batch size
    assert y.shape == (1, 10)


def export_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser)
    return parser.parse_args(list(argv))


def test_export_cli_int8_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs --calibration DIR"):
        export_cmd.run(
            export_args(
                str(tmp_path / "m.onnx"),
                "--format",
                "onnx",
                "--model",
                "res2net50",
                "--precision",
                "int8",
            ),
            [],
        )
    with pytest.raises(ValueError, match="ONNX .QDQ. only: use --format onnx"):
        export_cmd.run(
            export_args(
                str(tmp_path / "m.pt2"),
                "--format",
                "pt2",
                "--model",
                "res2net50",
                "--precision",
                "int8",
                "--calibration",
                str(tmp_path),
            ),
            [],
        )
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.pt2").exists()


def test_benchmark_precision_flag(monkeypatch, capsys):
    monkeypatch.setattr(lowprec, "bf16_supported", lambda device="cpu": True)
    row = benchmark_model(
        tiny("classic"),
        "tiny",
        batch_size=2,
        image_size=32,
        mode="infer",
        precision="bf16",
        warmup=1,
        repeats=1,
    )
    assert row.precision == "bf16" and row.jit_level == "optimized"
    with pytest.raises(ValueError, match="inference only"):
        benchmark_model(
            tiny("classic"), "tiny", batch_size=2, image_size=32, mode="train", precision="int8"
        )
    parser = argparse.ArgumentParser()
    benchmark_cmd.add_parser(parser)
    args = parser.parse_args(
        [
            "--model",
            "res2net50",
            "--batch_size",
            "1",
            "--image_resize",
            "32",
            "--mode",
            "infer",
            "--precision",
            "bf16",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert benchmark_cmd.run(args, []) == 0
    data = json.loads(capsys.readouterr().out.strip().rpartition("\n")[2])
    assert data["rows"][0]["precision"] == "bf16"
