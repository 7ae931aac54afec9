"""Bench tables (markdown, JSON) and the latency-versus-mIoU plot with its Pareto front."""

from __future__ import annotations

import os
from pathlib import Path

from opentrans.artifacts import atomic_path, write_json, write_text
from opentrans.deploy.auto import decision_markdown


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


def _cpu(machine: dict) -> str:
    """The CPU and its ISA from :func:`opentrans.artifacts.machine_description`, as :meth:`opentrans.hardware.CpuIsa.
    summary` writes it, e.g. ``AMD EPYC (avx2, fma; no VNNI, no native bf16)``."""
    from opentrans.hardware import CpuIsa

    isa = machine.get("isa")
    return CpuIsa(machine["cpu"], None if isa is None else tuple(isa)).summary()


def markdown_table(rows: list[dict], header: dict) -> str:
    """The bench table as markdown, headed by the machine, input size and weights it was measured with."""
    m = header["machine"]
    peaks = header.get("roofline_gmac_per_s") or {}
    lines = [
        f"# Benchmark: {header['run']}",
        "",
        f"- Weights: **{header['weights']}**",
        f"- Machine: {_cpu(m)}, {m['logical_cores']} logical cores, torch threads {m['torch_threads']}; "
        f"load average at the end {_loads(header)}",
        "- Roofline (peak GEMM, OpenVINO, measured in this run): "
        + (", ".join(f"{k} {v:.0f} GMAC/s" for k, v in peaks.items()) or "not measured"),
        f"- Input: {header['image_size'][0]}x{header['image_size'][1]} (HxW); latency at batch {header['batch']} "
        f"({header['warmup']} warm-up + {header['repeats']} timed calls; each build in its own process); "
        f"all rows from one run",
        f"- mIoU: {header['dataset']} split {header['split']}, {header['images']} images, "
        f"{header['num_classes']} classes; agreement = pixel argmax agreement with {header['reference']} "
        f"(finetuned models learned new labels, so they are expected to differ from it); parity = a build's "
        f"agreement with the model it was exported from, as its deploy check measured it",
        "",
        "| build | median ms | p90 ms | p99 ms | images/s | speed-up | GMACs | roofline % | peak RSS MB "
        "| mIoU % | agreement % | parity % | size MB | Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        roof = "n/a" if r.get("roofline_fraction") is None else f"{100 * r['roofline_fraction']:.1f} ({r['roofline_precision']})"
        lines.append(
            f"| {r['name']} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['images_per_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['gmacs']:.2f} | {roof} | {r['peak_rss_mb']:.0f} | {_fmt(r['miou'])} | "
            f"{_fmt(r['agreement'])} | {_fmt(r.get('parity_agreement'))} | {r['size_mb']:.1f} | {'*' if r['pareto'] else ''} |"
        )
    larger = [b for b in header.get("batch_sizes", []) if b != header["batch"]]
    if larger:
        lines += ["", "Latency at larger batches (median ms per call / images/s):", "",
                  "| build | " + " | ".join(f"batch {b}" for b in larger) + " |", "|---|" + "---:|" * len(larger)]
        for r in rows:
            cells = [f"{r['latency_by_batch'][str(b)]['median_ms']:.1f} / {r['latency_by_batch'][str(b)]['images_per_s']:.2f}"
                     for b in larger]
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _loads(header: dict) -> str:
    return "/".join(f"{v:.1f}" for v in header.get("load_average", [])) or "n/a"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


CSV_COLUMNS = ("name", "backend", "precision", "median_ms", "p90_ms", "p99_ms", "images_per_s", "speedup", "gmacs",
               "params_m", "achieved_gmac_per_s", "roofline_fraction", "peak_rss_mb", "size_mb", "miou", "pixel_acc",
               "agreement", "teacher_miou", "parity_agreement", "pareto", "weights", "path")


def csv_table(rows: list[dict]) -> str:
    """The rows as CSV with :data:`CSV_COLUMNS` (batch-1 latency)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_card(row: dict, header: dict) -> str:
    """A markdown model card for one build: what it is, how it was made, its figures and its weights."""
    roof = "n/a" if row.get("roofline_fraction") is None else f"{100 * row['roofline_fraction']:.1f} % of the {row['roofline_precision']} peak"
    return "\n".join([
        f"# Model card: {row['name']}",
        "",
        f"- **What**: open-vocabulary segmentor, back end `{row['backend']}`, precision {row['precision']}, "
        f"artifact `{row['path']}` ({row['size_mb']:.1f} MB).",
        f"- **Weights**: {row['weights']}.",
        f"- **How it was made**: stages {' -> '.join(row['lineage']) or 'none (fresh model)'}"
        + ("" if row["backend"].startswith("torch") else f", then `opentrans deploy` ({row['backend']})") + ".",
        f"- **Image encoder**: {row['params_m']:.2f} M params, {row['gmacs']:.2f} GMACs at "
        f"{header['image_size'][0]}x{header['image_size'][1]}.",
        f"- **Latency** (batch {row['batch']}, {header['machine']['cpu']}, {header['machine']['logical_cores']} "
        f"cores): median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
        f"{row['images_per_s']:.2f} images/s; {row['achieved_gmac_per_s']:.1f} GMAC/s = {roof}; "
        f"peak RSS {row['peak_rss_mb']:.0f} MB.",
        f"- **Accuracy** on {header['dataset']} ({header['split']}, {header['images']} images): mIoU "
        f"{_fmt(row['miou'])} %, pixel accuracy {_fmt(row['pixel_acc'])} %; agreement with {header['reference']}: "
        f"{_fmt(row['agreement'])} % of pixels, teacher mIoU {_fmt(row['teacher_miou'])} %.",
        "",
        *([] if not row.get("decision") else ["## Precision decision", "", decision_markdown(row["decision"])]),
    ])


def plot_pareto(rows: list[dict], path: str | os.PathLike, title: str, subtitle: str = "") -> Path:
    """Latency (median ms at batch 1, x) against mIoU (%, y): one numbered point per build, the Pareto front drawn
    as a step line, and a table beside the axes mapping each number to its build (name, ms, mIoU), front members
    in bold red. ``title`` is the run, ``subtitle`` the weights and machine (wrapped to the figure's width)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5.2))
    ax = fig.add_axes((0.07, 0.12, 0.46, 0.68))
    for i, r in enumerate(rows, start=1):
        color = "tab:red" if r["pareto"] else "tab:blue"
        ax.scatter(r["median_ms"], r["miou"], s=120, zorder=3, color=color, edgecolor="white", linewidth=0.8)
        ax.annotate(str(i), (r["median_ms"], r["miou"]), ha="center", va="center", fontsize=7, color="white",
                    fontweight="bold", zorder=4)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["median_ms"])
    ax.step([r["median_ms"] for r in front], [r["miou"] for r in front], where="post", color="tab:red",
            alpha=0.6, zorder=2, label="Pareto front (faster and at least as accurate)")
    ax.set_xlabel("latency, median ms per image (batch 1)")
    ax.set_ylabel("mIoU (%)")
    ax.margins(x=0.12, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, frameon=False)
    fig.text(0.01, 0.965, title, fontsize=11, fontweight="bold", va="top")
    if subtitle:
        fig.text(0.01, 0.915, "\n".join(textwrap.wrap(subtitle, 150)), fontsize=8, va="top", color="0.3")
    lines = [f"{i:>2}  {r['name'][:52]:<52} {r['median_ms']:>8.1f} ms {r['miou']:>6.2f} %"
             for i, r in enumerate(rows, start=1)]
    fig.text(0.56, 0.80, f"{'#':>2}  {'build':<52} {'latency':>11} {'mIoU':>8}", fontsize=7.5,
             family="monospace", fontweight="bold", va="top")
    for k, (line, r) in enumerate(zip(lines, rows)):
        fig.text(0.56, 0.80 - 0.045 * (k + 1), line, fontsize=7.5, family="monospace", va="top",
                 color="tab:red" if r["pareto"] else "black", fontweight="bold" if r["pareto"] else "normal")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def write_bench_report(rows: list[dict], header: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``bench.md``, ``bench.json``, ``bench.csv``, ``bench.png`` and ``cards/<build>.md``; return the paths."""
    out_dir = Path(out_dir)
    paths = [
        write_text(out_dir / "bench.md", markdown_table(rows, header)),
        write_json(out_dir / "bench.json", {"header": header, "rows": rows}),
        write_text(out_dir / "bench.csv", csv_table(rows)),
        plot_pareto(rows, out_dir / "bench.png", f"Latency vs mIoU: {header['run']}",
                    f"Weights: {header['weights']}. Machine: {_cpu(header['machine'])}, "
                    f"{header['machine']['logical_cores']} cores. {header['dataset']} {header['split']}, "
                    f"{header['images']} images."),
    ]
    for r in rows:
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in r["name"]).strip("_")
        paths.append(write_text(out_dir / "cards" / f"{slug}.md", model_card(r, header)))
    return paths
