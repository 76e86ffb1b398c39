"""Models on the Hugging Face Hub: a folder timm and this package both load, and its upload.

A model folder holds three files, the layout `timm.create_model("hf-hub:...")` reads:

* `model.safetensors`: the state dict in the official/timm names, with this package's metadata
  (`arch`, `num_classes`, `source`, `eval`) in its header;
* `config.json`: timm's keys (`architecture`, `num_classes`, `label_names`, `pretrained_cfg`
  with the eval transform: `input_size`, `crop_pct`, `interpolation`, `mean`, `std`);
* `README.md`: the model card (Hub metadata in its YAML header, then metrics, recipe, license).

`create_model("hf-hub:org/name")` goes through `huggingface_hub.hf_hub_download`, which reads
the Hub's cache first and works offline (`HF_HUB_OFFLINE=1`) once the files are cached;
`create_model("local-dir:/path")` reads a folder directly, as in timm. Everything read from a
folder is untrusted: the config is size-capped and checked key by key, the weights go through
`load_checkpoint` (safetensors only, never a pickle).
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import fileio
from .errors import CheckpointError, MissingFile
from .guards import read_regular_file
from .models import resolve_name
from .models.base import Res2NetBase
from .weights.convert import DEFAULT_EVAL, write_safetensors
from .weights.loading import MAX_CLASSES

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_PREFIX = "local-dir:"
MAX_CONFIG_BYTES = 8 << 20  # room for 100k label names; anything larger is not a config


def is_hub_name(name: str) -> bool:
    """True for `hf-hub:org/name[@revision]` and `local-dir:/path` model names."""
    return isinstance(name, str) and name.startswith((*HUB_PREFIXES, LOCAL_PREFIX))


def timm_config(
    arch: str,
    num_classes: int,
    *,
    eval_args: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`config.json` in timm's layout; `eval_args` in this package's keys (`image_resize`,
    `crop_pct`, `interpolation`, `mean`, `std` in 0..1 units)."""
    ev = {**DEFAULT_EVAL, **(eval_args or {})}
    size = int(ev["image_resize"])
    config: dict[str, Any] = {
        "architecture": resolve_name(arch),
        "num_classes": int(num_classes),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "crop_pct": float(ev["crop_pct"]),
            "crop_mode": "center",
            "interpolation": str(ev["interpolation"]),
            "mean": [float(m) for m in ev["mean"]],
            "std": [float(s) for s in ev["std"]],
            "num_classes": int(num_classes),
            "classifier": "fc",
        },
    }
    if classes is not None:
        if len(classes) != num_classes:
            raise CheckpointError(
                f"got {len(classes)} class names for a model with {num_classes} classes"
            )
        config["label_names"] = [str(c) for c in classes]
    config.update(extra or {})
    return config


def model_card(
    repo_name: str,
    config: dict[str, Any],
    *,
    metrics: dict[str, float] | None = None,
    recipe: str | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] = (),
) -> str:
    """The model card: the Hub's YAML metadata (through huggingface_hub's `ModelCardData`),
    then what the model is, how to load it, its metrics, recipe and license."""
    from huggingface_hub import ModelCardData

    arch = config["architecture"]
    data = ModelCardData(
        library_name="timm",
        license=license,
        tags=["image-classification", "timm", "res2net"],
        datasets=list(datasets) or None,
        pipeline_tag="image-classification",
    )
    ev = config["pretrained_cfg"]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {repo_name}",
        "",
        f"`{arch}` ({config['num_classes']} classes), a Res2Net image classifier "
        "([Gao et al., TPAMI 2019](https://arxiv.org/abs/1904.01169)).",
        "",
        "## Use",
        "",
        "```python",
        "import res2net, timm",
        f'model = res2net.create_model("hf-hub:{repo_name}")  # or',
        f'model = timm.create_model("hf-hub:{repo_name}", pretrained=True)',
        "```",
        "",
        f"Evaluation transform: resize to {ev['input_size'][1]} / {ev['crop_pct']} "
        f"({ev['interpolation']}), center crop {ev['input_size'][1]}, "
        f"mean {ev['mean']}, std {ev['std']}.",
        "",
    ]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [
            f"| {k} | {v:g} |" if isinstance(v, (int, float)) else f"| {k} | {v} |"
            for k, v in metrics.items()
        ]
        lines.append("")
    if recipe:
        lines += ["## Recipe", "", "```yaml", recipe.rstrip(), "```", ""]
    lines += ["## License", "", f"{license}", ""]
    return "\n".join(lines)


def save_to_folder(
    model: nn.Module,
    folder: str | Path,
    *,
    arch: str,
    repo_name: str | None = None,
    classes: Sequence[str] | None = None,
    eval_args: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    recipe: str | None = None,
    license: str = "apache-2.0",
    source: str = "res2net",
    datasets: Sequence[str] = (),
) -> Path:
    """Write `model` as `model.safetensors` + `config.json` + `README.md` into `folder`: a new
    or empty folder, or one this function wrote before (its files are replaced); any other
    folder holding one of those names is refused, so that nothing of the user's is overwritten."""
    folder = Path(folder)
    _check_replaceable(folder)
    fileio.make_directory(folder)
    for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):  # refused before anything is written
        fileio.check_target(folder / name)
    num_classes = int(getattr(model, "num_classes", 0))
    if num_classes <= 0:
        raise CheckpointError("only classifiers can go to the Hub: the model has no classifier")
    config = timm_config(arch, num_classes, eval_args=eval_args, classes=classes)
    ev = {**DEFAULT_EVAL, **(eval_args or {})}
    state = {
        k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
        for k, v in model.state_dict().items()
    }
    metadata = {
        "arch": config["architecture"],
        "num_classes": str(num_classes),
        "source": source,
        "eval": json.dumps(ev),
    }
    write_safetensors(folder / WEIGHTS_NAME, state, metadata)
    fileio.write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    card = model_card(
        repo_name or f"ORG/{folder.name}",
        config,
        metrics=metrics,
        recipe=recipe,
        license=license,
        datasets=datasets,
    )
    fileio.write_text(folder / CARD_NAME, card)
    return folder


def _check_replaceable(folder: Path) -> None:
    """ValueError when `folder` holds a file `save_to_folder` would write and is not a model
    folder it wrote (whose `model.safetensors` names its architecture)."""
    names = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
    present = [n for n in names if os.path.lexists(folder / n)]
    if not present:
        return
    from .weights.loading import read_metadata

    try:
        ours = "arch" in read_metadata(folder / WEIGHTS_NAME)
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise CheckpointError(
            f"{folder} already holds {', '.join(present)} and is not a model folder this package "
            "wrote: choose a new or empty folder, so that nothing there is overwritten"
        )


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    arch: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Add Res2Net model",
    **folder_kwargs: Any,
) -> str:
    """Upload `model` to the Hub repository `repo_id` (created if missing) as the folder
    `save_to_folder` writes; returns the commit's URL. Other keyword arguments go to
    `save_to_folder` (classes, eval_args, metrics, recipe, license, datasets)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    failures: tuple[type[Exception], ...] = (HfHubHTTPError, OSError, *_http_client_errors())
    with fileio.scratch_directory() as tmp:
        save_to_folder(model, tmp, arch=arch, repo_name=repo_id, **folder_kwargs)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, commit_message=commit_message
            )
        except OfflineModeIsEnabled:
            raise CheckpointError(
                f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it to upload"
            ) from None
        except failures as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"could not push to {repo_id} ({reason}); check the network and your token "
                "(`hf auth login` or HF_TOKEN), or write the folder with save_to_folder "
                "and upload it later"
            ) from None
    return str(getattr(info, "commit_url", info))


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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{path}: needs a JSON object with an 'architecture' name")
    resolve_name(config["architecture"])  # unknown names fail listing the close ones
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
        from .data.transforms import interpolation_mode

        interpolation_mode(str(cfg["interpolation"]))  # unknown names fail here
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


def load_from_hub(
    name: str, *, num_classes: int | None = None, cache_dir: str | Path | None = None, **kwargs: Any
) -> Res2NetBase:
    """The model behind `hf-hub:org/name[@rev]` or `local-dir:/path`, with its weights; the
    folder's config is kept as `model.hub_config` (label names, eval transform).
    `num_classes` other than the folder's gives a new head (fine-tuning). The weights must be
    safetensors, and without `num_classes` their classifier must have the config's class count
    before a model is built with it: a small config cannot size a huge classifier."""
    from .factory import create_model
    from .weights.loading import checkpoint_num_classes, detect_format

    folder = hub_folder(name, cache_dir)
    config = read_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingFile(f"{folder}: no {WEIGHTS_NAME} there")
    if detect_format(weights) != "safetensors":
        raise CheckpointError(
            f"{weights}: not a safetensors file; a model folder's weights must be"
        )
    if num_classes is None:  # the config's count sizes the classifier: checked against the file's
        n = checkpoint_num_classes(weights, config["architecture"])
        if n != config["num_classes"]:
            raise CheckpointError(
                f"{folder / CONFIG_NAME}: 'num_classes' is {config['num_classes']} but the "
                f"classifier in {WEIGHTS_NAME} has {n or 'no'} classes; the folder is inconsistent"
            )
    classes = {} if num_classes is None else {"num_classes": num_classes}
    model = create_model(
        config["architecture"],
        checkpoint_path=weights,
        **({"num_classes": config["num_classes"]} | classes),
        **kwargs,
    )
    model.hub_config = config
    return model
