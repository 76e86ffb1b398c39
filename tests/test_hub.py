"""Hugging Face Hub folders: written by `save_to_folder` / `res2net convert --to-hub-folder`,
read back by `create_model("local-dir:...")`, by `create_model("hf-hub:...")` through
huggingface_hub's cache (offline: nothing is uploaded or downloaded), and by timm."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import res2net
from res2net.cli.main import main
from res2net.errors import CheckpointError
from res2net.weights.hubfolder import read_config

from .conftest import rgb

pytestmark = pytest.mark.usefixtures("single_thread")
ARCH = "res2net50_14w_8s"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 5-class model with non-trivial BatchNorm statistics, and a Hub folder of it."""
    torch.manual_seed(0)
    model = res2net.create_model(ARCH, num_classes=5)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    folder = tmp_path_factory.mktemp("hub") / "tiny-res2net"
    res2net.save_to_folder(
        model,
        folder,
        arch=ARCH,
        repo_name="me/tiny-res2net",
        classes=list("abcde"),
        metrics={"top1": 61.5},
        eval_args={"image_resize": 160, "crop_pct": 0.95, "interpolation": "bicubic"},
    )
    return model, folder


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, trained):
    """The folder placed in a Hub cache laid out as huggingface_hub writes it, offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--me--tiny-res2net"
    shutil.copytree(trained[1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_folder_has_timm_layout_and_model_card(trained):
    _, folder = trained
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 5
    assert config["label_names"] == list("abcde")
    assert config["pretrained_cfg"]["input_size"] == [3, 160, 160]
    assert config["pretrained_cfg"]["interpolation"] == "bicubic"
    card = (folder / "README.md").read_text()
    assert (
        card.startswith("---\n") and "library_name: timm" in card and "license: apache-2.0" in card
    )
    assert "| top1 | 61.5 |" in card and 'create_model("hf-hub:me/tiny-res2net")' in card


def test_local_dir_and_hub_cache_give_the_same_logits(trained, hub_cache):
    model, folder = trained
    x = torch.randn(2, 3, 64, 64)
    for name in (f"local-dir:{folder}", "hf-hub:me/tiny-res2net", "hf_hub:me/tiny-res2net@main"):
        loaded = res2net.create_model(name)
        assert torch.equal(_logits(loaded, x), _logits(model, x)), name
        assert loaded.hub_config["label_names"] == list("abcde")
    finetune = res2net.create_model("hf-hub:me/tiny-res2net", num_classes=3)
    assert finetune.fc.out_features == 3


def test_timm_loads_our_folder_and_gives_our_logits(trained, hub_cache):
    timm = pytest.importorskip("timm")
    model, folder = trained
    x = torch.randn(2, 3, 64, 64)
    for name in (f"local-dir:{folder}", "hf-hub:me/tiny-res2net"):
        theirs = timm.create_model(name, pretrained=True)
        assert theirs.pretrained_cfg["crop_pct"] == 0.95
        err = (_logits(theirs, x) - _logits(model, x)).abs().max() / _logits(model, x).abs().max()
        assert err <= 1e-5, name


def test_missing_from_cache_offline_is_one_clear_error(hub_cache):
    with pytest.raises(CheckpointError, match="not in the Hub cache.*offline"):
        res2net.create_model("hf-hub:me/not-there")


def test_unreachable_hub_fails_at_once_in_one_line(tmp_path):
    """A file not in the cache and a Hub that refuses connections (HF_ENDPOINT on the discard
    port): one line, and none of huggingface_hub's retry lines (five tries, about 25 s)."""
    rgb(tmp_path / "img.png", size=(32, 32))
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "res2net.cli.main",
            "predict",
            "--model",
            "hf-hub:x/y",
            str(tmp_path / "img.png"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "res2net predict: error: x/y: config.json is not in the Hub cache and "
        "http://127.0.0.1:9/x/y/resolve/main/config.json cannot be reached"
    ), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_push_offline_fails_clearly_and_uploads_nothing(trained, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        res2net.push_to_hub(trained[0], "me/tiny-res2net", arch=ARCH)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architecture": "resnet50"}, "resnet50"),
        ({"num_classes": -3}, "num_classes"),
        ({"label_names": ["a"]}, "label_names"),
        ({"pretrained_cfg": {"input_size": [3, 10**6, 10**6]}}, "input_size"),
        ({"pretrained_cfg": {"std": [0, 1, 1]}}, "std"),
    ],
)
def test_hostile_configs_are_refused_naming_the_key(trained, tmp_path, change, message):
    folder = tmp_path / "bad"
    shutil.copytree(trained[1], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        read_config(folder)


def test_convert_cli_writes_a_hub_folder(trained, tmp_path, capsys):
    model, _ = trained
    src = tmp_path / "weights.pth"
    torch.save(model.state_dict(), src)
    (tmp_path / "classes.txt").write_text("\n".join("vwxyz"))
    out = tmp_path / "out"
    (tmp_path / "recipe.yaml").write_text("model: res2net50_14w_8s\nlr: 0.1\n")
    args = [
        "convert",
        str(src),
        "--model",
        ARCH,
        "--to-hub-folder",
        str(out),
        "--metric",
        "top1=12.5",
        "--classes",
        str(tmp_path / "classes.txt"),
        "--recipe",
        str(tmp_path / "recipe.yaml"),
    ]
    assert main(args) == 0
    loaded = res2net.create_model(f"local-dir:{out}")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(_logits(loaded, x), _logits(model, x))
    assert loaded.hub_config["label_names"] == list("vwxyz")
    card = (out / "README.md").read_text()
    assert "| top1 | 12.5 |" in card and "```yaml\nmodel: res2net50_14w_8s\nlr: 0.1\n```" in card
    assert main(["convert", str(src), "--model", ARCH]) == 2
    assert "give either DST" in capsys.readouterr().err


def test_a_folder_of_the_users_files_is_not_overwritten(trained, tmp_path):
    model, folder = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("MY NOTES")
    (mine / "config.json").write_text('{"mine": 1}')
    with pytest.raises(
        ValueError, match="already holds config.json, README.md and is not a model folder"
    ):
        res2net.save_to_folder(model, mine, arch=ARCH)
    assert (mine / "README.md").read_text() == "MY NOTES" and sorted(
        p.name for p in mine.iterdir()
    ) == ["README.md", "config.json"]
    again = tmp_path / "again"
    shutil.copytree(folder, again)
    res2net.save_to_folder(model, again, arch=ARCH, classes=list("vwxyz"))  # ours: replaced
    assert read_config(again)["label_names"] == list("vwxyz")


def test_config_classes_must_match_the_weights_before_the_model_is_built(
    trained, tmp_path, monkeypatch
):
    """A 1 KB config.json claiming a million classes must not size a 8 GB classifier: the
    weights' own classifier is read first, and the two must agree."""
    folder = tmp_path / "big"
    shutil.copytree(trained[1], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_classes=1_000_000, label_names=None)
    (folder / "config.json").write_text(json.dumps(config))
    built = []
    monkeypatch.setattr("res2net.factory.build_model", lambda name, **kw: built.append(kw) or 1 / 0)
    with pytest.raises(ValueError, match=r"config.json.*1000000.*5 classes"):
        res2net.create_model(f"local-dir:{folder}")
    assert not built


def test_folder_weights_are_read_as_safetensors_only(trained, tmp_path):
    folder = tmp_path / "pickle"
    shutil.copytree(trained[1], folder)
    torch.save(trained[0].state_dict(), folder / "model.safetensors")  # a pickle in its place
    with pytest.raises(ValueError, match="model.safetensors.*safetensors"):
        res2net.create_model(f"local-dir:{folder}")


def test_validate_on_a_hub_model_checks_the_checkpoint_classifier_first(
    trained, tmp_path, monkeypatch, capsys
):
    """`validate --model local-dir:DIR` sizes the Hub model's head from the checkpoint: a 4 MB
    file with a (2^20, 1) classifier must be refused against DIR's architecture before an 8 GiB
    head is built."""
    from safetensors.torch import save_file

    from .test_train import make_folder

    data = make_folder(tmp_path / "data", n_classes=2, per_class=1, splits=("val",))
    narrow = tmp_path / "narrow.safetensors"
    save_file({"fc.weight": torch.zeros(1 << 20, 1), "fc.bias": torch.zeros(1 << 20)}, narrow)
    class_map = tmp_path / "classes.txt"  # past the class count check, as for ImageNet-A
    class_map.write_text("class0\nclass1\n")
    built = []
    monkeypatch.setattr("res2net.factory.build_model", lambda name, **kw: built.append(kw) or 1 / 0)
    argv = ["validate", "--model", f"local-dir:{trained[1]}", "--data_dir", str(data)]
    argv += ["--ckpt_path", str(narrow), "--class_map", str(class_map)]
    argv += ["--image_resize", "16", "--num_parallel_workers", "0"]
    assert main(argv) == 2
    assert f"takes 1 features where {ARCH} has 2048" in capsys.readouterr().err
    assert not built


def test_a_checkpoint_cannot_name_a_hub_model_as_its_architecture(trained, tmp_path, monkeypatch):
    """A file's `arch` is untrusted: `convert` must not read a folder (or the Hub) it names."""
    from safetensors.torch import save_file

    from res2net.weights.convert import convert

    src = tmp_path / "named.safetensors"
    meta = {"arch": f"local-dir:{trained[1]}"}
    save_file({"fc.weight": torch.zeros(5, 2048), "fc.bias": torch.zeros(5)}, src, metadata=meta)
    read = []
    for module in ("res2net.weights.hubfolder", "res2net.weights.loading"):
        monkeypatch.setattr(f"{module}.read_config", lambda folder: read.append(folder) or 1 / 0)
    with pytest.raises(ValueError, match="unknown model 'local-dir:"):
        convert(src, tmp_path / "out.pth")
    assert not read
