"""Reading a Hugging Face Hub model folder (`hf-hub:org/name[@revision]` or `local-dir:/path`):
where its files are, and its `config.json`, checked key by key (everything read from a folder is
untrusted). `read_checkpoint` builds a `Checkpoint` from it; `res2net.hub` writes such folders.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

from ..data.transforms import interpolation_mode
from ..errors import CheckpointError, MissingFile
from ..guards import read_regular_file
from ..models import resolve_name
from .entry import DEFAULT_EVAL
from .formats import MAX_CLASSES

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_PREFIX = "local-dir:"
MAX_CONFIG_BYTES = 8 << 20  # room for 100k label names; anything larger is not a config


def is_hub_name(name: str) -> bool:
    """True for `hf-hub:org/name[@revision]` and `local-dir:/path` model names."""
    return isinstance(name, str) and name.startswith((*HUB_PREFIXES, LOCAL_PREFIX))


def _http_client_errors() -> tuple[type[Exception], ...]:
    """The connection errors of the HTTP client huggingface_hub uses (httpx, httpx2 or requests,
    depending on its release), so that an unreachable Hub is one line, not a traceback."""
    errors: list[type[Exception]] = []
    for module, name in (
        ("httpx", "HTTPError"),
        ("httpx2", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _split_revision(spec: str) -> tuple[str, str | None]:
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def hub_folder(name: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder behind `hf-hub:org/name[@rev]` (its files fetched into, or read from,
    the Hub cache) or `local-dir:/path`."""
    if name.startswith(LOCAL_PREFIX):
        folder = Path(name[len(LOCAL_PREFIX) :]).expanduser()
        if not (folder / CONFIG_NAME).is_file():
            raise MissingFile(f"{folder}: no {CONFIG_NAME} there; is it a model folder?")
        return folder
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    spec = name.split(":", 1)[1]
    repo_id, revision = _split_revision(spec)
    paths = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        _check_reachable(repo_id, filename, revision, cache_dir)
        try:
            paths.append(
                Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))
            )
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"{repo_id}: {filename} is not in the Hub cache and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1); connect once to download it, or use local-dir:PATH"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"could not get {filename} of {repo_id} from the Hub ({reason})"
            ) from None
    if paths[0].parent != paths[1].parent:
        raise CheckpointError(f"{repo_id}: config and weights come from different snapshots")
    return paths[0].parent


def _check_reachable(
    repo_id: str, filename: str, revision: str | None, cache_dir: str | Path | None
) -> None:
    """For a file not in the Hub cache, one HEAD request without retries, so that an unreachable
    Hub fails at once: `hf_hub_download` retries such a file for about 25 s, logging each try."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    if isinstance(cached, str) or constants.HF_HUB_OFFLINE:
        return  # hf_hub_download reads the cache, or says the file is not there
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        get_hf_file_metadata(url)
    except HfHubHTTPError:
        return  # the Hub answered (no such repo, no access...): hf_hub_download says so
    except _http_client_errors() as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{repo_id}: {filename} is not in the Hub cache and {url} cannot be reached "
            f"({reason}); connect once to download it, or use local-dir:PATH"
        ) from None


def read_config(folder: str | Path) -> dict[str, Any]:
    """`config.json` of a model folder, checked: a JSON object naming a known architecture,
    a class count, an optional list of that many label names and a sane eval transform."""
    path = Path(folder) / CONFIG_NAME
    text = read_regular_file(path, "model config", MAX_CONFIG_BYTES)  # no pipes or devices
    try:
        config = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # also too deep, or an integer of 5,000 digits
        reason = str(e).splitlines()[0][:100] if str(e) else "nested too deeply"
        raise CheckpointError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{path}: needs a JSON object with an 'architecture' name")
    try:
        resolve_name(config["architecture"])  # unknown names fail listing the close ones
    except ValueError as e:
        raise CheckpointError(f"{path}: 'architecture': {e}") from None
    n = config.get("num_classes")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_CLASSES:
        raise CheckpointError(
            f"{path}: 'num_classes' must be an integer in 1..{MAX_CLASSES}, not {n!r}"
        )
    labels = config.get("label_names")
    if labels is not None and not (
        isinstance(labels, list) and len(labels) == n and all(isinstance(x, str) for x in labels)
    ):
        raise CheckpointError(f"{path}: 'label_names' must be a list of {n} strings")
    eval_args(config, path)  # checked now rather than when first used
    return config


def eval_args(config: dict[str, Any], where: str | Path = CONFIG_NAME) -> dict[str, Any]:
    """This package's eval-transform keys from a config's `pretrained_cfg` (timm's keys)."""
    cfg = config.get("pretrained_cfg") or {}
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: 'pretrained_cfg' must be an object")
    out = dict(DEFAULT_EVAL)
    size = cfg.get("input_size")
    if size is not None:
        if not (
            isinstance(size, list)
            and len(size) == 3
            and all(isinstance(s, int) for s in size)
            and 16 <= size[1] <= 4096
            and size[1] == size[2]
        ):
            raise CheckpointError(
                f"{where}: 'input_size' must be [3, S, S] with 16 <= S <= 4096, not {size!r}"
            )
        out["image_resize"] = size[1]
    if "crop_pct" in cfg:
        pct = cfg["crop_pct"]
        if not isinstance(pct, (int, float)) or not 0 < pct <= 1:
            raise CheckpointError(f"{where}: 'crop_pct' must be in (0, 1], not {pct!r}")
        out["crop_pct"] = float(pct)
    if "interpolation" in cfg:
        try:
            interpolation_mode(str(cfg["interpolation"]))
        except ValueError:
            raise CheckpointError(
                f"{where}: 'interpolation' {str(cfg['interpolation'])[:40]!r} is not a name "
                "torchvision knows"
            ) from None
        out["interpolation"] = str(cfg["interpolation"])
    for key in ("mean", "std"):
        if key in cfg:
            v = cfg[key]
            if not (
                isinstance(v, list)
                and len(v) == 3
                and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
            ):
                raise CheckpointError(f"{where}: {key!r} must be three numbers, not {v!r}")
            if key == "std" and min(v) <= 0:
                raise CheckpointError(f"{where}: 'std' must be positive, not {v!r}")
            out[key] = [float(x) for x in v]
    return out
