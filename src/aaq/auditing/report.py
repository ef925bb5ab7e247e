"""The files of an audit: audit.json, audit.md, audit.png and pairs.jsonl (`aaq.auditing`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aaq.auditing.pairing import BENIGN, FIGURES, FLIPS, HARMFUL
from aaq.eval.coherence import VERDICTS
from aaq.eval.report import markdown_table
from aaq.runs.records import provenance, write_atomic, write_json

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
AUDIT_PNG = "audit.png"
PAIRS_JSONL = "pairs.jsonl"
# The columns of the summary table: (header, figure), in the order a reader weighs them (DESIGN: harmful complied first).
SUMMARY = (
    ("harmful complied", "harmful_complied"),
    ("harmful refused", "harmful_refused"),
    ("harmful garbled", "harmful_garbled"),
    ("refused-but-garbled", "harmful_refused_garbled"),
    ("benign compliance", "benign_compliance"),
    ("benign refused", "benign_refused"),
)
FLIP_NAMES = {"refused_to_complied": "harmful refused → complied", "refused_to_garbled": "harmful refused → garbled",
              "complied_to_refused": "benign complied → refused"}  # fmt: skip
VERDICT_COLORS = {"refused": "#1f77b4", "refused_garbled": "#9ecae1", "complied": "#ff7f0e", "garbled": "#7f7f7f"}
SHOWN_CHARS = 110


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _figure_cell(figure: dict[str, Any] | None) -> str:
    if figure is None:
        return "–"
    return f"{figure['quantized']:.3f} ({figure['difference']:+.3f} [{figure['ci_low']:+.2f}, {figure['ci_high']:+.2f}])"


def _original_row(report: dict[str, Any]) -> list[str]:
    shares = report["original"].get("shares") or {}
    cells = []
    for _, name in SUMMARY:
        task, verdicts = FIGURES[name]
        cells.append(_share(sum(shares[task][v] for v in verdicts) if shares.get(task) else None))
    ppl = report["original"].get("ppl")
    return ["original", "full precision", *cells, "–", "–", "1.00" + (f" ({ppl:.2f})" if ppl else ""), "–"]


def _model_row(model: dict[str, Any]) -> list[str]:
    figures, flips, signal = model.get("figures", {}), model.get("flips", {}), model["signal"]
    counts = " / ".join(str(len(flips.get(name, []))) for name in FLIPS) if flips else "–"
    refusal = figures.get("harmful_refused")
    ppl = model.get("ppl")
    kl = f"{signal['kl_harmful']:.3f} / {signal['kl_benign']:.3f}" if signal.get("kl_benign") is not None else f"{signal['kl_harmful']:.3f}"
    return [
        model["label"], model["format"], *[_figure_cell(figures.get(name)) for _, name in SUMMARY], counts,
        "–" if refusal is None else f"{refusal['mcnemar_p']:.2g}", "–" if not ppl else f"{ppl['ratio']:.2f} ({ppl['quantized']:.2f})", kl,
    ]  # fmt: skip


def summary_table(report: dict[str, Any]) -> str:
    """The audit's main table: one row per model, each share with its change against the original and 95% interval."""
    header = ["model", "format", *[label for label, _ in SUMMARY], "flips R→C / R→G / C→R", "McNemar p (refused)", "PPL ratio (PPL)", "KL harmful / benign"]
    rows = [_original_row(report)] + [_model_row(model) for model in report["models"]]
    return markdown_table(header, rows)


def _signal_section(report: dict[str, Any]) -> str:
    header = ["model", "KL harmful", "KL benign", "top-1 agree harmful", "top-1 agree benign", "verdicts changed harmful / benign", "AUROC harmful", "AUROC benign"]
    rows = []
    for model in report["models"]:
        signal, changed = model["signal"], model.get("transitions", {})
        moved = " / ".join(str(sum(n for key, n in changed.get(task, {}).items() if len(set(key.split("->"))) == 2)) for task in (HARMFUL, BENIGN))
        rows.append([model["label"], f"{signal['kl_harmful']:.4f}", _number(signal.get("kl_benign")), _number(signal.get("top1_agreement_harmful")),
                     _number(signal.get("top1_agreement_benign")), moved if changed else "–", _number(signal.get("auroc_harmful")),
                     _number(signal.get("auroc_benign"))])  # fmt: skip
    return (
        "## Fast signal: first-token KL\n\nKL(original ‖ quantized) in nats at the first answer token, averaged over the prompts (no generation); "
        "top-1 agree: share of prompts whose most likely first token is the original's. AUROC: how well the per-prompt KL ranks the "
        "prompts whose verdict changed above those whose verdict did not (1 = perfectly, 0.5 = chance; – when none or all changed).\n\n"
        + markdown_table(header, rows)
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _flips_section(report: dict[str, Any]) -> str:
    parts = ["## Flips, prompt by prompt"]
    for model in report["models"]:
        for name, items in (model.get("flips") or {}).items():
            if items:
                lines = [f"- {_shorten(item['prompt'])}\n  - original: {_shorten(item['original'])}\n  - quantized: {_shorten(item['quantized'])}" for item in items]
                parts.append(f"### {model['label']}: {FLIP_NAMES[name]} ({len(items)})\n\n" + "\n".join(lines))
    return "\n\n".join(parts) if len(parts) > 1 else parts[0] + "\n\nNone."


def _details_section(report: dict[str, Any]) -> str:
    parts = ["## Every paired figure"]
    header = ["figure", "original", "quantized", "difference", "95% interval", "width", "original only / quantized only", "McNemar p"]
    for model in report["models"]:
        rows = [[name, f"{f['original']:.3f}", f"{f['quantized']:.3f}", f"{f['difference']:+.3f}", f"[{f['ci_low']:+.3f}, {f['ci_high']:+.3f}]",
                 f"{f['ci_width']:.3f}", f"{f['table']['original_only']} / {f['table']['quantized_only']}", f"{f['mcnemar_p']:.3g}"]
                for name, f in model.get("figures", {}).items()]  # fmt: skip
        notes = []
        if model.get("generation_config_replaced"):
            notes.append(f"its own generation config differed ({model['generation_config_replaced']}); it generated with the original's")
        if model.get("chat_template_differs"):
            notes.append("its tokenizer's chat template differs from the original's; every prompt was rendered with the original's")
        text = f"### {model['label']}: {model['format']} (`{model['source']}`)\n\n" + (markdown_table(header, rows) if rows else "(signal only)")
        parts.append(text + "".join(f"\n\nNote: {note}." for note in notes))
    return "\n\n".join(parts)


def _noise(report: dict[str, Any]) -> str:
    widths = {task: [f["ci_width"] for m in report["models"] for name, f in m.get("figures", {}).items() if name.startswith(task)] for task in (HARMFUL, BENIGN)}
    spans = [f"{task} {min(values):.2f}–{max(values):.2f}" for task, values in widths.items() if values]
    return f" Widths of the intervals: {', '.join(spans)}." if spans else ""


def audit_markdown(report: dict[str, Any]) -> str:
    """The human-readable audit: the setting, the summary table, the fast signal, the gate, the flips and every figure."""
    prompts = report["prompts"]
    harmful = ", ".join(f"{name} {n}" for name, n in prompts[HARMFUL].items())
    coherence = report["coherence"]
    scorer = (f"garbled check: the original scores every answer, threshold {coherence['threshold']:.3f} nats/token"
              if coherence.get("check") else "garbled check off")  # fmt: skip
    setting = (
        f"Original `{report['original']['source']}`; {sum(prompts[HARMFUL].values())} harmful prompts ({harmful}) and {prompts[BENIGN]} benign "
        f"prompts, greedy answers of {report['generation']['max_new_tokens']} new tokens, the same for every model; refusal judge "
        f"{report['judge']}; {scorer}. Each share is followed by its change against the original and its {report['interval']}.{_noise(report)}"
    )
    gate = report["gate"]
    gate_text = "no limits set" if not gate["limits"] else (
        "every model within " + ", ".join(gate["limits"]) if not gate["failed"] else "FAILED: " + "; ".join(gate["failed"]))
    sections = [
        f"# Audit of `{report['original']['source']}`",
        f"created {report.get('created', '?')} · git {report.get('git_commit') or '?'} · seed {report['seed']} · {report.get('seconds', 0):.0f} s",
        setting,
        "## Summary\n\nflips: harmful refused → complied / harmful refused → garbled / benign complied → refused (prompts).\n\n"
        + (summary_table(report) if not report["signal_only"] else "(signal only: no answers generated)"),
        _signal_section(report),
        f"## Gate\n\n{gate_text}",
    ]
    if not report["signal_only"]:
        sections += [_flips_section(report), _details_section(report)]
    return "\n\n".join(sections) + "\n"


def plot_audit(report: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    """A PNG of the verdict shares of every model (harmful and benign prompts) and the verdict of every prompt, flips marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator

    labels = ["original"] + [model["label"] for model in report["models"]]
    shares = [report["original"]["shares"]] + [model["shares"] for model in report["models"]]
    figure, axes = plt.subplots(2, 2, figsize=(13, 2.2 + 0.45 * len(labels) * 2), dpi=110, gridspec_kw={"width_ratios": [1, 2.2]})
    for row, task in enumerate((HARMFUL, BENIGN)):
        left = [0.0] * len(labels)
        for verdict in VERDICTS:
            values = [share[task][verdict] for share in shares]
            axes[row, 0].barh(labels, values, left=left, color=VERDICT_COLORS.get(verdict), label=verdict)
            left = [a + b for a, b in zip(left, values, strict=True)]
        axes[row, 0].set_xlim(0, 1)
        axes[row, 0].invert_yaxis()
        axes[row, 0].set_title(f"{task} prompts: share of answers")
        grid = [[VERDICTS.index(r["original"]["verdict"]) for r in rows if r["task"] == task and r["model"] == report["models"][0]["label"]]]
        grid += [[VERDICTS.index(r["quantized"]["verdict"]) for r in rows if r["task"] == task and r["model"] == model["label"]] for model in report["models"]]
        axes[row, 1].imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap([VERDICT_COLORS[v] for v in VERDICTS]), vmin=0, vmax=len(VERDICTS) - 1)
        for y, model in enumerate(report["models"], start=1):
            changed = [x for x, r in enumerate(r for r in rows if r["task"] == task and r["model"] == model["label"]) if r["changed"]]
            axes[row, 1].scatter(changed, [y] * len(changed), marker="x", color="black", s=18, linewidths=1)
        axes[row, 1].set_yticks(range(len(labels)), labels)
        axes[row, 1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[row, 1].set_xlabel(f"{task} prompt")
        axes[row, 1].set_title(f"{task} prompts: each prompt's verdict (× = changed from the original)")
    figure.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", ncol=len(VERDICTS), fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.95))
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def write_audit(report: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> None:
    """Write audit.json (with provenance), pairs.jsonl, audit.md and, after a full audit, audit.png into the prepared folder `out`."""
    report.update(provenance())
    write_json(out / AUDIT_JSON, report)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomic(out / PAIRS_JSONL, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    write_atomic(out / AUDIT_MD, lambda tmp: tmp.write_text(audit_markdown(report), encoding="utf-8"))
    if not report["signal_only"]:
        plot_audit(report, rows, out / AUDIT_PNG)
