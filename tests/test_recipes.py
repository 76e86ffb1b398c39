"""MindCV's recipes, value form by value form: they load, they train one epoch with the default
settings (fast_decode on), and their keys mean what MindCV's code makes them mean.

Expected numbers come from MindCV's own definitions (mindcv/scheduler/scheduler_factory.py and
dynamic_lr.py, mindcv/optim/optim_factory.py, mindcv/data/transforms_factory.py,
mindcv/data/mixup.py, mindcv/data/distributed_sampler.py), restated in the comments."""

from __future__ import annotations

import dataclasses
import io
import math
import re
from bisect import bisect_right
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from res2net.cli.train import config_from_argv, key_groups
from res2net.config import KEYS, Config, ConfigError, load_config
from res2net.data.folders import EncodedImage, image_for
from res2net.data.loader import EpochSampler
from res2net.data.transforms import eval_transform, mixup_cutmix, train_transform
from res2net.engine.optim import build_optimizer, param_groups
from res2net.engine.schedules import LrSchedule
from res2net.engine.train import config_notes, train
from res2net.schema import AUTO_AUGMENTS, INTERPOLATIONS, OPTIMIZERS, SCHEDULERS

SRC = Path(__file__).resolve().parents[1] / "src" / "res2net"


# --------------------------------------------------------------------------------------------
# lr schedules: MindCV builds a list, warmup list + main list for epochs - warmup_epochs


def mindcv_lrs(
    name,
    *,
    lr,
    spe,
    epochs,
    min_lr=0.0,
    warmup=0,
    wf=0.0,
    decay_epochs=10,
    rate=0.9,
    milestones=(),
    cycles=1,
    cycle_decay=1.0,
    stair=False,
):
    """MindCV's create_scheduler, as a list (restated from its dynamic_lr functions)."""
    out = []
    for i in range(spe * warmup):  # linear_lr (stair) / linear_refined_lr
        e = i // spe if stair else i / spe
        out.append(lr * wf + min(e, warmup) / warmup * (lr - lr * wf))
    main = epochs - warmup
    steps = spe * main
    for i in range(steps):
        e = i // spe if stair else i / spe
        if name in ("cosine_decay", "warmup_cosine_decay"):
            c, t = divmod(i, spe * decay_epochs)
            t = t // spe if stair else t / spe
            peak = lr * cycle_decay**c
            out.append(
                min_lr
                if c >= cycles
                else min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / decay_epochs))
            )
        elif name == "step_decay":
            out.append(lr * rate ** math.floor((i // spe) / decay_epochs))
        elif name == "multi_step_decay":
            out.append(lr * rate ** bisect_right(sorted(milestones), i // spe))
        elif name == "exponential_decay":
            out.append(lr * rate**e)
        elif name == "polynomial_decay":
            out.append(lr * (1 - min(e, main) / main) ** rate)
        elif name == "constant":
            out.append(lr)
        elif name == "one_cycle":  # one_cycle_lr(max_lr=lr, final_div_factor=(lr/25)/min_lr)
            init, up, end = lr / 25, 0.3 * steps - 1, steps - 1

            def cos(a, b, pct):
                return b + (a - b) / 2 * (math.cos(math.pi * pct) + 1)

            out.append(cos(init, lr, i / up) if i <= up else cos(lr, min_lr, (i - up) / (end - up)))
        elif name == "cyclic":  # cyclic_lr(base_lr=min_lr, max_lr=lr, step_size_up=...)
            half = float(int(steps / cycles / 2))
            cycle = math.floor(1 + i / (2 * half))
            x = 1 + i / (2 * half) - cycle
            scale = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
            out.append(min_lr + (lr - min_lr) * scale)
    return out


SCHEDULE_CASES = [
    (name, warmup, stair)
    for name in SCHEDULERS
    for warmup in (0, 2)
    for stair in (False, True)
    if name not in ("one_cycle", "cyclic") or (warmup == 0 and not stair)
]


@pytest.mark.parametrize("name,warmup,stair", SCHEDULE_CASES)
def test_lr_at_every_step_equals_mindcv(name, warmup, stair):
    kw = dict(
        lr=0.5, min_lr=0.01, decay_epochs=3, rate=0.5, milestones=(1, 3), cycles=2, cycle_decay=0.5
    )
    expected = mindcv_lrs(name, spe=3, epochs=9, warmup=warmup, wf=0.1, stair=stair, **kw)
    s = LrSchedule(
        name,
        lr=0.5,
        steps_per_epoch=3,
        min_lr=0.01,
        warmup_epochs=warmup,
        warmup_factor=0.1,
        decay_epochs=3,
        decay_rate=0.5,
        milestones=(1, 3),
        num_cycles=2,
        cycle_decay=0.5,
        lr_epoch_stair=stair,
        epochs=9,
    )
    assert [s(i) for i in range(27)] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_multi_step_milestones_count_after_warmup():
    # MindCV's multi_step_lr runs for epochs - warmup_epochs: milestone 2 falls 2 epochs after
    # the 3 warmup epochs, at epoch 5 of the run.
    s = LrSchedule(
        "multi_step_decay",
        lr=1.0,
        steps_per_epoch=1,
        warmup_epochs=3,
        warmup_factor=0.0,
        milestones=(2, 4),
        decay_rate=0.1,
        epochs=10,
    )
    assert [s(i) for i in range(10)] == pytest.approx(
        [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.01]
    )


def test_one_cycle_and_cyclic_numbers():
    oc = LrSchedule("one_cycle", lr=1.0, steps_per_epoch=5, min_lr=1e-4, epochs=2)
    assert oc(0) == pytest.approx(0.04)  # lr / 25
    assert oc(2) == pytest.approx(1.0)  # peak at 0.3 * 10 - 1 = step 2
    assert oc(9) == pytest.approx(1e-4)  # min_lr at the last step
    cy = LrSchedule("cyclic", lr=1.0, steps_per_epoch=4, min_lr=0.0, num_cycles=2, epochs=2)
    assert [cy(i) for i in range(8)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5])


@pytest.mark.parametrize(
    "scheduler,key,value",
    [
        ("one_cycle", "warmup_epochs", "2"),
        ("one_cycle", "lr_epoch_stair", "True"),
        ("cyclic", "warmup_epochs", "1"),
        ("cyclic", "lr_epoch_stair", "True"),
        ("one_cycle", "min_lr", "0"),
    ],
)
def test_scheduler_refusals_name_the_key(scheduler, key, value):
    with pytest.raises(ConfigError, match=f"^config key '{key}'"):
        config_from_argv(
            None, ["--scheduler", scheduler, "--warmup_epochs", "0", f"--{key}", value]
        )


# --------------------------------------------------------------------------------------------
# optimizers and weight decay


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))


def test_weight_decay_filters_as_mindspore():
    net = small_net()
    names = {id(p): n for n, p in net.named_parameters()}

    def undecayed(filt):
        groups = param_groups(net, weight_decay=0.1, weight_decay_filter=filt)
        return sorted(names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"])

    # disable: one group, everything decayed
    assert undecayed("disable") == []
    # auto: MindSpore's default filter drops norm parameters (gamma, beta) only
    assert undecayed("auto") == ["1.bias", "1.weight"]
    # norm_and_bias: also every bias
    assert undecayed("norm_and_bias") == ["0.bias", "1.bias", "1.weight", "3.bias"]


def test_layer_decay_scales_stem_stages_head(tiny_arch):
    import res2net

    model = res2net.create_model(tiny_arch, num_classes=3)  # res2net50's layer names
    opt = build_optimizer(model, opt="sgd", lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["conv1.weight"])] == 0.5**5
    for k in range(1, 5):
        assert lr_of[id(named[f"layer{k}.0.conv1.weight"])] == 0.5 ** (5 - k)
    assert lr_of[id(named["fc.weight"])] == lr_of[id(named["fc.bias"])] == 1.0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_mindcv_optimizer_steps(name):
    net = small_net()
    opt = build_optimizer(
        net, opt=name.upper(), lr=0.01, weight_decay=1e-4, weight_decay_filter="norm_and_bias"
    )
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_is_fused_and_updates_as_torchs_per_tensor_loop(nesterov):
    """The fused SGD kernel (one pass per tensor) gives the per-tensor loop's updates."""
    fused_net, loop_net = small_net(), small_net()
    fused = build_optimizer(
        fused_net,
        opt="momentum",
        lr=0.1,
        weight_decay=1e-4,
        nesterov=nesterov,
        weight_decay_filter="auto",
    )
    assert all(group["fused"] for group in fused.param_groups)
    loop = torch.optim.SGD(
        [
            {"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in build_optimizer(
                loop_net, opt="momentum", lr=0.1, weight_decay_filter="auto", weight_decay=1e-4
            ).param_groups
        ],
        lr=0.1,
        momentum=0.9,
        nesterov=nesterov,
        foreach=False,
    )
    torch.manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5)
        for net, opt in ((fused_net, fused), (loop_net, loop)):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    for a, b in zip(fused_net.parameters(), loop_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def one_step(name, g, w=1.0, **kw):
    p = nn.Parameter(torch.tensor([w]))
    opt = build_optimizer(nn.ParameterList([p]), opt=name, lr=0.1, **kw)
    p.grad = torch.tensor([g])
    opt.step()
    return p.item()


def test_optimizer_updates_follow_mindspore():
    # RMSProp: mean square starts at 1, eps inside the root, lr inside momentum
    ms = 0.9 * 1 + 0.1 * 0.5**2
    assert one_step("rmsprop", 0.5, eps=1e-3) == pytest.approx(1 - 0.1 * 0.5 / math.sqrt(ms + 1e-3))
    # Adagrad: accumulator starts at 0.1, no epsilon
    assert one_step("adagrad", 0.5) == pytest.approx(1 - 0.1 * 0.5 / math.sqrt(0.1 + 0.25))
    # Lion: first step moves by lr * sign(grad)
    assert one_step("lion", -3.0) == pytest.approx(1.1)
    # momentum: coupled weight decay, v = g + wd * w
    assert one_step("momentum", 0.5, weight_decay=0.1) == pytest.approx(1 - 0.1 * 0.6)


def test_optimizer_names_are_case_insensitive():
    assert config_from_argv(None, ["--opt", "SGD"]).opt == "sgd"
    assert config_from_argv(None, ["--opt", "AdamW"]).opt == "adamw"
    assert config_from_argv(None, ["--loss", "ce"]).loss == "CE"
    with pytest.raises(ConfigError, match="^config key 'use_nesterov'"):
        config_from_argv(None, ["--opt", "adam", "--use_nesterov", "True"])


# --------------------------------------------------------------------------------------------
# loss targets, mixup/cutmix, random erasing, eval resize, color jitter


def test_label_smoothing_targets_as_mindcv():
    # MindCV's mixup_target: off = s / K, on = 1 - s + s / K
    mix = mixup_cutmix(4, mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_prob=0.0, label_smoothing=0.1)
    _, t = mix(torch.zeros(2, 3, 4, 4), torch.tensor([0, 2]))
    assert t[0].tolist() == pytest.approx([0.925, 0.025, 0.025, 0.025])
    assert t[1].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])


def test_label_smoothing_loss_as_mindcv():
    from res2net.engine import train as train_mod

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    logp = torch.log_softmax(logits, 1)
    # CrossEntropySmooth: (1 - s) * NLL + s * mean over classes of -log p
    ce = train_mod._loss(config_from_argv(None, ["--label_smoothing", "0.1"]), False)
    nll = -logp[torch.arange(2), labels]
    assert ce(logits, labels).item() == pytest.approx(
        (0.9 * nll + 0.1 * -logp.mean(1)).mean().item(), rel=1e-6
    )
    # BinaryCrossEntropySmooth: targets on = 1 - s + s / K, off = s / K
    bce = train_mod._loss(
        config_from_argv(None, ["--label_smoothing", "0.3", "--loss", "bce"]), False
    )
    targets = torch.full((2, 3), 0.1)
    targets[torch.arange(2), labels] = 0.8
    expected = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert bce(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def classify_mixes(mix, n=300):
    """How often a batch is left alone, cut-mixed or mixed-up (images 0 and 1 in a pair)."""
    torch.manual_seed(0)
    a = torch.zeros(1, 1, 8, 8)
    b = torch.ones(1, 1, 8, 8)
    counts = {"none": 0, "cutmix": 0, "mixup": 0}
    for _ in range(n):
        out, _ = mix(torch.cat([a, b]), torch.tensor([0, 1]))
        values = set(torch.round(out[0], decimals=5).flatten().tolist())
        kind = "none" if values == {0.0} else "cutmix" if values <= {0.0, 1.0} else "mixup"
        counts[kind] += 1
    return {k: v / n for k, v in counts.items()}


def test_mixup_cutmix_switching_and_probability():
    # MindCV's Mixup(prob=cutmix_prob, switch_prob=0.5): mixed with probability cutmix_prob,
    # then cutmix or mixup with equal odds when both alphas are set.
    both = classify_mixes(mixup_cutmix(2, mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_prob=1.0))
    assert both["none"] < 0.05 and abs(both["cutmix"] - 0.5) < 0.1
    half = classify_mixes(mixup_cutmix(2, mixup_alpha=0.8, cutmix_alpha=0.0, cutmix_prob=0.5))
    assert abs(half["none"] - 0.5) < 0.1 and half["cutmix"] < 0.05
    assert classify_mixes(mixup_cutmix(2, mixup_alpha=0.0, cutmix_alpha=1.0))["mixup"] == 0


def test_random_erasing_random_value_is_normal_noise():
    # re_value 'random': erased pixels are standard normal values (after normalization)
    t = train_transform(
        32,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        hflip=0,
        color_jitter=None,
        re_prob=1.0,
        re_scale=(0.5, 0.5),
        re_value="random",
    )
    torch.manual_seed(0)
    out = t(Image.new("RGB", (32, 32), (124, 116, 104)))  # the mean: normalizes to ~0
    erased = out[out.abs() > 0.05]
    assert erased.numel() > 0.4 * out.numel()
    assert abs(erased.mean().item()) < 0.1 and abs(erased.std().item() - 1) < 0.15


@pytest.mark.parametrize("crop_pct,resize", [(0.875, 256), (0.95, 235), (0.9, 248), (1.15, 194)])
def test_eval_resize_from_crop_pct(crop_pct, resize):
    # MindCV: Resize(int(image_resize / crop_pct)), CenterCrop(image_resize)
    t = eval_transform(224, crop_pct=crop_pct)
    assert t.transforms[0].size == [resize]
    assert t(Image.new("RGB", (300, 400))).shape == (3, 224, 224)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("0.4", [(0.6, 1.4)] * 3 + [None]),
        ("[0.3, 0.3, 0.3]", [(0.7, 1.3)] * 3 + [None]),
        ("[0.4, 0.4, 0.4, 0.1]", [(0.6, 1.4)] * 3 + [(-0.1, 0.1)]),
    ],
)
def test_color_jitter_forms(value, expected):
    cfg = config_from_argv(None, ["--color_jitter", value])
    t = train_transform(16, color_jitter=cfg.color_jitter)
    jitter = next(s for s in t.transforms if isinstance(s, v2.ColorJitter))
    got = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    assert [None if g is None else pytest.approx(g) for g in got] == expected


# --------------------------------------------------------------------------------------------
# every interpolation with every auto-augment policy, on the tensor and the PIL path

AA_FORMS = [
    "randaug-m9-mstd0.5-inc1",
    "randaug-m7-mstd0.5",
    "randaug-m9-n2-mstd0.5-inc1",
    "autoaug",
    "autoaugr",
    "autoaug-mstd0.5",
    "3a",
    "augmix",
    "trivialaugwide",
]


def jpeg_bytes(size=40) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_transforms_know_exactly_the_schema_interpolations():
    from res2net.data import transforms

    assert set(transforms._INTERPOLATIONS) == set(INTERPOLATIONS)


def test_aa_forms_cover_every_policy():
    assert {f.split("-")[0] for f in AA_FORMS} == set(AUTO_AUGMENTS)


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_interpolation_with_every_policy(interpolation, single_thread):
    data = jpeg_bytes()
    for fast in (True, False):
        for aa in AA_FORMS:
            t = train_transform(
                16, interpolation=interpolation, auto_augment=aa, fast_decode=fast, re_prob=0.25
            )
            image = image_for(t, data, "x.jpg", None)  # what the datasets hand the transform
            if fast and interpolation in ("nearest", "bilinear", "linear", "bicubic", "cubic"):
                assert isinstance(image, EncodedImage)
            for seed in range(3):
                torch.manual_seed(seed)
                out = t(image)
                assert out.shape == (3, 16, 16) and out.dtype == torch.float32, (aa, fast)


# --------------------------------------------------------------------------------------------
# repeated augmentation


def test_repeated_augmentation_as_mindcv_sampler():
    # RepeatAugSampler(selected_round=0): the permutation, each index 3 times in a row, padded
    # to a multiple of the ranks, every 2nd position per rank, ceil(N / ranks) per rank.
    ranks = [EpochSampler(10, seed=3, num_replicas=2, rank=r, repeats=3) for r in range(2)]
    keys = [list(s) for s in ranks]
    assert [len(k) for k in keys] == [5, 5]
    perm = ranks[0].indices()  # rank 0's indices: positions 0, 2, 4, ... of the repeated order
    full = [i for pair in zip(keys[0], keys[1]) for i, _ in pair]
    assert full[:3] == [full[0]] * 3 and full[3:6] == [full[3]] * 3  # consecutive copies
    assert perm == [i for i, _ in keys[0]]
    seeds = [s for k in keys for _, s in k]
    assert len(set(seeds)) == len(seeds)  # every copy augmented anew
    # one rank: an epoch as long as a plain one, covering a third of the images
    single = list(EpochSampler(9, seed=1, repeats=3))
    assert len(single) == 9 and len({i for i, _ in single}) == 3


# --------------------------------------------------------------------------------------------
# no key silently ignored; one schema for choices and help


def test_every_field_is_read_or_declared():
    sources = [p.read_text() for p in SRC.rglob("*.py") if p.name != "config.py"]
    unused = []
    for f in dataclasses.fields(Config):
        read = any(re.search(rf"\bcfg\.{f.name}\b", s) for s in sources)
        if not read and not KEYS[f.name].ignored and not KEYS[f.name].mapped:
            unused.append(f.name)
    assert unused == [], f"Config keys read nowhere and not declared ignored/mapped: {unused}"


def test_every_field_has_one_help_line():
    keys = [k for group in key_groups().values() for k in group]
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(Config))
    assert len(keys) == len(set(keys))


def test_ignored_keys_are_reported():
    cfg = config_from_argv(
        None,
        [
            "--aux_factor",
            "0.1",
            "--re_max_attempts",
            "1",
            "--eval_shuffle",
            "True",
            "--eps",
            "1e-3",
            "--opt",
            "adamw",
        ],
    )
    notes = "\n".join(config_notes(cfg))
    for key in ("aux_factor", "re_max_attempts", "eval_shuffle", "eps"):
        assert f"{key}: " in notes


def test_help_lists_every_key_grouped(capsys):
    from res2net.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for group, keys in key_groups().items():
        assert f"\n{group}:\n" in out
        for key in keys:
            assert f"--{key} (default: " in out


def test_mindcv_quirks_keep_working(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "weight_decay: 1e-5\nmin_lr: '1e-6'\nnum_classes: None\n"
        "color_jitter: [0.4, 0.4, 0.4]\nopt: 'SGD'\nloss: 'ce'\n"
    )
    cfg = config_from_argv(recipe, ["--ema"])
    assert cfg.weight_decay == 1e-5 and cfg.min_lr == 1e-6 and cfg.num_classes is None
    assert cfg.ema is True and cfg.color_jitter == (0.4, 0.4, 0.4)


# Every key and value (as YAML) that MindCV's 179 public recipes give, from their tally.
RECIPE_VALUES = {
    "distribute": ["True"],
    "num_parallel_workers": ["8", "16"],
    "dataset": ["'imagenet'"],
    "shuffle": ["True"],
    "batch_size": ["32", "75", "320"],
    "keep_checkpoint_max": ["10", "100"],
    "epoch_size": ["300", "90"],
    "dataset_sink_mode": ["True"],
    "amp_level": ["'O2'", "'O3'", "'O0'"],
    "loss": ["'CE'", "'ce'"],
    "label_smoothing": ["0.1"],
    "scheduler": ["'cosine_decay'", "'warmup_cosine_decay'", "'multi_step_decay'", "'step_decay'"],
    "lr": ["0.1", "0.0005"],
    "opt": ["'momentum'", "'adamw'", "'rmsprop'", "'sgd'", "'SGD'", "'lion'", "'AdamW'"],
    "weight_decay": ["0.0001", "4e-05", "'1e-5'", "'5e-5'", "0.3"],
    "mode": ["0"],
    "warmup_epochs": ["5", "0", "32"],
    "interpolation": ["'bilinear'", "'bicubic'"],
    "decay_epochs": ["120", "295"],
    "image_resize": ["224", "256", "299", "240"],
    "hflip": ["0.5"],
    "use_nesterov": ["False", "True"],
    "dataset_download": ["False"],
    "pretrained": ["False"],
    "drop_remainder": ["True"],
    "min_lr": ["0.0", "1e-05", "1e-06", "'1e-10'", "'1e-6'", "3e-07", "'5e-6'"],
    "scale": ["[0.08, 1.0]"],
    "ratio": ["[0.75, 1.333]", "[0.75, 1.33]"],
    "crop_pct": ["0.875", "0.9", "0.95", "0.935", "0.96", "0.93", "0.925", "0.915", "0.87", "1.15"],
    "momentum": ["0.9"],
    "loss_scale": ["1024", "16777216", "16777216.0", "1024.0", "300"],
    "val_while_train": ["True"],
    "re_prob": ["0.25", "0.0", "1.0"],
    "auto_augment": [
        "'randaug-m9-mstd0.5-inc1'",
        "'randaug-m9-mstd0.5'",
        "'autoaug'",
        "'randaug-m7-mstd0.5'",
        "'randaug-m7-mstd0.5-inc1'",
        "'autoaug-mstd0.5'",
        "'randaug-m9-n2-mstd0.5-inc1'",
    ],
    "mixup": ["0.8", "0.2"],
    "color_jitter": ["0.4", "[0.4, 0.4, 0.4]", "0.0", "[0.3, 0.3, 0.3]"],
    "cutmix": ["1.0"],
    "loss_scale_type": ["'dynamic'", "'auto'", "'fixed'"],
    "val_interval": ["1", "5"],
    "drop_path_rate": ["0.1", "0.0", "0.5"],
    "drop_overflow_update": ["True"],
    "cutmix_prob": ["1.0", "0.0"],
    "ckpt_save_policy": ["'top_k'", "'latest_k'"],
    "vflip": ["0.0"],
    "eps": ["'1e-3'", "1e-08", "'1e-8'"],
    "warmup_factor": ["0.01", "0.002", "1.75e-05"],
    "val_split": ["'val'"],
    "re_value": ["'random'"],
    "decay_rate": ["0.1", "0.5", "0.01"],
    "weight_decay_filter": ["'auto'", "'norm_and_bias'"],
    "drop_rate": ["0.2", "0.0", "0.25"],
    "val_amp_level": ["'O3'", "'O2'"],
    "lr_epoch_stair": ["True", "False"],
    "ema": ["True", "False"],
    "ckpt_save_interval": ["1"],
    "ema_decay": ["0.9995", "0.99996"],
    "log_interval": ["100"],
    "aug_repeats": ["3"],
    "train_split": ["'train'"],
    "seed": ["1"],
    "multi_step_decay_milestones": ["[30, 40, 50, 60, 70, 80, 85]"],
    "num_cycles": ["4", "2"],
    "cycle_decay": ["1.0", "1"],
    "re_max_attempts": ["1"],
    "aux_factor": ["0.1"],
    "re_ratio": ["[0.3, 3.333]"],
    "in_channels": ["3"],
    "gradient_accumulation_steps": ["2"],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in RECIPE_VALUES.items() for v in vs])
def test_every_recipe_value_loads(key, value, tmp_path):
    path = tmp_path / "r.yaml"
    base = "" if key == "opt" else "opt: momentum\n"  # MindCV's default 'adam' has no Nesterov
    path.write_text(f"{base}{key}: {value}\n")
    cfg = load_config(path)
    assert getattr(cfg, key) is not None


# --------------------------------------------------------------------------------------------
# every recipe shape trains one epoch, default settings (fast_decode on)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 80, (28, 36, 3), dtype=np.uint8)
                pixels[..., c] += 150
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


# Together these cover every value form of mindcv_recipe_values.md (plus the optimizers and
# schedulers no public recipe uses), one training run per group.
RECIPE_SHAPES = {
    "momentum-cosine-randaug-bicubic": dict(
        opt="momentum",
        scheduler="cosine_decay",
        interpolation="bicubic",
        auto_augment="randaug-m9-mstd0.5-inc1",
        re_prob=0.25,
        mixup=0.8,
        cutmix=1.0,
        cutmix_prob=1.0,
        loss="CE",
        weight_decay="1e-5",
        min_lr="1e-10",
        ema=True,
        ema_decay=0.9995,
        amp_level="O2",
        loss_scale=1024,
        loss_scale_type="dynamic",
        drop_overflow_update=True,
        val_amp_level="O3",
        mode=0,
        drop_path_rate=0.1,
    ),
    "adamw-warmup_cosine-stair-re_random": dict(
        opt="AdamW",
        scheduler="warmup_cosine_decay",
        warmup_factor=0.01,
        lr_epoch_stair=True,
        interpolation="bicubic",
        auto_augment="randaug-m9-n2-mstd0.5-inc1",
        color_jitter=[0.4, 0.4, 0.4],
        re_prob=1.0,
        re_value="random",
        re_ratio=[0.3, 3.333],
        eps="1e-8",
        weight_decay_filter="auto",
        mixup=0.2,
        cutmix=1.0,
        cutmix_prob=0.0,
        ratio=[0.75, 1.33],
        crop_pct=0.95,
    ),
    "rmsprop-step-autoaug-aug_repeats": dict(
        opt="rmsprop",
        eps="1e-3",
        scheduler="step_decay",
        decay_rate=0.97,
        decay_epochs=1,
        interpolation="bilinear",
        auto_augment="autoaug",
        loss="ce",
        aug_repeats=3,
        drop_rate=0.2,
        warmup_factor=1.75e-05,
        crop_pct=1.15,
    ),
    "sgd-multistep-autoaug_mstd-accumulation": dict(
        opt="SGD",
        scheduler="multi_step_decay",
        multi_step_decay_milestones=[1, 2],
        decay_rate=0.1,
        auto_augment="autoaug-mstd0.5",
        interpolation="bicubic",
        gradient_accumulation_steps=2,
        weight_decay_filter="norm_and_bias",
        color_jitter=[0.3, 0.3, 0.3],
        ckpt_save_policy="top_k",
        val_while_train=True,
        use_nesterov=True,
    ),
    "lion-randaug_m7-extras": dict(
        opt="lion",
        lr=0.0001,
        auto_augment="randaug-m7-mstd0.5-inc1",
        interpolation="bilinear",
        re_max_attempts=1,
        aux_factor=0.1,
        in_channels=3,
        color_jitter=0.0,
        num_cycles=2,
        cycle_decay=1,
        dataset_download=False,
        train_split="train",
        val_split="val",
        seed=1,
    ),
    "lamb-one_cycle-augmix-3a": dict(
        opt="lamb",
        scheduler="one_cycle",
        warmup_epochs=0,
        auto_augment="augmix",
        interpolation="bicubic",
        layer_decay=0.75,
    ),
    "adan-cyclic-3a": dict(
        opt="adan",
        scheduler="cyclic",
        warmup_epochs=0,
        auto_augment="3a",
        num_cycles=1,
        interpolation="nearest",
    ),
    "nadam-exponential-trivialaug": dict(
        opt="nadam",
        scheduler="exponential_decay",
        auto_augment="trivialaugwide",
        interpolation="lanczos",
    ),
    "adagrad-polynomial-autoaugr": dict(
        opt="adagrad",
        scheduler="polynomial_decay",
        auto_augment="autoaugr",
        interpolation="area",
        decay_rate=2.0,
    ),
    "adam-constant-hue": dict(opt="adam", scheduler="constant", color_jitter=[0.4, 0.4, 0.4, 0.1]),
}


def test_recipe_shapes_cover_optimizers_and_schedulers():
    used_opts = {str(r["opt"]).lower() for r in RECIPE_SHAPES.values()} | {"momentum"}
    used_scheds = {r.get("scheduler", "cosine_decay") for r in RECIPE_SHAPES.values()}
    assert used_opts >= set(OPTIMIZERS) - {"nesterov"}
    assert used_scheds == set(SCHEDULERS)


@pytest.mark.parametrize("shape", list(RECIPE_SHAPES))
def test_recipe_shape_trains_one_epoch(shape, jpeg_dir, tmp_path, single_thread, tiny_arch):
    """The recipe's values train: the tiny registered Res2Net (the zoo model is not the point;
    a res2net50 checkpoint with Adam's moments is 300 MB)."""
    import yaml

    recipe = {
        "model": tiny_arch,
        "image_resize": 16,
        "batch_size": 4,
        "epoch_size": 1,
        "warmup_epochs": 0,
        "num_parallel_workers": 0,
        "distribute": False,
        "dataset_sink_mode": True,
        "data_dir": str(jpeg_dir),
        "log_interval": 1,
        "label_smoothing": 0.1,
        "scale": [0.08, 1.0],
        "hflip": 0.5,
        "momentum": 0.9,
        "lr": 0.01,
        **RECIPE_SHAPES[shape],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = config_from_argv(path, ["--ckpt_save_dir", str(tmp_path / "ckpt")])  # outside: flag only
    assert cfg.fast_decode
    result = train(cfg)
    assert result.epochs_done == 1 and not result.interrupted
    assert (tmp_path / "ckpt" / "last.pt").is_file()
