"""Two CPU processes under torchrun (gloo) train and validate exactly like one process."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from res2net.cli.main import main as cli_main
from res2net.cli.train import config_from_argv
from res2net.engine.checkpoint import load_training_state
from res2net.engine.validate import validate

from .conftest import REGISTER_TINY, TINY_ARCH, _register_tiny
from .test_train import make_folder

# the processes train the tiny registered Res2Net: the distributed path is the point, not the
# zoo model
HOOK = (
    REGISTER_TINY
    + """
import os, signal, sys
from res2net.engine import progress
real = progress.StepReporter.update
def update(self, step, *args, **kwargs):
    real(self, step, *args, **kwargs)
    if os.environ.get("RANK") == "1" and step == 1 and os.environ.get("STOP_AT_STEP_1"):
        os.kill(os.getpid(), signal.SIGTERM)  # one rank is stopped: all must stop together
progress.StepReporter.update = update
from res2net.cli.main import main
sys.exit(main(sys.argv[1:]))
"""
)


def common_args(data_dir: Path, ckpt_dir: Path, batch_size: int) -> list[str]:
    return [
        "train",
        "--model",
        TINY_ARCH,
        "--data_dir",
        str(data_dir),
        "--ckpt_save_dir",
        str(ckpt_dir),
        "--image_resize",
        "16",
        "--crop_pct",
        "1.0",
        "--batch_size",
        str(batch_size),
        "--epoch_size",
        "2",
        "--num_parallel_workers",
        "0",
        "--mode",
        "1",
        "--opt",
        "momentum",
        "--lr",
        "0.01",
        "--warmup_epochs",
        "0",
        "--decay_epochs",
        "2",
        "--weight_decay",
        "1e-4",
        "--freeze_bn",
        "True",
        "--val_while_train",
        "True",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--dist_timeout",
        "120",
    ]


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the ones torchrun's agent handles


def torchrun(hook: Path, args: list[str], logs: Path, env: dict | None = None) -> None:
    """`torchrun --standalone --nproc_per_node 2 HOOK ARGS --distribute True`, its launcher
    (torch's own elastic agent) in this process, which has imported torch already: the two
    ranks are new processes, as any torchrun starts them. Their output goes to `logs`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    handlers = {name: signal.getsignal(getattr(signal, name)) for name in STOP_SIGNALS}
    argv = ["--standalone", "--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "3"]
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # else it sets it
            for key, value in (env or {}).items():
                mp.setenv(key, value)
            torchrun_main([*argv, str(hook), *args, "--distribute", "True"])
    except ChildFailedError as e:
        raise AssertionError(f"{e}\n{rank_output(logs)[-6000:]}") from None
    finally:  # the agent's handlers (set in the main thread only) would outlive the launch
        if threading.current_thread() is threading.main_thread():
            for name, handler in handlers.items():
                signal.signal(getattr(signal, name), handler)
    assert "Grad strides do not match" not in rank_output(logs)  # CPU weights in the grads' layout


def rank_output(logs: Path) -> str:
    """What the ranks of the launches logging to `logs` wrote (stdout and stderr)."""
    return "".join(p.read_text(errors="replace") for p in sorted(logs.rglob("*.log")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 18 training images; 15 validation images: not divisible by the world size
    data = make_folder(root / "data", n_classes=3, per_class=6, splits=("train",))
    make_folder(root / "val_tmp", n_classes=3, per_class=5, splits=("val",))
    (root / "val_tmp" / "val").rename(data / "val")
    hook = root / "hook.py"
    hook.write_text(HOOK)
    # frozen BN does not normalise a fresh net; residual branches starting at zero keep it finite
    warm = ["--zero_init_last", "True"]
    # the one-process reference runs in this process (a subprocess costs seconds of imports)
    with pytest.MonkeyPatch.context() as mp:
        _register_tiny(mp)
        assert cli_main([*common_args(data, root / "single", 8), *warm]) == 0
    torchrun(hook, [*common_args(data, root / "ddp", 4), *warm], root / "logs-ddp")
    stop = {"STOP_AT_STEP_1": "1"}
    torchrun(hook, [*common_args(data, root / "stopped", 4), *warm], root / "logs-stop", stop)
    stopped = load_training_state(root / "stopped" / "last.pt")
    resume = [*common_args(data, root / "stopped", 4), *warm, "--resume", "auto"]
    torchrun(hook, resume, root / "logs-resume")
    return root, data, stopped


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_training_state(path)["model"]


def test_two_processes_equal_one_with_the_global_batch(runs):
    root, _, _ = runs
    single, ddp = weights(root / "single" / "last.pt"), weights(root / "ddp" / "last.pt")
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6, msg=k)
    assert load_training_state(root / "ddp" / "last.pt")["global_step"] == 4  # 2 epochs x 2 steps


def test_distributed_eval_counts_every_image_once(runs, tiny_arch):
    root, data, _ = runs
    records = [json.loads(x) for x in (root / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "epoch"][-1]
    cfg = config_from_argv(
        None,
        [
            "--model",
            TINY_ARCH,
            "--data_dir",
            str(data),
            "--image_resize",
            "16",
            "--crop_pct",
            "1.0",
            "--batch_size",
            "4",
            "--num_parallel_workers",
            "0",
            "--device",
            "cpu",
        ],
    )
    alone = validate(cfg, root / "ddp" / "last.pt")
    assert final["val_n"] == alone.n == 15
    assert final["val_top1"] == alone.top1 and final["val_top5"] == alone.top5
    assert final["val_loss"] == pytest.approx(alone.loss, rel=1e-5)


def test_job_stopped_mid_epoch_resumes_to_the_same_weights(runs):
    root, _, stopped = runs
    assert (stopped["epoch"], stopped["batch_in_epoch"]) == (
        0,
        1,
    )  # every rank stopped after step 1
    resumed, ddp = weights(root / "stopped" / "last.pt"), weights(root / "ddp" / "last.pt")
    for k in ddp:
        assert torch.equal(resumed[k], ddp[k]), k


def test_distribute_without_torchrun_runs_one_process(tmp_path, caplog, capsys):
    """The seed's recipes say `distribute: True`; run as written, they run one process."""
    from res2net.engine import distributed

    info = distributed.setup(True, "cpu")
    assert (info.rank, info.world_size, info.enabled) == (0, 1, False)
    with caplog.at_level(logging.INFO):
        rc = cli_main(["train", "--data_dir", str(tmp_path), "--distribute", "True"])
    assert rc == 2  # the empty data folder, not the missing torchrun
    assert str(tmp_path) in capsys.readouterr().err
    assert "running one process" in caplog.text and "torchrun --nproc_per_node" in caplog.text
