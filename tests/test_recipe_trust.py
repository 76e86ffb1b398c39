"""A recipe tunes a run; only the command line says what is moved aside, contacted or written
outside the run folder. Each attack below is a recipe alone (`train -c evil.yaml`, no flags):
it is refused in one line naming the key and the flag that does the same, before anything runs.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from res2net.cli.main import main
from res2net.cli.train import config_from_argv
from res2net.config import ConfigError, load_config


def recipe(tmp_path: Path, text: str, name: str = "evil.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(capsys, path: Path, key: str) -> str:
    assert main(["train", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("res2net train: error: "), err
    assert f"{key} " in err and f"pass --{key}" in err and str(path) in err, err
    return err


def test_recipe_cannot_delete_another_run(tmp_path, capsys):
    other = tmp_path / "other-run"
    other.mkdir()
    kept = {"last.pt": b"ckpt", "metrics.jsonl": b"{}\n", "train_plot.png": b"png"}
    for name, data in kept.items():
        (other / name).write_bytes(data)
    evil = recipe(tmp_path, f"ckpt_save_dir: {other}\noverwrite: True\nepoch_size: 1\n")
    refused(capsys, evil, "ckpt_save_dir")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == kept
    evil = recipe(tmp_path, "overwrite: True\n")
    refused(capsys, evil, "overwrite")


@pytest.mark.parametrize("where", ["../elsewhere", "runs/../../elsewhere", "~/elsewhere"])
def test_recipe_cannot_write_outside_the_run_folder(tmp_path, capsys, where):
    refused(capsys, recipe(tmp_path, f"ckpt_save_dir: {where}\n"), "ckpt_save_dir")


def test_recipe_cannot_create_a_tracking_database_elsewhere(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "elsewhere" / "evil.db"
    evil = recipe(tmp_path, f"log: mlflow\nlog_uri: sqlite:///{db}\n")
    refused(capsys, evil, "log")
    assert not db.parent.exists() and not (tmp_path / "mlruns").exists()
    refused(capsys, recipe(tmp_path, f"log_uri: sqlite:///{db}\n"), "log_uri")
    refused(capsys, recipe(tmp_path, "log_project: other-team\n"), "log_project")


def test_recipe_cannot_make_training_contact_a_host(tmp_path, capsys):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        evil = recipe(tmp_path, f"log: mlflow\nlog_uri: http://127.0.0.1:{port}/\n")
        refused(capsys, evil, "log")
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.parametrize("model", ["hf-hub:org/name", "local-dir:/tmp/x"])
def test_recipe_cannot_fetch_a_hub_model(tmp_path, capsys, model):
    refused(capsys, recipe(tmp_path, f"model: {model}\n"), "model")


def test_command_line_may_set_every_trusted_key(tmp_path):
    evil = recipe(tmp_path, "overwrite: True\nlog: mlflow\nmodel: hf-hub:org/name\n")
    flags = ["--overwrite", "--log", "mlflow", "--model", "hf-hub:org/name"]
    cfg = config_from_argv(evil, [*flags, "--ckpt_save_dir", str(tmp_path / "run")])
    assert cfg.overwrite and cfg.log == "mlflow" and cfg.ckpt_save_dir == str(tmp_path / "run")


def test_public_recipes_and_defaults_still_load(tmp_path):
    text = "data_dir: /path/to/imagenet\nckpt_save_dir: ./ckpt\noverwrite: False\nlog: ''\n"
    cfg = load_config(recipe(tmp_path, text, "mindcv.yaml"))
    assert (cfg.data_dir, cfg.ckpt_save_dir, cfg.overwrite) == (
        "/path/to/imagenet",
        "./ckpt",
        False,
    )
    dumped = recipe(tmp_path, cfg.to_yaml(), "dump.yaml")  # a full dump sets every key
    assert load_config(dumped).replace(config=cfg.config) == cfg
    assert load_config(recipe(tmp_path, "ckpt_save_dir: runs/r1\n")).ckpt_save_dir == "runs/r1"


def test_control_characters_in_a_recipe_path_are_escaped(tmp_path, capsys):
    evil = recipe(tmp_path, "lrr: 0.1\n", "evil\x1b[2J\x07\u200f.yaml")
    assert main(["train", "-c", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "\u200f" not in err
    assert "evil\\x1b[2J\\x07\\u200f.yaml" in err and err.count("\n") == 1, err


def test_nul_in_a_path_key_names_key_and_file(tmp_path):
    evil = recipe(tmp_path, 'ckpt_save_dir: "run\\0x"\n')
    with pytest.raises(ConfigError, match=f"'ckpt_save_dir' contains a NUL .* \\(in {evil}\\)"):
        load_config(evil)


def test_huge_seed_names_key_and_file(tmp_path):
    evil = recipe(tmp_path, f"seed: {'9' * 5000}\n")
    with pytest.raises(ConfigError, match=f"^config key 'seed' .* \\(in {evil}\\)$"):
        load_config(evil)
    with pytest.raises(ConfigError, match="^config key 'seed' .* \\(on the command line\\)$"):
        config_from_argv(None, ["--seed", "9" * 5000])
    with pytest.raises(ConfigError, match="'seed' must be <= 4294967295"):
        config_from_argv(None, ["--seed", "9" * 90])
