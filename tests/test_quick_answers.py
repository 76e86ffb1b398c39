"""The command line answers at once: `--help` of every command, argument and file errors and
`res2net models` never import torch or torchvision (README, "Quick start"); the zoo table those
answers print is the one the real models give. benchmarks/cli_latency.py measures the CPU time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from res2net.cli.main import COMMANDS
from res2net.cli.models import ZOO_FILE, zoo_rows

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/demo/res2net_digits.yaml"
MISSING = "no-such-file.ckpt"

CASES = [
    ["--help"],
    *[[name, "--help"] for name in COMMANDS],
    ["saliency", "train", "--help"],
    ["saliency", "predict", "--help"],
    ["data", "shard", "--help"],
    ["data", "check", "--help"],
    ["predict"],  # a missing argument
    ["export", "--format", "nope", "--model", "res2net50", "x.onnx"],  # a bad choice
    ["train", "-c", "no-such-recipe.yaml"],
    ["train", "-c", RECIPE, "--no_such_key", "1"],
    ["validate", "-c", RECIPE, "--ckpt_path", MISSING],
    ["predict", "img.jpg", "--model", "res2net50", "--ckpt_path", MISSING],
    ["convert", MISSING, "out.safetensors"],
    ["export", "--format", "onnx", "--model", "res2net50", "--ckpt_path", MISSING, "x.onnx"],
    ["models"],
    ["models", "--names", "res2net50*"],
    ["models", "nothing*"],
]

PROBE = """
import contextlib, io, json, sys
from res2net.cli.main import main
heavy = ("torch", "torchvision", "numpy", "PIL")
results = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append([argv, rc, out.getvalue(), [m for m in heavy if m in sys.modules]])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> list:
    """Every case, in one fresh interpreter: what each printed, and what it had imported."""
    cwd = tmp_path_factory.mktemp("quick")
    (cwd / "configs").symlink_to(ROOT / "configs")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(CASES)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_quick_answers_do_not_import_torch(answers: list) -> None:
    for argv, _rc, out, imported in answers:
        assert not imported, f"`res2net {' '.join(argv)}` imported {imported}"
        assert "Traceback" not in out, out


def test_quick_answers_say_what_is_wrong(answers: list) -> None:
    by_argv = {" ".join(argv): (rc, out) for argv, rc, out, _ in answers}
    assert by_argv["--help"][0] == 0 and "train" in by_argv["--help"][1]
    assert by_argv["validate --help"][0] == 0
    assert by_argv["train -c no-such-recipe.yaml"] == (
        2,
        "res2net train: error: config file not found: no-such-recipe.yaml\n",
    )
    for argv in [a for a in by_argv if MISSING in a]:
        rc, out = by_argv[argv]
        assert rc == 2 and f"checkpoint '{MISSING}' does not exist" in out, (argv, out)
        assert len(out.strip().splitlines()) == 1, out
    assert by_argv["predict"][0] == 2 and "required" in by_argv["predict"][1]
    assert "no model matches" in by_argv["models nothing*"][1]
    table = by_argv["models"][1]
    assert table.startswith("| model |") and "| res2net50_26w_4s | res2net50 | 25.70 |" in table


def test_zoo_table_matches_the_models() -> None:
    """models/zoo.json is what the models give (rewrite it with
    `python -c "from res2net.cli.models import write_zoo_table; write_zoo_table()"`)."""
    stored = json.loads(ZOO_FILE.read_text(encoding="utf-8"))
    assert stored == zoo_rows(), "models/zoo.json is stale: rewrite it with write_zoo_table()"


def test_export_formats_named_without_torch() -> None:
    from res2net import export
    from res2net.cli import export as export_cmd

    assert export_cmd.FORMATS == export.FORMATS


def test_validate_help_names_the_keys_it_needs(answers: list) -> None:
    rc, out = next((rc, out) for argv, rc, out, _ in answers if argv == ["validate", "--help"])
    assert rc == 0 and "--ckpt_path\n" in out and "--data_dir\n" in out


def test_loading_a_model_does_not_import_timm() -> None:
    """timm (with its model zoo and wandb, about a second) is imported only when an
    auto_augment policy is built, not by every command that loads a model or reads images."""
    probe = (
        "import sys, res2net.data, res2net.inference, res2net.weights.loading; "
        "print(sorted(m for m in ('timm', 'wandb') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.strip() == "[]", proc.stdout
