"""A bare `pip install res2net` (no extras): every command runs or answers in one line naming
the extra to install.

The optional packages are hidden in a fresh interpreter (`sys.modules[name] = None`, Python's
own import block: `import name` raises ModuleNotFoundError and `find_spec` says it is absent)
rather than by building a venv without them: a venv would need the index (a download of
torch) on every CI run, while the block gives the same ModuleNotFoundError in seconds. It hides
every package of the extras and of `dev`, so a command that imports one by accident fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .conftest import REGISTER_TINY, TINY_ARCH

HIDDEN = [
    "sklearn",
    "webdataset",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "skimage",
    "hypothesis",
    "tensorboard",
    "starlette",
    "uvicorn",
]

DRIVER = r"""
import contextlib, io, json, logging, sys

for name in sys.argv[1].split(","):
    sys.modules[name] = None  # Python's own way to block an import: ModuleNotFoundError
exec(sys.argv[3])  # the tiny registered model, where the network is not the point
from res2net.cli.main import main

results = []
for argv in json.loads(sys.argv[2]):
    out = io.StringIO()
    logging.getLogger().handlers.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "output": out.getvalue()})
print(json.dumps(results))
"""


def run_without_extras(commands: list[list[str]], cwd: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, ",".join(HIDDEN), json.dumps(commands), REGISTER_TINY],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_command_runs_or_names_its_extra(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "data" / split / c / "1.png")
    image = tmp_path / "data" / "val" / "a" / "1.png"
    results = run_without_extras(
        [
            ["models"],
            ["predict", str(image), "--model", TINY_ARCH, "--image_resize", "64"],
            [
                "cam",
                str(image),
                "--model",
                TINY_ARCH,
                "--image_resize",
                "64",
                "--out",
                str(tmp_path / "cam"),
            ],
            ["data", "check", str(tmp_path / "data"), "--workers", "1"],
            ["export", "--format", "onnx", "--model", "res2net50", str(tmp_path / "m.onnx")],
            ["demo", "--data_dir", str(tmp_path / "digits")],
            ["data", "shard", str(tmp_path / "data"), str(tmp_path / "wds")],
            ["serve", "--model", "res2net50", "--port", "0"],
        ],
        tmp_path,
    )
    by_command = {" ".join(r["argv"][:2]): r for r in results}
    for ok in ("models", "data check"):
        assert by_command[ok]["rc"] == 0, by_command[ok]["output"]
    for ok in ("predict " + str(image), "cam " + str(image)):
        r = by_command[ok]
        assert r["rc"] == 0 and "random weights" in r["output"], r["output"]
    assert (tmp_path / "cam" / "1_cam.png").is_file()  # matplotlib is a core dependency
    for command, extra in (
        ("export --format", "export"),
        ("demo --data_dir", "demo"),
        ("data shard", "shards"),
        ("serve --model", "serve"),
    ):
        r = by_command[command]
        lines = r["output"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1, r["output"]
        assert f"pip install 'res2net[{extra}]'" in lines[0] and "Traceback" not in r["output"]
    assert not (tmp_path / "digits").exists()
