"""Turn benchmarks/compare.py's JSON into the Markdown tables of docs/benchmarks.md (ratios
against the peer measured in the same run) and a bar chart PNG.

    python benchmarks/report.py benchmarks/results.json --png docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (part, ours, peer, target speed-up) for the targets of the speed issue
TARGETS = [
    ("inference", "res2net eager", "timm eager", 1.3),
    ("inference", "res2net optimize_for_inference", "onnxruntime (timm ONNX)", 1.05),
    ("inference", "res2net optimize_for_inference(compile=True)", "onnxruntime (timm ONNX)", 1.05),
    ("training", "res2net train step", "timm train step", 1.2),
]


def table(part: dict, baseline: str) -> str:
    lines = [
        f"| candidate | best ms | median ms | img/s | GFLOP/s | of torch.mm roofline | speed vs {baseline} (best / median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = part["candidates"][baseline]
    for name, c in part["candidates"].items():
        lines.append(
            f"| {name} | {c['best_ms']:.0f} | {c['median_ms']:.0f} | {c['img_s']:.1f} | {c['gflop_s']:.0f} | "
            f"{c['roofline_frac'] * 100:.0f}% | {base['best_ms'] / c['best_ms']:.2f}x / "
            f"{base['median_ms'] / c['median_ms']:.2f}x |"
        )
    return "\n".join(lines)


def targets(result: dict) -> str:
    lines = [
        "| ours | peer | speed-up, best rounds | speed-up, medians | target |",
        "|---|---|---:|---:|---:|",
    ]
    for part, ours, peer, target in TARGETS:
        c = result.get(part, {}).get("candidates", {})
        if ours not in c or peer not in c:
            continue
        best = c[peer]["best_ms"] / c[ours]["best_ms"]
        median = c[peer]["median_ms"] / c[ours]["median_ms"]
        lines.append(f"| {ours} | {peer} | {best:.2f}x | {median:.2f}x | {target:.2f}x |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [p for p in ("inference", "training") if p in result]
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        cands = result[part]["candidates"]
        names = list(cands)
        values = [cands[n]["img_s"] for n in names]
        colors = ["tab:orange" if "res2net" in n else "tab:gray" for n in names]
        ax.barh(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.12)
        ax.invert_yaxis()
        ax.set_xlabel("images / s (best round, higher is better)")
        ax.set_title(
            f"Res2Net-50 {part}, batch {result['batch_size']}, {result['image_size']}px, fp32"
        )
    m = result["machine"]
    fig.suptitle(
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}; gray: peers, orange: res2net",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path)
    parser.add_argument("--png", type=Path, help="write the bar chart here")
    args = parser.parse_args()
    result = json.loads(args.results.read_text())
    m = result["machine"]
    print(
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"timm {result['timm']}, onnxruntime {result['onnxruntime']}; load average before/after "
        f"{result['load_before'][0]:.2f}/{result['load_after'][0]:.2f}."
    )
    print(
        f"fp32 GEMM rooflines: torch.mm 2048^3 {result['matmul_gflop_s']:.0f} GFLOP/s, the same product as a "
        f"1x1 convolution (oneDNN, 1024^3) {result['conv_gemm_gflop_s']:.0f} GFLOP/s; "
        f"{result['gflop_per_image']:.2f} GFLOP per image at {result['image_size']}px."
    )
    print(f"Allocator settings: {result['allocator_env'] or 'defaults'}.\n")
    print(targets(result) + "\n")
    if "inference" in result:
        print(table(result["inference"], "timm eager") + "\n")
        inf = result["inference"]
        for name, s in {**inf["compile_s"], **inf["export_s"]}.items():
            print(f"- {name}: {'compile' if name in inf['compile_s'] else 'export'} {s:.0f} s")
        worst = max(inf["max_rel_err_vs_timm_eager"].values())
        print(f"- largest max relative difference from timm eager's logits: {worst:.1e}\n")
    if "training" in result:
        print(table(result["training"], "timm train step"))
    if args.png:
        plot(result, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
