"""ONNX export checked in onnxruntime, torch.export round trip, and the export CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from res2net.cli import export as export_cmd
from res2net.cli.main import main
from res2net.export import compare_outputs, export_onnx
from res2net.models import DLA, Res2Net

from .test_models import randomize_bn, rel_err


def tiny_res2net(**kw) -> Res2Net:
    torch.manual_seed(0)
    model = Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, **kw)
    randomize_bn(model)
    return model.eval()


def micro_net(num_classes: int = 10) -> nn.Module:
    """A one-convolution classifier for the tests of the export's file handling and wiring,
    where the network is not the point: it exports in a fraction of a Res2Net's time (the
    exporters trace every operator). The tests with `tiny_res2net` check the Res2Net itself."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )
    randomize_bn(model)
    return model.eval()


def test_onnx_export_has_dynamic_batch_and_matches_torch(tmp_path):
    """A fixed-size export: the batch stays dynamic, height and width do not. On the one-conv
    net: the Res2Net's ONNX export is checked at another batch and size by
    `test_onnx_export_is_one_quiet_file_with_dynamic_size`, and at its fixed size by the fp32
    export inside `test_lowprec.py::test_int8_onnx_export_runs_in_onnxruntime`."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = micro_net(num_classes=10)
    check = export_onnx(model, tmp_path / "tiny.onnx", image_size=32)
    assert (
        check.max_rel_err <= 1e-4 and check.batch_size != 2
    )  # checked at another batch than traced
    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "image" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]
    x = torch.randn(5, 3, 32, 32)
    (y,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(y), model(x)) <= 1e-4


def test_onnx_export_of_a_dla_backbone(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = DLA(levels=(1, 1, 1, 1, 1, 1), channels=(8, 16, 32, 64, 64, 128), out_indices=(2, 4))
    randomize_bn(model)
    check = export_onnx(model.eval(), tmp_path / "dla.onnx", image_size=32)
    assert check.max_rel_err <= 1e-4


def test_export_check_fails_loudly_when_outputs_differ(tmp_path):
    want = [torch.ones(2, 10)]
    assert (
        compare_outputs(tmp_path, 2, [torch.ones(2, 10) * (1 + 1e-6)], want, rtol=1e-4).max_rel_err
        < 1e-4
    )
    with pytest.raises(RuntimeError, match="differ from PyTorch"):
        compare_outputs(tmp_path, 2, [torch.ones(2, 10) * 1.01], want, rtol=1e-4)
    with pytest.raises(RuntimeError, match="shapes"):
        compare_outputs(tmp_path, 2, [torch.ones(2, 9)], want, rtol=1e-4)


def export_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    export_cmd.add_parser(parser)
    return parser.parse_args(list(argv))


def test_export_cli_pt2_round_trip(tmp_path, capsys, monkeypatch):
    built = {}

    def create_tiny(name, **kw):  # the CLI's wiring, on a tiny net instead of the named one
        built.update(name=name, **kw)
        return micro_net(num_classes=kw.get("num_classes", 1000))

    monkeypatch.setattr("res2net.factory.create_model", create_tiny)
    out = tmp_path / "r50.pt2"
    args = export_args(
        str(out),
        "--format",
        "pt2",
        "--model",
        "res2net50",
        "--image_resize",
        "32",
        "--num_classes",
        "7",
    )
    assert export_cmd.run(args, []) == 0
    assert built == dict(name="res2net50", checkpoint=None, features_only=False, num_classes=7)
    assert capsys.readouterr().out == ""  # nothing on success
    assert torch.export.load(str(out)).module()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_export_file_out_takes_model_classes_and_size_from_the_checkpoint(
    tmp_path, capsys, monkeypatch
):
    from safetensors.torch import save_file

    built = {}

    def create_tiny(name, **kw):  # the CLI's wiring, on a tiny net instead of the named one
        built.update(name=name, **kw)
        return micro_net(num_classes=kw["num_classes"])

    monkeypatch.setattr("res2net.factory.create_model", create_tiny)
    ckpt = tmp_path / "best.safetensors"
    meta = {"arch": "res2net50", "num_classes": "7", "eval": json.dumps({"image_resize": 32})}
    save_file({"fc.weight": torch.zeros(7, 2048), "fc.bias": torch.zeros(7)}, ckpt, metadata=meta)
    out = tmp_path / "best.pt2"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert built["name"] == "res2net50" and built["num_classes"] == 7
    assert built["checkpoint"].origin == str(ckpt)
    program = torch.export.load(str(out)).module()
    assert program(torch.randn(2, 3, 32, 32)).shape == (2, 7)  # the weights' own eval size
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        program(torch.randn(2, 3, 48, 48))  # a static 32x32 program, not 224


def test_export_without_a_known_format_or_model_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.bin"), "--model", "res2net50"]) == 2
    assert "no format for the extension '.bin'" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "m.onnx")]) == 2
    assert "--model NAME" in capsys.readouterr().err


@pytest.mark.slow
def test_export_cli_onnx_with_checkpoint(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = Res2Net(layers=(3, 4, 6, 3), num_classes=5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    args = export_args(
        str(tmp_path / "r50.onnx"),
        "--format",
        "onnx",
        "--model",
        "res2net50",
        "--ckpt_path",
        str(tmp_path / "w.pth"),
        "--image_resize",
        "64",
    )
    args.verbose = True
    assert export_cmd.run(args, []) == 0
    assert "max rel error" in capsys.readouterr().out


def test_onnx_export_is_one_quiet_file_with_dynamic_size(tmp_path, capfd):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_res2net(num_classes=10)
    path = tmp_path / "any_size.onnx"
    check = export_onnx(model, path, image_size=32, dynamic_size=True)
    assert check.max_rel_err <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [
        "any_size.onnx"
    ]  # weights inside, no .onnx.data
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no exporter chatter without verbose
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert all(isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3]))
    x = torch.randn(2, 3, 64, 96)
    (y,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        assert rel_err(torch.from_numpy(y), model(x)) <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_rejected_export_leaves_the_file_already_there(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from res2net.export import export_program

    out = tmp_path / f"model.{fmt}"
    out.write_bytes(b"the previous good export")
    export = export_onnx if fmt == "onnx" else export_program
    with pytest.raises(RuntimeError, match="differ from PyTorch"):
        export(micro_net(), out, image_size=32, rtol=-1.0)  # every check fails
    assert out.read_bytes() == b"the previous good export"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left
    export(micro_net(), out, image_size=32)
    assert out.read_bytes() != b"the previous good export"


def test_export_refuses_to_write_over_its_checkpoint(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_res2net().state_dict(), ckpt)
    args = export_args(
        str(ckpt), "--format", "pt2", "--model", "res2net50", "--ckpt_path", str(ckpt)
    )
    with pytest.raises(ValueError, match="is the checkpoint to export"):
        export_cmd.run(args, [])


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_export_to_a_directory_is_refused_before_any_work(tmp_path, fmt, monkeypatch, capsys):

    def no_model(name, **kw):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr("res2net.factory.create_model", no_model)
    out = tmp_path / f"out.{fmt}"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    assert main(["export", str(out), "--format", fmt, "--model", "res2net50"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"res2net export: error: export output '{out}' is a directory: name a file to write\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == [out.name] and (
        out / "mine.txt"
    ).read_text() == "kept"
    below_a_file = tmp_path / "file.txt"
    below_a_file.write_text("x")
    assert (
        main(["export", str(below_a_file / "m.pt2"), "--format", fmt, "--model", "res2net50"]) == 2
    )
    assert "a folder on its path is a file" in capsys.readouterr().err


def test_pt2_export_prints_nothing(tmp_path, capfd):
    from res2net.export import export_program

    export_program(micro_net(num_classes=3), tmp_path / "m.pt2", image_size=32)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no torch warning about the temporary name


def test_openvino_export_runs_in_openvinos_runtime_like_torch(tmp_path):
    ov = pytest.importorskip("openvino")
    from res2net.export import export_openvino

    model = tiny_res2net(num_classes=10)
    out = tmp_path / "m.xml"
    check = export_openvino(model, out, image_size=32, dynamic_size=True)
    assert check.max_rel_err < 1e-4 and check.path == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    compiled = ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for shape in ((1, 3, 32, 32), (5, 3, 64, 48)):  # dynamic batch, height and width
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x)
        assert rel_err(torch.from_numpy(compiled(x.numpy())[0]), want) < 1e-4


def test_export_cli_writes_openvino_for_an_xml_name(tmp_path, capsys, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr("res2net.factory.create_model", lambda name, **kw: micro_net(num_classes=4))
    out = tmp_path / "r50.xml"
    args = export_args(str(out), "--model", "res2net50", "--image_resize", "32", "--verbose")
    assert export_cmd.run(args, []) == 0  # silent on success; --verbose says what was written
    assert capsys.readouterr().out.startswith(f"wrote {out} (openvino, fp32, dynamic batch")
    assert (tmp_path / "r50.bin").is_file()


def test_a_rejected_openvino_export_leaves_both_files_there(tmp_path):
    pytest.importorskip("openvino")
    from res2net.export import export_openvino

    out = tmp_path / "model.xml"
    out.write_bytes(b"the previous graph")
    out.with_suffix(".bin").write_bytes(b"the previous weights")
    with pytest.raises(RuntimeError, match="differ from PyTorch"):
        export_openvino(micro_net(), out, image_size=32, rtol=-1.0)  # every check fails
    assert out.read_bytes() == b"the previous graph"
    assert out.with_suffix(".bin").read_bytes() == b"the previous weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]


def test_export_format_comes_from_the_extension_or_one_clear_error(tmp_path):
    from res2net.errors import ConfigError
    from res2net.export import export_openvino, format_for_path

    assert [format_for_path(f"m{s}") for s in (".onnx", ".pt2", ".XML")] == [
        "onnx",
        "pt2",
        "openvino",
    ]
    with pytest.raises(ConfigError, match=r"no format for the extension '\.bin'.*--format"):
        format_for_path(tmp_path / "m.bin")
    pytest.importorskip("openvino")
    with pytest.raises(ConfigError, match="give a path ending in .xml"):
        export_openvino(tiny_res2net(), tmp_path / "m.ir", image_size=32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pt2_export_with_dynamic_size_runs_at_other_sizes(tmp_path):
    """The third format of the dynamic-size promise: the same `torch.export` program with
    symbolic height and width is checked at other sizes in `make test` through ONNX
    (`test_onnx_export_is_one_quiet_file_with_dynamic_size`) and OpenVINO
    (`test_openvino_export_runs_in_openvinos_runtime_like_torch`); saving and loading a .pt2
    by `test_export_cli_pt2_round_trip`."""
    from res2net.export import export_program

    model = tiny_res2net(num_classes=10)
    export_program(model, tmp_path / "m.pt2", image_size=32, dynamic_size=True)
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert rel_err(program(x), model(x)) < 1e-4
