"""Evaluation reports: report.json + report.md per run, a comparison table and a safety-vs-perplexity plot."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

from aaq.errors import AaqError
from aaq.runs.folders import prepare_output_folder
from aaq.runs.records import provenance, write_atomic, write_json

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "safety_vs_ppl.png"
COMPARISON_KIND = "aaq-comparison"
FP_COLOR = "#d62728"
FP_MARKERS = ("fp", "fp16", "fp32", "bf16", "w16a16", "w16a16kv16", "none")
METRIC_COLUMNS = (
    ("PPL", "ppl", "{:.2f}"),
    ("harmful complied", "harmful_complied_rate", "{:.1%}"),
    ("refusal", "refusal_rate", "{:.1%}"),
    ("refused, garbled", "refused_garbled_rate", "{:.1%}"),
    ("harmful garbled", "garbled_rate", "{:.1%}"),
    ("benign complied", "benign_compliance", "{:.1%}"),
    ("benign refused", "benign_refusal_rate", "{:.1%}"),
    ("benign garbled", "benign_garbled_rate", "{:.1%}"),
    ("SafetyBench", "safetybench_acc", "{:.1%}"),
)
TABLE_LEGEND = (
    "Every answer is refused, refused but garbled, complied or garbled: a refusal by the judge or not, and coherent or "
    "not (incoherent: empty, a loop, or a per-token NLL under the full-precision scorer above its calibrated threshold; "
    "report.json `coherence`). On harmful prompts: harmful complied = coherent answers that do not refuse (the primary "
    "safety figure, lower is safer), refusal = coherent refusals, refused, garbled = refusals followed by noise, harmful "
    "garbled = incoherent non-refusals; on benign prompts: benign complied = coherent answers, benign refused = "
    "refusals, benign garbled = incoherent non-refusals. Each is a share of the prompts; – = not measured (or the "
    "garbled check was off)."
)
# The by-set rows of a report's metrics: label and metric of each harmful prompt set.
_SET_ROWS = (("harmful complied", "harmful_complied_rate"), ("refusal", "refusal_rate"), ("refused, garbled", "refused_garbled_rate"), ("harmful garbled", "garbled_rate"))


# Above this magnitude a fixed-point pattern such as "{:.2f}" would print every digit (a broken model's perplexity, 1e172).
_FIXED_POINT_LIMIT = 1e6


def _cell(value, pattern: str = "{}") -> str:
    """A table cell: – for nothing, inf/nan as such, huge numbers in exponent notation, others with `pattern`."""
    if value is None:
        return "–"
    if isinstance(value, float) and (not math.isfinite(value) or abs(value) >= _FIXED_POINT_LIMIT):
        return f"{value:.4g}"
    return pattern.format(value) if isinstance(value, (int, float)) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of `header` and `rows` (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _metrics_section(report: dict) -> str:
    metrics = report.get("metrics", {})
    rows = [[label, _cell(metrics.get(key), pattern)] for label, key, pattern in METRIC_COLUMNS]
    for name, values in (metrics.get("refusal_by_set") or {}).items():
        rows += [[f"{label}, {name} ({values['n']})", _cell(values.get(key), "{:.1%}")] for label, key in _SET_ROWS]
    for task, values in (metrics.get("lmeval") or {}).items():
        rows += [[f"lm-eval {task} {name}", _cell(value, "{:.4f}")] for name, value in values.items()]
    return "## Metrics\n\n" + markdown_table(["metric", "value"], rows)


def _breakdowns_section(report: dict) -> str:
    parts = ["## Per-category breakdowns"]
    for name, values in (report.get("breakdowns") or {}).items():
        if values:
            rows = [[category, _cell(value, "{:.1%}")] for category, value in values.items()]
            parts.append(f"### {name}\n\n" + markdown_table(["category", "rate"], rows))
    return "\n\n".join(parts)


def _key_values_section(title: str, values: dict, pattern: str = "{}") -> str:
    rows = [[str(key), _cell(value, pattern)] for key, value in (values or {}).items()]
    return f"## {title}\n\n" + (markdown_table(["", ""], rows) if rows else "(none)")


def _coherence_section(report: dict) -> str:
    coherence = report.get("coherence") or {}
    if not coherence.get("check"):
        return "## Garbled check\n\n" + (f"off ({coherence['reason']})" if coherence else "(not recorded)")
    text = (
        f"Scorer `{coherence['scorer']}`, threshold {coherence['threshold']:.3f} nats/token = the "
        f"{coherence['quantile']:.2f} quantile ({coherence['nll_quantile']:.3f}) of its own answers to "
        f"{coherence['n_answers']} calibration prompts + {coherence['margin']:.2f}. {coherence['rule']}"
    )
    return "## Garbled check\n\n" + text


def report_markdown(report: dict) -> str:
    """Return the human-readable markdown of one evaluation report."""
    title = f"# Evaluation: {report.get('model')} ({report.get('method')}, {report.get('bits')})"
    header = f"seed {report.get('seed')} · created {report.get('created', '?')} · git {report.get('git_commit') or '?'}"
    sections = [
        title,
        header,
        _metrics_section(report),
        _key_values_section("What the metrics mean", report.get("metric_definitions", {})),
        _coherence_section(report),
        _breakdowns_section(report),
        _key_values_section("Items", report.get("n_items", {})),
        _key_values_section("Wall time (s)", report.get("seconds", {}), "{:.1f}"),
        _key_values_section("Versions", report.get("versions", {})),
    ]
    return "\n\n".join(sections) + "\n"


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Write `report.json` and `report.md` into `out_dir` (atomically) and return the folder."""
    out_dir = Path(out_dir)
    write_json(out_dir / REPORT_JSON, report)
    write_atomic(out_dir / REPORT_MD, lambda tmp: tmp.write_text(report_markdown(report), encoding="utf-8"))
    return out_dir


def _report_path(run: str | Path) -> Path:
    run = Path(run)
    return run if run.suffix == ".json" else run / REPORT_JSON


def merge_reports(run_dirs: Sequence[str | Path]) -> list[dict]:
    """Return the evaluation reports of every run folder (or report file) in order, each with its `run_dir` added.

    A folder may hold an `aaq eval` report or an `aaq report` comparison (its runs are taken in
    order); anything else is an AaqError.
    """
    reports = []
    for run in run_dirs:
        path = _report_path(run)
        if not path.is_file():
            raise AaqError(f"{path} does not exist; pass run folders written by `aaq eval --out DIR`")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AaqError(f"{path} is not valid JSON ({error}); re-run `aaq eval` for that folder") from None
        comparison = isinstance(report, dict) and report.get("kind") == COMPARISON_KIND
        found = report.get("runs") if comparison else [report]
        if not isinstance(found, list) or not all(is_evaluation_report(r) for r in found):
            raise AaqError(
                f"{path} is not an aaq report; pass folders written by `aaq eval --out DIR` or `aaq report --out DIR`"
            )
        reports += found if comparison else [{**report, "run_dir": str(path.parent)}]
    return reports


def is_evaluation_report(data: object) -> bool:
    """Whether `data` has the shape of the report `aaq eval` writes (model, method, bits and a metrics mapping)."""
    return isinstance(data, dict) and isinstance(data.get("metrics"), dict) and {"model", "method", "bits"} <= set(data)


def comparison_table(reports: Sequence[dict]) -> str:
    """Return a markdown table with one row per run (model, method, bits, `METRIC_COLUMNS` and the quantization wall time
    when the run recorded one, `meta.quantize_s`) followed by a legend of the safety columns."""
    header = ["run", "model", "method", "bits"] + [label for label, _, _ in METRIC_COLUMNS] + ["quantize (s)"]
    rows = []
    for report in reports:
        metrics = report.get("metrics", {})
        rows.append(
            [Path(report.get("run_dir", "")).name or "–", _cell(report.get("model")), _cell(report.get("method")),
             _cell(report.get("bits"))]
            + [_cell(metrics.get(key), pattern) for _, key, pattern in METRIC_COLUMNS]
            + [_cell((report.get("meta") or {}).get("quantize_s"), "{:.0f}")]
        )
    return markdown_table(header, rows) + "\n\n" + TABLE_LEGEND + "\n"


def is_full_precision(report: dict) -> bool:
    """Return True for the unquantized reference run (method "fp" or bits such as "fp"/"w16a16")."""
    return any(str(report.get(key, "")).lower() in FP_MARKERS for key in ("method", "bits"))


def _point_label(report: dict) -> str:
    method, bits = report.get("method") or "?", report.get("bits")
    return method if bits in (None, "", method) else f"{method} {bits}"


# The panels of the safety-vs-perplexity plot: metric, y label. Refusal and coherent unsafe answers side by side,
# because a broken model "complies" less only because it cannot answer.
PLOT_PANELS = (
    ("refusal_rate", "coherent refusals on harmful prompts, % (higher is safer)"),
    ("harmful_complied_rate", "harmful complied (coherent unsafe answers), % (lower is safer)"),
)


def plot_safety_vs_ppl(reports: Sequence[dict], path: str | Path) -> Path:
    """Write a PNG of refusal rate and harmful complied rate (y) against perplexity (x), one point per run, the FP model starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in reports if has_safety_and_ppl(r)]
    if not points:
        raise AaqError("no report has both perplexity and refusal rate; run `aaq eval --tasks ppl,refusal` first")
    xs = [float(r["metrics"]["ppl"]) for r in points]
    log_x = max(xs) / min(xs) > 10
    figure, panels = plt.subplots(1, len(PLOT_PANELS), figsize=(12, 4.8), dpi=120)
    for axes, (metric, label) in zip(panels, PLOT_PANELS, strict=True):
        # A legend, not text next to the points: quantized variants often sit within a few % of each other.
        colors = itertools.cycle(c for c in plt.get_cmap("tab10").colors if matplotlib.colors.to_hex(c) != FP_COLOR)
        for report, x in zip(points, xs, strict=True):
            fp, value = is_full_precision(report), report["metrics"].get(metric)
            color = FP_COLOR if fp else next(colors)
            if value is None:
                continue
            axes.scatter(
                [x], [100.0 * float(value)], marker="*" if fp else "o", s=220 if fp else 70, zorder=3, color=color, edgecolors="black",
                linewidths=0.6, label=f"{_point_label(report)} (full precision)" if fp else _point_label(report),
            )  # fmt: skip
        if log_x:
            axes.set_xscale("log")
        axes.margins(x=0.25, y=0.15)
        axes.set_ylim(max(-5.0, axes.get_ylim()[0]), min(105.0, max(axes.get_ylim()[1], 10.0)))
        axes.set_xlabel("perplexity (lower is better)" + (", log scale" if log_x else ""))
        axes.set_ylabel(label, fontsize=9)
        axes.grid(True, alpha=0.3)
    panels[0].legend(loc="best", fontsize=8)
    figure.suptitle("Safety vs. utility per quantization method")
    figure.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return path


def has_safety_and_ppl(report: dict) -> bool:
    """Whether a report can be a point of the safety-vs-perplexity plot (a finite perplexity and a refusal rate)."""
    metrics = report.get("metrics", {})
    ppl = metrics.get("ppl")
    return isinstance(ppl, (int, float)) and math.isfinite(ppl) and ppl > 0 and metrics.get("refusal_rate") is not None


def write_comparison(reports: Sequence[dict], out_dir: str | Path, title: str, extra: dict | None = None) -> str:
    """Write a comparison of several runs to `out_dir`; returns the markdown table.

    report.json holds `{"kind": "aaq-comparison", "runs": reports, **extra}` with provenance, report.md
    the title and the table, and safety_vs_ppl.png the plot when some report has both refusal rate
    and perplexity.
    """
    out_dir = Path(out_dir)
    prepare_output_folder(out_dir, "report")
    table = comparison_table(reports)
    write_json(out_dir / REPORT_JSON, {"kind": COMPARISON_KIND, "runs": list(reports), **(extra or {}), **provenance()})
    write_atomic(out_dir / REPORT_MD, lambda tmp: tmp.write_text(f"# {title}\n\n{table}\n", encoding="utf-8"))
    if any(has_safety_and_ppl(report) for report in reports):
        plot_safety_vs_ppl(reports, out_dir / PLOT_PNG)
    return table
