"""Typed weights: the published-weights entry (`Weights`) and the evaluation transform that
travels with weights (`EvalTransform`), as torchvision's `Weights` and timm's `PretrainedCfg`.

Mean and std are in 0..1 units here, in the pretrained table and in checkpoint metadata (the
units of `torchvision.transforms.Normalize`). MindCV recipes write them in 0..255 pixel units;
`EvalTransform.from_config` is the one place that converts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor

from ..data import ResizeCrop, eval_resize_crop, eval_transform
from ..errors import CheckpointError
from ..schema import IMAGENET_MEAN_01, IMAGENET_STD_01
from .pretrained import select_entry

EVAL_KEYS = ("image_resize", "crop_pct", "interpolation", "mean", "std")


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to int(image_resize / crop_pct), center crop image_resize,
    normalize with `mean`/`std` (0..1 units)."""

    image_resize: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN_01
    std: tuple[float, ...] = IMAGENET_STD_01

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "eval transform") -> EvalTransform:
        """From a mapping with any of `EVAL_KEYS` (0..1 mean/std); other keys are ignored.
        Wrong types or values raise ValueError naming `where` and the key."""
        values: dict[str, Any] = {}
        try:
            if "image_resize" in d:
                values["image_resize"] = int(d["image_resize"])
            if "crop_pct" in d:
                values["crop_pct"] = float(d["crop_pct"])
            if "interpolation" in d:
                values["interpolation"] = str(d["interpolation"])
            for key in ("mean", "std"):
                if key in d:
                    values[key] = tuple(float(v) for v in d[key])
        except (TypeError, ValueError, OverflowError):
            keys = ", ".join(k for k in EVAL_KEYS if k in d)
            raise CheckpointError(f"{where}: malformed value among {keys}") from None
        out = cls(**values)
        out.check(where)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> EvalTransform:
        """From a run's config (a `Config` or its `to_dict()`): mean/std in MindCV's 0..255."""
        values = config if isinstance(config, Mapping) else config.to_dict()
        d = {k: values[k] for k in EVAL_KEYS if values.get(k) is not None}
        try:
            for key in ("mean", "std"):
                if key in d:
                    d[key] = [float(v) / 255 for v in d[key]]
        except (TypeError, ValueError, OverflowError):
            raise CheckpointError("training config: malformed mean/std") from None
        return cls.from_dict(d, "training config")

    def check(self, where: str = "eval transform") -> None:
        def bad(key: str, why: str) -> ValueError:
            return CheckpointError(f"{where}: {key} {why}")

        if not 1 <= self.image_resize <= 8192:
            raise bad("image_resize", f"is {self.image_resize}; it must be in 1..8192")
        if not 0 < self.crop_pct <= 1:
            raise bad("crop_pct", f"is {self.crop_pct}; it must be in (0, 1]")
        if not (len(self.mean) == len(self.std) >= 1):
            raise bad("mean/std", "must have one value per channel")
        if not all(math.isfinite(v) for v in self.mean) or not all(
            math.isfinite(v) and v > 0 for v in self.std
        ):
            raise bad("mean/std", "must be finite (std > 0)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}

    def resize_crop(self) -> ResizeCrop:
        """The transform's geometry, for `decode_image(resize=...)`."""
        return eval_resize_crop(
            self.image_resize, crop_pct=self.crop_pct, interpolation=self.interpolation
        )

    def transform(self) -> Callable[[Any], Tensor]:
        """The torchvision transform: PIL image -> normalized float tensor."""
        return eval_transform(
            self.image_resize,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=[255 * m for m in self.mean],
            std=[255 * s for s in self.std],
        )


DEFAULT_EVAL = EvalTransform().to_dict()  # ImageNet's: 224, 0.875, bilinear, mean/std


@dataclass(frozen=True)
class Weights:
    """One published weights file: where to get it, how to check it, under which license, what
    it scores and with which evaluation transform (see `pretrained.json`)."""

    model: str
    source: str
    urls: tuple[str, ...]
    file_name: str
    format: str
    license: str
    eval: EvalTransform
    metrics: dict[str, float] = field(default_factory=dict)  # published ImageNet-1K top1/top5
    sha256_prefix: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # recipe, notes, verified_from

    @classmethod
    def from_entry(cls, model: str, entry: Mapping[str, Any]) -> Weights:
        names = {f.name for f in fields(cls)}
        return cls(
            model=model,
            source=entry["source"],
            urls=tuple(entry["urls"]),
            file_name=entry["file_name"],
            format=entry.get("format", ""),
            license=entry.get("license", ""),
            eval=EvalTransform.from_dict(entry.get("eval", {}), f"pretrained table, {model}"),
            metrics={k: float(entry[k]) for k in ("top1", "top5") if entry.get(k) is not None},
            sha256_prefix=entry.get("sha256_prefix"),
            meta={
                k: v
                for k, v in entry.items()
                if k not in names and k not in ("top1", "top5", "hash_kind")
            },
        )

    def entry(self) -> dict[str, Any]:
        """The table's dict form (what `download_weights` takes)."""
        out: dict[str, Any] = {
            "source": self.source,
            "urls": list(self.urls),
            "file_name": self.file_name,
            "format": self.format,
            "license": self.license,
            "eval": self.eval.to_dict(),
            **self.metrics,
            **self.meta,
        }
        if self.sha256_prefix:
            out.update(sha256_prefix=self.sha256_prefix, hash_kind="sha256")
        return out

    def transforms(self) -> Callable[[Any], Tensor]:
        """The evaluation transform the published accuracy was measured with."""
        return self.eval.transform()


def get_weights(name: str, source: bool | str = True) -> Weights:
    """The typed entry `select_entry(name, source)` picks."""
    return Weights.from_entry(name, select_entry(name, source))


def resolve_eval_transform(
    *,
    flags: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    checkpoint: tuple[EvalTransform, str] | None = None,
    recipe_name: str = "recipe",
    defaults: tuple[Mapping[str, Any], str] | None = None,
) -> tuple[EvalTransform, dict[str, str]]:
    """The eval transform by precedence: explicit flags > recipe > checkpoint > defaults.

    `flags` and `recipe` map keys of `EVAL_KEYS` to values (mean/std in 0..1); `defaults`
    (values, name) replaces `EvalTransform()`'s. Returns the transform and, for each key, where
    its value came from."""
    base, base_name = defaults if defaults is not None else (EvalTransform().to_dict(), "default")
    values = {k: base[k] for k in EVAL_KEYS}
    where = {k: base_name for k in EVAL_KEYS}
    layers: list[tuple[Mapping[str, Any], str]] = []
    if checkpoint is not None:
        layers.append((checkpoint[0].to_dict(), checkpoint[1]))
    layers += [(recipe or {}, recipe_name), (flags or {}, "command line")]
    for layer, name in layers:
        for key in EVAL_KEYS:
            if key in layer and layer[key] is not None:
                values[key], where[key] = layer[key], name
    return EvalTransform.from_dict(values, "eval transform"), where


def describe_sources(t: EvalTransform, where: Mapping[str, str]) -> str:
    """One line: each value with its origin, grouped by origin."""
    by_origin: dict[str, list[str]] = {}
    shown = {
        "image_resize": str(t.image_resize),
        "crop_pct": f"{t.crop_pct:g}",
        "interpolation": t.interpolation,
        "mean": "(" + ", ".join(f"{m:.3g}" for m in t.mean) + ")",
        "std": "(" + ", ".join(f"{s:.3g}" for s in t.std) + ")",
    }
    for key in EVAL_KEYS:
        by_origin.setdefault(where[key], []).append(f"{key} {shown[key]}")
    return "eval transform: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in by_origin.items())
