"""The table of published weights and their download, with local files only."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.error import URLError

import pytest
import torch.hub

from res2net.errors import CheckpointError
from res2net.models import ALIASES, ARCHITECTURES
from res2net.weights import pretrained as pt
from res2net.weights.pretrained import (
    SOURCES,
    download_weights,
    eval_transform_args,
    pretrained_entries,
    select_entry,
)

TABLE = pt._table()
ENTRIES = [(name, e) for name, entries in TABLE.items() for e in entries]
REQUIRED = {
    "source",
    "urls",
    "file_name",
    "format",
    "license",
    "top1",
    "top5",
    "eval",
    "verified_from",
}
EVAL_KEYS = {"image_resize", "crop_pct", "interpolation", "mean", "std"}


# --- the table ------------------------------------------------------------------------------


def test_keys_are_canonical_registry_names() -> None:
    assert TABLE, "the table is empty"
    assert set(TABLE) <= set(ARCHITECTURES)
    assert all(TABLE[name] for name in TABLE), "a model listed without entries"


@pytest.mark.parametrize(
    "name,entry", ENTRIES, ids=[f"{n}-{e['source']}-{e['file_name']}" for n, e in ENTRIES]
)
def test_entry_schema(name: str, entry: dict) -> None:
    assert REQUIRED <= set(entry), REQUIRED - set(entry)
    assert entry["source"] in SOURCES
    assert entry["format"] in {"mindspore", "torch", "safetensors"}
    assert entry["urls"] and all(u.startswith("https://") for u in entry["urls"])
    assert len(set(entry["urls"])) == len(entry["urls"])
    assert "/" not in entry["file_name"] and entry["file_name"].strip() == entry["file_name"]
    assert isinstance(entry["license"], str) and entry["license"]
    assert isinstance(entry["verified_from"], str) and entry["verified_from"]
    assert 50.0 < entry["top1"] < entry["top5"] < 100.0
    ev = entry["eval"]
    assert set(ev) == EVAL_KEYS
    assert ev["image_resize"] == 224 and 0.5 < ev["crop_pct"] <= 1.0
    assert ev["interpolation"] in {"bilinear", "bicubic"}
    assert len(ev["mean"]) == len(ev["std"]) == 3
    assert all(0.0 < v < 1.0 for v in (*ev["mean"], *ev["std"])), "mean/std must be in 0..1 units"
    if "recipe" in entry:
        assert entry["recipe"].startswith("https://")
    if "sha256_prefix" in entry:
        assert entry.get("hash_kind") == "sha256"
        assert re.fullmatch(r"[0-9a-f]{8,64}", entry["sha256_prefix"])
        assert f"-{entry['sha256_prefix']}" in entry["file_name"]
    else:
        assert "hash_kind" not in entry
    if entry["source"] == "mindcv":
        assert entry["format"] == "mindspore" and entry["notes"] == "MindSpore checkpoint"


def test_cache_file_names_are_unique() -> None:
    # Entries share one cache folder, so two different files must never share a name.
    names = [e["file_name"] for _, e in ENTRIES]
    assert len(names) == len(set(names))


def test_published_numbers() -> None:
    def top1(name: str, source: str) -> float:
        return select_entry(name, source)["top1"]

    assert top1("res2net50", "mindcv") == 79.33
    assert select_entry("res2net50", "mindcv")["file_name"] == "res2net50-aa758355-910v2.ckpt"
    assert top1("res2net101", "mindcv") == 79.56
    assert top1("res2net50_v1b", "mindcv") == 80.32
    assert top1("res2net101_v1b", "mindcv") == 81.14
    assert top1("res2net50_26w_4s", "official") == 77.99
    assert top1("res2net50_v1b_26w_4s", "official") == 80.27
    assert top1("res2net101_v1b_26w_4s", "official") == 81.23


# --- lookup ---------------------------------------------------------------------------------


def test_aliases_share_the_canonical_entries() -> None:
    for alias, canonical in ALIASES.items():
        assert pretrained_entries(alias) == pretrained_entries(canonical)


def test_entries_are_copies() -> None:
    pretrained_entries("res2net50")[0]["urls"].clear()
    assert pretrained_entries("res2net50")[0]["urls"]


def test_no_weights_and_unknown_names() -> None:
    assert pretrained_entries("res2net152_26w_4s") == []
    with pytest.raises(ValueError, match="no published weights"):
        select_entry("res2net152")
    with pytest.raises(ValueError, match="unknown model"):
        pretrained_entries("res2net999")


def test_default_source() -> None:
    # MindCV's names get MindCV's weights; every other name the authors' files first.
    assert select_entry("res2net50")["source"] == "mindcv"
    assert select_entry("res2net101_v1b")["source"] == "mindcv"
    assert select_entry("res2net50_26w_4s")["source"] == "official"
    assert select_entry("res2net101_26w_4s", True)["source"] == "official"
    assert select_entry("dla60_res2next")["source"] == "official"


def test_named_source() -> None:
    entry = select_entry("res2net50_26w_4s", "timm")
    assert entry["format"] == "safetensors"
    assert (
        entry["urls"][0]
        == "https://huggingface.co/timm/res2net50_26w_4s.in1k/resolve/main/model.safetensors"
    )
    assert select_entry("res2net50_14w_8s", "openmmlab")["sha256_prefix"] == "bc967bf1"
    with pytest.raises(ValueError, match=r"available sources: mindcv, official$"):
        select_entry("res2net50_v1b", "timm")
    with pytest.raises(ValueError, match="available sources"):
        select_entry("res2next50", "nonsense")
    with pytest.raises(ValueError, match="source must be"):
        select_entry("res2next50", 3)  # type: ignore[arg-type]


def test_eval_transform_args() -> None:
    args = eval_transform_args("res2net50", True)
    assert args == select_entry("res2net50")["eval"]
    assert args["crop_pct"] == 0.875 and args["mean"] == [0.485, 0.456, 0.406]
    args["crop_pct"] = 1.0
    assert eval_transform_args("res2net50")["crop_pct"] == 0.875


# --- download, local files only ---------------------------------------------------------------


@pytest.fixture
def payload(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "served" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(b"res2net weights" * 1000)
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def _entry(urls: list[str], prefix: str | None = None) -> dict:
    entry = {"source": "official", "urls": urls, "file_name": "model-x.pth"}
    if prefix is not None:
        entry["sha256_prefix"] = prefix
    return entry


def _forbid_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(pt, "fetch", fail)


def test_download_verifies_and_caches(
    payload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, digest = payload
    cache = tmp_path / "cache"
    entry = _entry([src.as_uri()], digest[:8])
    path = download_weights(entry, cache_dir=cache)
    assert path == cache / "model-x.pth" and path.read_bytes() == src.read_bytes()
    assert [p.name for p in cache.iterdir()] == ["model-x.pth"], "no partial files left behind"

    _forbid_download(monkeypatch)
    assert download_weights(entry, cache_dir=cache) == path


def test_download_without_prefix_reuses_any_cached_file(
    payload, tmp_path: Path, monkeypatch
) -> None:
    src, _ = payload
    (tmp_path / "model-x.pth").write_bytes(b"already here")
    _forbid_download(monkeypatch)
    assert (
        download_weights(_entry([src.as_uri()]), cache_dir=tmp_path).read_bytes() == b"already here"
    )


def test_download_default_cache_dir(
    payload, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, digest = payload
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = download_weights(_entry([src.as_uri()], digest[:8]))
    assert path == tmp_path / "hub" / "checkpoints" / "model-x.pth" and path.is_file()


def test_wrong_hash_is_an_error(payload, tmp_path: Path) -> None:
    src, digest = payload
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "f" * 8
    with pytest.raises(CheckpointError, match="invalid hash value") as info:
        download_weights(_entry([src.as_uri()], wrong), cache_dir=tmp_path / "cache")
    assert src.as_uri() in str(info.value) and "checkpoint_path=" in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == [], "a file that fails its hash must not be kept"


def test_stale_cached_file_is_replaced(payload, tmp_path: Path) -> None:
    src, digest = payload
    (tmp_path / "model-x.pth").write_bytes(b"corrupt")
    path = download_weights(_entry([src.as_uri()], digest[:8]), cache_dir=tmp_path)
    assert path.read_bytes() == src.read_bytes()


def test_mirror_used_when_primary_fails(payload, tmp_path: Path) -> None:
    src, digest = payload
    missing = (tmp_path / "nowhere.bin").as_uri()
    path = download_weights(
        _entry([missing, src.as_uri()], digest[:8]), cache_dir=tmp_path / "cache"
    )
    assert path.read_bytes() == src.read_bytes()


def test_offline_error_names_every_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    def offline(url: str, dst: str, hash_prefix=None, progress=True) -> None:
        tried.append(url)
        raise URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(pt, "fetch", offline)
    urls = ["https://primary.example/model-x.pth", "https://mirror.example/model-x.pth"]
    with pytest.raises(CheckpointError) as info:
        download_weights(_entry(urls, "abcdef12"), cache_dir=tmp_path)
    message = str(info.value)
    assert tried == urls
    assert "\n" not in message
    assert all(u in message for u in urls)
    assert "checkpoint_path=" in message and "by hand" in message
    assert "offline" in message and "name resolution" in message
    assert not (tmp_path / "model-x.pth").exists()
