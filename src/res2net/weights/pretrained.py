"""The table of published weights (`pretrained.json`) and the download of one entry.

Each model name maps to a list of entries, one per published file. An entry names its
`source` ("mindcv", "official", "timm", "openmmlab"), the `urls` to fetch it from (primary
first, then mirrors), the `file_name` it is cached under, its `format`, `license`, published
ImageNet-1K `top1`/`top5`, the `eval` transform it was measured with, and where those facts
were read (`verified_from`). Entries whose file name carries a known SHA-256 prefix also have
`sha256_prefix` (with `hash_kind: "sha256"`); downloads and cached copies are checked against it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import urllib.request
from functools import lru_cache
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO
from urllib.error import URLError

import torch.hub

from .. import fileio
from ..errors import CheckpointError
from ..guards import NETWORK_TIMEOUT, interruptible
from ..models.registry import ALIASES, resolve_name

log = logging.getLogger(__name__)

SOURCES = ("mindcv", "official", "timm", "openmmlab")
# Default source order: MindCV's names prefer MindCV's weights; every other name prefers the
# authors' own files, then timm's copies.
_ALIAS_ORDER = ("mindcv", "official", "timm", "openmmlab")
_CANONICAL_ORDER = ("official", "timm", "mindcv", "openmmlab")


@lru_cache(maxsize=1)
def _table() -> dict[str, list[dict[str, Any]]]:
    return json.loads(Path(__file__).with_name("pretrained.json").read_text(encoding="utf-8"))


def pretrained_entries(name: str) -> list[dict[str, Any]]:
    """All published-weight entries for `name` (canonical or MindCV alias); [] if none.

    Unknown names raise the registry's ValueError. The entries are copies: changing them does not
    change the table."""
    return copy.deepcopy(_table().get(resolve_name(name), []))


def select_entry(name: str, source: bool | str = True) -> dict[str, Any]:
    """The entry to use for `name`.

    `source=True` picks the default: for a MindCV name (`res2net50`, ...) MindCV's weights if
    published, else the official file, else timm's; for any other name the official file, then
    timm's, then the others. A source given by name must exist for the model, else ValueError
    listing the sources that do."""
    entries = pretrained_entries(name)
    if not entries:
        raise CheckpointError(
            f"no published weights for {name!r}; load your own with --ckpt_path FILE "
            "(command line) or checkpoint_path=FILE (Python)"
        )
    if source is True:
        order = _ALIAS_ORDER if name in ALIASES else _CANONICAL_ORDER
        return min(entries, key=lambda e: order.index(e["source"]))
    if not isinstance(source, str):
        raise CheckpointError(f"source must be True or one of {', '.join(SOURCES)}; got {source!r}")
    for entry in entries:
        if entry["source"] == source:
            return entry
    available = ", ".join(dict.fromkeys(e["source"] for e in entries))
    raise CheckpointError(f"no {source!r} weights for {name!r}; available sources: {available}")


def eval_transform_args(name: str, source: bool | str = True) -> dict[str, Any]:
    """The evaluation transform (`image_resize`, `crop_pct`, `interpolation`, `mean`, `std`, the
    last two in 0..1 units) under which the selected entry's accuracy was published."""
    return dict(select_entry(name, source)["eval"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reason(err: BaseException) -> str:
    reason = " ".join(str(getattr(err, "reason", None) or err).split()) or type(err).__name__
    code = getattr(err, "code", None)
    return f"HTTP {code} {reason}" if code is not None else reason


def fetch(url: str, target: Path, hash_prefix: str | None = None, progress: bool = False) -> None:
    """Download `url` to `target` (renamed into place only once complete and, with
    `hash_prefix`, verified). Unlike `torch.hub.download_url_to_file` every read has a
    timeout (`NETWORK_TIMEOUT`: a server that accepts and never answers fails instead of
    hanging), and SIGTERM/Ctrl-C interrupt the wait at once."""
    digest = hashlib.sha256()

    def copy(response: Any, f: BinaryIO) -> None:
        size = int(response.headers.get("Content-Length") or 0)
        bar = _progress_bar(size) if progress else None
        while chunk := response.read(1 << 20):
            f.write(chunk)
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if hash_prefix is not None and not digest.hexdigest().startswith(hash_prefix):
            got = digest.hexdigest()[: len(hash_prefix)]
            raise CheckpointError(f"invalid hash value (expected {hash_prefix}, got {got})")

    with interruptible(), urllib.request.urlopen(url, timeout=NETWORK_TIMEOUT) as response:
        fileio.atomic_write(target, lambda f: copy(response, f))


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024)


def download_weights(
    entry: dict[str, Any], cache_dir: str | Path | None = None, progress: bool = False
) -> Path:
    """The local path of `entry`'s file, downloading it if needed.

    Files live in `cache_dir` (default: `torch.hub.get_dir()/checkpoints`) under the entry's
    `file_name`. A cached file is reused when it passes the entry's SHA-256 prefix (or when the
    entry has none); otherwise each URL is tried in order, the download written to a temporary
    file and renamed only once complete and verified. If every URL fails, one RuntimeError names
    them, with the causes, and says how to load the file by hand."""
    directory = (
        Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    )
    fileio.make_directory(directory)
    target = directory / entry["file_name"]
    prefix = entry.get("sha256_prefix")

    if target.is_file():
        if prefix is None or _sha256(target).startswith(prefix):
            return target
        log.warning(
            "%s: cached file does not match SHA-256 prefix %s; downloading it again", target, prefix
        )

    failures: list[str] = []
    offline = True
    for url in entry["urls"]:
        try:
            fetch(url, target, hash_prefix=prefix, progress=progress)
            return target
        except (URLError, HTTPException, OSError, RuntimeError, ValueError) as err:
            offline = offline and isinstance(err, URLError) and not hasattr(err, "code")
            failures.append(f"{url} ({_reason(err)})")
    cause = "this machine seems to be offline or the hosts unreachable; " if offline else ""
    raise CheckpointError(
        f"could not download {entry['file_name']}: tried {'; '.join(failures)}. {cause}"
        "Download the file by hand and load it with --ckpt_path FILE (command line) or "
        "checkpoint_path=FILE (Python)."
    )
