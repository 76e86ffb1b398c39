"""A small bundled dataset in ImageNet layout, for demos and tests that must not download.

scikit-learn ships 1,797 handwritten digits (8x8 grayscale, 10 classes) inside its package;
`write_digits_folder` writes them as PNG files in `root/train/<digit>/` and `root/val/<digit>/`,
so the whole pipeline (folders, transforms, loaders, training) runs on them unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .. import fileio
from ..console import progress_bar
from .folders import DataError

MARKER = ".digits-complete.json"  # written last; its presence means the tree is complete


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from ..extras import require

    digits = require("sklearn.datasets", "demo", "the digits demo set").load_digits()
    return digits.images, digits.target


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation samples: round(val_fraction * n) of each class, chosen at
    random with `seed` (a few lines of NumPy instead of sklearn's splitter, so the split depends
    only on this code)."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(round(val_fraction * len(members)))
        is_val[rng.permutation(members)[:n_val]] = True
    return is_val


def write_digits_folder(
    root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0, upscale: int = 32
) -> Path:
    """Write scikit-learn's digits to `root/{train,val}/<digit>/<n>.png` and return `root`.

    Pixels 0..16 become 0..255, images are enlarged to `upscale` x `upscale` (nearest neighbour,
    so files are exact and small) and saved as 8-bit grayscale PNG; the loader converts them to
    RGB. The split is stratified: `val_fraction` of each digit, fixed by `seed`.

    Idempotent: a tree written before with the same arguments is left as is. The tree is written
    to a temporary folder next to `root` and renamed into place, so `root` is either absent or
    complete, even with concurrent callers (e.g. one per rank)."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), not {val_fraction}")
    if upscale < 8:
        raise DataError(f"upscale must be >= 8 pixels, not {upscale}")
    root = Path(root).expanduser()
    params = {"val_fraction": val_fraction, "seed": seed, "upscale": upscale}
    if _is_complete(root, params):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"'{root}' exists and is not a digits demo folder; choose another path")

    images, labels = _load_digits()
    is_val = _stratified_split(labels, val_fraction, seed)
    tmp = fileio.private_directory(root.parent, f".{root.name}.")
    try:
        pairs = progress_bar(
            enumerate(zip(images, labels, strict=True)),
            total=len(labels),
            desc=f"writing {root}",
            unit="image",
        )
        for i, (image, label) in pairs:
            folder = tmp / ("val" if is_val[i] else "train") / str(int(label))
            fileio.make_directory(folder)
            pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
            im = Image.fromarray(pixels).resize((upscale, upscale), Image.Resampling.NEAREST)
            im.save(folder / f"{i:04d}.png")
        fileio.write_text(tmp / MARKER, json.dumps({**params, "images": len(labels)}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            fileio.publish_directory(tmp, root)  # empty (checked above) or missing
        except OSError:
            if not _is_complete(root, params):  # not a concurrent writer finishing first
                raise
    finally:
        fileio.remove_private_directory(tmp)
    return root


def _is_complete(root: Path, params: dict) -> bool:
    """True when `root` holds a tree written with `params`; a tree written with other
    arguments is an error rather than a silent mismatch."""
    marker = root / MARKER
    data = fileio.read_existing(marker, 1 << 16)  # at its own name, never through a link
    if data is None:
        return False
    try:
        written = json.loads(data)
    except ValueError:
        written = None
    if not isinstance(written, dict):
        raise DataError(f"'{marker}' is not the digits' JSON marker: choose another path")
    if any(written.get(k) != v for k, v in params.items()):
        raise DataError(
            f"'{root}' holds digits written with "
            f"{ {k: written.get(k) for k in params} }, not {params}; choose another path"
        )
    return True
