"""Bench tables (markdown, JSON) and the latency-versus-mIoU plot with its Pareto front."""

from __future__ import annotations

import os
from pathlib import Path

from opentrans.artifacts import atomic_path, write_json, write_text


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the builds no other build beats on both latency (lower) and mIoU (higher)."""
    front = []
    for r in rows:
        dominated = any(
            o is not r and o["median_ms"] <= r["median_ms"] and o["miou"] >= r["miou"]
            and (o["median_ms"] < r["median_ms"] or o["miou"] > r["miou"])
            for o in rows
        )
        if not dominated:
            front.append(r["name"])
    return front


def markdown_table(rows: list[dict], header: dict) -> str:
    """The bench table as markdown, headed by the machine, input size and weights it was measured with."""
    lines = [
        f"# Benchmark: {header['run']}",
        "",
        f"- Weights: **{header['weights']}**",
        f"- Machine: {header['machine']['cpu']}, {header['machine']['logical_cores']} logical cores, "
        f"torch threads {header['machine']['torch_threads']}, ISA {', '.join(header['machine']['isa']) or 'n/a'}",
        f"- Input: {header['image_size'][0]}x{header['image_size'][1]} (HxW), batch {header['batch']}; "
        f"{header['warmup']} warm-up + {header['repeats']} timed calls per build; all rows from one run",
        f"- mIoU: {header['dataset']} split {header['split']}, {header['images']} images, "
        f"{header['num_classes']} classes; agreement = pixel argmax agreement with {header['reference']}",
        "",
        "| build | median ms | p90 ms | images/s | speed-up | mIoU % | pAcc % | agreement % | size MB | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['images_per_s']:.2f} | "
            f"{r['speedup']:.2f}x | {_fmt(r['miou'])} | {_fmt(r['pixel_acc'])} | {_fmt(r['agreement'])} | "
            f"{r['size_mb']:.1f} | {'*' if r['pareto'] else ''} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def plot_pareto(rows: list[dict], path: str | os.PathLike, title: str) -> Path:
    """Scatter of latency (ms, x) against mIoU (%, y), one labelled point per build, Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["median_ms"], r["miou"], s=50, zorder=3, color="tab:red" if r["pareto"] else "tab:blue")
        ax.annotate(r["name"], (r["median_ms"], r["miou"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["median_ms"])
    ax.step([r["median_ms"] for r in front], [r["miou"] for r in front], where="post", color="tab:red",
            alpha=0.6, label="Pareto front")
    ax.set_xlabel("latency, median ms (batch 1)")
    ax.set_ylabel("mIoU %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def write_bench_report(rows: list[dict], header: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``bench.md``, ``bench.json`` and ``bench.png`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    md = write_text(out_dir / "bench.md", markdown_table(rows, header))
    js = write_json(out_dir / "bench.json", {"header": header, "rows": rows})
    png = plot_pareto(rows, out_dir / "bench.png", f"{header['run']} ({header['weights']})")
    return [md, js, png]
