"""MindCV's auto-augment policies, form by form, on the PIL and the uint8 tensor path.

MindCV's policies (mindcv/data/auto_augment.py) are a port of timm's `timm.data.auto_augment`,
built by mindcv/data/transforms_factory.py with these arguments, restated here:

* hparams: `translate_const=int(min(image_resize) * 0.45)`, `img_mean=round(mean)` (0..255) as
  the fill, `interpolation` the recipe's (bilinear for names MindSpore's Inter lacks);
* randaug, autoaug, autoaugr, 3a: `hparams.setdefault("magnitude_std", 0.5)` before the string
  is read, so the magnitude noise is always 0.5 and `mstd` has no effect;
* randaug: MindCV's 14 ops (timm's list less SolarizeAdd), `inc` with any value selects the
  increasing ones; "autoaug"/"autoaugr" are timm's "original"/"originalr";
* augmix: `translate_pct=0.3`, magnitudes drawn uniformly;
* trivialaugwide: MindCV's own (below), which neither timm nor torchvision has.
"""

from __future__ import annotations

import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_aa
from torchvision.transforms import v2

from res2net.data.transforms import (
    IMAGENET_MEAN,
    TrivialAugmentWide,
    auto_augment_transform,
    train_transform,
)
from res2net.schema import parse_auto_augment

SIZE = 16
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8))

# MindCV's RandAugment op names (its TranslateX/Y are relative: timm's TranslateX/YRel)
MINDCV_RAND_OPS = [
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
]


def mindcv_hparams(resample=Image.Resampling.BICUBIC, **extra):
    """What MindCV's create_transforms hands the policy for a SIZE crop, ImageNet mean."""
    return dict(
        translate_const=int(SIZE * 0.45),
        img_mean=tuple(min(255, round(m)) for m in IMAGENET_MEAN),
        interpolation=resample,
        **extra,
    )


def timm_randaug(config: str, **extra):
    """timm's RandAugment with MindCV's op list (timm's less SolarizeAdd)."""
    ra = timm_aa.rand_augment_transform(config, mindcv_hparams(magnitude_std=0.5, **extra))
    ra.ops = [op for op in ra.ops if op.name != "SolarizeAdd"]
    return ra


# each form -> timm's transform built from MindCV's arguments
REFERENCES = {
    "randaug-m9-mstd0.5-inc1": lambda: timm_randaug("rand-m9-inc1"),
    "randaug-m7-mstd0.5": lambda: timm_randaug("rand-m7"),
    "randaug-m9-n2-mstd0.5-inc1": lambda: timm_randaug("rand-m9-n2-inc1"),
    "randaug-m9-mstd101-mmax8": lambda: timm_randaug("rand-m9", magnitude_max=8),  # mstd ignored
    "autoaug": lambda: timm_aa.auto_augment_transform(
        "original", mindcv_hparams(magnitude_std=0.5)
    ),
    "autoaugr": lambda: timm_aa.auto_augment_transform(
        "originalr", mindcv_hparams(magnitude_std=0.5)
    ),
    "autoaug-mstd2": lambda: timm_aa.auto_augment_transform(
        "original", mindcv_hparams(magnitude_std=0.5)
    ),
    "3a": lambda: timm_aa.auto_augment_transform("3a", mindcv_hparams(magnitude_std=0.5)),
    "augmix": lambda: timm_aa.augment_and_mix_transform(
        "augmix", mindcv_hparams(translate_pct=0.3)
    ),
    "augmix-m5-w4-d2-a0.5": lambda: timm_aa.augment_and_mix_transform(
        "augmix-m5-w4-d2-a0.5", mindcv_hparams(translate_pct=0.3)
    ),
}


def draws(transform, image=IMAGE, n=12):
    """`n` outputs of `transform` with Python's and numpy's RNG (timm's) seeded alike."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return [np.asarray(transform(image)) for _ in range(n)]


@pytest.mark.parametrize("spec", REFERENCES)
def test_policy_is_timms_built_from_mindcv_arguments(spec):
    ours = auto_augment_transform(spec, interpolation="bicubic", image_resize=SIZE)
    reference = REFERENCES[spec]()
    if hasattr(reference, "ops"):
        assert [op.name for op in ours.ops] == [op.name for op in reference.ops]
    for got, want in zip(draws(ours), draws(reference)):
        np.testing.assert_array_equal(got, want)


def test_randaug_ops_weights_and_noise_are_mindcvs():
    ra = auto_augment_transform("randaug-m9-mstd0.5", image_resize=SIZE)
    assert [op.name for op in ra.ops] == MINDCV_RAND_OPS
    assert all(op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert ra.num_layers == 2 and ra.choice_weights is None
    inc = auto_augment_transform("randaug-m9-inc0")  # MindCV tests bool("0"): increasing
    assert "PosterizeIncreasing" in [op.name for op in inc.ops]
    weighted = auto_augment_transform("randaug-m9-w0")  # MindCV's _RAND_CHOICE_WEIGHTS_0
    weights = dict(zip(MINDCV_RAND_OPS, weighted.choice_weights))
    assert weights["Rotate"] == pytest.approx(0.3 / 1.0) and weights["Invert"] == 0
    assert sum(weighted.choice_weights) == pytest.approx(1.0)


def test_posterize_keeps_at_least_one_bit():
    """timm's increasing posterize asks for 0 bits at magnitude 10 (m9 with noise reaches it);
    Pillow refuses 0 bits, and MindCV keeps at least one."""
    for spec in ("randaug-m10-inc1", "augmix-m10"):
        op = next(op for op in auto_augment_transform(spec).ops if op.name == "PosterizeIncreasing")
        op.prob, op.magnitude_std = 1.0, 0.0
        assert op(IMAGE).tobytes() == ImageOps.posterize(IMAGE, 1).tobytes()


@pytest.mark.parametrize(
    "interpolation, resample",
    [
        ("nearest", Image.Resampling.NEAREST),
        ("bilinear", Image.Resampling.BILINEAR),
        ("linear", Image.Resampling.BILINEAR),
        ("bicubic", Image.Resampling.BICUBIC),
        ("cubic", Image.Resampling.BICUBIC),
        ("pilcubic", Image.Resampling.BICUBIC),
        ("lanczos", Image.Resampling.BILINEAR),
        ("area", Image.Resampling.BILINEAR),
    ],
)
def test_fill_and_interpolation_are_mindcvs(interpolation, resample):
    mean = (10.4, 300.0, 127.5)  # MindCV: min(255, round(m))
    for spec in ("randaug-m9", "autoaug", "augmix"):
        t = auto_augment_transform(spec, interpolation=interpolation, mean=mean, image_resize=40)
        op = t.ops[0] if spec != "autoaug" else t.policy[0][0]
        assert op.kwargs == {"fillcolor": (10, 255, 128), "resample": resample}
        assert op.hparams["translate_const"] == 18
    ta = auto_augment_transform("trivialaugwide", interpolation=interpolation, mean=mean)
    assert ta.kwargs == {"fillcolor": (10, 255, 128), "resample": resample}
    assert auto_augment_transform("augmix").ops[-1].hparams["translate_pct"] == 0.3


def test_trivialaugwide_is_mindcvs(monkeypatch):
    """MindCV's TrivialAugmentWide: one of its 14 RandAugment ops, always applied, the magnitude
    uniform in [0, m] and divided by m: rotate +-135, shear +-0.99, translate 0..0.15 (MindCV
    never negates it), enhance 0.01..2, posterize to 2..8 bits, solarize 0..255."""
    calls = defaultdict(list)
    for name in MINDCV_RAND_OPS:
        monkeypatch.setitem(
            timm_aa.NAME_TO_OP,
            name,
            lambda img, *args, _n=name, **kw: calls[_n].append((args, kw)) or img,
        )
    ta = auto_augment_transform("trivialaugwide-m20", interpolation="bicubic")
    random.seed(0)
    np.random.seed(0)
    for _ in range(3000):
        ta(IMAGE)
    assert set(calls) == set(MINDCV_RAND_OPS)  # no identity; invert is one (unlike torchvision)
    kw = {"fillcolor": (124, 116, 104), "resample": Image.Resampling.BICUBIC}
    assert all(k == kw for c in calls.values() for _, k in c)
    # posterize: int(l * 6) + 2 bits, 8 only at l = 1
    ranges = {
        "Rotate": (-135, 135),
        "ShearX": (-0.99, 0.99),
        "TranslateXRel": (0, 0.15),
        "Color": (0.01, 2.0),
        "Posterize": (2, 7),
        "Solarize": (0, 255),
    }
    for name, (low, high) in ranges.items():
        values = [args[0] for args, _ in calls[name]]
        assert low <= min(values) and max(values) <= high, name
        assert min(values) < low + (high - low) * 0.1 and max(values) > high - (high - low) * 0.1
    assert all(args == () for args, _ in calls["Invert"] + calls["Equalize"])
    assert isinstance(auto_augment_transform("trivialaug"), TrivialAugmentWide)


FORMS = [*REFERENCES, "trivialaugwide", "trivialaugwide-m20"]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_tensor_path_runs_the_same_policy_on_pil(interpolation, single_thread):
    """fast_decode's uint8 tensor goes through PIL for the policy only: the same output as the
    PIL path under the same seeds (the crop here is the whole image, so both crops are exact)."""
    for spec in FORMS:
        kwargs = {
            "interpolation": interpolation,
            "auto_augment": spec,
            "hflip": 0.0,
            "scale": (1.0, 1.0),
            "ratio": (1.0, 1.0),
        }
        fast = train_transform(SIZE, fast_decode=True, **kwargs)
        slow = train_transform(SIZE, fast_decode=False, **kwargs)
        assert isinstance(fast.transforms[1], v2.ToPILImage)
        assert type(fast.transforms[2]) is type(slow.transforms[1])
        for got, want in zip(draws(fast, n=4), draws(slow, n=4)):
            np.testing.assert_array_equal(got, want)


def test_pil_path_applies_the_reference_policy(single_thread):
    t = train_transform(
        SIZE,
        interpolation="bicubic",
        auto_augment="randaug-m9-mstd0.5-inc1",
        hflip=0.0,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
    )
    reference = v2.Compose([timm_randaug("rand-m9-inc1"), *t.transforms[2:]])
    for got, want in zip(draws(t), draws(reference)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "spec",
    [
        "randaug-p0.5",
        "autoaug-inc1",
        "augmix-mstd0.5",
        "augmix-b1",
        "trivialaugwide-m0",
        "trivialaugwide-m32",
        "3a-m5",
        "randaug-m11",
        "randaug-m15-mmax12",
        "randaug-w1",
    ],
)
def test_options_mindcv_refuses_are_refused(spec):
    with pytest.raises(ValueError, match="auto_augment"):
        parse_auto_augment(spec)


def test_options_mindcv_accepts_are_accepted():
    assert parse_auto_augment("trivialaugwide-m20") == ("trivialaugwide", {"m": 20.0})
    assert parse_auto_augment("3a-mstd0.5") == ("3a", {"mstd": 0.5})
    assert parse_auto_augment("randaug-m9-w0-mmax10")[1] == {"m": 9.0, "w": 0.0, "mmax": 10.0}
    assert parse_auto_augment("randaug-m15-mmax20")[1] == {"m": 15.0, "mmax": 20.0}
