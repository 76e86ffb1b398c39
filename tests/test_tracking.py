"""`res2net train --log mlflow|wandb`: the tracked run read back with each library's own client
(MLflow's `MlflowClient`; for an offline W&B run, its transaction log parsed with wandb's own
protobuf records). Nothing leaves the machine."""

import json
import struct
from pathlib import Path

import pytest

from res2net.engine.tracking import Trackers
from res2net.engine.train import train
from res2net.errors import ConfigError

from .conftest import TINY_ARCH
from .test_train import make_folder, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread", "tiny_arch")  # tiny_config's model


@pytest.fixture()
def wandb_offline(monkeypatch):
    """W&B offline and quiet; its service process (`wandb-core`, started by `wandb.init`) ended
    when the test ends: otherwise it outlives the test and, under pytest-xdist, pytest itself."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    wandb.teardown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("data"), per_class=2)


def mlflow_run(uri: str, run_dir: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    return client, client.get_run(run_id)


def check_mlflow(client, run, records):
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == TINY_ARCH and run.data.params["lr"] == "0.01"
    steps = [r for r in records if r["kind"] == "step"]
    history = client.get_metric_history(run.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in history] == [
        (r["global_step"], pytest.approx(r["loss"])) for r in steps
    ]
    epochs = [r for r in records if r["kind"] == "epoch"]
    top1 = client.get_metric_history(run.info.run_id, "epoch/val_top1")
    assert [m.value for m in top1] == pytest.approx([r["val_top1"] for r in epochs])
    folders = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert folders == {"plots", "checkpoints"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "checkpoints/best.pt"
    ]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == [
        "plots/training.png"
    ]


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-ID.wandb`): a 7-byte header, then LevelDB
    log blocks of 32 KiB whose chunks (crc32c, length, type) carry wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
        elif kind == 0:
            break
    return out


def test_mlflow_and_wandb_offline(data_dir, tmp_path, monkeypatch, wandb_offline):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file store: fast to create in a test
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    result = train(tiny_config(data_dir, run_dir, "--log", "mlflow,wandb", "--log_uri", uri))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check_mlflow(*mlflow_run(uri, run_dir), records)

    ids = json.loads((run_dir / "tracking.json").read_text())
    (log_file,) = run_dir.glob(f"wandb/offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb")
    history, config = {}, {}
    for record in wandb_records(log_file):
        if record.WhichOneof("record_type") == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert config["model"] == TINY_ARCH and config["lr"] == 0.01
    for r in records:
        if r["kind"] == "step":
            assert history[r["global_step"]]["step/loss"] == pytest.approx(r["loss"])
    assert history[records[-1]["global_step"]]["epoch/val_top1"] == pytest.approx(
        records[-1]["val_top1"]
    )
    assert result.best_path is not None


def test_a_crashed_run_is_marked_failed(data_dir, tmp_path, monkeypatch):
    import res2net.engine.train as train_module

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(train_module, "train_one_epoch", crash)
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_config(data_dir, run_dir, "--log", "mlflow", "--log_uri", uri))
    assert mlflow_run(uri, run_dir)[1].info.status == "FAILED"


def test_a_stopped_run_is_marked_killed(data_dir, tmp_path, monkeypatch):
    import res2net.engine.train as train_module

    def second_signal(*args, **kwargs):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(train_module, "train_one_epoch", second_signal)
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data_dir, run_dir, "--log", "mlflow", "--log_uri", uri))
    assert mlflow_run(uri, run_dir)[1].info.status == "KILLED"


def test_a_crash_before_the_first_step_is_marked_failed(data_dir, tmp_path, monkeypatch):
    import res2net.engine.train as train_module

    def crash(self, step):
        raise OSError("disk full")

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(train_module.MetricsLog, "rewind", crash)
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(data_dir, run_dir, "--log", "mlflow", "--log_uri", uri))
    assert mlflow_run(uri, run_dir)[1].info.status == "FAILED"


def test_wandb_refusal_is_one_line_and_fails_the_started_mlflow_run(
    tmp_path, monkeypatch, wandb_offline
):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    with pytest.raises(ConfigError) as e:
        Trackers(tmp_path, ["mlflow", "wandb"], uri=uri, project="team/\x1bproject")
    message = str(e.value)
    assert message.startswith("--log wandb: cannot start a run in project ") and "\n" not in message
    assert "UsageError" in message and "\x1b" not in message and e.value.key == "log_project"
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.get_experiment_by_name("team/\x1bproject").experiment_id)
    assert run.info.status == "FAILED"


def test_bad_tracker_and_unreachable_uri_fail_before_training(data_dir, tmp_path):
    with pytest.raises(ValueError, match="config key .log. must be mlflow, wandb"):
        tiny_config(data_dir, tmp_path / "r", "--log", "comet")
    with pytest.raises(ConfigError, match="cannot use tracking URI.*unreachable"):
        Trackers(
            tmp_path, ["mlflow"], uri="http://127.0.0.1:9/"
        )  # what train() opens before its first step


@pytest.mark.slow
def test_mlflow_default_store_is_mlruns(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    train(tiny_config(data_dir, run_dir, "--log", "mlflow"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check_mlflow(*mlflow_run(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", run_dir), records)
    assert (tmp_path / "mlruns" / "artifacts").is_dir()
