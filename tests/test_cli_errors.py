"""Bad input and environment errors of every command end in one line on stderr and exit code 2
(README, "Exit codes"), never a traceback: missing, unreadable or wrong-kind files, folders
where files are expected and back, bad flag values, unknown models, another architecture's
checkpoint, an output folder that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import res2net
from res2net.cli.main import main
from tests.test_train import make_folder

ROOT = Path(__file__).resolve().parents[1]
M = ["--model", "res2net50"]
FAST = [
    "--batch_size",
    "2",
    "--epoch_size",
    "1",
    "--image_resize",
    "16",
    "--num_parallel_workers",
    "0",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Named inputs: a tiny data folder, text, garbage, and checkpoints of two other models."""
    t = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    out = {
        "data": make_folder(t / "data", n_classes=2, per_class=2),
        "empty": t / "empty",
        "txt": t / "notes.txt",
        "garbage": t / "garbage.pt",
        "yaml": t / "bad.yaml",
        "r101": t / "r101.pth",
        "w8": t / "w8.pth",
        "r50": t / "r50.pth",
        "t": t,
    }
    (out["empty"] / "val").mkdir(parents=True)
    out["txt"].write_text("hello\n")
    out["garbage"].write_bytes(b"\x00\x01garbage" * 10)
    out["yaml"].write_text("lr: [1,\n")
    for key, arch in (
        ("r101", "res2net101"),
        ("w8", "res2net50_26w_8s"),
        ("r50", "res2net50"),
    ):
        torch.save(res2net.create_model(arch, num_classes=2).state_dict(), out[key])
    # a backbone: validating it would score a random head
    out["headless"] = t / "headless.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, out["headless"])
    # a million classes in 0 bytes: must not size the model
    out["hollow"] = t / "hollow.safetensors"
    save_file({"fc.weight": torch.zeros(10**6, 0), "fc.bias": torch.zeros(1)}, out["hollow"])
    out["narrow"] = t / "narrow.safetensors"  # 2^20 classes of 1 feature: 8 GiB once built
    save_file(
        {"fc.weight": torch.zeros(1 << 20, 1), "fc.bias": torch.zeros(1 << 20)}, out["narrow"]
    )
    out["deep"] = t / "deep.json"
    out["deep"].write_text("[" * 100_000 + "]" * 100_000)
    out["broken"] = t / "broken"
    for name in ("a", "b"):
        (out["broken"] / "val" / name).mkdir(parents=True)
        (out["broken"] / "val" / name / "1.png").write_text("not an image")
    return out


# (argv with {key} placeholders for `files`, a fragment of the expected message)
CASES = {
    "train-config-missing": (["train", "-c", "{t}/nope.yaml"], "config file not found"),
    "train-config-dir": (["train", "-c", "{t}"], "is a directory"),
    "train-config-bad-yaml": (["train", "-c", "{yaml}"], "invalid YAML"),
    "train-config-not-mapping": (["train", "-c", "{txt}"], "expected a mapping"),
    "train-unknown-key": (["train", "--lrr", "0.1"], "did you mean 'lr'"),
    "train-bad-number": (["train", "--lr", "abc"], "'lr' expects a number"),
    "train-bad-range": (["train", "--batch_size", "-1"], "'batch_size' must be >= 1"),
    "train-unknown-model": (
        [
            "train",
            "--model",
            "zzz",
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_save_dir",
            "{t}/r1",
        ],
        "unknown model 'zzz'",
    ),
    "train-out-not-writable": (
        ["train", *M, *FAST, "--data_dir", "{data}", "--ckpt_save_dir", "{txt}/run"],
        "is not writable",
    ),
    "train-resume-garbage": (
        [
            "train",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_save_dir",
            "{t}/r2",
            "--resume",
            "{garbage}",
        ],
        "not a readable training checkpoint",
    ),
    "train-other-arch": (
        [
            "train",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_save_dir",
            "{t}/r3",
            "--ckpt_path",
            "{r101}",
        ],
        "does not match the model",
    ),
    "validate-no-ckpt": (
        ["validate", *M, "--data_dir", "{data}"],
        "give the checkpoint",
    ),
    "validate-ckpt-missing": (
        ["validate", "--data_dir", "{data}", "--ckpt_path", "{t}/nope.pt"],
        "does not exist",
    ),
    "validate-ckpt-dir": (
        ["validate", "--data_dir", "{data}", "--ckpt_path", "{t}"],
        "is a directory",
    ),
    "validate-ckpt-garbage": (
        ["validate", "--data_dir", "{data}", "--ckpt_path", "{garbage}"],
        "not a checkpoint this library reads",
    ),
    "validate-ckpt-text": (
        ["validate", "--data_dir", "{data}", "--ckpt_path", "{txt}"],
        "not a checkpoint this library reads",
    ),
    "validate-other-arch": (
        ["validate", *M, "--data_dir", "{data}", "--ckpt_path", "{r101}"],
        "does not match the model",
    ),
    "validate-other-width": (
        ["validate", *M, "--data_dir", "{data}", "--ckpt_path", "{w8}"],
        "different architecture",
    ),
    "validate-unknown-model": (
        ["validate", "--model", "zzz", "--data_dir", "{data}", "--ckpt_path", "{r50}"],
        "unknown model 'zzz'",
    ),
    "validate-class-map-missing": (
        [
            "validate",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_path",
            "{r50}",
            "--class_map",
            "{t}/nope.txt",
        ],
        "does not exist",
    ),
    "validate-real-labels-not-json": (
        [
            "validate",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_path",
            "{r50}",
            "--real_labels",
            "{txt}",
        ],
        "not valid JSON",
    ),
    "validate-csv-is-dir": (
        [
            "validate",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_path",
            "{r50}",
            "--per_class_csv",
            "{t}",
        ],
        "is a directory: name a file to write",
    ),
    "validate-ckpt-no-classifier": (
        ["validate", *M, *FAST, "--data_dir", "{data}", "--ckpt_path", "{headless}"],
        "no classifier in this checkpoint, so nothing to validate",
    ),
    "validate-ckpt-hollow-classifier": (
        [
            "validate",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_path",
            "{hollow}",
            "--class_map",
            "{txt}",
        ],
        "classifier 'fc.weight' has shape (1000000, 0)",
    ),
    "validate-ckpt-narrow-classifier": (
        [
            "validate",
            *M,
            *FAST,
            "--data_dir",
            "{data}",
            "--ckpt_path",
            "{narrow}",
            "--class_map",
            "{txt}",
        ],
        "takes 1 features where res2net50 has 2048",
    ),
    "predict-ckpt-narrow-classifier": (
        ["predict", "{t}/notes.txt", *M, "--ckpt_path", "{narrow}"],
        "takes 1 features where res2net50 has 2048",
    ),
    "validate-no-decodable-image": (
        ["validate", *M, *FAST, "--data_dir", "{broken}", "--ckpt_path", "{r50}"],
        "none of the 2 images of",
    ),
    "predict-image-missing": (
        ["predict", "{t}/nope.png", *M],
        "no such image or folder",
    ),
    "predict-not-an-image": (
        ["predict", "{txt}", *M],
        "not an image format Pillow knows",
    ),
    "predict-empty-folder": (["predict", "{empty}/val", *M], "no images in folder"),
    "predict-bad-crop": (
        ["predict", "{data}/val", *M, "--crop_pct", "5"],
        "crop_pct is 5.0",
    ),
    "predict-classes-missing": (
        ["predict", "{data}/val", *M, "--classes", "{t}/nope"],
        "neither a folder nor a file",
    ),
    "predict-unknown-source": (
        ["predict", "{data}/val", *M, "--pretrained", "zzz"],
        "no 'zzz' weights",
    ),
    "predict-unknown-model": (
        ["predict", "{data}/val", "--model", "zzz"],
        "unknown model",
    ),
    "convert-src-missing": (
        ["convert", "{t}/nope.pt", "{t}/o.safetensors"],
        "does not exist",
    ),
    "convert-src-dir": (["convert", "{t}", "{t}/o.safetensors", *M], "is a directory"),
    "convert-src-garbage": (
        ["convert", "{garbage}", "{t}/o.safetensors", *M],
        "not a checkpoint",
    ),
    "convert-dst-extension": (
        ["convert", "{r50}", "{t}/o.xyz", *M],
        "cannot tell the output format",
    ),
    "convert-no-model": (
        ["convert", "{r50}", "{t}/o.safetensors"],
        "pass --model NAME",
    ),
    "convert-other-arch": (
        ["convert", "{w8}", "{t}/o.safetensors", *M],
        "different architecture",
    ),
    "convert-dst-not-writable": (
        ["convert", "{r50}", "{txt}/o.safetensors", *M],
        "notes.txt",
    ),
    "convert-bad-metric": (
        ["convert", "{r50}", *M, "--to-hub-folder", "{t}/hub", "--metric", "x"],
        "KEY=VALUE",
    ),
    "convert-recipe-missing": (
        [
            "convert",
            "{r50}",
            *M,
            "--to-hub-folder",
            "{t}/hub2",
            "--recipe",
            "{t}/nope.yaml",
        ],
        "nope.yaml",
    ),
    "export-unknown-model": (
        ["export", "{t}/m.onnx", "--format", "onnx", "--model", "zzz"],
        "unknown model",
    ),
    "export-ckpt-garbage": (
        ["export", "{t}/m.onnx", "--format", "onnx", *M, "--ckpt_path", "{garbage}"],
        "not a checkpoint",
    ),
    "benchmark-unknown-model": (["benchmark", "--model", "zzz"], "unknown model"),
    "benchmark-bad-batch": (["benchmark", *M, "--batch_size", "0"], "must be >= 1"),
    "cam-image-missing": (["cam", "{t}/nope.png", *M], "no such image or folder"),
    "cam-unknown-model": (["cam", "{data}/val", "--model", "zzz"], "unknown model"),
    "saliency-image-missing": (
        ["saliency", "predict", "{t}/nope.png", "--weights", "{r50}"],
        "no such image",
    ),
    "saliency-not-a-folder": (
        ["saliency", "train", "--data", "{t}/nope"],
        "is not a saliency folder",
    ),
    "data-missing": (["data", "check", "{t}/nope"], "is not a folder"),
    "data-file": (["data", "check", "{txt}"], "is not a folder"),
    "data-raw-unbounded": (["data", "shard", "{t}", "{t}/out", "--raw"], "raw pixels need"),
    "benchmark-no-classes": (
        ["benchmark", *M, "--num_classes", "0"],
        "--num_classes 0: give 1 to 1048576",
    ),
    "saliency-train-no-epochs": (
        ["saliency", "train", "--data", "{data}", "--epochs", "0"],
        "--epochs 0: give 1 or more",
    ),
    "saliency-train-tiny-images": (
        ["saliency", "train", "--data", "{data}", "--image_size", "8"],
        "--image_size 8: give 32 to 4096",
    ),
    "saliency-train-infinite-lr": (
        ["saliency", "train", "--data", "{data}", "--lr", "inf"],
        "--lr inf: give a positive finite number",
    ),
    "saliency-train-nan-weight-decay": (
        ["saliency", "train", "--data", "{data}", "--weight_decay", "nan"],
        "--weight_decay nan: give 0 or a positive finite number",
    ),
    "saliency-train-negative-workers": (
        ["saliency", "train", "--data", "{data}", "--workers", "-1"],
        "--workers -1: give 0 or more",
    ),
    "serve-no-weights": (["serve", "--model", "zzz"], "give the weights"),
    "serve-ckpt-garbage": (["serve", "--ckpt_path", "{garbage}"], "not a checkpoint"),
    "serve-ckpt-missing": (["serve", "--ckpt_path", "{t}/nope.pt"], "does not exist"),
    "serve-no-connections": (
        ["serve", "--ckpt_path", "{r50}", "--max_connections", "0"],
        "--max_connections 0: give a positive number",
    ),
    "serve-body-under-a-kib": (
        ["serve", "--ckpt_path", "{r50}", "--max_body_mb", "1e-9"],
        "--max_body_mb 1e-09: give at least 1 KiB",
    ),
    "serve-timeout-nan": (
        ["serve", "--ckpt_path", "{r50}", "--timeout_s", "nan"],
        "--timeout_s nan: give a positive number",
    ),
    "models-no-match": (["models", "zzz*"], "no model matches"),
    "models-names-no-match": (["models", "--names", "zzz*"], "no model matches 'zzz*'"),
    "demo-unknown-key": (
        ["demo", "--epochs_zzz", "3"],
        "unknown config key 'epochs_zzz'",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(case: str, files, capsys) -> None:
    argv, fragment = CASES[case]
    rc = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err.strip()
    command = argv[0]
    assert rc == 2 and err.startswith(f"res2net {command}: error: "), err
    assert len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize(
    "flag, target, fragment",
    [
        ("--per_class_csv", "{t}", "--per_class_csv '{t}' is a directory: name a file to write"),
        ("--per_class_csv", "{r50}", "--per_class_csv '{r50}' is the checkpoint"),
        ("--results_csv", "{t}", "--results_csv '{t}' is a directory: name a file to write"),
        ("--results_csv", "{txt}", "--results_csv {txt}: has other columns"),
        ("--report_dir", "{txt}", "--report_dir '{txt}' is a file: name a folder"),
        ("--real_labels", "{deep}", "--real_labels {deep}: JSON nested too deeply"),
    ],
)
def test_validate_checks_its_outputs_before_validating(
    files, capsys, monkeypatch, flag, target, fragment
):
    """A wrong output or report input fails at once, not after the whole validation, and the
    files named are left as they were."""

    def evaluate(*args, **kwargs):
        raise AssertionError("validated before the outputs were checked")

    monkeypatch.setattr("res2net.engine.validate.evaluate", evaluate)
    before = {k: files[k].read_bytes() for k in ("r50", "txt")}
    argv = ["validate", *M, *FAST, "--data_dir", "{data}", "--ckpt_path", "{r50}", flag, target]
    assert main([a.format(**files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"res2net validate: error: {fragment.format(**files)}" in err, (
        err
    )
    assert before == {k: files[k].read_bytes() for k in ("r50", "txt")}


def test_validate_says_how_many_images_it_could_not_score(files, tmp_path, capsys, caplog):
    data = make_folder(tmp_path / "data", n_classes=2, per_class=2, splits=("val",))
    (data / "val" / "class0" / "broken.png").write_text("not an image")
    argv = ["validate", *M, *FAST, "--data_dir", str(data), "--ckpt_path", str(files["r50"])]
    assert main(argv) == 0
    assert (
        "1 of the 5 images failed to decode and were not scored; the results are over the other 4"
        in caplog.text
    )
    assert "(4 images)" in capsys.readouterr().out


def test_class_folder_names_are_quoted_in_messages(files, tmp_path, capsys):
    """A class folder named with terminal control characters cannot drive the terminal."""
    data = make_folder(tmp_path / "data", n_classes=2, per_class=1, splits=("val",))
    (data / "val" / "class1").rename(data / "val" / "evil\x1b[2J\x07")
    class_map = tmp_path / "classes.txt"
    class_map.write_text("class0\nclass1\n")
    argv = [
        "validate",
        *M,
        *FAST,
        "--data_dir",
        str(data),
        "--ckpt_path",
        str(files["r50"]),
        "--class_map",
        str(class_map),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        "no line for the data's class folder(s) 'evil\\x1b[2J\\x07'" in err and "\x1b" not in err
    ), err


def test_bad_flag_value_is_argparse_usage_and_exit_code_2(files, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(files["data"] / "val"), *M, "--topk", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].endswith("argument --topk: must be >= 1, got 0")


@pytest.mark.parametrize(
    "script, argv, fragment",
    [
        ("train.py", ["-c", "missing.yaml"], "config file not found"),
        ("validate.py", ["--ckpt_path", "missing.pt"], "does not exist"),
    ],
)
def test_seed_scripts_end_in_one_line(script, argv, fragment, tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and fragment in err, err


def test_a_genuine_bug_keeps_its_traceback_and_exit_code_1(tmp_path, monkeypatch) -> None:
    """Only the project's own error types are one line: a RuntimeError inside a command (a
    shape bug, CUDA out of memory) is a bug, shown with Python's traceback."""
    from res2net.cli import main as main_module

    def bug(args, extra):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(main_module.COMMANDS["models"], "run", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["models"])
    script = (
        "import sys\nfrom res2net.cli import main as m\n"
        "def bug(args, extra):\n"
        "    raise RuntimeError('mat1 and mat2 shapes cannot be multiplied')\n"
        "m.COMMANDS['models'].run = bug\nsys.exit(m.main(['models']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().endswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")


def test_user_errors_print_no_control_characters(tmp_path, capsys) -> None:
    evil = tmp_path / "run\x1b]0;owned\x07.yaml"
    evil.write_text("batch_size: 0\n")
    assert main(["train", "-c", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "run\\x1b]0;owned\\x07.yaml" in err, err
