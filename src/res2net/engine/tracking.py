"""Experiment tracking for `res2net train --log mlflow|wandb` (both: `--log mlflow,wandb`).

Each tracker receives what `metrics.jsonl` receives (the run's parameters first, then every
step and epoch record, named `step/loss`, `epoch/val_top1`... as in TensorBoard) and, at the
end, the training plot and the best checkpoint as artifacts.

* MLflow: `--log_uri` is any tracking URI; by default a SQLite store in `./mlruns/mlflow.db`
  with artifacts in `./mlruns/artifacts` (MLflow's plain-file store is deprecated). The
  experiment is `--log_project` (default "res2net").
* Weights & Biases: project `--log_project`, files under the run's `ckpt_save_dir`; offline
  when `WANDB_MODE=offline` (then `wandb sync` uploads later).

A resumed run (`--resume`) continues the same tracked run: its id is kept in
`ckpt_save_dir/tracking.json`. A tracker that fails while training logs one warning and stops
tracking; training goes on.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .. import fileio
from ..errors import ConfigError, FileRefused
from ..fileio import atomic_write
from ..guards import printable, short

log = logging.getLogger("res2net.train")

BACKENDS = ("mlflow", "wandb")
_SKIP = ("kind", "global_step", "epoch", "step")


def parse_backends(spec: str) -> list[str]:
    """'mlflow,wandb' -> ['mlflow', 'wandb']; '' or 'none' -> []."""
    names = [
        s.strip().lower()
        for s in (spec or "").split(",")
        if s.strip() and s.strip().lower() != "none"
    ]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(
            f"log: unknown tracker {short(unknown[0])}; "
            f"use {', '.join(BACKENDS)} or both, comma-separated"
        )
    return list(dict.fromkeys(names))


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("kind", "train")
    return {
        f"{kind}/{k}": float(v)
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _probe(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when a tracking server is down."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        return  # the server answers: MLflow itself judges the rest
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(
            f"--log mlflow: cannot use tracking URI {short(uri)} (unreachable: {reason})",
            key="log_uri",
        ) from None


MLRUNS = "mlruns"  # the default store's folder, in the folder the run starts in (MLflow's too)
MAX_STATE_BYTES = 1 << 20


def check_stores(backends: list[str], *, uri: str, directory: Path) -> None:
    """Before any work: refuse (ConfigError, one line naming the path) a local tracking folder
    that a planted link would carry outside. MLflow's default store (`uri` '') and a SQLite
    store write `./mlruns` in the folder the run starts in (MLflow's own artifact folder for a
    SQLite store); MLflow and SQLite open those names without checking for links (SQLite even
    creates a missing link target). W&B writes `<ckpt_save_dir>/wandb`. So `./mlruns`,
    `./mlruns/artifacts` and `wandb` must be plain folders or nothing, and the SQLite file
    nothing or a plain file with one name. A server URI, or a file store folder the user named,
    is the user's choice."""
    try:
        if "wandb" in backends:
            fileio.check_below(directory, "wandb", folder=True)
        if "mlflow" in backends and (not uri or uri.startswith("sqlite:///")):
            fileio.check_below(Path.cwd(), Path(MLRUNS, "artifacts"), folder=True)
            fileio.check_in_place(Path.cwd() / (_sqlite_path(uri) or f"{MLRUNS}/mlflow.db"))
    except FileRefused as e:
        raise ConfigError(
            f"--log: {e} (or store the runs elsewhere: --log_uri, --ckpt_save_dir)", key="log"
        ) from None


def _sqlite_path(uri: str) -> str | None:
    return unquote(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _store(uri: str) -> tuple[str, Path | None, Path | None]:
    """The tracking URI, the artifact folder to give a new experiment, and the local folder
    below which MLflow writes artifacts (checked before each copy; None for a server). For ''
    the default store: `./mlruns/mlflow.db`, artifacts in `./mlruns/artifacts` (folders made
    through `fileio`: never a link)."""
    check_stores(["mlflow"], uri=uri, directory=Path.cwd())
    if not uri:
        root = fileio.make_subdirectory(Path.cwd(), MLRUNS)
        artifacts = fileio.make_subdirectory(root, "artifacts")
        return f"sqlite:///{root / 'mlflow.db'}", artifacts, artifacts
    if _sqlite_path(uri) is not None:
        return uri, None, Path.cwd() / MLRUNS  # MLflow's default artifact folder
    parsed = urlparse(uri)
    local = Path(unquote(parsed.path)).absolute() if parsed.scheme in ("file", "") else None
    return uri, None, local  # a file store writes its artifacts below its folder


class MlflowTracker:
    """One MLflow run, through `mlflow.MlflowClient`."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "--log mlflow needs MLflow: pip install 'res2net[tracking]'"
            ) from None

        uri, artifacts, self.local_root = _store(uri)
        self.uri = uri
        _probe(uri)
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            exp_id = (
                found.experiment_id
                if found
                else self.client.create_experiment(
                    experiment,
                    artifact_location=artifacts.as_uri() if artifacts else None,
                )
            )
            if run_id is None:
                run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as e:  # MLflow's errors and its stores' (SQLAlchemy, HTTP)
            raise ConfigError(
                f"--log mlflow: cannot use tracking URI {short(uri)} ({_first_line(e)})",
                key="log_uri",
            ) from None
        self.run_id = run_id

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(k, json.dumps(v) if not isinstance(v, str) else v)
            for k, v in params.items()
            if v is not None
        ]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(record.get("global_step", 0))
        metrics = [Metric(k, v, now, step) for k, v in _metrics(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def artifact(self, path: Path, folder: str) -> None:
        """Copy `path` into the run's artifacts; into a local folder only after checking that
        no folder or file MLflow will write below it is a link (it copies by name)."""
        if self.local_root is not None:
            where = urlparse(self.client.get_run(self.run_id).info.artifact_uri)
            target = Path(unquote(where.path)) / folder / path.name
            if where.scheme in ("file", "") and target.is_relative_to(self.local_root):
                fileio.check_below(self.local_root, target.relative_to(self.local_root))
                fileio.check_in_place(target)
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status.upper())  # FINISHED/KILLED/FAILED


class WandbTracker:
    """One Weights & Biases run (`wandb.init`), online or offline as `WANDB_MODE` says."""

    def __init__(self, directory: Path, project: str, run_name: str, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "--log wandb needs Weights & Biases: pip install 'res2net[tracking]'"
            ) from None
        self.wandb = wandb
        check_stores(["wandb"], uri="", directory=directory)
        try:
            self.run = wandb.init(
                project=project,
                name=run_name or None,
                dir=str(directory),
                id=run_id,
                resume="allow" if run_id else None,
                reinit="create_new",
            )
        except Exception as e:  # UsageError (no API key, a bad project name), network errors
            raise ConfigError(
                f"--log wandb: cannot start a run in project {short(project)} ({_first_line(e)})",
                key="log_project",
            ) from None
        self.run_id = self.run.id

    def params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log(self, record: dict[str, Any]) -> None:
        metrics = _metrics(record)
        if metrics:
            self.run.log(metrics, step=int(record.get("global_step", 0)))

    def artifact(self, path: Path, folder: str) -> None:
        if path.suffix == ".png":
            self.run.log({f"{folder}/{path.stem}": self.wandb.Image(str(path))})
            return
        art = self.wandb.Artifact(f"{self.run.id}-{folder}", type="model")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


class Trackers:
    """The trackers of one run; failures after start-up turn a tracker off with one warning."""

    def __init__(
        self,
        directory: Path,
        backends: list[str],
        *,
        uri: str = "",
        project: str = "res2net",
        run_name: str = "",
    ) -> None:
        self.state_path = directory / "tracking.json"
        ids = self._ids()
        self.active: dict[str, Any] = {}
        try:
            for name in backends:
                if name == "mlflow":
                    self.active[name] = MlflowTracker(uri, project, run_name, ids.get("mlflow"))
                else:
                    self.active[name] = WandbTracker(directory, project, run_name, ids.get("wandb"))
        except BaseException:  # the trackers already started must not stay marked running
            self.fail()
            raise
        if self.active:
            new = {name: t.run_id for name, t in self.active.items()}
            atomic_write(
                self.state_path, lambda f: f.write(json.dumps({**ids, **new}, indent=1).encode())
            )

    def _ids(self) -> dict[str, str]:
        try:  # never through a link, never blocked by a named pipe
            ids = json.loads(fileio.read_existing(self.state_path, MAX_STATE_BYTES) or b"{}")
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}

    def _each(self, what: str, *args: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, what)(*args)
            except Exception as e:  # tracking is never worth losing a run for
                log.warning("%s tracking stopped (%s); training goes on", name, _first_line(e))
                del self.active[name]

    def params(self, params: dict[str, Any]) -> None:
        self._each("params", params)

    def log(self, record: dict[str, Any]) -> None:
        self._each("log", record)

    def finish(self, *, plot: Path | None, best: Path | None, interrupted: bool) -> None:
        if plot is not None and plot.is_file():
            self._each("artifact", plot, "plots")
        if best is not None and best.is_file() and not interrupted:
            self._each("artifact", best, "checkpoints")
        self._each("close", "killed" if interrupted else "finished")

    def fail(self, *, stopped: bool = False) -> None:
        """Close every run as failed (training raised) or killed (`stopped` by a signal or
        Ctrl-C), so that none stays marked running."""
        self._each("close", "killed" if stopped else "failed")


def _first_line(e: BaseException) -> str:
    """`e` as one printable line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return printable(f"{type(e).__name__}: {lines[0] if lines else ''}".strip(": "))
