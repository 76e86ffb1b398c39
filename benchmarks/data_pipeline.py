"""Training input pipeline, per core: torchvision's default ImageFolder + PIL pipeline against
this package's, measured side by side in one run.

The corpus is built from real photos that installable packages ship (scikit-image's and
scikit-learn's sample images), cropped and re-encoded as JPEG (quality 90) at typical ImageNet
sizes (500x375 and the like, some up to 1024x768), 24 files per photo in one class folder each.

Candidates read the same files through a `DataLoader` (batch 32, no worker processes, one torch
thread: the cost per core, which is what a worker process pays), taking turns epoch by epoch:

* recipe "basic": random resized crop 224, horizontal flip, to float, normalize (torchvision's
  ImageNet reference recipe);
* recipe "mindcv": the same plus color jitter 0.4 and random erasing 0.5 (MindCV's Res2Net recipe).

For each recipe: torchvision's `ImageFolder` with `transforms.Compose` (PIL loader), and
`ImageFolderDataset` with `train_transform(..., fast_decode=False)` and `fast_decode=True`.

    python benchmarks/data_pipeline.py --out benchmarks/results/data-cpu2.json --png docs/data_pipeline.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision import transforms as T

from res2net.data import ImageFolderDataset, build_shard_loader, train_transform, write_shards
from res2net.profile import machine_info, time_interleaved

SIZES = [
    (500, 375),
    (375, 500),
    (500, 333),
    (500, 400),
    (400, 300),
    (640, 480),
    (800, 600),
    (1024, 768),
    (500, 500),
    (333, 500),
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_photos() -> dict[str, np.ndarray]:
    """The RGB sample photos of scikit-image and scikit-learn (HxWx3 uint8)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = [
        "astronaut",
        "chelsea",
        "coffee",
        "hubble_deep_field",
        "immunohistochemistry",
        "retina",
        "rocket",
    ]
    photos = {name: getattr(skimage.data, name)() for name in names}
    sklearn_images = load_sample_images()
    for filename, image in zip(sklearn_images.filenames, sklearn_images.images):
        photos[Path(filename).stem] = image
    return photos


def build_corpus(root: Path, per_photo: int = 24, seed: int = 0) -> int:
    """`root/train/<photo>/<n>.jpg`: random crops of each photo at ImageNet-like sizes."""
    rng = np.random.default_rng(seed)
    count = 0
    for name, array in sample_photos().items():
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        photo = Image.fromarray(array).convert("RGB")
        for k in range(per_photo):
            w, h = SIZES[rng.integers(len(SIZES))]
            # the largest crop of the target aspect, shrunk at random, then resized to w x h
            cw = min(photo.width, int(photo.height * w / h))
            cw = int(cw * rng.uniform(0.7, 1.0))
            ch = int(cw * h / w)
            x = int(rng.integers(0, photo.width - cw + 1))
            y = int(rng.integers(0, photo.height - ch + 1))
            crop = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC)
            crop.save(folder / f"{k:03d}.jpg", quality=90)
            count += 1
    return count


def candidates(root: Path) -> dict[str, Dataset]:
    """name -> dataset yielding (float image, label), for both recipes."""
    out: dict[str, Dataset] = {}
    for recipe, jitter, erasing in [("basic", None, 0.0), ("mindcv", 0.4, 0.5)]:
        steps: list[Any] = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        if jitter:
            steps.append(T.ColorJitter(jitter, jitter, jitter))
        steps += [T.ToTensor(), T.Normalize(MEAN, STD)]
        if erasing:
            steps.append(T.RandomErasing(p=erasing))
        out[f"{recipe}: torchvision ImageFolder + PIL"] = datasets.ImageFolder(
            str(root / "train"), T.Compose(steps)
        )
        for fast in (False, True):
            tf = train_transform(224, color_jitter=jitter, re_prob=erasing, fast_decode=fast)
            out[f"{recipe}: res2net fast_decode={fast}"] = ImageFolderDataset(
                root, "train", transform=tf
            )
    return out


def shard_epochs(
    root: Path, max_sizes: list[int], batch_size: int
) -> dict[str, Callable[[], None]]:
    """Recipe "basic" read from WebDataset shards written by `write_shards(max_size=N)` (images
    with a bounded longer side, as FFCV stores them: JPEG, or raw RGB pixels), fast_decode on."""
    out: dict[str, Callable[[], None]] = {}
    for max_size in max_sizes:
        for raw in (False, True):
            shard_dir = root.parent / f"{root.name}-shards-{max_size}{'-raw' if raw else ''}"
            write_shards(root, shard_dir, splits=("train",), max_size=max_size, raw=raw)
            loader, _ = build_shard_loader(
                shard_dir,
                transform=train_transform(224, color_jitter=None, fast_decode=True),
                batch_size=batch_size,
                split="train",
            )
            size = sum(f.stat().st_size for f in (shard_dir / "train").glob("*.tar")) / 2**20
            name = f"basic: res2net shards max_size={max_size}{', raw' if raw else ''} ({size:.0f} MiB)"
            out[name] = partial(consume, loader)
    return out


def consume(batches: Iterable) -> None:
    for _ in batches:
        pass


def epoch(dataset: Dataset, batch_size: int) -> None:
    consume(DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus", type=Path, help="where to build the corpus (default: a temporary folder)"
    )
    parser.add_argument("--per_photo", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--png", type=Path, help="bar chart of images per second")
    parser.add_argument(
        "--shard_max_size",
        type=int,
        nargs="*",
        default=[],
        help="also time shards written with these --max-size bounds, e.g. 256 320",
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = args.corpus or Path(tempfile.mkdtemp(prefix="res2net-corpus-"))
    n = build_corpus(root, args.per_photo)
    print(
        f"corpus: {n} JPEGs in {root} ({sum(f.stat().st_size for f in root.rglob('*.jpg')) / n / 1024:.0f} KiB each)"
    )
    epochs: dict[str, Callable[[], None]] = {
        name: partial(epoch, ds, args.batch_size) for name, ds in candidates(root).items()
    }
    epochs.update(shard_epochs(root, args.shard_max_size, args.batch_size))
    print(
        f"timing {len(epochs)} pipelines: a warm-up epoch, then {args.rounds} epochs each, taking turns"
    )
    # warm-up: files in the page cache, lazy imports done
    times = time_interleaved(epochs, warmup=1, rounds=args.rounds)
    seconds = {name: [ms / 1000 for ms in round_ms] for name, round_ms in times.items()}

    results = {}
    for name, epoch_s in seconds.items():
        recipe = name.split(":")[0]
        base = min(seconds[f"{recipe}: torchvision ImageFolder + PIL"])
        base_median = statistics.median(seconds[f"{recipe}: torchvision ImageFolder + PIL"])
        results[name] = {
            "img_s": n / min(epoch_s),
            "median_img_s": n / statistics.median(epoch_s),
            "ms_per_img": min(epoch_s) / n * 1000,
            "speedup": base / min(epoch_s),
            "median_speedup": base_median / statistics.median(epoch_s),
            "seconds": epoch_s,
        }
    print(
        "\n| pipeline | img/s per core (best) | ms/img | speed-up (best / median) |\n|---|---:|---:|---:|"
    )
    for name, r in results.items():
        print(
            f"| {name} | {r['img_s']:.0f} | {r['ms_per_img']:.2f} | {r['speedup']:.2f}x / {r['median_speedup']:.2f}x |"
        )
    record = {
        "machine": machine_info(),
        "load_average": os.getloadavg(),
        "images": n,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    if args.png:
        plot(results, args.png)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1))
    values = [results[name]["img_s"] for name in names]
    ax.barh(
        names[::-1],
        values[::-1],
        color=["tab:blue" if "res2net" in s else "tab:gray" for s in names[::-1]],
    )
    for y, value in enumerate(values[::-1]):
        ax.text(value, y, f" {value:.0f}", va="center")
    ax.set_xlim(0, max(values) * 1.12)
    ax.set_xlabel("training images per second, one core (best epoch)")
    ax.set_title("Input pipeline: decode, crop, augment (224x224)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
