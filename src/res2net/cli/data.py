"""`res2net data`: prepare and check datasets.

`res2net data shard SRC_DIR OUT_DIR` packs an ImageNet-style folder into WebDataset tar shards
for streaming on clusters; `res2net data check DIR` counts images per split and class and lists
every image that cannot be decoded (a folder, or shards written by `data shard`), before a long
run finds them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import MissingFile

HELP = "prepare data: pack a folder into WebDataset shards (shard), verify a dataset (check)"

_CHUNK = 256  # images decoded per round of the worker pool


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    shard = sub.add_parser(
        "shard",
        help="pack SRC_DIR/<split>/<class>/<image> into OUT_DIR/<split>/<split>-NNNNNN.tar + "
        "index.json",
        description="Pack an ImageNet-style folder into WebDataset tar shards. Images are copied "
        "byte for byte; training splits are shuffled once so that every shard mixes classes.",
        allow_abbrev=False,
    )
    shard.add_argument("src_dir", help="ImageNet-style folder: SRC_DIR/<split>/<class>/<image>")
    shard.add_argument("out_dir", help="where OUT_DIR/<split>/ shard folders are written")
    shard.add_argument(
        "--shard-size", type=int, default=1000, help="samples per shard (default 1000)"
    )
    shard.add_argument(
        "--max-bytes",
        type=_size,
        default=None,
        help="also cap shard size, e.g. 500M, 1G, 2GiB (default: no cap)",
    )
    shard.add_argument(
        "--splits",
        type=_splits,
        default=("train", "val"),
        help="comma-separated splits (default train,val)",
    )
    shard.add_argument(
        "--max-size",
        "--max_size",
        type=int,
        default=None,
        help="re-encode images whose longer side exceeds N pixels as JPEG "
        "(quality 90) with that longer side, as FFCV does (default: copy bytes)",
    )
    shard.add_argument(
        "--raw",
        action="store_true",
        help="with --max-size: store every image as uncompressed RGB pixels (PPM), read "
        "without decoding; about 10x the bytes of JPEG",
    )
    shard.add_argument(
        "--seed", type=int, default=0, help="seed of the training splits' one shuffle (default 0)"
    )
    shard.add_argument(
        "--shuffle-splits",
        type=_splits,
        default=("train",),
        help="splits shuffled when written (default train); others keep folder order",
    )

    check = sub.add_parser(
        "check",
        help="count images per split/class and list undecodable images (folder or shards)",
        description="Verify a dataset before a long run: images per split and class, empty class "
        "folders, validation classes missing from training, and every image that cannot be "
        "decoded. Works on an ImageNet-style folder and on shards written by `data shard`. "
        "Exit status 1 when a problem is found.",
        allow_abbrev=False,
    )
    check.add_argument(
        "dir", help="DIR/<split>/<class>/<image>, or DIR/<split>/index.json + shards"
    )
    check.add_argument(
        "--splits",
        type=_splits,
        default=("train", "val"),
        help="comma-separated splits (default train,val)",
    )
    check.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes"
    )
    check.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="decompression-bomb limit (default: the loader's)",
    )
    check.add_argument(
        "--per-class",
        action="store_true",
        help="print every class's count (default: up to 20 classes)",
    )


def _splits(text: str) -> tuple[str, ...]:
    splits = tuple(s.strip() for s in text.split(",") if s.strip())
    if not splits:
        raise argparse.ArgumentTypeError("give at least one split, e.g. train,val")
    return splits


_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]I?)?B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 1G, 2GiB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, not {text!r}")
    return int(value)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ---------------------------------------------------------------------------------------------
# shard


def shard_summary(split: str, index: dict[str, Any]) -> str:
    """One line describing a split written by `write_shards`."""
    shards = index["shards"]
    size = sum(s["bytes"] for s in shards)
    most = max(s["count"] for s in shards)
    order = "shuffled" if index["shuffled"] else "in folder order"
    return (
        f"{split}: {index['total']:,} images, {len(index['classes'])} classes -> {len(shards)} "
        "shards "
        f"(up to {most} image{'s' if most != 1 else ''} each, {order}) in {index['dir']} "
        f"({_human(size)})"
    )


def _progress_line(split: str, done: int, total: int) -> None:
    end = "\n" if done == total else ""
    print(f"\r{split}: {done:,}/{total:,} images packed", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# check


def _decode_error(item: tuple[str, Any, int | None]) -> str | None:
    from ..data import DEFAULT_MAX_PIXELS, DataError, decode_image, load_image

    name, payload, max_pixels = item
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    try:
        if isinstance(payload, bytes):
            decode_image(payload, name, limit)
        else:
            load_image(payload, limit)
    except DataError as e:
        return str(e)
    except Exception as e:  # pragma: no cover - load_image turns failures into DataError
        return f"{type(e).__name__}: {e}"
    return None


def _decode_errors(
    items: Iterable[tuple[str, Any]], workers: int, max_pixels: int | None
) -> Iterator[tuple[str, str]]:
    """(name, error) of every item that does not decode; payloads are paths or bytes. Items are
    taken in chunks so that shard bytes never pile up in memory."""
    it = iter(items)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        while chunk := [
            (name, payload, max_pixels) for name, payload in _take(it, _CHUNK * max(1, workers))
        ]:
            results = (
                pool.map(_decode_error, chunk, chunksize=16)
                if pool is not None
                else map(_decode_error, chunk)
            )
            for (name, _, _), error in zip(chunk, results):
                if error is not None:
                    yield name, error
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def check_split(
    data_dir: str | os.PathLike,
    split: str,
    class_to_idx: dict[str, int] | None = None,
    workers: int = 1,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Counts and problems of one split, a folder or shards. Keys: split, kind ('folder' or
    'shards'), shards (their number, or None), images, classes (names in class-index order),
    per_class ({name: images}), empty (class folders without images: a problem), missing
    (classes of `class_to_idx` with no images here: a note), bad ([(name, error)]), error (a
    message when the split is unusable, else None)."""
    from ..data import DataError, ImageFolderDataset
    from ..data.shards import ShardIndex, is_shard_dir, iter_shard_samples

    row: dict[str, Any] = {
        "split": split,
        "kind": "folder",
        "shards": None,
        "images": 0,
        "classes": [],
        "per_class": {},
        "empty": [],
        "missing": [],
        "bad": [],
        "error": None,
    }
    try:
        if is_shard_dir(data_dir, split):
            row["kind"] = "shards"
            index = ShardIndex.load(data_dir, split)
            classes = list(index.classes)
            unknown = sorted(set(classes) - set(class_to_idx)) if class_to_idx is not None else []
            if unknown:
                raise DataError(f"classes not in the first split: {', '.join(unknown[:10])}")
            row["shards"] = len(index.names)
            counts: Counter[int] = Counter()
            problems: list[tuple[str, str]] = []  # found without decoding

            def items() -> Iterator[tuple[str, Any]]:
                for s in iter_shard_samples(data_dir, split):
                    name = f"{s.shard}:{s.key}"
                    try:
                        counts[int(s.cls)] += 1  # type: ignore[arg-type]
                    except (TypeError, ValueError):
                        problems.append((name, "no valid class label"))
                    if s.problem is not None:
                        problems.append((name, s.problem))
                        continue
                    yield name, s.data if s.data is not None else b""

            bad = list(_decode_errors(items(), workers, max_pixels))
            row["bad"] = problems + bad
            present = {c for i, c in enumerate(classes) if counts.get(i, 0) > 0}
        else:
            dataset = ImageFolderDataset(
                data_dir, split, class_to_idx=class_to_idx, allow_empty=True
            )
            classes = list(dataset.classes)
            counts = Counter(dataset.targets)
            present = {
                e.name
                for e in os.scandir(dataset.root)
                if e.is_dir() and not e.name.startswith(".")
            }
            row["bad"] = list(
                _decode_errors(((p, p) for p, _ in dataset.samples), workers, max_pixels)
            )
    except DataError as e:
        row["error"] = str(e)
        return row
    row["classes"] = classes
    row["per_class"] = {name: counts.get(i, 0) for i, name in enumerate(classes)}
    row["images"] = sum(counts.values())
    row["empty"] = [c for c, n in row["per_class"].items() if n == 0 and c in present]
    row["missing"] = [c for c, n in row["per_class"].items() if n == 0 and c not in present]
    return row


def format_check(row: dict[str, Any], per_class: bool = False) -> list[str]:
    """Report lines for one `check_split` row."""
    split = row["split"]
    if row["error"] is not None:
        return [f"{split}: unusable: {row['error']}"]
    counts = list(row["per_class"].values())
    where = f" in {row['shards']} shards" if row["kind"] == "shards" else ""
    spread = f" ({min(counts)}-{max(counts)} per class)" if counts else ""
    lines = [f"{split}: {row['images']:,} images{where}, {len(row['classes'])} classes{spread}"]
    if per_class or len(counts) <= 20:
        lines.append("  " + ", ".join(f"{name} {n}" for name, n in row["per_class"].items()))
    if row["empty"]:
        lines.append(
            f"  class folders without images ({len(row['empty'])}): {', '.join(row['empty'][:20])}"
        )
    if row["missing"]:
        lines.append(
            f"  note: no images of {len(row['missing'])} classes: {', '.join(row['missing'][:20])}"
        )
    if row["bad"]:
        lines.append(f"  {len(row['bad'])} images cannot be decoded:")
        lines += [f"    {name}: {error}" for name, error in row["bad"]]
    return lines


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.data_command == "shard":
        from ..data.shards import write_shards

        progress = _progress_line if sys.stderr.isatty() else None
        results = write_shards(
            args.src_dir,
            args.out_dir,
            args.splits,
            args.shard_size,
            args.max_bytes,
            args.seed,
            shuffle_splits=args.shuffle_splits,
            progress=progress,
            max_size=args.max_size,
            raw=args.raw,
        )
        for split, index in results.items():
            print(shard_summary(split, index))
        return 0

    if not Path(args.dir).expanduser().is_dir():
        raise MissingFile(f"'{args.dir}' is not a folder")
    problems = 0
    reference: dict[str, int] | None = None  # the first split's classes index the others
    for split in args.splits:
        row = check_split(args.dir, split, reference, args.workers, args.max_pixels)
        for line in format_check(row, args.per_class):
            print(line)
        problems += (row["error"] is not None) + len(row["bad"]) + len(row["empty"])
        if reference is None and row["error"] is None:
            reference = {name: i for i, name in enumerate(row["classes"])}
    print("ok" if problems == 0 else f"{problems} problem{'s' if problems != 1 else ''} found")
    return 0 if problems == 0 else 1
