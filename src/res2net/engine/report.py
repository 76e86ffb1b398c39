"""Evaluation reports for `validate`: confusion matrix and most-confused pairs, per-class
precision/recall, test-time augmentation, relabelled evaluation and timm-style results rows.

* `--tta flip | five_crop | ten_crop`: class probabilities averaged over the views (the image
  and its mirror; the four corner crops and the center crop of the resized image, as
  torchvision's `FiveCrop`; both). The averaged probabilities' logarithm stands for the logits,
  so the loss stays the cross-entropy of what is reported.
* `--class_map FILE`: the model's classes, one name per line (line i names output i); each class
  folder of the data is scored against the output of its name, and predictions are restricted to
  the classes the data has (how ImageNet-A/-R subsets are evaluated with a 1000-class model).
* `--real_labels FILE`: ImageNet ReaL-style multi-label ground truth (Beyer et al., 2020): a JSON
  list in ImageNet val order (entry i is `ILSVRC2012_val_{i+1:08d}.JPEG`, as in timm's `real.json`)
  or an object mapping file names to label lists; a prediction counts when it is any of the
  image's labels; images with no label are left out.
* `--results_csv FILE`: one row appended in timm's results-file columns.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .. import fileio
from ..errors import DataError, MissingFile
from ..guards import check_output_file, short
from .evaluate import EvalResult

log = logging.getLogger("res2net.validate")

# what `write_report` writes into --report_dir
REPORT_FILES = ("per_class.csv", "confused_pairs.csv", "confusion.png", "summary.json")

TTA_MODES = ("flip", "five_crop", "ten_crop")
MAX_LABEL_FILE_BYTES = 256 << 20  # ImageNet's real.json is 2 MB
MAX_RESULTS_BYTES = 64 << 20  # --results_csv: a row is about 150 bytes
RESULTS_COLUMNS = [
    "model",
    "top1",
    "top1_err",
    "top5",
    "top5_err",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
    "tta",
    "real_top1",
    "real_top5",
    "images",
]


@dataclass
class ReportOptions:
    """What `validate` reports beyond top-1/top-5 (every field optional)."""

    report_dir: str | Path | None = None
    tta: str | None = None
    class_map: str | Path | None = None
    real_labels: str | Path | None = None
    results_csv: str | Path | None = None

    def __post_init__(self) -> None:
        if self.tta is not None and self.tta not in TTA_MODES:
            raise DataError(f"--tta {self.tta!r}: choose one of {', '.join(TTA_MODES)}")


class TTAModel(nn.Module):
    """`model` applied to several views of each image; returns the log of the mean probability.

    For the crop modes the input is the resized image (side `crop_size / crop_pct`), from which
    the views of side `crop_size` are cut."""

    def __init__(self, model: nn.Module, mode: str, crop_size: int) -> None:
        super().__init__()
        self.model, self.mode, self.crop_size = model, mode, crop_size

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "flip":
            return [x, x.flip(-1)]
        if self.mode == "five_crop":
            return list(TF.five_crop(x, [self.crop_size, self.crop_size]))
        return list(TF.ten_crop(x, [self.crop_size, self.crop_size]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([self.model(v).float().log_softmax(dim=1) for v in self.views(x)])
        return logp.logsumexp(dim=0) - math.log(len(logp))  # log of the mean probability, exactly


class ClassMapHead(nn.Module):
    """Keeps the model's outputs `indices`, in that order: output d scores data class d."""

    def __init__(self, model: nn.Module, indices: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer(
            "indices", torch.as_tensor(list(indices), dtype=torch.long), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)


def transform_settings(settings: dict[str, Any], tta: str | None) -> dict[str, Any]:
    """The eval transform for `tta`: for the crop modes, the resized image whole (no center
    crop), so that `TTAModel` cuts its crops from it."""
    if tta not in ("five_crop", "ten_crop"):
        return settings
    resized = int(settings["image_resize"] / settings["crop_pct"])
    return {**settings, "image_resize": resized, "crop_pct": 1.0}


def _read_limited(path: Path, what: str) -> str:
    if not path.is_file():
        raise MissingFile(f"{what} {str(path)!r} does not exist")
    if path.stat().st_size > MAX_LABEL_FILE_BYTES:
        raise DataError(f"{what} {path}: larger than {MAX_LABEL_FILE_BYTES >> 20} MiB")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{what} {path}: not UTF-8 text") from None


def class_map_indices(path: str | Path, data_classes: Sequence[str], num_outputs: int) -> list[int]:
    """For each data class, the model output its name is on in the class map file."""
    names = [
        line.strip()
        for line in _read_limited(Path(path), "--class_map").splitlines()
        if line.strip()
    ]
    if len(names) != num_outputs:
        raise DataError(
            f"--class_map {path}: names {len(names)} classes "
            f"but the model has {num_outputs} outputs"
        )
    index = {name: i for i, name in enumerate(names)}
    missing = [c for c in data_classes if c not in index]
    if missing:  # folder names quoted: they may hold control characters
        raise DataError(
            f"--class_map {path}: no line for the data's class folder(s) "
            + ", ".join(short(c) for c in missing[:5])
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    return [index[c] for c in data_classes]


def read_real_labels(
    path: str | Path, files: Sequence[str], num_outputs: int
) -> list[list[int] | None]:
    """Each file's set of correct labels (None when the file has no entry)."""
    try:
        data = json.loads(_read_limited(Path(path), "--real_labels"))
    except json.JSONDecodeError as e:
        raise DataError(f"--real_labels {path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"--real_labels {path}: JSON nested too deeply") from None
    if isinstance(data, list):
        data = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": labels for i, labels in enumerate(data)}
    if not isinstance(data, dict):
        raise DataError(
            f"--real_labels {path}: expected a JSON list (ImageNet val order) or an object"
        )
    out: list[list[int] | None] = []
    for f in files:
        labels = data.get(Path(f).name)
        if labels is not None and not (
            isinstance(labels, list)
            and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < num_outputs
                for v in labels
            )
        ):
            raise DataError(
                f"--real_labels {path}: the entry of {Path(f).name} must be a list of class "
                f"indices in 0..{num_outputs - 1}"
            )
        out.append(labels)
    if all(labels is None for labels in out):
        raise DataError(
            f"--real_labels {path}: none of the {len(files)} images has an entry (names differ?)"
        )
    return out


def confusion_matrix(labels: torch.Tensor, pred1: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(true, predicted) counts."""
    flat = torch.bincount(labels * num_classes + pred1, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


PER_CLASS_COLUMNS = ["class", "images", "correct", "precision", "recall", "f1"]


def per_class_rows(confusion: torch.Tensor, classes: Sequence[str]) -> list[list[Any]]:
    """`PER_CLASS_COLUMNS` rows of a confusion matrix (see `per_class_count_rows`)."""
    return per_class_count_rows(
        confusion.sum(1).tolist(), confusion.diag().tolist(), confusion.sum(0).tolist(), classes
    )


def per_class_count_rows(
    support: Sequence[int], tp: Sequence[int], predicted: Sequence[int], classes: Sequence[str]
) -> list[list[Any]]:
    """class, images, correct, precision, recall, f1 (percent; empty where undefined) from the
    images of each class, those predicted right, and the images predicted as it. The report's
    `per_class.csv` and `validate --per_class_csv` both write these rows."""
    rows = []
    for name, t, s, p in zip(classes, tp, support, predicted):
        precision = 100.0 * t / p if p else None
        recall = 100.0 * t / s if s else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
        rows.append(
            [name, s, t] + ["" if v is None else f"{v:.2f}" for v in (precision, recall, f1)]
        )
    return rows


def most_confused(
    confusion: torch.Tensor, classes: Sequence[str], k: int = 10
) -> list[dict[str, Any]]:
    """The `k` largest off-diagonal counts: true class, predicted class, count, and the count's
    share of the true class's images (percent)."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    support = confusion.sum(1)
    pairs = []
    for c, f in zip(counts.tolist(), flat.tolist()):
        if c == 0:
            break
        t, p = divmod(f, confusion.shape[0])
        pairs.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": c,
                "share": round(100.0 * c / int(support[t]), 2),
            }
        )
    return pairs


def confusion_png(confusion: torch.Tensor, classes: Sequence[str]) -> bytes:
    """The row-normalised confusion matrix as a PNG (class names shown up to 40 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    n = len(classes)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)
    side = min(14.0, 4.0 + 0.25 * n)
    fig = Figure(figsize=(side, side * 0.85), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_title(f"confusion matrix: {int(confusion.sum())} images, {n} classes (row-normalised)")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 15:
            for t in range(n):
                for p in range(n):
                    if confusion[t, p]:
                        ax.text(
                            p,
                            t,
                            str(int(confusion[t, p])),
                            ha="center",
                            va="center",
                            color="white" if rows[t, p] > 0.5 else "black",
                            fontsize=8,
                        )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _csv_bytes(header: list[str], rows: list[list[Any]]) -> bytes:
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(header)
    w.writerows(rows)
    return text.getvalue().encode()


def real_accuracy(
    topk: torch.Tensor, valid: torch.Tensor, real: list[list[int] | None]
) -> dict[str, float]:
    """ReaL top-1/top-5 over the valid images that have labels."""
    n = hit1 = hit5 = 0
    for preds, ok, labels in zip(topk.tolist(), valid.tolist(), real):
        if not ok or not labels:
            continue
        n += 1
        hit1 += preds[0] in labels
        hit5 += any(p in labels for p in preds)
    return {
        "real_top1": 100.0 * hit1 / max(1, n),
        "real_top5": 100.0 * hit5 / max(1, n),
        "real_images": n,
    }


def check_targets(options: ReportOptions) -> None:
    """Before any validation, so that a bad target does not waste it: `--report_dir` is a
    folder (created now), `--results_csv` a file, new or holding the results columns."""
    if options.report_dir:
        directory = Path(options.report_dir)
        if directory.exists() and not directory.is_dir():
            raise DataError(f"--report_dir {str(directory)!r} is a file: name a folder")
        fileio.make_directory(directory)
        for name in REPORT_FILES:  # refused before the validation, not after it
            fileio.check_target(directory / name)
    if options.results_csv:
        path = fileio.check_target(check_output_file(options.results_csv, "--results_csv"))
        _check_results_columns(path)


def finish(
    options: ReportOptions,
    result: EvalResult,
    predictions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    classes: Sequence[str],
    real: list[list[int] | None] | None,
    real_outputs: Sequence[int] | None,
    model_name: str,
    param_count: int,
    settings: dict[str, Any],
) -> EvalResult:
    """Write the report files and the results row; ReaL accuracy goes into `result.extra`.

    `real`: each image's ReaL labels (`read_real_labels`, read before the validation);
    `real_outputs`: for each scored class, the model output it stands for (the class map), so
    that ReaL labels, which name model outputs, are compared with the right predictions."""
    if not predictions:
        raise DataError("no image was evaluated: nothing to report")
    topk = torch.cat([p[0] for p in predictions])
    labels = torch.cat([p[1] for p in predictions])
    valid = torch.cat([p[2] for p in predictions])
    if real is not None:
        mapped = (
            topk if real_outputs is None else torch.as_tensor(list(real_outputs))[topk.clamp_min(0)]
        )
        result.extra.update(real_accuracy(mapped, valid, real))
    if options.report_dir:
        write_report(Path(options.report_dir), labels[valid], topk[valid][:, 0], classes, result)
    if options.results_csv:
        append_results_row(
            Path(options.results_csv),
            _results_row(result, model_name, param_count, settings, options.tta),
        )
    return result


def write_report(
    directory: Path,
    labels: torch.Tensor,
    pred1: torch.Tensor,
    classes: Sequence[str],
    result: EvalResult,
) -> None:
    """per_class.csv, confused_pairs.csv, confusion.png and summary.json in `directory`."""
    fileio.make_directory(directory)
    confusion = confusion_matrix(labels, pred1, len(classes))
    per_class = per_class_rows(confusion, classes)
    pairs = most_confused(confusion, classes)
    fileio.atomic_write(
        directory / "per_class.csv",
        lambda f: f.write(_csv_bytes(PER_CLASS_COLUMNS, per_class)),
    )
    fileio.atomic_write(
        directory / "confused_pairs.csv",
        lambda f: f.write(
            _csv_bytes(["true", "predicted", "count", "share"], [list(p.values()) for p in pairs])
        ),
    )
    png = confusion_png(confusion, classes)
    fileio.atomic_write(directory / "confusion.png", lambda f: f.write(png))
    summary = {**result.as_dict(), "most_confused": pairs}
    fileio.atomic_write(
        directory / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode())
    )
    log.info(
        "report written to %s (confusion.png, per_class.csv, confused_pairs.csv, summary.json)",
        directory,
    )


def _results_row(
    result: EvalResult, model_name: str, param_count: int, settings: dict[str, Any], tta: str | None
) -> list[Any]:
    real1, real5 = result.extra.get("real_top1"), result.extra.get("real_top5")
    size = settings["image_resize"]
    return [
        model_name,
        f"{result.top1:.3f}",
        f"{100 - result.top1:.3f}",
        f"{result.top5:.3f}",
        f"{100 - result.top5:.3f}",
        f"{param_count / 1e6:.2f}",
        size,
        settings["crop_pct"],
        settings["interpolation"],
        tta or "",
        "" if real1 is None else f"{real1:.3f}",
        "" if real5 is None else f"{real5:.3f}",
        result.n,
    ]


def _check_results_columns(path: Path) -> bytes:
    """The results CSV's bytes (empty when new); ValueError when it has other columns."""
    old = fileio.read_existing(path, MAX_RESULTS_BYTES) or b""  # never through a link or pipe
    if old and not old.startswith(",".join(RESULTS_COLUMNS).encode()):
        raise DataError(
            f"--results_csv {path}: has other columns than {','.join(RESULTS_COLUMNS)}; "
            "give a new file"
        )
    return old


def append_results_row(path: Path, row: list[Any]) -> None:
    """Append `row` to the results CSV (written with its header when new or empty)."""
    old = _check_results_columns(path)
    new = old if old else _csv_bytes(RESULTS_COLUMNS, [])
    fileio.atomic_write(
        path, lambda f: f.write(new + _csv_bytes(RESULTS_COLUMNS, [row]).split(b"\n", 1)[1])
    )
