"""What every Res2Net classifier offers on top of its stages: the pooled head, a replaceable
classifier, and the feature-map ("features_only") mode used by detection and segmentation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .layers import check_out_indices


class Res2NetBase(nn.Module):
    """A net whose body is five steps (stem at stride 2, then four stages at strides 4..32).

    Subclasses build their layers, set `feature_info` (channels and stride of the five maps) and
    `num_features`, implement `forward_stages`, and call `_build_head`. With
    `out_indices` set (features_only), there is no head and `forward` returns the chosen maps.
    """

    feature_info: list[dict[str, int]]
    num_features: int
    # set by create_model (models/ knows nothing of weights/): the published entry it loaded
    # (a `weights.entry.Weights`), and a Hub model folder's config.json
    pretrained_weights: Any
    hub_config: dict[str, Any]

    def _build_head(
        self, num_classes: int, drop_rate: float, out_indices: tuple[int, ...] | None, conv_fc: bool
    ) -> None:
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.out_indices = None if out_indices is None else check_out_indices(out_indices)
        self.conv_fc = conv_fc
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = None if self.out_indices is not None else self._make_fc(num_classes)

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if self.conv_fc:  # DLA's published weights hold the classifier as a 1x1 conv
            return nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True)
        return nn.Linear(self.num_features, num_classes)

    @property
    def feature_channels(self) -> list[int]:
        """Channel counts of the maps `forward` returns in features_only mode."""
        idx = self.out_indices if self.out_indices is not None else range(5)
        return [self.feature_info[i]["num_chs"] for i in idx]

    @property
    def feature_reductions(self) -> list[int]:
        """Strides of the maps `forward` returns in features_only mode."""
        idx = self.out_indices if self.out_indices is not None else range(5)
        return [self.feature_info[i]["reduction"] for i in idx]

    def forward_stages(self, x: torch.Tensor, last: int = 4) -> list[torch.Tensor]:
        """Return the maps after the stem (index 0) and each stage up to index `last`."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (stride 32 unless dilated)."""
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout, classifier; `pre_logits` stops before the classifier."""
        if self.fc is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        x = F.adaptive_avg_pool2d(x, 1)
        if pre_logits:
            return x.flatten(1)
        x = self.head_drop(x)
        if isinstance(self.fc, nn.Conv2d):
            return self.fc(x).flatten(1)
        return self.fc(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.out_indices is not None:
            maps = self.forward_stages(x, max(self.out_indices))
            return [maps[i] for i in self.out_indices]
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module | None:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` (0 = none)."""
        if self.fc is None:
            raise RuntimeError("this model was built with features_only=True and has no head")
        device = next(self.parameters()).device
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes).to(device)
