"""Checkpoints from every Res2Net ecosystem: format detection by content, torch wrappers and
prefixes, this project's training checkpoints, safetensors, OpenMMLab names, classifier heads,
hostile and damaged files, and `res2net convert` round trips."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import res2net
from res2net.cli.main import main as cli_main
from res2net.engine.checkpoint import save_checkpoint
from res2net.fileio import atomic_write
from res2net.models import ARCHITECTURES, Res2Net
from res2net.weights.convert import convert
from res2net.weights.formats import detect_format as detect_bytes
from res2net.weights.formats import mmpretrain_to_ours, model_features
from res2net.weights.loading import load_checkpoint, read_checkpoint
from res2net.weights.mindspore import read_mindspore_checkpoint


def detect_format(path):
    return detect_bytes(Path(path).read_bytes(), path)


FIXTURES = Path(__file__).parent / "fixtures" / "mindcv"
MINDCV_TINY = FIXTURES / "res2net_tiny.ckpt"
ARCH = dict(layers=(1, 1, 1, 1), base_width=4, scale=4)
V1B = dict(deep_stem=True, avg_down=True)


def tiny(num_classes: int = 10, seed: int = 0, **kw) -> Res2Net:
    torch.manual_seed(seed)
    return Res2Net(**ARCH, num_classes=num_classes, **kw).eval()


def randomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """`model` with random values in every parameter and BatchNorm statistic (so that loading
    the wrong tensor anywhere changes the logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point() and k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _logits(model: nn.Module) -> torch.Tensor:
    """The model's eval-mode output on a fixed small image."""
    x = torch.from_numpy(np.load(FIXTURES / "input.npy"))[:1, :, :32, :32]
    with torch.no_grad():
        return model.eval()(x)


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    for k, v in expected.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], v.to(got[k].dtype)), k


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return randomized(tiny())


@pytest.fixture
def tiny_name(monkeypatch) -> str:
    """A registry name for the tiny classic Res2Net of the MindCV fixture."""
    monkeypatch.setitem(ARCHITECTURES, "res2net_tiny_test", (Res2Net, dict(ARCH)))
    return "res2net_tiny_test"


class Payload:
    """Creates `marker` when unpickled: the shape of a pickle that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- torch files: wrappers, prefixes, training checkpoints ------------------------------------


def _wrap(state: dict[str, torch.Tensor], how: str) -> object:
    if how == "plain":
        return state
    if how in ("module.", "_orig_mod.", "module._orig_mod."):
        return {how + k: v for k, v in state.items()}
    if how == "timm-train":  # timm's training checkpoint: DDP prefixes under "state_dict"
        return {
            "epoch": 3,
            "arch": "res2net",
            "state_dict": {"module." + k: v for k, v in state.items()},
        }
    if how == "official":
        return {"state_dict": state}
    return {how: state, "epoch": 7}


WRAPPINGS = [
    "plain",
    "state_dict",
    "model",
    "module",
    "module.",
    "_orig_mod.",
    "module._orig_mod.",
    "timm-train",
    "official",
]


@pytest.mark.parametrize("how", WRAPPINGS)
def test_torch_state_dicts_plain_wrapped_and_prefixed(tmp_path, source, how):
    path = tmp_path / "weights.pth"
    torch.save(_wrap(source.state_dict(), how), path)
    model = tiny(seed=5)
    report = load_checkpoint(model, path)
    assert report.format == "torch" and report.missing == [] and report.unexpected == []
    assert_same_state(model, source.state_dict())


def test_legacy_torch_serialization(tmp_path, source):
    path = tmp_path / "old.pth"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    model = tiny(seed=5)
    load_checkpoint(model, path)
    assert_same_state(model, source.state_dict())


def test_training_checkpoint_loads_model_weights(tmp_path, source):
    path = tmp_path / "last.pt"
    optimizer = {
        "state": {0: {"momentum_buffer": torch.ones(3)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    state = {
        "arch": "res2net50",
        "num_classes": 10,
        "classes": ["a", "b"],
        "model": source.state_dict(),
        "ema": None,
        "optimizer": optimizer,
        "epoch": 2,
        "rng": {"torch": torch.get_rng_state()},
    }
    save_checkpoint(state, path)
    c = read_checkpoint(path)
    fmt, metadata = c.format, c.metadata
    assert fmt == "torch" and metadata == {"arch": "res2net50", "num_classes": "10"}
    model = tiny(seed=5)
    load_checkpoint(model, path)
    assert_same_state(model, source.state_dict())


def test_training_checkpoint_prefers_ema_weights(tmp_path, source):
    """With EMA on, training validates (and ranks checkpoints by) the EMA weights: load those."""
    ema = torch.optim.swa_utils.AveragedModel(source, use_buffers=True)
    with torch.no_grad():
        for p in ema.module.parameters():
            p.mul_(0.5)
    path = tmp_path / "best.pt"
    save_checkpoint(
        {"arch": "res2net50", "model": source.state_dict(), "ema": ema.state_dict()}, path
    )
    model = tiny(seed=5)
    load_checkpoint(model, path)
    assert_same_state(model, ema.module.state_dict())


def test_safetensors_with_metadata(tmp_path, source):
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path), metadata={"arch": "res2net50", "source": "timm"})
    model = tiny(seed=5)
    report = load_checkpoint(model, path)
    assert report.format == "safetensors" and report.metadata == {
        "arch": "res2net50",
        "source": "timm",
    }
    assert_same_state(model, source.state_dict())


def test_format_detected_from_content_not_extension(tmp_path, source):
    files = {
        "safetensors": tmp_path / "really_safetensors.pth",
        "torch": tmp_path / "really_torch.ckpt",
        "mindspore": tmp_path / "really_mindspore.safetensors",
    }
    save_file(source.state_dict(), str(files["safetensors"]))
    torch.save(source.state_dict(), files["torch"])
    files["mindspore"].write_bytes(MINDCV_TINY.read_bytes())
    for fmt, path in files.items():
        assert detect_format(path) == fmt
        model = tiny(seed=5)
        assert load_checkpoint(model, path).format == fmt
        if fmt != "mindspore":
            assert_same_state(model, source.state_dict())


def test_float16_file_cast_to_model_dtype(tmp_path, source):
    path = tmp_path / "half.safetensors"
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    save_file(half, str(path))
    model = tiny(seed=5)
    load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert v.dtype == source.state_dict()[k].dtype, k
        assert torch.equal(v, half[k].to(v.dtype)), k


def test_mindcv_checkpoint_reproduces_mindspore_logits():
    model = tiny(seed=5)
    report = load_checkpoint(model, MINDCV_TINY)
    assert report.format == "mindspore" and report.skipped == []
    x = torch.from_numpy(np.load(FIXTURES / "input.npy"))
    theirs = torch.from_numpy(np.load(FIXTURES / "res2net_tiny_logits.npy"))
    with torch.no_grad():
        ours = model(x)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


# --- OpenMMLab ------------------------------------------------------------------------------


def to_mmpretrain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names the way mmpretrain's `ImageClassifier(backbone=Res2Net, head=LinearClsHead)`
    spells them: mmcv's `build_norm_layer` names BatchNorms `bn1`/`bn3` (as we do), the block's
    `convs`/`bns` lists match ours, the deep stem is `stem.{0,1,2}` of ConvModules (`.conv`,
    `.bn`), everything sits under `backbone.`, and the classifier is `head.fc`."""
    ours_to_stem = {
        "conv1.0": "stem.0.conv",
        "conv1.1": "stem.0.bn",
        "conv1.3": "stem.1.conv",
        "conv1.4": "stem.1.bn",
        "conv1.6": "stem.2.conv",
    }
    out = {}
    for k, v in state.items():
        module, _, leaf = k.rpartition(".")
        if k.startswith("fc."):
            out["head." + k] = v
            continue
        if module in ours_to_stem:
            module = ours_to_stem[module]
        elif module == "bn1" and "conv1.0.weight" in state:
            module = "stem.2.bn"
        out[f"backbone.{module}.{leaf}"] = v
    return out


@pytest.mark.parametrize("kw", [{}, V1B], ids=["classic", "deep-stem"])
def test_openmmlab_checkpoint(tmp_path, kw):
    source = randomized(tiny(**kw))
    mm = to_mmpretrain(source.state_dict())
    assert "backbone.layer1.0.bns.0.running_var" in mm and "head.fc.weight" in mm
    assert ("backbone.stem.2.bn.weight" in mm) == bool(kw)
    path = tmp_path / "res2net50-w14-s8_3rdparty_8xb32_in1k.pth"
    torch.save({"meta": {"mmcls_version": "0.16.0", "CLASSES": ["a", "b"]}, "state_dict": mm}, path)
    assert mmpretrain_to_ours(mm).keys() == source.state_dict().keys()
    model = tiny(seed=5, **kw)
    load_checkpoint(model, path)
    assert_same_state(model, source.state_dict())


def test_openmmlab_detection_backbone_loads_as_features(tmp_path, source, tiny_name):
    """An mmdet checkpoint: backbone plus neck/heads; the backbone part loads for features."""
    mm = {k: v for k, v in to_mmpretrain(source.state_dict()).items() if not k.startswith("head.")}
    mm["neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "mmdet.pth"
    torch.save({"state_dict": mm}, path)
    model = res2net.create_model(tiny_name, checkpoint_path=path, features_only=True)
    assert_same_state(
        model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    )


# --- classifier heads, strictness, architectures ---------------------------------------------


def test_classifier_size_mismatch_explained(tmp_path, source):
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    model = tiny(num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg and "10 classes" in msg and "has 5" in msg
    assert "num_classes=10" in msg and "reset_head=True" in msg
    assert_same_state(model, before)


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_reset_head_keeps_new_classifier_and_loads_the_rest(tmp_path, source, caplog):
    path = tmp_path / "ten.safetensors"
    save_file(source.state_dict(), str(path))
    model = tiny(num_classes=5, seed=3)
    fresh_fc = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    with caplog.at_level(logging.INFO):
        report = load_checkpoint(model, path, reset_head=True)
    assert report.head_reset
    assert_same_state(model, fresh_fc)
    assert_same_state(
        model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    )
    assert len(_warnings(caplog)) == 1 and "classifier" in _warnings(caplog)[0].getMessage()


@pytest.mark.parametrize("num_classes", [5, 0])
def test_create_model_with_other_num_classes_fine_tunes(
    tmp_path, source, tiny_name, caplog, num_classes
):
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO):
        model = res2net.create_model(tiny_name, num_classes=num_classes, checkpoint_path=path)
    assert model.num_classes == num_classes
    assert_same_state(
        model, {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    )
    if num_classes:
        assert model.fc.weight.shape == (5, source.num_features)
        assert not torch.equal(model.fc.weight[:5], source.fc.weight[:5])
    assert len(_warnings(caplog)) == 1


def test_create_model_same_num_classes_loads_head(tmp_path, source, tiny_name, caplog):
    path = tmp_path / "ten.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.INFO):
        model = res2net.create_model(tiny_name, num_classes=10, checkpoint_path=path)
    assert_same_state(model, source.state_dict())
    assert _warnings(caplog) == []
    with pytest.raises(ValueError, match="classifier has 10 classes but the model has 1000"):
        res2net.create_model(
            tiny_name, checkpoint_path=path
        )  # default 1000 classes: not a request for a new head


def test_strict_mismatch_message_and_non_strict_report(tmp_path, source):
    state = dict(source.state_dict())
    state.pop("layer4.0.bn3.running_var")
    state["extra.weight"] = torch.ones(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    model = tiny(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path)
    msg = str(err.value)
    assert str(path) in msg and "1 missing keys" in msg and "layer4.0.bn3.running_var" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg and "model name" in msg
    assert_same_state(model, before)  # nothing loaded on error
    report = load_checkpoint(model, path, strict=False)
    assert report.missing == ["layer4.0.bn3.running_var"] and report.unexpected == ["extra.weight"]
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_other_architecture_named(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    other = Res2Net(layers=(1, 1, 1, 1), base_width=8, scale=4, num_classes=10)
    with pytest.raises(ValueError, match="different architecture"):
        load_checkpoint(other, path)


def test_num_batches_tracked_not_required(tmp_path, source):
    path = tmp_path / "no_counters.pth"
    torch.save(
        {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")},
        path,
    )
    model = tiny(seed=5)
    assert load_checkpoint(model, path).missing == []


@pytest.mark.parametrize("content", ["empty", "foreign"])
@pytest.mark.parametrize("how", ["strict", "reset_head", "features_only"])
def test_a_file_with_none_of_the_models_tensors_is_refused_once(
    tmp_path, source, caplog, content, how
):
    """An empty safetensors header (`{}`) or another network's tensors: one error saying so, not
    a warning that the rest loaded followed by hundreds of missing keys, nor a silent random
    backbone where missing keys are allowed."""
    path = tmp_path / f"{content}.safetensors"
    save_file({} if content == "empty" else {"encoder.embed.weight": torch.ones(2)}, str(path))
    model = tiny(
        seed=5, **({"num_classes": 0, "out_indices": (4,)} if how == "features_only" else {})
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as err:
        load_checkpoint(model, path, strict=how != "features_only", reset_head=how == "reset_head")
    expected = (
        "it holds no tensors"
        if content == "empty"
        else "none of its 1 tensors is one of the model's"
    )
    assert str(err.value).startswith(f"{path}: {expected}") and "nothing was loaded" in str(
        err.value
    )
    assert caplog.records == []
    assert_same_state(model, before)


def test_new_head_warning_only_once_the_rest_has_loaded(tmp_path, source, caplog):
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(tiny(num_classes=5), path, reset_head=True)
    assert _warnings(caplog) == []  # no "all other weights loaded" before the error
    load_checkpoint(tiny(num_classes=5), path, reset_head=True, strict=False)
    (warning,) = _warnings(caplog)
    assert (
        "classifier not loaded" in warning.getMessage()
        and "other weights were not in the file" in warning.getMessage()
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_values_for_float_weights_are_refused(tmp_path, source, dtype):
    """Integers or bools where the model has float weights are no weights (they would be cast
    silently); BatchNorm's integer counters stay accepted as integers."""
    state = dict(source.state_dict())
    assert state["bn1.num_batches_tracked"].dtype == torch.int64  # integer buffers load as before
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].to(dtype)
    path = tmp_path / "ints.safetensors"
    save_file(state, str(path))
    model = tiny(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=rf"{path}: tensor 'layer1.0.conv1.weight' holds {dtype} values where the "
        r"model's torch.float32 weights go; nothing was loaded",
    ):
        load_checkpoint(model, path)
    assert_same_state(model, before)


# --- hostile and damaged files ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "pickle-2", "pickle-4", "pickle-0", "nested"])
def test_pickle_carrying_code_refused_and_not_run(tmp_path, kind):
    marker = tmp_path / "code-ran"
    payload = {"state_dict": {"conv1.weight": torch.ones(1), "evil": Payload(marker)}}
    path = tmp_path / "evil.pth"
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "nested":
        torch.save({"model": {"x": torch.ones(1)}, "optimizer": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(kind[-1])))
    if kind != "zip" and kind != "nested":  # the payload is real: a plain unpickler runs it
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ValueError) as err:
        load_checkpoint(tiny(), path)
    msg = str(err.value)
    assert str(path) in msg and "refused" in msg and "nothing in it was executed" in msg
    assert "could run code" in msg
    if kind == "zip":
        assert f"{open.__module__}.open" in msg  # the refusal names what the file wanted to call
    assert not marker.exists()


def _truncations(tmp_path: Path, source: nn.Module) -> dict[str, bytes]:
    state = {k: v for k, v in list(source.state_dict().items())[:6]}
    torch.save(state, tmp_path / "z.pth")
    torch.save(state, tmp_path / "l.pth", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "s.safetensors"))
    z, legacy, st = ((tmp_path / n).read_bytes() for n in ("z.pth", "l.pth", "s.safetensors"))
    return {
        "torch-zip-half": z[: len(z) // 2],
        "torch-zip-tail": z[:-10],
        "torch-legacy-half": legacy[: len(legacy) // 2],
        "torch-legacy-head": legacy[:30],
        "safetensors-header": st[:40],
        "safetensors-data": st[:-7],
        "safetensors-lying-header": st[:8] + b"{" + b" " * 20,
        "garbage": bytes(range(7, 256)) * 3,
        "empty": b"",
        "zip-not-torch": b"PK\x03\x04" + b"\x00" * 60,
    }


def test_damaged_files_raise_value_error_naming_the_file(tmp_path, source):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, data in _truncations(tmp_path, source).items():
        for ext in (".pth", ".safetensors", ".ckpt"):
            path = tmp_path / f"{name}{ext}"
            path.write_bytes(data)
            with pytest.raises(ValueError) as err:
                load_checkpoint(model, path)
            assert str(path) in str(err.value), (name, ext, str(err.value))
    assert_same_state(model, before)


def test_holds_no_state_dict(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": [0.1]}, path)
    with pytest.raises(ValueError, match="holds no state dict"):
        read_checkpoint(path)


def test_missing_file(tmp_path, tiny_name):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tiny(), tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        res2net.create_model(tiny_name, checkpoint_path=tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tiny(), tmp_path)  # a directory is not a checkpoint


# --- conversion -------------------------------------------------------------------------------


def test_convert_round_trip_from_mindcv(tmp_path):
    original, _ = read_mindspore_checkpoint(MINDCV_TINY)
    reference = tiny(seed=5)
    load_checkpoint(reference, MINDCV_TINY)
    expected = _logits(reference)

    st = convert(
        MINDCV_TINY,
        tmp_path / "tiny.safetensors",
        "res2net_tiny",
        source="mindcv",
        model=tiny(seed=1),
    )
    c = read_checkpoint(st)
    tensors, fmt, meta = c.state_dict, c.format, c.metadata
    assert fmt == "safetensors" and all(v.dtype != torch.float16 for v in tensors.values())
    assert (
        meta["arch"] == "res2net_tiny"
        and meta["num_classes"] == "10"
        and meta["source"] == "mindcv"
    )
    assert set(json.loads(meta["eval"])) == {
        "image_resize",
        "crop_pct",
        "interpolation",
        "mean",
        "std",
    }
    assert set(tensors) == set(
        reference.state_dict()
    )  # num_batches_tracked included for load_state_dict

    ckpt = convert(st, tmp_path / "back.ckpt", model=tiny(seed=2))
    back, skipped = read_mindspore_checkpoint(ckpt)
    assert skipped == [] and set(back) == set(original)  # MindCV's names
    for k, v in original.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.float()), k

    pth = convert(ckpt, tmp_path / "back.pth", model=tiny(seed=3))
    assert detect_format(pth) == "torch"
    for path in (st, ckpt, pth):
        model = tiny(seed=4)
        load_checkpoint(model, path)
        assert torch.equal(_logits(model), expected), path


def test_convert_cli_with_registry_name(tmp_path, tiny_name, capsys):
    dst = tmp_path / "out" / "tiny.safetensors"
    assert cli_main(["convert", str(MINDCV_TINY), str(dst), "--model", tiny_name]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {dst}"
    meta = read_checkpoint(dst).metadata
    assert meta["arch"] == tiny_name and meta["source"] == "mindspore"
    # the architecture is read back from the file's metadata
    assert cli_main(["convert", str(dst), str(tmp_path / "tiny.ckpt")]) == 0
    model = res2net.create_model(tiny_name, num_classes=10, checkpoint_path=tmp_path / "tiny.ckpt")
    reference = tiny(seed=5)
    load_checkpoint(reference, MINDCV_TINY)
    assert_same_state(model, reference.state_dict())
    assert [p.name for p in (tmp_path / "out").iterdir()] == [
        "tiny.safetensors"
    ]  # no temporaries left


def test_convert_training_checkpoint_names_its_architecture(tmp_path, source, tiny_name):
    save_checkpoint(
        {"arch": tiny_name, "num_classes": 10, "model": source.state_dict()}, tmp_path / "last.pt"
    )
    out = convert(tmp_path / "last.pt", tmp_path / "final.safetensors")
    meta = read_checkpoint(out).metadata
    assert meta["arch"] == tiny_name and meta["num_classes"] == "10"


def test_convert_metadata_from_pretrained_table(tmp_path, source, monkeypatch):
    """A file named like a published one gets that entry's source and eval transform."""
    from res2net.weights import convert as convert_module

    entry = {
        "source": "official",
        "file_name": "tiny-0123abcd.pth",
        "eval": {
            "image_resize": 224,
            "crop_pct": 0.9,
            "interpolation": "bicubic",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
    }
    monkeypatch.setattr(convert_module, "pretrained_entries", lambda name: [entry])
    torch.save(source.state_dict(), tmp_path / entry["file_name"])
    out = convert(
        tmp_path / entry["file_name"], tmp_path / "t.safetensors", "res2net_tiny", model=tiny()
    )
    meta = read_checkpoint(out).metadata
    assert meta["source"] == "official" and json.loads(meta["eval"]) == entry["eval"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["missing.ckpt", "out.safetensors", "--model", "res2net50"], "does not exist"),
        (["{fixture}", "out.txt", "--model", "res2net50"], "cannot tell the output format"),
        (["{fixture}", "out.safetensors"], "pass --model NAME"),
        (["{fixture}", "out.safetensors", "--model", "res2net50"], "different architecture"),
        (["{fixture}", "out.safetensors", "--model", "res2net_nope"], "unknown model"),
        (
            ["{garbage}", "out.safetensors", "--model", "res2net50"],
            "not a checkpoint this library reads",
        ),
    ],
)
def test_convert_cli_errors_are_one_line(tmp_path, capsys, args, expected):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x01\x02 not a checkpoint")
    args = [a.format(fixture=MINDCV_TINY, garbage=garbage) for a in args]
    args[:2] = [
        str(tmp_path / args[0]) if not os.path.isabs(args[0]) else args[0],
        str(tmp_path / args[1]),
    ]
    assert cli_main(["convert", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("res2net convert: error:") and expected in err, (
        err
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_cli_refuses_hostile_file(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.weight": torch.ones(1)}, "x": Payload(marker)}, path)
    assert (
        cli_main(["convert", str(path), str(tmp_path / "out.safetensors"), "--model", "res2net50"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and str(path) in err, err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(OSError, match=r"could not write .*f\.bin \(disk full\)"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# one architecture of each family built for real; the others' constructors run on the meta
# device (the same code, without the memory and initialisation of 13 networks)
BUILT_FOR_REAL = {"res2net50_26w_4s", "res2next50", "res2net50_v1b_26w_4s", "dla60_res2next"}


def test_classifier_features_known_for_every_architecture_without_building_it():
    """`model_features` builds on the meta device without a classifier; it must agree with a
    build that has one, and with the width that classifier takes."""
    for name in ARCHITECTURES:
        device = "cpu" if name in BUILT_FOR_REAL else "meta"
        with torch.device(device):
            model = res2net.create_model(name, num_classes=3)
        classifier_width = model.get_classifier().weight.shape[1]
        assert model_features(name) == model.num_features == classifier_width, name
    assert model_features("hf-hub:org/name") is None  # a Hub model brings its own config


def test_class_count_of_a_dla_checkpoint_whose_classifier_is_a_1x1_conv(tmp_path):
    model = res2net.create_model("dla60_res2net", num_classes=7)
    save_file(model.state_dict(), tmp_path / "dla.safetensors")
    assert read_checkpoint(tmp_path / "dla.safetensors", model="dla60_res2net").num_classes == 7
    with pytest.raises(ValueError, match="takes 1024 features where res2net50 has 2048"):
        read_checkpoint(tmp_path / "dla.safetensors", model="res2net50")
