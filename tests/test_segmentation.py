"""Segmentation: dilated backbones at output stride 8/16 with torchvision's DeepLabV3 and FCN
heads, their output dict, and a training step."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torchvision.models.segmentation import FCN, DeepLabV3

from res2net.models import Res2Net
from res2net.segmentation import deeplabv3_res2net50, fcn_res2net50, segmentation_backbone

SIZE = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_trunk(output_stride: int) -> Res2Net:
    return Res2Net(
        layers=(1, 1, 1, 1), base_width=4, scale=4, output_stride=output_stride, out_indices=(3, 4)
    )


def test_backbone_from_name_is_dilated():
    body = segmentation_backbone("res2net50", output_stride=16)
    assert (body.out_channels, body.aux_channels, body.output_stride) == (2048, 1024, 16)
    assert body.body.layer4[0].convs[0].stride == (1, 1) and body.body.layer4[1].convs[
        0
    ].dilation == (2, 2)
    with torch.no_grad():
        out = body(torch.rand(1, 3, SIZE, SIZE))
    assert list(out) == ["out", "aux"]
    assert out["out"].shape == (1, 2048, 4, 4) and out["aux"].shape == (1, 1024, 4, 4)
    with pytest.raises(ValueError, match="output_stride"):
        segmentation_backbone("res2net50", output_stride=4)


@pytest.mark.parametrize("output_stride, rate", [(8, 12), (16, 6)])
def test_deeplabv3_train_step(output_stride, rate):
    torch.manual_seed(0)
    model = deeplabv3_res2net50(
        5, output_stride=output_stride, aux_loss=True, backbone=tiny_trunk(output_stride)
    )
    assert isinstance(model, DeepLabV3)
    assert model.classifier[0].convs[1][0].dilation == (rate, rate)  # ASPP rates follow the stride
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, SIZE, SIZE))
    assert feats["out"].shape[-1] == SIZE // output_stride

    x = torch.rand(2, 3, SIZE, SIZE)
    target = torch.randint(0, 5, (2, SIZE, SIZE))
    model.train()
    out = model(x)
    assert list(out) == ["out", "aux"]
    assert out["out"].shape == (2, 5, SIZE, SIZE) and out["aux"].shape == (2, 5, SIZE, SIZE)
    loss = F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0


def test_fcn_train_step_and_eval_output():
    torch.manual_seed(0)
    model = fcn_res2net50(3, output_stride=8, backbone=tiny_trunk(8))
    assert isinstance(model, FCN) and model.aux_classifier is None
    x = torch.rand(2, 3, SIZE, SIZE)
    model.train()
    out = model(x)
    assert list(out) == ["out"] and out["out"].shape == (2, 3, SIZE, SIZE)
    F.cross_entropy(out["out"], torch.randint(0, 3, (2, SIZE, SIZE))).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 48, 40))
    assert list(out) == ["out"] and out["out"].shape == (1, 3, 48, 40)
