"""Detection backbones: the FPN's maps, frozen stages and frozen BatchNorm, checkpoint loading,
and a training step and inference of each torchvision detector on synthetic boxes and masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import res2net
from res2net.detection import (
    fasterrcnn_res2net50_fpn,
    fcos_res2net50_fpn,
    freeze_batchnorm,
    freeze_stages,
    maskrcnn_res2net50_fpn,
    res2net_fpn_backbone,
    retinanet_res2net50_fpn,
)
from res2net.models import DLA, Res2Net

SIZE = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_trunk() -> Res2Net:
    return Res2Net(layers=(1, 1, 1, 1), base_width=4, scale=4, out_indices=(1, 2, 3, 4))


def tiny_dla() -> DLA:
    return DLA(
        levels=(1, 1, 1, 1, 1, 1),
        channels=(8, 16, 32, 64, 128, 256),
        base_width=16,
        out_indices=(2, 3, 4),
    )


def trainable_roots(module: nn.Module) -> set[str]:
    return {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}


def test_backbone_from_name_maps_and_frozen_parts():
    fpn = res2net_fpn_backbone("res2net50")
    assert fpn.out_channels == 256
    assert fpn.in_channels_list == [256, 512, 1024, 2048]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in fpn.body.modules()) > 0
    assert trainable_roots(fpn.body) == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for p in fpn.fpn.parameters())
    with torch.no_grad():
        out = fpn(torch.rand(1, 3, SIZE, SIZE))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 256, s, s) for s in (16, 8, 4, 2, 1)]


@pytest.mark.parametrize(
    "trainable, expected",
    [
        (0, set()),
        (1, {"layer4"}),
        (3, {"layer2", "layer3", "layer4"}),
        (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
    ],
)
def test_trainable_layers_res2net(trainable, expected):
    model = Res2Net(layers=(1, 1, 1, 1), base_width=4, out_indices=(1, 2, 3, 4), num_classes=0)
    freeze_stages(model, trainable)
    assert trainable_roots(model) == expected  # bn1 has parameters while not frozen


def test_trainable_layers_dla_and_unused_stages():
    model = tiny_dla()
    freeze_stages(model, 5)
    assert trainable_roots(model) == {f"level{i}" for i in range(6)} | {"base_layer"}
    freeze_stages(model, 2)
    assert trainable_roots(model) == {"level4", "level5"}
    freeze_stages(model, 2, last_stage=3)  # level5 is unused when the FPN stops at stage 3
    assert trainable_roots(model) == {"level4"}
    with pytest.raises(ValueError, match="0..5"):
        freeze_stages(model, 6)


def test_dla_backbone_with_p6p7():
    fpn = res2net_fpn_backbone(
        tiny_dla(), returned_layers=(2, 3, 4), extra_blocks=LastLevelP6P7(64, 64), out_channels=64
    )
    with torch.no_grad():
        out = fpn(torch.rand(1, 3, SIZE, SIZE))
    assert list(out) == ["0", "1", "2", "p6", "p7"]
    assert [v.shape[-1] for v in out.values()] == [8, 4, 2, 1, 1]
    assert all(v.shape[1] == 64 for v in out.values())


def test_frozen_batchnorm_matches_batchnorm_in_eval():
    model = tiny_trunk()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.eval()(x)
        out = freeze_batchnorm(model).train()(x)  # frozen: train mode changes nothing
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_norm_bn_and_bad_arguments():
    fpn = res2net_fpn_backbone(tiny_trunk(), norm="bn")
    assert any(isinstance(m, nn.BatchNorm2d) for m in fpn.body.modules())
    with pytest.raises(ValueError, match="norm"):
        res2net_fpn_backbone(tiny_trunk(), norm="gn")
    with pytest.raises(ValueError, match="returned_layers"):
        res2net_fpn_backbone(tiny_trunk(), returned_layers=(0, 1))
    with pytest.raises(ValueError, match="features_only"):
        res2net_fpn_backbone(Res2Net(layers=(1, 1, 1, 1), base_width=4, num_classes=3))


def test_checkpoint_loads_into_the_trunk(tmp_path, tiny_arch):
    classifier = res2net.create_model(tiny_arch, num_classes=10)
    with torch.no_grad():
        classifier.layer3[0].bn1.running_var.fill_(2.0)
    torch.save(classifier.state_dict(), tmp_path / "r50.pth")
    fpn = res2net_fpn_backbone(tiny_arch, checkpoint_path=tmp_path / "r50.pth")
    torch.testing.assert_close(fpn.body.layer4[0].conv1.weight, classifier.layer4[0].conv1.weight)
    frozen = fpn.body.layer3[0].bn1
    assert isinstance(frozen, FrozenBatchNorm2d)
    assert torch.all(frozen.running_var == 2.0)


# ---------------------------------------------------------------------------------------------
# The detectors


def synthetic_batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    boxes = torch.tensor([[4.0, 8.0, 30.0, 44.0], [26.0, 20.0, 60.0, 56.0]])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[k, y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    return images, [target, {k: v.clone() for k, v in target.items()}]


RCNN_KW = dict(
    min_size=SIZE,
    max_size=SIZE,
    rpn_pre_nms_top_n_train=100,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50,
    rpn_batch_size_per_image=64,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
    box_score_thresh=0.0,
)
ONE_STAGE_KW = dict(min_size=SIZE, max_size=SIZE, detections_per_img=10, score_thresh=0.0)

RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
DETECTORS = {
    "fasterrcnn": (fasterrcnn_res2net50_fpn, RCNN_KW, RCNN_LOSSES),
    "maskrcnn": (maskrcnn_res2net50_fpn, RCNN_KW, RCNN_LOSSES | {"loss_mask"}),
    "retinanet": (retinanet_res2net50_fpn, ONE_STAGE_KW, {"classification", "bbox_regression"}),
    "fcos": (
        fcos_res2net50_fpn,
        ONE_STAGE_KW,
        {"classification", "bbox_regression", "bbox_ctrness"},
    ),
}


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_detector_train_step_and_inference(kind):
    builder, kwargs, loss_names = DETECTORS[kind]
    torch.manual_seed(0)
    model = builder(3, backbone=tiny_trunk(), **kwargs)
    body = model.backbone.body
    frozen_stats = {k: v.clone() for k, v in body.state_dict().items() if "running" in k}
    images, targets = synthetic_batch()

    model.train()
    losses = model(images, targets)
    assert set(losses) == loss_names
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    for name, p in body.named_parameters():
        if name.split(".")[0] in ("layer2", "layer3", "layer4"):
            assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body.layer2.parameters())
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.body.")]
    assert all(p.grad is not None for p in heads)
    for k, v in body.state_dict().items():  # FrozenBatchNorm2d statistics do not move in training
        if k in frozen_stats:
            assert torch.equal(v, frozen_stats[k]), k

    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert isinstance(detections, list) and len(detections) == 2
    expected_keys = {"boxes", "labels", "scores"} | ({"masks"} if kind == "maskrcnn" else set())
    for det in detections:
        assert set(det) == expected_keys
        n = det["boxes"].shape[0]
        assert 0 < n <= 10
        assert (
            det["boxes"].shape == (n, 4)
            and det["scores"].shape == (n,)
            and det["labels"].shape == (n,)
        )
        assert (
            det["labels"].dtype == torch.int64
            and det["labels"].min() >= 0
            and det["labels"].max() < 3
        )
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= SIZE
        if kind == "maskrcnn":
            assert det["masks"].shape == (n, 1, SIZE, SIZE)


def test_frozen_bn_trunk_is_built_frozen_and_loads_bn_weights(tmp_path, tiny_arch):
    """A named trunk is built with `norm_layer=FrozenBatchNorm2d` (no BatchNorm2d ever exists) and
    still loads a checkpoint written from a BatchNorm model."""
    source = res2net.create_model(tiny_arch, num_classes=10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    fpn = res2net_fpn_backbone(tiny_arch, checkpoint_path=tmp_path / "w.pth")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fpn.body.modules())
    assert torch.equal(fpn.body.layer2[0].bn1.running_var, source.layer2[0].bn1.running_var)
