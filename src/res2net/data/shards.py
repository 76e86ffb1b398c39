"""Sharded data for clusters: an ImageNet-style folder packed into WebDataset tar shards, and
streamed back for training and validation from a local folder or any URL `webdataset` opens.

Layout written by `write_shards(SRC, OUT)`::

    OUT/train/train-000000.tar  train-000001.tar ...  index.json
    OUT/val/val-000000.tar ...                         index.json

A sample is two tar members, `<key>.<ext>` (the original file's bytes, never re-encoded; `ext`
is its extension, lower-cased) and `<key>.cls` (the class index as ASCII digits). The key is the
file's path inside the split folder without its extension (`n01440764/n01440764_10026`), so
tar listings name the source files. Training splits are shuffled once when written (each shard
mixes classes); validation splits keep folder order. `index.json` (shard names, per-shard sample
counts and sizes, total, class names in class-index order) is written last and atomically: a
split without it is an interrupted write, and readers refuse it.

Reading (`ShardDataset`, `ShardLoader`, `build_shard_loader`). The data location is a local
folder, a URL prefix (`https://host/imagenet`, `file:///data/imagenet`; `<prefix>/<split>/...`
is read with `webdataset.gopen`) or a `pipe:` command with `{}` standing for the path inside the
shard folder (`pipe:aws s3 cp s3://bucket/imagenet/{} -`).

How an epoch is split. The shards, in an order shuffled by (seed, epoch) when training, form one
stream of N samples. Each rank takes a contiguous part of it and each DataLoader worker a
contiguous part of its rank's, cut at sample (not shard) boundaries, so the shares are equal
whatever the shard sizes; a shard that straddles a cut is read by both readers, each keeping its
part. (`webdataset.split_by_node` / `split_by_worker` deal out whole shards instead, which gives
ranks different sample counts: DistributedDataParallel then hangs at the end of the epoch, or
needs `with_epoch` and resampled shards, which repeat and drop samples.) So:

* training: every rank gets ceil(N / world_size) samples (the stream's start repeated to fill,
  as `DistributedSampler` does) and the same number of batches; every sample is seen once per
  epoch (plus those few repeats); each worker reads its part through a shuffle buffer seeded by
  (seed, epoch, rank, worker);
* validation: ranks get consecutive parts with no padding: every sample is evaluated exactly
  once across ranks and workers, with any number of shards (fewer shards than ranks x workers
  only means some shards are streamed by several readers, each skipping the others' samples).

Each reader skips by streaming: cheap on local disks, extra transfer over a network. Shards
many times more numerous than world_size x workers keep it small (ImageNet's train split at
1000 samples per shard gives 1282 shards).

Determinism. A sample's augmentations depend only on (seed, epoch, sample); the order of an
epoch depends on (seed, epoch, world_size, num_workers, batch_size). `set_epoch(epoch,
start=batches_done * batch_size)` resumes inside an epoch with exactly the remaining batches, in
the same order. Workers are not persistent (each epoch starts them afresh, which is how they
learn the epoch).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import json
import logging
import os
import random
import re
import shlex
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import fileio
from ..guards import NETWORK_TIMEOUT, interruptible, open_regular_file, read_regular_file, short
from .folders import (
    DEFAULT_MAX_PIXELS,
    DataError,
    ImageFolderDataset,
    OnBadImage,
    decode_image,
    image_for,
    read_file,
    substitute_image,
    visible_entries,
)
from .loader import epoch_generator, ignore_stop_signals, rngs_restored, seed_all

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "res2net-webdataset"
INDEX_VERSION = 1
SHARD_PATTERN = "{split}-{number:06d}.tar"
# Tar overhead: a 512-byte header per member, data padded to 512 bytes.
_BLOCK = 512

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A shard name is a plain file name in the split's folder; a split one or more plain names.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")
# Bounds on what an index or a shard may make a reader hold.
MAX_INDEX_BYTES = 16 << 20
MAX_SHARDS = 1 << 20
MAX_CLASSES = 1 << 20
MAX_SAMPLE_BYTES = 64 << 20  # all members of one sample together
MAX_TAR_HEADER_BYTES = 8 << 10  # a pax or GNU long-name header: a name and a few fields
# Shards are plain tar: compressed ones are refused (a small gzip member can expand to
# gigabytes, and webdataset's `r|*` would decompress it without limit).
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
}
# curl for http(s) shards: give up on a connection after NETWORK_TIMEOUT seconds and on a
# transfer that stalls (under 1 byte/s) for as long, whatever the server does.
_CURL = [
    "curl",
    "--connect-timeout",
    str(int(NETWORK_TIMEOUT)),
    "--speed-limit",
    "1",
    "--speed-time",
    str(int(NETWORK_TIMEOUT)),
    "--retry",
    "3",
    "--retry-delay",
    "2",
    "-f",
    "-s",
    "-L",
    "--",
]


def _webdataset() -> Any:
    from ..extras import require

    return require("webdataset", "shards", "sharded data")


# ---------------------------------------------------------------------------------------------
# Locations


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL (`scheme://...`) or a `pipe:` command rather than a path."""
    s = os.fspath(location)
    return s.startswith("pipe:") or bool(_URL_RE.match(s))


def check_name(name: Any, what: str = "shard name", *, nested: bool = False) -> str:
    """`name` when it is a plain file name (letters, digits, `._+-`, not starting with a dot),
    or with `nested` several joined by `/`; else DataError. Nothing else is ever pasted into a
    path, URL or `pipe:` command."""
    parts = name.split("/") if nested and isinstance(name, str) else [name]
    if not all(isinstance(p, str) and _NAME_RE.fullmatch(p) for p in parts):
        raise DataError(f"{what} {short(name)} is not a plain file name (letters, digits, '._+-')")
    return name


def _join(location: str, name: str) -> str:
    """`location/name`: a path, a URL, or a `pipe:` command whose `{}` stands for the path
    (shell-quoted there, though `check_name` already allows no character the shell reads)."""
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise DataError(
                f"a pipe: data location needs '{{}}' where the path inside the shard folder goes, "
                f"e.g. 'pipe:aws s3 cp s3://bucket/imagenet/{{}} -' (got {short(location)})"
            )
        return location.replace("{}", shlex.quote(name))
    if _URL_RE.match(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def _split_location(data_dir: str | os.PathLike, split: str | None) -> str:
    location = os.fspath(data_dir)
    if not is_url(location):
        location = os.path.expanduser(location)
    if split is None:
        return location
    check_name(split, "split", nested=True)
    # A pipe: template stays one: its '{}' now stands for the path inside the split folder.
    if location.startswith("pipe:"):
        _join(location, "")  # the check for '{}'
        return location.replace("{}", split + "/{}")
    return _join(location, split)


def is_shard_dir(data_dir: str | os.PathLike, split: str) -> bool:
    """True when `data_dir` holds shards for `split` (`data_dir/split/index.json` exists) or is
    a URL / `pipe:` command (shards are the only thing read from URLs)."""
    if is_url(data_dir):
        return True
    return (Path(data_dir).expanduser() / split / INDEX_NAME).is_file()


# ---------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True)
class ShardIndex:
    """The content of a split's `index.json`, and where its shards are."""

    location: str  # the split's folder, URL prefix or pipe: template
    split: str
    classes: tuple[str, ...]
    names: tuple[str, ...]  # shard file names, in index order
    counts: tuple[int, ...]  # samples per shard
    sizes: tuple[int | None, ...]  # bytes per shard (checked for local shards)
    shuffled: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def offsets(self) -> list[int]:
        """Index of each shard's first sample in index order (len = shards + 1)."""
        return [0, *itertools.accumulate(self.counts)]

    def url(self, name: str) -> str:
        """Where shard (or file) `name` of this split is read from."""
        return _join(self.location, name)

    @classmethod
    def load(cls, data_dir: str | os.PathLike, split: str | None = None) -> ShardIndex:
        """Read `data_dir/split/index.json` (or `data_dir/index.json` when `split` is None) and,
        for local shards, check that every shard is there with the size the index gives."""
        location = _split_location(data_dir, split)
        index_url = _join(location, INDEX_NAME)
        if is_url(location):
            wds = _webdataset()
            scheme = location.split(":", 1)[0].lower()
            if scheme not in wds.gopen_schemes and scheme != "file":
                raise DataError(
                    f"webdataset cannot open '{scheme}:' URLs; use a pipe: command, e.g. "
                    f"--data_dir 'pipe:aws s3 cp s3://bucket/imagenet/{{}} -' (got {location!r})"
                )
            try:
                stream = _open_stream(index_url)
                try:
                    with interruptible():
                        content = _read_capped(stream, MAX_INDEX_BYTES + 1)
                finally:
                    _close(stream, early=True)
            except Exception as e:
                reason = f"{type(e).__name__}: {short(str(e), 200)}"
                raise DataError(f"cannot read the shard index '{index_url}': {reason}") from e
            if len(content) > MAX_INDEX_BYTES:
                raise DataError(
                    f"'{index_url}' is larger than {MAX_INDEX_BYTES} bytes; not a shard index"
                )
        else:
            content = _read_local_index(Path(location))
        try:
            info = json.loads(content)
        except (ValueError, RecursionError) as e:
            reason = short(str(e), 120)
            raise DataError(f"'{index_url}' is not a valid shard index: {reason}") from None
        problem = _index_problem(info)
        if problem:
            raise DataError(f"'{index_url}' is not a valid shard index: {problem}")
        shards = info["shards"]
        index = cls(
            location=location,
            split=str(info.get("split", split or Path(location).name))[:100],
            classes=tuple(info["classes"]),
            names=tuple(s["name"] for s in shards),
            counts=tuple(int(s["count"]) for s in shards),
            sizes=tuple(s.get("bytes") for s in shards),
            shuffled=bool(info.get("shuffled", False)),
        )
        if index.total != info.get("total", index.total):
            raise DataError(
                f"'{index_url}' is inconsistent: shard counts add up to {index.total}, total says "
                f"{info['total']}"
            )
        if index.total == 0:
            raise DataError(f"'{index_url}' lists no samples")
        if not is_url(location):
            index._check_local_files()
        return index

    def _check_local_files(self) -> None:
        for name, size in zip(self.names, self.sizes):
            path = Path(self.url(name))
            if not path.is_file():
                raise DataError(f"shard '{path}' listed in {INDEX_NAME} is missing")
            if size is not None and path.stat().st_size != size:
                raise DataError(
                    f"shard '{path}' has {path.stat().st_size} bytes but {INDEX_NAME} says {size} "
                    f"(an incomplete copy?)"
                )


def _index_problem(info: Any) -> str | None:
    """What is wrong with a parsed `index.json` (None when nothing): its schema, shard names
    (`check_name`) and counts, checked before any of it is used."""

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40

    if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT:
        return "not written by `res2net data shard` (no 'format': 'res2net-webdataset')"
    version = info.get("version", 0)
    if not count(version) or version > INDEX_VERSION:
        return f"index version {short(version)}; this res2net reads up to {INDEX_VERSION}"
    shards, classes = info.get("shards"), info.get("classes")
    if not isinstance(shards, list) or not 0 < len(shards) <= MAX_SHARDS:
        return f"'shards' must be a list of 1 to {MAX_SHARDS} entries"
    if not isinstance(classes, list) or len(classes) > MAX_CLASSES:
        return f"'classes' must be a list of at most {MAX_CLASSES} names"
    if not all(isinstance(c, str) and 0 < len(c) <= 1000 for c in classes):
        return "'classes' must hold non-empty names of at most 1000 characters"
    if "total" in info and not count(info["total"]):
        return f"'total' must be a count, got {short(info['total'])}"
    seen: set[str] = set()
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard {k} is not an object"
        name = shard.get("name")
        try:
            name = check_name(name)
        except DataError as e:
            return str(e)
        if name in seen:
            return f"shard {name!r} is listed twice"
        seen.add(name)
        if not count(shard.get("count")):
            return f"shard {name!r} has no valid 'count' ({short(shard.get('count'))})"
        if shard.get("bytes") is not None and not count(shard["bytes"]):
            return f"shard {name!r} has an invalid 'bytes' ({short(shard['bytes'])})"
    return None


def _read_local_index(split_dir: Path) -> bytes:
    index_path = split_dir / INDEX_NAME
    if index_path.exists():
        try:
            return read_regular_file(index_path, "shard index", MAX_INDEX_BYTES)
        except (OSError, ValueError) as e:
            raise DataError(str(e)) from None
    if split_dir.is_dir() and any(p.suffix == ".tar" for p in split_dir.iterdir()):
        raise DataError(
            f"'{split_dir}' has shards but no {INDEX_NAME}: writing them was interrupted; "
            f"run `res2net data shard` again"
        )
    raise DataError(
        f"no shards at '{split_dir}': expected {index_path} (write shards with "
        f"`res2net data shard SRC_DIR OUT_DIR`)"
    )


# ---------------------------------------------------------------------------------------------
# Writing


def _sample_key(path: str, root: str) -> tuple[str, str]:
    """(key, ext) of an image file: its path in the split folder without the extension, with
    the dots of the file name replaced (webdataset splits a name at its first dot)."""
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    folder, _, base = rel.rpartition("/")
    stem, _, ext = base.rpartition(".")
    stem = stem.replace(".", "_")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _member_bytes(name: str, size: int) -> int:
    pax = 3 * _BLOCK if len(name.encode()) > 100 or not name.isascii() else 0
    return _BLOCK + pax + -(-size // _BLOCK) * _BLOCK


def _previous_shards(split_dir: Path, split: str) -> list[str]:
    """The shard names the split's previous `index.json` lists, in this module's naming: the
    only files a rewrite may delete ([] when there is no index this module wrote)."""
    path = split_dir / INDEX_NAME
    if not os.path.lexists(path):
        return []
    try:
        info = json.loads(read_regular_file(path, "shard index", MAX_INDEX_BYTES))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return []
    if _index_problem(info) is not None:
        return []
    ours = re.compile(rf"{re.escape(split)}-\d{{6,}}\.tar")
    return [e["name"] for e in info["shards"] if ours.fullmatch(e["name"])]


def _clear_split_dir(split_dir: Path, split: str) -> None:
    """Delete the split's previous shards: only the plain files its own `index.json` listed
    (a name the index does not list is never deleted, whatever it looks like), and the
    temporary files of killed writes."""
    previous = _previous_shards(split_dir, split)
    # The index first: from here until the new one is written, the folder reads as incomplete.
    fileio.remove(split_dir / INDEX_NAME)
    for name in previous:
        fileio.remove(split_dir / name)
    fileio.remove_stale_temporaries(split_dir)


class _ShardSink:
    """Writes numbered shards, each to a temporary file renamed when complete."""

    def __init__(self, split_dir: Path, split: str, shard_size: int, max_bytes: int | None) -> None:
        self.split_dir, self.split = split_dir, split
        self.shard_size, self.max_bytes = shard_size, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None
        self._file: Any = None
        self._partial: Path  # the shard being written, renamed to its name when complete
        self._count = 0
        self._bytes = 0

    def write(self, key: str, target: int, ext: str, data: bytes) -> None:
        size = _member_bytes(f"{key}.{ext}", len(data)) + _member_bytes(f"{key}.cls", 8)
        full = self._count >= self.shard_size or (
            self.max_bytes is not None and self._count > 0 and self._bytes + size > self.max_bytes
        )
        if self._writer is None or full:
            self._finish()
            self._open()
        self._writer.write({"__key__": key, "cls": str(target).encode(), ext: data})
        self._count += 1
        self._bytes += size

    def _open(self) -> None:
        wds = _webdataset()
        name = SHARD_PATTERN.format(split=self.split, number=len(self.shards))
        self._partial = fileio.temporary_path(self.split_dir / name)
        self._file = fileio.open_new(self._partial)
        # mtime fixed: the same folder gives the same bytes. PAX: long and non-ASCII names.
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0, format="PAX_FORMAT")
        self.shards.append({"name": name, "count": 0, "bytes": 0})
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._file.close()
        entry = self.shards[-1]
        entry["count"] = self._count
        entry["bytes"] = self._partial.stat().st_size
        fileio.rename_into(self._partial, self.split_dir / entry["name"])
        self._writer = self._file = None

    def close(self) -> list[dict[str, Any]]:
        self._finish()
        return self.shards

    def abort(self) -> None:
        if self._writer is not None:
            # the tar stream first: left open, it would write its end to a closed file when
            # collected; a write that failed (disk full) may fail again, the file goes anyway
            with contextlib.suppress(OSError):
                self._writer.close()
            self._file.close()
            fileio.remove(self._partial)
            self._writer = self._file = None


def bounded_image(
    name: str, ext: str, data: bytes, max_size: int, *, raw: bool = False
) -> tuple[str, bytes]:
    """The image as (extension, bytes) with its longer side at most `max_size`: re-encoded as
    a JPEG (quality 90) when larger, else unchanged; with `raw`, always stored as uncompressed
    8-bit RGB pixels (binary PPM, upright), which training reads without decoding.
    `DataError` naming the file when it cannot be decoded."""
    im = decode_image(data, name)
    if max(im.size) <= max_size and not raw:
        return ext, data
    if max(im.size) > max_size:
        scale = max_size / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    out = io.BytesIO()
    if raw:
        im.save(out, "PPM")
        return "ppm", out.getvalue()
    im.save(out, "JPEG", quality=90)
    return "jpg", out.getvalue()


def write_shards(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "val"),
    shard_size: int = 1000,
    max_bytes: int | None = None,
    seed: int = 0,
    *,
    class_split: str = "train",
    shuffle_splits: Sequence[str] = ("train",),
    progress: Callable[[str, int, int], None] | None = None,
    max_size: int | None = None,
    raw: bool = False,
) -> dict[str, dict[str, Any]]:
    """Pack `data_dir/<split>/<class>/<image>` into `out_dir/<split>/<split>-NNNNNN.tar` shards.

    Args:
        data_dir: an ImageNet-style folder (read with `ImageFolderDataset`'s file list).
        out_dir: where each split's shard folder is written (created; earlier shards of the
            same split are replaced).
        splits: the split folders to pack.
        shard_size: samples per shard.
        max_bytes: also start a new shard before one would exceed this many bytes (a larger
            single sample gets a shard of its own).
        seed: the seed of the one shuffle of `shuffle_splits` (training splits), so that every
            shard mixes classes; other splits keep folder order.
        class_split: when `data_dir/<class_split>` exists, its class folders define the class
            indices of every split (as training and validation use the training split's).
        shuffle_splits: the splits shuffled when written.
        progress: called as ``progress(split, images_written, images_in_split)`` before the
            first shard, after every `shard_size` images and at the end of each split.
        max_size: re-encode every image whose longer side exceeds this many pixels as a JPEG
            (quality 90) with that longer side, as FFCV's `max_resolution` does: training then
            decodes fewer pixels. Images within the bound are copied as they are.
        raw: with `max_size`, store every image as uncompressed RGB pixels (binary PPM, which
            PIL and most image libraries open) instead: training skips JPEG decoding, at about
            ten times the bytes of a JPEG of the same size (FFCV's raw mode).

    Returns ``{split: index}``, each index being the content of the `index.json` written, plus
    ``"dir"``: the split's shard folder. Images are copied byte for byte, not decoded: bad ones
    are found when read (`res2net data check` finds them beforehand).
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, not {shard_size}")
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"max_bytes must be >= 1, not {max_bytes}")
    if max_size is not None and max_size < 16:
        raise DataError(f"max_size must be >= 16 pixels, not {max_size}")
    if raw and max_size is None:
        raise DataError(
            "raw pixels need a max_size (e.g. 256): a full-size ImageNet image is ~0.5 MB raw"
        )
    data_dir = Path(data_dir).expanduser()
    out = Path(out_dir).expanduser()
    if out.resolve() == data_dir.resolve():
        raise DataError("out_dir must differ from data_dir")
    class_to_idx = None
    class_root = data_dir / class_split
    if class_root.is_dir():
        names = [e.name for e in visible_entries(class_root) if e.is_dir()]
        class_to_idx = {name: i for i, name in enumerate(names)}
    results: dict[str, dict[str, Any]] = {}
    for split in splits:
        dataset = ImageFolderDataset(data_dir, split, class_to_idx=class_to_idx)
        order = list(range(len(dataset.samples)))
        shuffled = split in shuffle_splits
        if shuffled:
            random.Random(seed).shuffle(order)
        split_dir = fileio.make_subdirectory(out, split)  # never a planted link
        _clear_split_dir(split_dir, split)
        sink = _ShardSink(split_dir, split, shard_size, max_bytes)
        keys: set[str] = set()
        if progress is not None:
            progress(split, 0, len(order))
        try:
            for done, i in enumerate(order):
                if progress is not None and done and done % min(shard_size, 200) == 0:
                    progress(split, done, len(order))
                path, target = dataset.samples[i]
                key, ext = _sample_key(path, dataset.root)
                if key in keys:  # a.jpg next to a.png, or a.b.jpg next to a_b.jpg
                    key = next(f"{key}_{n}" for n in itertools.count(2) if f"{key}_{n}" not in keys)
                keys.add(key)
                data = read_file(path)
                if max_size is not None:
                    ext, data = bounded_image(path, ext, data, max_size, raw=raw)
                if len(data) + len(str(target)) > MAX_SAMPLE_BYTES:  # what a reader takes
                    raise DataError(
                        f"image '{path}' has {len(data)} bytes; a shard sample holds at most "
                        f"{MAX_SAMPLE_BYTES}: shrink it, or write the shards with --max-size"
                    )
                sink.write(key, target, ext, data)
            shards = sink.close()
            if progress is not None:
                progress(split, len(order), len(order))
        except BaseException:
            sink.abort()
            raise
        index = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "split": split,
            "classes": list(dataset.classes),
            "total": len(order),
            "shuffled": shuffled,
            "seed": seed if shuffled else None,
            "shards": shards,
        }
        fileio.write_text(split_dir / INDEX_NAME, json.dumps(index, indent=1) + "\n")
        results[split] = dict(index, dir=str(split_dir))
    return results


# ---------------------------------------------------------------------------------------------
# Reading


class ShardSample(NamedTuple):
    """One raw sample: its position in the split (index order), shard URL, key, label field and
    image bytes (None when the sample has no image member, or is too large to read: `problem`
    then says so)."""

    index: int  # type: ignore[assignment]  # a field may shadow tuple.index; typeshed objects
    shard: str
    key: str
    cls: bytes | None
    ext: str | None
    data: bytes | None
    problem: str | None = None


_META_FIELDS = ("cls", "json", "txt")
_TOO_LARGE = "__too_large__"  # the field `_tar_files` puts in place of a sample's large members


def _to_raw(index: int, url: str, sample: dict[str, Any]) -> ShardSample:
    if _TOO_LARGE in sample:  # its members were skipped unread (see `_tar_files`)
        problem = f"holds more than {MAX_SAMPLE_BYTES} bytes"
        return ShardSample(index, url, sample["__key__"], sample.get("cls"), None, None, problem)
    image_fields = [k for k in sample if not k.startswith("__") and k not in _META_FIELDS]
    ext = image_fields[0] if image_fields else None
    return ShardSample(
        index, url, sample["__key__"], sample.get("cls"), ext, sample[ext] if ext else None
    )


def _read_shard(
    index: ShardIndex, shard: int, skip: int, take: int, offset: int
) -> Iterator[ShardSample]:
    """Samples skip .. skip+take-1 of one shard (the first `skip` are streamed past, not kept)."""
    wds = _webdataset()
    url = index.url(index.names[shard])
    if take <= 0:
        return
    try:
        stream = _open_stream(url)
    except Exception as e:
        reason = f"{type(e).__name__}: {short(str(e), 200)}"
        raise DataError(f"cannot open shard '{url}': {reason}") from e
    n = 0
    try:
        samples = wds.tariterators.group_by_keys(_tar_files(stream, url))
        try:
            for j, sample in enumerate(samples):
                if j < skip:
                    continue
                yield _to_raw(offset + j, url, sample)
                n += 1
                if n == take:
                    break
        except DataError:
            raise
        except Exception as e:  # tarfile / pipe errors: the shard itself is unreadable
            raise DataError(f"cannot read shard '{url}': {type(e).__name__}: {e}") from e
        if n < take:
            raise DataError(
                f"shard '{url}' has {skip + n} samples but {INDEX_NAME} says {index.counts[shard]}"
            )
    finally:
        _close(stream, early=skip + n < index.counts[shard])


def _open_stream(url: str) -> Any:
    """A readable stream of `url`: local files must be regular files (a named pipe would block,
    a device never end); http(s) goes through curl with timeouts (`_CURL`); other URLs and
    `pipe:` commands (given on the command line, never by a recipe) through webdataset."""
    wds = _webdataset()
    scheme = url.split(":", 1)[0].lower() if is_url(url) else ""
    if not scheme or scheme == "file":
        path = url[len("file://") :] if scheme else url
        return open_regular_file(path, "shard file")
    if scheme in ("http", "https"):
        from webdataset.gopen import Pipe

        return Pipe([*_CURL, url], mode="rb", bufsize=8192, ignore_status=[141, 23])
    return wds.gopen(url)


def _read_capped(stream: Any, limit: int) -> bytes:
    """At most `limit` bytes of `stream`, read in chunks (one `read(limit)` would allocate
    `limit` bytes up front, however little the stream holds)."""
    chunks, size = [], 0
    while size < limit:
        chunk = stream.read(min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _close(stream: Any, early: bool) -> None:
    """Close `stream`; when reading stopped `early` (done, failed or interrupted), a command
    behind it (curl, a pipe:) is killed rather than waited for: it may be stalled."""
    process = getattr(stream, "proc", None)
    if early and process is not None:
        stream.ignore_errors = True
        process.kill()
    try:
        stream.close()
    except Exception:
        logger.debug("closing %s", stream, exc_info=True)


class _Prefixed:
    """A read-only stream whose first bytes were already read (to look at them)."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            out, self.head = (
                (self.head, b"")
                if size < 0 or size >= len(self.head)
                else (self.head[:size], self.head[size:])
            )
            return out
        return self.stream.read(size)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar member whose extended header (pax, GNU long name) is refused beyond
    MAX_TAR_HEADER_BYTES before tarfile reads it: tarfile reads such a header whole, and parses
    a pax one in time quadratic in its size in Pythons before the fix of CVE-2024-6232."""

    def _proc_member(self, tar: Any) -> Any:
        if self.type in _EXTENDED_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.HeaderError(  # `_read_shard` names the shard
                f"an extended header of {self.size} bytes (at most {MAX_TAR_HEADER_BYTES}); "
                "not a shard `res2net data shard` writes"
            )
        return super()._proc_member(tar)  # type: ignore[misc]


_EXTENDED_HEADERS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _tar_files(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """The regular members of an uncompressed tar stream as webdataset's `group_by_keys` wants
    them; DataError for a compressed shard. The members of a sample beyond MAX_SAMPLE_BYTES
    are not read: the sample gets a `_TOO_LARGE` field instead, a bad image for the reader."""
    head = stream.read(8)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise DataError(
                f"shard '{url}' is {kind}-compressed; shards must be plain tar "
                "(re-run `res2net data shard`)"
            )
    base_plus_ext = _webdataset().tariterators.base_plus_ext
    key, held, too_large = None, 0, False
    # "r|": no decompression. The stream mode calls only read(), which is all _Prefixed has;
    # typeshed asks for the whole file interface.
    prefixed = _Prefixed(head, stream)
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=prefixed, mode="r|", tarinfo=_BoundedTarInfo
    ) as tar:
        for member in tar:
            if not member.isreg() or member.name.startswith("__"):
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix != key:
                held, too_large = 0, False
            held += member.size
            key = prefix
            tar.members = []  # a stream: forget members already read
            if held > MAX_SAMPLE_BYTES:  # not read: tarfile streams past it to the next member
                if not too_large:  # one mark per sample (a second would start a new sample)
                    too_large = True
                    yield {"fname": f"{prefix}.{_TOO_LARGE}", "data": held, "__url__": url}
                continue
            data = tar.extractfile(member).read()
            yield {"fname": member.name, "data": data, "__url__": url}


def iter_shard_samples(
    data_dir: str | os.PathLike, split: str | None = None
) -> Iterator[ShardSample]:
    """Every sample of a split's shards, raw, in index order (`split` None: `data_dir` is the
    split's shard folder)."""
    index = ShardIndex.load(data_dir, split)
    offsets = index.offsets
    for k, count in enumerate(index.counts):
        yield from _read_shard(index, k, 0, count, offsets[k])


class _SampleNames(Sequence):
    """`samples`-like names for bad-image reports: item i is ('<shard url>[j]', -1)."""

    def __init__(self, index: ShardIndex) -> None:
        self._index = index
        self._offsets = index.offsets

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._offsets, i) - 1
        return f"{self._index.url(self._index.names[k])}[{i - self._offsets[k]}]", -1


def _mixed_seed(*values: int) -> int:
    return int(
        np.random.SeedSequence([v % 2**32 for v in values])
        .generate_state(2, np.uint32)
        .view(np.uint64)[0]
    )


Segment = tuple[int, int, int]  # (shard, skip, take)


class ShardDataset(IterableDataset):
    """Streams a split's shards: this rank's share of each epoch, split between DataLoader workers.

    Args:
        data_dir: the folder (or URL prefix, or `pipe:` template) holding `<split>/index.json`.
        split: the split; None when `data_dir` is the split's shard folder itself.
        transform, target_transform: as in `ImageFolderDataset` (`transform` gets an RGB PIL image).
        training: True: shuffled shard order and shuffle buffer, and every rank gets the same
            number of samples (the start repeated to fill). False (validation): in order, every
            sample exactly once across ranks and workers, ranks differ by at most one sample.
        shuffle: shuffle (default: `training`).
        batch_size, drop_last: the loader's batching: workers get whole batches, so the rank's
            batches come out in a fixed order; `drop_last` drops this rank's last partial batch.
        seed: seeds the shard order, the shuffle buffers and the per-sample augmentation seeds.
        shuffle_buffer: samples held (raw bytes) by each worker's shuffle buffer.
        rank, world_size: default to the initialized process group's, else 0 and 1.
        class_to_idx: a fixed mapping (the training split's, for validation); the index's class
            names must be in it and labels are mapped by name.
        on_bad_image: "error" raises `DataError` naming shard and key; "skip" gives items
            ``(image, target, valid, index)`` with a black substitute flagged invalid.
        max_pixels: the decompression-bomb limit of `load_image`.

    Items are ``(image, target)`` (``on_bad_image="error"``) or ``(image, target, valid, index)``;
    `index` is the sample's position in the split (shard order of `index.json`) and
    ``samples[index][0]`` names it ('<shard>[position in shard]').
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str | None = "train",
        transform: Callable | None = None,
        target_transform: Callable | None = None,
        *,
        training: bool = True,
        shuffle: bool | None = None,
        batch_size: int = 1,
        drop_last: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        class_to_idx: dict[str, int] | None = None,
        on_bad_image: OnBadImage = "error",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise DataError(f"on_bad_image must be 'error' or 'skip', not {on_bad_image!r}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, not {batch_size}")
        if rank is None or world_size is None:
            dist_rank, dist_world = _process_group()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), not {rank}")
        self.index = ShardIndex.load(data_dir, split)
        self.split = self.index.split
        self.transform = transform
        self.target_transform = target_transform
        self.training = training
        self.shuffle = training if shuffle is None else shuffle
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank = rank
        self.world_size = world_size
        self.on_bad_image = on_bad_image
        self.max_pixels = max_pixels
        self.epoch = 0
        self.start = 0
        if class_to_idx is None:
            self.classes = list(self.index.classes)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
            self._label_map: list[int] | None = None
        else:
            unknown = [c for c in self.index.classes if c not in class_to_idx]
            if unknown:
                raise DataError(
                    f"shards of '{self.index.location}' have classes that are not in the given "
                    "classes: "
                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}"
                )
            self.class_to_idx = dict(class_to_idx)
            self.classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
            self._label_map = [class_to_idx[c] for c in self.index.classes]
        self.samples = _SampleNames(self.index)
        if self.shuffle and not self.index.shuffled:
            logger.warning(
                "shards of %s were written in folder order: each holds few classes, so shuffled "
                "reading mixes poorly; write training shards with `res2net data shard` (it "
                "shuffles)",
                self.index.location,
            )

    # sizes --------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def total(self) -> int:
        """Samples in the split (all ranks)."""
        return self.index.total

    def _rank_span(self) -> tuple[int, int]:
        """(first stream position, samples) of this rank before batching."""
        n, r, w = self.index.total, self.rank, self.world_size
        if self.training:
            per_rank = -(-n // w)
            return r * per_rank, per_rank
        return r * n // w, (r + 1) * n // w - r * n // w

    @property
    def num_batches(self) -> int:
        """Batches this rank yields per epoch (the same on every rank when training)."""
        _, count = self._rank_span()
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        _, count = self._rank_span()
        return min(count, self.num_batches * self.batch_size)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch the next iteration streams; `start` (a multiple of `batch_size`:
        batches done x batch size) skips this rank's batches already done when resuming."""
        if start < 0 or start % self.batch_size:
            raise DataError(
                f"start must be a multiple of batch_size {self.batch_size} and >= 0, not {start}"
            )
        self.epoch = epoch
        self.start = start

    # planning -----------------------------------------------------------------------------

    def shard_order(self) -> list[int]:
        """The epoch's shard order (shuffled by (seed, epoch) when shuffling)."""
        n = len(self.index.counts)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=epoch_generator(self.seed, self.epoch)).tolist()

    def worker_segments(self, worker: int, num_workers: int) -> list[Segment]:
        """(shard, skip, take) pieces that logical worker `worker` of `num_workers` reads this
        epoch, in order: logical worker w yields the rank's batches w, w + num_workers, ..."""
        b, steps = self.batch_size, self.num_batches
        first, _ = self._rank_span()
        # batch k goes to worker k % num_workers; all are full but the last (counted, not
        # looped over: an index may claim any number of samples)
        sizes = [max(0, -(-(steps - w) // num_workers)) * b for w in range(num_workers)]
        if steps:
            last = steps - 1
            sizes[last % num_workers] -= b - min(b, self.num_samples - last * b)
        begin = first + sum(sizes[:worker])
        return self._segments(begin, begin + sizes[worker])

    def _segments(self, a: int, b: int) -> list[Segment]:
        order = self.shard_order()
        counts = self.index.counts
        cum = [0, *itertools.accumulate(counts[k] for k in order)]
        n = cum[-1]
        out: list[Segment] = []
        while a < b:
            p = a % n  # positions past the end repeat the start (training padding)
            k = bisect.bisect_right(cum, p) - 1
            skip = p - cum[k]
            take = min(counts[order[k]] - skip, b - a)
            out.append((order[k], skip, take))
            a += take
        return out

    # iteration ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        done = self.start // self.batch_size
        # DataLoader asks worker 0 for the first batch: after `done` batches that is logical
        # worker done % num_workers, so the batches keep the uninterrupted order.
        return self.iter_worker((worker_id + done) % num_workers, num_workers)

    def iter_worker(self, worker: int, num_workers: int) -> Iterator[tuple[Any, ...]]:
        """The items logical worker `worker` of `num_workers` yields this epoch (after the
        batches skipped by `set_epoch(..., start)`). `__iter__` calls it in each DataLoader
        worker."""
        done = self.start // self.batch_size
        skip = max(0, -(-(done - worker) // num_workers)) * self.batch_size
        offsets = self.index.offsets
        raw: Iterator[ShardSample] = (
            s
            for shard, first, take in self.worker_segments(worker, num_workers)
            for s in _read_shard(self.index, shard, first, take, offsets[shard])
        )
        if self.shuffle:
            wds = _webdataset()
            rng = random.Random(_mixed_seed(self.seed, self.epoch, self.rank, worker, 0x5EED))
            raw = iter(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raw))
        samples = itertools.islice(raw, skip, None)
        # A batch at a time: in the main process the RNG states are saved and restored once per
        # batch (see `_apply`), and the loop never runs between a batch's samples anyway.
        while batch := list(itertools.islice(samples, self.batch_size)):
            with rngs_restored():
                items = [self._item(sample) for sample in batch]
            yield from items

    def _item(self, sample: ShardSample) -> tuple[Any, ...]:
        name = f"{sample.shard}:{sample.key}"
        valid, target = True, 0
        try:
            if sample.problem is not None:
                raise DataError(f"sample '{name}' {sample.problem}")
            target = self._target(sample, name)
            if sample.data is None:
                raise DataError(f"sample '{name}' has no image")
            image, target = self._apply(
                image_for(self.transform, sample.data, name, self.max_pixels), target, sample.index
            )
        except DataError:
            if self.on_bad_image == "error":
                raise
            valid = False
            image, target = self._apply(substitute_image(name), target, sample.index)
        if self.on_bad_image == "error":
            return image, target
        return image, target, valid, sample.index

    def _target(self, sample: ShardSample, name: str) -> int:
        try:
            target = int(sample.cls)  # type: ignore[arg-type]
            if not 0 <= target < len(self.index.classes):
                raise DataError(f"class {target} outside 0..{len(self.index.classes) - 1}")
        except (TypeError, ValueError) as e:
            raise DataError(f"sample '{name}' has no valid class: {e}") from e
        return target if self._label_map is None else self._label_map[target]

    def _apply(self, image: Any, target: Any, index: int) -> tuple[Any, Any]:
        # As `SeededDataset`: augmentations seeded per sample (`iter_worker` restores the main
        # process's RNGs after each batch).
        if self.transform is None and self.target_transform is None:
            return image, target
        seed_all(_mixed_seed(self.seed, self.epoch, index))
        out_image = self.transform(image) if self.transform is not None else image
        out_target = self.target_transform(target) if self.target_transform is not None else target
        return out_image, out_target

    def __repr__(self) -> str:
        return (
            f"ShardDataset({self.index.location!r}, {len(self.index.names)} shards, {self.total} "
            "samples, "
            f"{self.num_classes} classes, rank {self.rank}/{self.world_size}, {self.num_batches} "
            "batches of "
            f"{self.batch_size}, training={self.training})"
        )


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardLoader:
    """Batches of a `ShardDataset`; an `EpochLoader` like `build_loader`'s: `len(loader)`
    (batches per epoch), `set_epoch(epoch, start=...)`, iteration and `dataset`. Workers are
    started for each epoch (they learn the epoch that way)."""

    def __init__(
        self,
        dataset: ShardDataset,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        collate_fn: Any = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = dataset.batch_size
        self.num_workers = num_workers
        self._loader = DataLoader(
            dataset,
            batch_size=dataset.batch_size,
            drop_last=False,  # the dataset already yields whole batches only, when drop_last
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
            persistent_workers=False,
            # Seeds the workers' own RNGs without drawing from the global one.
            generator=torch.Generator().manual_seed(dataset.seed),
            collate_fn=collate_fn,
            worker_init_fn=ignore_stop_signals,
        )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.dataset.set_epoch(epoch, start)

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self._loader)


def build_shard_loader(
    data_dir: str | os.PathLike,
    *,
    transform: Callable | None,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    training: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    split: str | None = None,
    shuffle: bool | None = None,
    drop_last: bool = False,
    shuffle_buffer: int = 1000,
    class_to_idx: dict[str, int] | None = None,
    on_bad_image: OnBadImage = "error",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_transform: Callable | None = None,
    pin_memory: bool | None = None,
) -> tuple[ShardLoader, int]:
    """(loader, batches per epoch on this rank) over a split's shards: `data_dir` is the split's
    shard folder (or URL), or the data folder with `split`. See `ShardDataset` for the rest."""
    dataset = ShardDataset(
        data_dir,
        split,
        transform,
        target_transform,
        training=training,
        shuffle=shuffle,
        batch_size=batch_size,
        drop_last=drop_last,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        class_to_idx=class_to_idx,
        on_bad_image=on_bad_image,
        max_pixels=max_pixels,
    )
    loader = ShardLoader(dataset, num_workers, pin_memory)
    return loader, len(loader)


__all__ = [
    "INDEX_NAME",
    "ShardDataset",
    "ShardIndex",
    "ShardLoader",
    "ShardSample",
    "build_shard_loader",
    "is_shard_dir",
    "is_url",
    "iter_shard_samples",
    "write_shards",
]
