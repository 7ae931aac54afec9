"""``prune_report.md``: one renderer for the reports of both pruning methods (pure functions of the report dict).

A structured report (:func:`opentrans.prune.stage.compute_prune`) and an IMP report
(:func:`opentrans.prune.imp_stage.imp_report`, ``"method": "imp"``) share the page's parts: the title, a cost
table before/after, the recovery and fidelity lines and a per-layer table; each method contributes its own rows.
"""

from __future__ import annotations

REPORT_JSON = "prune_report.json"
REPORT_MD = "prune_report.md"
#: How the report describes each IMP target set (a report without ``targets`` predates them: ``extended``).
TARGETS_TEXT = {
    "authors": "Conv2d weights except the first conv (the OpenTrans authors' targets; no Linear layer)",
    "extended": "Linear/Conv2d weights and fused Q/K/V (patch/stem conv excluded; our extended targets)",
}
LATENCY_NOTE = ("Unstructured sparsity shrinks the compressed size of the weights but not dense-kernel latency: "
                "the pruned model keeps every shape, so its GMACs and its dense CPU/GPU latency are unchanged. "
                "Use `--method structured` to make the model faster.")


def change(before: float, after: float) -> str:
    """Relative change from ``before`` to ``after`` as ``+x.y%`` (``n/a`` when ``before`` is 0)."""
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def table(header: list[str], align: str, rows: list[list]) -> list[str]:
    """Markdown table lines: ``header`` cells, ``align`` one letter per column (``l`` left, ``r`` right), rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def fidelity_line(report: dict, logit_cosine: bool = False) -> list[str]:
    """The fidelity paragraph (``["", line]``), or nothing when the report has no fidelity."""
    fid = report.get("fidelity")
    if not fid:
        return []
    line = (f"Fidelity to the unpruned model on `{report['eval_data']}` val ({fid['images']} images, "
            f"{report['weights']}): teacher-agreement mIoU **{fid['teacher_miou']:.2f} %**, pixel agreement "
            f"{fid['pixel_agreement']:.2f} %, dense feature cosine {fid['feature_cosine']:.4f}")
    if logit_cosine:
        line += f", logit cosine (min) {fid['logit_cosine']:.4f}"
    return ["", line + "."]


def _before_after(label: str, before: float, after: float) -> list:
    return [label, f"{before:.4g}", f"{after:.4g}", change(before, after)]


def _structured_cost_rows(report: dict) -> list[list]:
    rows = [_before_after("Params (M)", report["params_m_before"], report["params_m_after"]),
            _before_after("GMACs (dense path)", report["gmacs_before"], report["gmacs_after"])]
    if "weights_mb_before" in report:
        rows.append(_before_after("Weights, whole segmentor (MB, fp32)", report["weights_mb_before"],
                                  report["weights_mb_after"]))
    lat, lat_ov = report.get("latency"), report.get("latency_openvino")
    if lat:
        rows.append(_before_after(f"Latency, torch CPU, {lat['threads']} threads (ms, median)", lat["ms_before"],
                                  lat["ms_after"]))
    if lat_ov:
        rows.append(_before_after(f"Latency, OpenVINO CPU f32, {lat_ov['threads']} threads (ms, median)",
                                  lat_ov["ms_before"], lat_ov["ms_after"]))
    return rows


def _structured_notes(report: dict) -> list[str]:
    lines = ["", "GMACs: matrix products and convolutions of the dense path the segmentor runs (element-wise ops not "
             "counted). Params: every parameter of the image tower."]
    lat, lat_ov = report.get("latency"), report.get("latency_openvino")
    if lat:
        lines.append(f"Latency (torch): image encoder dense path, batch 1, measured before and after pruning in the "
                     f"same run (interleaved, {lat['repeats']} rounds); speed-up {lat['speedup']:.2f}x for a MAC "
                     f"ratio (before / after) of {lat['mac_ratio']:.2f}x (ratio {lat['speedup'] / lat['mac_ratio']:.2f}).")
    if lat_ov:
        lines.append(f"Latency (OpenVINO): whole segmentor graph (ONNX -> IR, f32 inference precision, 11 classes), "
                     f"batch 1, same run, interleaved; speed-up {lat_ov['speedup']:.2f}x.")
    return lines


def _structured(report: dict) -> list[str]:
    weights, (h, w) = report["weights"], report["image_size"]
    if report.get("transfer_from"):
        intro = (f"Weights: **{weights}**. Pruned shapes transferred from `{report['transfer_from']}` "
                 f"(kept indices re-applied, no scoring).")
    else:
        intro = (f"Weights: **{weights}**. Importance `{report['importance']}` ({report['ranking']} ranking), "
                 f"round_to {report['round_to']}.")
    structures = [[name, s["original"], "n/a" if s.get("target") is None else f"{s['target']:.1%}",
                   f"{s['before']:.1%}", f"{s['achieved']:.1%}", s["kept"]] for name, s in report["structures"].items()]
    lines = [f"# Prune report: {report['model']}", "", intro, ""]
    lines += table(["Structure", "units (original)", "target", "before", "achieved", "kept"], "lrrrrr", structures)
    lines += [""] + table([f"Image encoder ({weights}, {h}x{w}, batch 1)", "before", "after", "change"], "lrrr",
                          _structured_cost_rows(report))
    lines += _structured_notes(report)
    lines += [""] + table(["Structure", "Layer", "original", "before", "after"], "llrrr",
                          [[row.get("structure", "channels"), f"`{row['layer']}`", row["original"], row["before"],
                            row["after"]] for row in report["layers"]])
    rec = report.get("recovery")
    if rec:
        lines += ["", f"Recovery: {rec['steps']} label-free distillation steps on `{rec['distill_data']}`; distillation "
                  f"loss on a fixed batch {rec['loss_pruned']:.5f} after pruning -> {rec['loss_recovered']:.5f} after "
                  f"recovery."]
    return lines + fidelity_line(report)


def _imp(report: dict) -> list[str]:
    w, (h, wd) = report["weights"], report["image_size"]
    lines = [
        f"# Prune report (OpenTrans IMP): {report['model']}",
        "",
        f"Weights: **{w}**. Global unstructured L1 magnitude pruning of the image encoder's "
        + TARGETS_TEXT[report.get("targets", "extended")]
        + f", {report['rate']:.0%} of the remaining weights per round, "
        f"{report['recovery_steps']} distillation recovery steps per round"
        + (f" on `{report['distill_data']}`" if report.get("distill_data") else "") + ".",
        f"Sparsity of the pruned weights: {report['sparsity_before']:.2%} -> **{report['sparsity']:.2%}** "
        f"(target {report['sparsity_target']:.2%}) in {len(report['rounds'])} rounds.",
        "",
        f"**{LATENCY_NOTE}**",
        "",
    ]
    rows = [["Params (M)", f"{report['params_m']:.4g}", f"{report['params_m']:.4g}"],
            ["Non-zero params (M)", f"{report['nonzero_params_m_before']:.4g}", f"{report['nonzero_params_m_after']:.4g}"],
            [f"GMACs (dense path, {h}x{wd})", f"{report['gmacs']:.4g}", f"{report['gmacs']:.4g}"],
            ["zlib-compressed weights (MB)", f"{report['compressed_mb_before']:.4g}",
             f"{report['compressed_mb_after']:.4g}"],
            ["model.safetensors (MB, dense)", f"{report['file_mb']:.4g}", f"{report['file_mb']:.4g}"]]
    lines += table([f"Image encoder ({w})", "before", "after"], "lrr", rows) + [""]
    fid = fidelity_line(report, logit_cosine=True)
    lines += fid[1:] + [""] if fid else []
    if report["rounds"]:
        lines += table(["Round", "sparsity %", "distill loss after pruning", "after recovery"], "rrrr",
                       [[r["round"], f"{100 * r['sparsity']:.2f}", _loss(r.get("loss_pruned")),
                         _loss(r.get("loss_recovered"))] for r in report["rounds"]]) + [""]
    lines += table(["Layer", "shape", "params", "zeros", "sparsity %"], "llrrr",
                   [[f"`{r['layer']}`", "x".join(map(str, r["shape"])), r["params"], r["zeros"], f"{r['sparsity']:.2f}"]
                    for r in report["layers"]])
    return lines


def _loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def render_markdown(report: dict) -> str:
    """``prune_report.md`` for people from a prune report: a structured one (cost before/after, latency,
    per-layer sizes, recovery, fidelity) or an IMP one (``"method": "imp"``: sparsity, compressed size, latency
    note, rounds, per-layer sparsity, fidelity). Both carry ``model`` and ``weights``."""
    lines = _imp(report) if report.get("method") == "imp" else _structured(report)
    return "\n".join(lines) + "\n"
