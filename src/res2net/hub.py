"""Models on the Hugging Face Hub: a folder timm and this package both load, and its upload.

A model folder holds three files, the layout `timm.create_model("hf-hub:...")` reads:

* `model.safetensors`: the state dict in the official/timm names, with this package's metadata
  (`arch`, `num_classes`, `source`, `eval`) in its header;
* `config.json`: timm's keys (`architecture`, `num_classes`, `label_names`, `pretrained_cfg`
  with the eval transform: `input_size`, `crop_pct`, `interpolation`, `mean`, `std`);
* `README.md`: the model card (Hub metadata in its YAML header, then metrics, recipe, license).

Reading such a folder (`hf-hub:org/name`, `local-dir:/path`) is `weights.hubfolder`'s, and
`read_checkpoint` / `create_model` take those names.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from . import fileio
from .errors import CheckpointError, FileRefused
from .models import resolve_name
from .weights.convert import write_safetensors
from .weights.entry import DEFAULT_EVAL
from .weights.hubfolder import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, _http_client_errors

# The most of a `model.safetensors` header `check_folder` reads (a model's is tens of KB).
MAX_HEADER_BYTES = 4 << 20


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
    folder = check_folder(folder)  # refused before anything is written
    fileio.make_directory(folder)
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


def check_folder(folder: str | Path) -> Path:
    """`folder` when `save_to_folder` may write there: a new or empty folder, or one it wrote
    before (its `model.safetensors` header names an architecture). Checked before any work
    whose result goes there: a link, pipe or folder at one of the three names is FileRefused
    naming it, and a folder of someone else's files a CheckpointError, so nothing of the user's
    is overwritten."""
    folder = Path(folder)
    names = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)
    for name in names:
        fileio.check_target(folder / name)
    present = [n for n in names if os.path.lexists(folder / n)]
    if present and _written_arch(folder / WEIGHTS_NAME) is None:
        raise CheckpointError(
            f"{folder} already holds {', '.join(present)} and is not a model folder this package "
            "wrote: choose a new or empty folder, so that nothing there is overwritten"
        )
    return folder


def _written_arch(path: Path) -> str | None:
    """The `arch` that the `.safetensors` header of `path` names (what `save_to_folder`
    writes), or None. Only the header is read, within `MAX_HEADER_BYTES`, from the file at the
    name itself (`fileio.open_read`: never through a link, never blocked by a named pipe)."""
    try:
        with fileio.open_read(path) as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            if not 0 < n <= MAX_HEADER_BYTES:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except FileRefused:  # a pipe or link swapped in since the check by name: named
        raise
    except (OSError, ValueError, RecursionError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    arch = metadata.get("arch") if isinstance(metadata, dict) else None
    return arch if isinstance(arch, str) and arch else None


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
