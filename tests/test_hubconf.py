"""hubconf.py: every zoo model through torch.hub.load(..., source="local")."""

from pathlib import Path

import torch

import res2net
from res2net.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def test_hubconf_has_every_zoo_model() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    entries = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert entries == res2net.list_models()
    assert "checkpoint_path" in hub.res2net101_v1b.__doc__


def test_hub_load_builds_and_loads_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.hub.load(str(REPO), "res2net50", source="local", num_classes=4)
    assert model.fc.out_features == 4 and model.pretrained_weights is None
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    loaded = torch.hub.load(
        str(REPO), "res2net50", source="local", checkpoint_path=str(path), num_classes=4
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    features = torch.hub.load(str(REPO), "dla60_res2next", source="local", features_only=True)
    assert len(features(torch.randn(1, 3, 64, 64))) == 4


def test_hub_pretrained_offline_names_the_command_line_too(monkeypatch, tmp_path: Path) -> None:
    from urllib.error import URLError

    def offline(url: str, dst: str, **kwargs: object) -> None:
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    try:
        torch.hub.load(str(REPO), "res2net50", source="local", pretrained=True)
    except CheckpointError as e:
        assert "offline" in str(e) and "--ckpt_path" in str(e) and "checkpoint_path=" in str(e)
    else:
        raise AssertionError("an offline download must fail")
