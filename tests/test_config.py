"""The run schema: MindCV recipes load unchanged, overrides parse like MindCV's argparse,
mistakes fail with one-line messages that name the key, MindSpore-only keys are reported."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from res2net.cli.train import config_from_argv
from res2net.config import Config, ConfigError, load_config
from res2net.engine import train as engine

RECIPES = sorted((Path(__file__).parent / "fixtures" / "mindcv_recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- MindCV recipes and defaults ------------------------------------------------------------


def test_fixture_recipes_present():
    assert len(RECIPES) == 5


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shared_recipe_loads(recipe: Path):
    cfg = config_from_argv(str(recipe), ["--data_dir", "/data/imagenet"])
    assert cfg.data_dir == "/data/imagenet"
    assert cfg.config == str(recipe)
    assert cfg.model.startswith("res2net")
    assert (cfg.batch_size, cfg.lr, cfg.opt, cfg.momentum) == (32, 0.1, "momentum", 0.9)
    assert cfg.scale == (0.08, 1.0) and cfg.ratio == (0.75, 1.333)
    assert cfg.label_smoothing == 0.1 and cfg.re_prob == 0.5
    assert cfg.amp_level in ("O2", "O3") and cfg.loss_scale == 1024.0
    assert cfg.mode == 0 and cfg.distribute is True


def test_step_decay_recipe_values():
    cfg = config_from_argv(str(RECIPES[0]), ["--data_dir", "/x"])  # res2net_101_ascend.yaml
    assert cfg.scheduler == "step_decay"
    assert (cfg.decay_epochs, cfg.decay_rate) == (30, 0.1)
    assert (cfg.warmup_epochs, cfg.epoch_size) == (0, 140)


def test_defaults_are_mindcvs():
    cfg = Config()
    assert (cfg.mode, cfg.batch_size, cfg.epoch_size) == (0, 128, 90)
    assert (cfg.lr, cfg.opt) == (0.001, "adam")
    assert cfg.weight_decay == 1e-6 and cfg.min_lr == 1e-6 and cfg.eps == 1e-10
    assert cfg.mean == (0.485 * 255, 0.456 * 255, 0.406 * 255)
    assert cfg.std == (0.229 * 255, 0.224 * 255, 0.225 * 255)
    assert cfg.multi_step_decay_milestones == (30, 60, 90)
    assert cfg.ckpt_save_policy == "latest_k" and cfg.num_classes is None
    assert load_config(None) == cfg


def test_yaml_scientific_notation_is_a_number(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; the schema still makes it a float.
    cfg = load_config(write(tmp_path, "weight_decay: 1e-4\nlr: 5e-1\n"))
    assert cfg.weight_decay == pytest.approx(1e-4) and cfg.lr == 0.5


def test_integer_too_large_for_a_number_key_names_the_key(tmp_path):
    # YAML reads 400 digits as an int, which no float holds: one line, not an OverflowError.
    path = write(tmp_path, f"lr: {'9' * 400}\n")
    with pytest.raises(
        ConfigError, match=f"^config key 'lr' expects a number, .* \\(in {path}\\)$"
    ):
        load_config(path)


# --- overrides ------------------------------------------------------------------------------


def test_overrides_underscores_dashes_and_equals():
    cfg = config_from_argv(
        str(RECIPES[2]),
        [
            "--lr",
            "0.2",
            "--distribute",
            "False",
            "--scale",
            "[0.08, 1.0]",
            "--data-dir",
            "/x",
            "--batch-size=64",
            "--ratio=0.5,2.0",
            "--num_classes",
            "None",
            "--ema",
            "--ckpt_save_policy",
            "None",
            "--auto_augment",
            "randaug-m9-mstd0.5-inc1",
            "--min_lr",
            "-0",
        ],
    )
    assert cfg.lr == 0.2 and cfg.distribute is False and cfg.data_dir == "/x"
    assert cfg.batch_size == 64 and cfg.ratio == (0.5, 2.0) and cfg.scale == (0.08, 1.0)
    assert cfg.num_classes is None and cfg.ema is True and cfg.ckpt_save_policy is None
    assert cfg.auto_augment == "randaug-m9-mstd0.5-inc1"


@pytest.mark.parametrize(
    "text,expected",
    [("true", True), ("True", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_bool_spellings(text, expected):
    assert config_from_argv(None, ["--shuffle", text]).shuffle is expected


def test_config_path_on_the_command_line():
    cfg = config_from_argv(None, ["-c", str(RECIPES[3]), "--data_dir", "/x"])
    assert cfg.config == str(RECIPES[3]) and cfg.mixup == 0.2
    assert config_from_argv(None, [f"--config={RECIPES[3]}"]).mixup == 0.2


def test_dict_overrides_and_case_normalisation():
    cfg = load_config(None, {"data-dir": "/x", "lr": "0.3", "amp_level": "o2", "opt": "SGD"})
    assert (cfg.data_dir, cfg.lr, cfg.amp_level, cfg.opt) == ("/x", 0.3, "O2", "sgd")


def test_string_fields_keep_command_line_text():
    cfg = config_from_argv(
        None, ["--ckpt_path", "", "--val_split", "2012", "--model", "res2net101"]
    )
    assert cfg.ckpt_path == "" and cfg.val_split == "2012" and cfg.model == "res2net101"


@pytest.mark.parametrize(
    "argv,needle", [(["data_dir", "/x"], "unexpected"), (["--lr"], "needs a value")]
)
def test_malformed_command_line(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_argv(None, argv)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = write(tmp_path, "lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"unknown config key 'lrr' (in {path}); did you mean 'lr'?"
    assert e.value.key == "lrr"


def test_unknown_key_on_command_line_suggests_closest():
    with pytest.raises(ConfigError) as e:
        config_from_argv(None, ["--label_smothing", "0.1"])
    assert str(e.value) == (
        "unknown config key 'label_smothing' (on the command line); did you mean 'label_smoothing'?"
    )
    with pytest.raises(ConfigError, match="unknown config key 'zzz' \\(on the command line\\)$"):
        config_from_argv(None, ["--zzz", "1"])


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("lr", "abc", "a number"),
        ("batch_size", "3.5", "an integer"),
        ("distribute", "maybe", "a bool"),
        ("scale", "[0.08]", "a list of 2 numbers"),
        ("mean", "127", "a list of numbers"),
        ("num_samples", "all", "an integer or None"),
    ],
)
def test_type_errors_name_key_value_and_type(key, value, expected):
    with pytest.raises(ConfigError) as e:
        config_from_argv(None, [f"--{key}", value])
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg and "on the command line" in msg
    assert "\n" not in msg and e.value.key == key


def test_type_error_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "hflip: [0.5]\n")
    expected = f"'hflip' expects a number, got \\[0.5\\] \\(in {path}\\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


@pytest.mark.parametrize(
    "key,value",
    [
        ("lr", "0"),
        ("batch_size", "0"),
        ("hflip", "1.5"),
        ("vflip", "-0.1"),
        ("re_prob", "2"),
        ("label_smoothing", "1.0"),
        ("epoch_size", "0"),
        ("warmup_epochs", "-1"),
        ("scale", "[1.0, 0.08]"),
        ("ratio", "[0, 1]"),
        ("crop_pct", "0"),
        ("crop_pct", "2.5"),
        ("ema_decay", "1.0"),
        ("keep_checkpoint_max", "0"),
        ("ckpt_save_policy", "best"),
        ("opt", "shampoo"),
        ("scheduler", "linear"),
        ("amp_level", "O4"),
        ("interpolation", "quad"),
        ("auto_augment", "randaug-q9"),
        ("color_jitter", "[0.4, 0.4]"),
        ("dataset", "cifar10"),
        ("mode", "2"),
        ("device", "gpu"),
        ("lr_scale", "sqrt"),
        ("on_bad_image", "ignore"),
        ("loss", "focal"),
        ("mean", "[1, 2]"),
        ("loss_scale", "0.5"),
        ("multi_step_decay_milestones", "[60, 30]"),
        ("aug_splits", "3"),
        ("dataset_download", "True"),
    ],
)
def test_range_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        config_from_argv(None, [f"--{key}", value])
    assert str(e.value).startswith(f"config key '{key}' ")
    assert "on the command line" in str(e.value) and e.value.key == key


def test_range_error_from_file_names_file(tmp_path):
    path = write(tmp_path, "batch_size: 0\n")
    with pytest.raises(ConfigError, match=f"'batch_size' must be >= 1, got 0 \\(in {path}\\)"):
        load_config(path)


def test_python_tagged_yaml_is_refused(tmp_path):
    path = write(tmp_path, "lr: 0.1\nmodel: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ValueError) as e:
        load_config(path)
    assert isinstance(e.value, ConfigError)
    assert path in str(e.value) and "line 2" in str(e.value) and "python" in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "lr: 0.1\nscale: [0.08, 1.0\nhflip: 0.5\n")
    with pytest.raises(ConfigError, match=f"^{path}: line \\d+: invalid YAML"):
        load_config(path)


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- lr\n- 0.1\n"))
    assert load_config(write(tmp_path, "# nothing\n")).config.endswith("recipe.yaml")


# --- the object -----------------------------------------------------------------------------


def test_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1  # type: ignore[misc]
    assert cfg.replace(lr="0.2").lr == 0.2
    with pytest.raises(ConfigError, match="'lr' must be > 0"):
        cfg.replace(lr=-1)
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        cfg.replace(lrr=1)


def test_to_yaml_round_trip(tmp_path):
    cfg = config_from_argv(str(RECIPES[3]), ["--data_dir", "/x", "--ckpt_save_policy", "None"])
    again = load_config(write(tmp_path, cfg.to_yaml(), "dump.yaml"))
    assert again.replace(config=cfg.config) == cfg
    assert cfg.to_dict()["scale"] == [0.08, 1.0]


# --- MindSpore keys: notes and mappings -----------------------------------------------------


def test_notes_report_ignored_keys_only_when_set():
    for recipe in RECIPES:  # they set dataset_sink_mode: True, MindCV's default
        notes = "\n".join(engine.config_notes(load_config(str(recipe))))
        assert "dataset_sink_mode" not in notes and "amp_level" in notes and "loss_scale" in notes
    cfg = config_from_argv(
        None,
        [
            "--dataset_sink_mode",
            "False",
            "--device_target",
            "GPU",
            "--jit_level",
            "O1",
            "--eval_shuffle",
            "True",
            "--mode",
            "1",
        ],
    )
    notes = engine.config_notes(cfg)
    for key in ("dataset_sink_mode", "device_target", "jit_level", "eval_shuffle"):
        assert any(line.startswith(key) for line in notes), key
    assert not any(line.startswith("mode") for line in notes)
    assert engine.config_notes(config_from_argv(None, ["--mode", "1"])) == []


def test_legacy_keys_are_mapped(tmp_path):
    cfg = load_config(write(tmp_path, "filter_bias_and_bn: True\ndynamic_loss_scale: True\n"))
    assert cfg.weight_decay_filter == "norm_and_bias" and cfg.loss_scale_type == "dynamic"
    assert any(line.startswith("filter_bias_and_bn") for line in engine.config_notes(cfg))


def test_amp_mapping():
    amp_dtype, use_grad_scaler = engine.amp_dtype, engine.use_grad_scaler
    assert amp_dtype(Config(), "cuda") is None and amp_dtype(Config(), "cpu") is None
    for level in ("O1", "O2", "O3"):
        cfg = Config(amp_level=level)
        assert amp_dtype(cfg, "cpu") == torch.bfloat16
        assert amp_dtype(cfg, "cuda", bf16_supported=True) == torch.bfloat16
        assert amp_dtype(cfg, "cuda", bf16_supported=False) == torch.float16
        assert amp_dtype(cfg, "cuda", validation=True, bf16_supported=False) is None
        assert use_grad_scaler(cfg, "cuda", bf16_supported=False)
        assert not use_grad_scaler(cfg, "cuda", bf16_supported=True)
        assert not use_grad_scaler(cfg, "cpu")
    assert amp_dtype(Config(val_amp_level="O2"), "cpu", validation=True) == torch.bfloat16
    assert engine.grad_scaler_init_scale(Config(loss_scale=1024)) == 1024.0
    assert engine.grad_scaler_init_scale(Config()) == 2.0**16


def test_compile_mapping():
    use_compile = engine.use_compile
    assert use_compile(Config(mode=0), "cuda") and not use_compile(Config(mode=0), "cpu")
    assert not use_compile(Config(mode=1), "cuda")
    assert use_compile(Config(mode=1, compile=True), "cpu")


def test_lr_scale_factor():
    lr_scale_factor = engine.lr_scale_factor
    assert lr_scale_factor(Config(batch_size=32), 8) == 1.0  # lr_scale: none
    cfg = Config(batch_size=32, lr_scale="linear")
    assert lr_scale_factor(cfg, 8) == 1.0 and lr_scale_factor(cfg, 1) == 0.125
    assert lr_scale_factor(cfg.replace(gradient_accumulation_steps=2), 4) == 1.0


def test_every_shipped_recipe_loads_and_names_a_model():
    from res2net.models import resolve_name

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
    assert len(recipes) >= 14
    for recipe in recipes:
        cfg = config_from_argv(str(recipe), ["--data_dir", "/data"])
        resolve_name(cfg.model)


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_dist_timeout_must_be_positive_and_finite(value):
    with pytest.raises(ConfigError, match="dist_timeout"):
        config_from_argv(None, ["--dist_timeout", value])


def test_readme_key_table_is_generated_from_the_declarations():
    from res2net.cli.train import keys_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme.split("<!-- keys:begin -->\n")[1].split("<!-- keys:end -->")[0]
    assert table == keys_table(), "README's key table is stale: paste cli.train.keys_table() there"


def test_help_states_trust_bounds_and_status(capsys):
    from res2net.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert (
        "--overwrite (default: False)\n" in out
        and "files already in ckpt_save_dir; command line only" in out
    )
    assert "images per device per step [>= 1, <= 65536]" in out
    assert (
        "--dataset_sink_mode (default: True)\n      data sinking; ignored (MindSpore-only)" in out
    )
