"""The engine check (issue 20, item 2): do OSTQuant's learned transforms beat QuaRot's fixed rotations, and at what budget?

The faithful aligned model `smollm2-135m-safe-unanchored` at W4A4KV4: QuaRot (random Hadamard R1-R4 +
GPTQ), OSTQuant with 0 steps (its start alone: the same kind of random Hadamard start, unit smoothing
scales, then GPTQ) and OSTQuant after learning, across calibration budgets (windows x tokens, steps x
batch) and optimiser settings, at >= 3 seeds per cell. A cell is one `aaq quantize` command; QuaRot and
OSTQuant of the same seed and calibration set share the calibration windows (the seed draws them) and GPTQ
sees all of them. Measured: perplexity on 8 x 512 held-out tokens (the Python docs held-out files, never a
calibration window) and, for the cells that matter, the verdicts on tuning data only (the HarmBench test
tuning split and 128 benign training prompts, 32 new tokens): the garbled rate. Every OSTQuant cell holds
out 4 of its calibration windows and records the student's loss on them (`--heldout-windows`, item 1).

Goal (issue 20): OSTQuant closes >= 35% of QuaRot's PPL gap to FP, (ppl_quarot - ppl_ostquant) /
(ppl_quarot - ppl_fp) paired by seed, at a garbled rate no higher than QuaRot's, at a budget that runs in
<= 20 CPU-minutes here.

Reproduce (resumable: one folder per run under WORK, finished runs skipped):

    OMP_NUM_THREADS=1 python benchmarks/transform_budget.py run --work runs/transform_budget --cells NAME,... --seeds 0,1,2
    python benchmarks/transform_budget.py report --work runs/transform_budget   # JSON + plot in benchmarks/results/
    python benchmarks/transform_budget.py report --records benchmarks/results/transform_budget_runs   # from the committed records
    python benchmarks/transform_budget.py cells                                # the cells and their commands

This is a diagnosis, not a pre-registered comparison: cells were added as the diagnosis went (PPL first,
few seeds, then generation on the cells that matter); every cell run is reported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from aaq_runs import (
    drop_bulky_outputs,
    fresh_run_folder,
    mean_sd,
    pyplot,
    read_records,
    run_aaq,
    run_folder,
    run_outputs,
    save_figure,
    shares,
    store_record,
    t_interval,
    tuning_eval_flags,
    verdicts,
    write_report,
)

from aaq.eval.report import markdown_table

log = logging.getLogger("transform_budget")

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-safe-unanchored"
HELDOUT_WINDOWS = 4
BENIGN_PROMPTS = 128


@dataclass(frozen=True)
class Cell:
    """One configuration: method, calibration set (windows x tokens), and for OSTQuant its training settings."""

    name: str
    method: str  # quarot | ostquant
    windows: int = 32
    seq_len: int = 128
    steps: int = 0
    batch: int = 1
    optimizer: str = "cayley_sgd"
    rotation_lr: float = 0.017
    scale_lr: float = 0.0018
    bits: str = "w4a4kv4"
    flags: tuple[str, ...] = ()
    generate: bool = False  # also the tuning-split verdicts (garbled rate)
    note: str = ""

    @property
    def budget_tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    @property
    def quarot_partner(self) -> str:
        """The QuaRot cell with the same calibration set and bits (the reference of the gap closure)."""
        return f"quarot-{self.windows}x{self.seq_len}-{self.bits}"

    def args(self, seed: int, out: Path) -> list[str]:
        """The `aaq quantize` arguments of this cell at one seed."""
        argv = ["quantize", "--model", MODEL, "--method", self.method, "--bits", self.bits, "--seed", str(seed)]
        argv += ["--calib-samples", str(self.windows), "--calib-seq-len", str(self.seq_len), *self.flags]
        if self.method == "ostquant":
            argv += ["--steps", str(self.steps), "--step-batch", str(self.batch), "--optimizer", self.optimizer]
            argv += ["--rotation-lr", str(self.rotation_lr), "--scale-lr", str(self.scale_lr)]
            argv += ["--heldout-windows", str(HELDOUT_WINDOWS), "--heldout-every", str(max(1, self.steps // 8))]
        tasks = tuning_eval_flags(BENIGN_PROMPTS) if self.generate else ["--tasks", "ppl", "--ppl-samples", "8"]
        return argv + tasks + ["--out", str(out)]


def quarot(windows: int, seq_len: int, bits: str = "w4a4kv4", generate: bool = False) -> Cell:
    return Cell(f"quarot-{windows}x{seq_len}-{bits}", "quarot", windows, seq_len, bits=bits, generate=generate)


ISSUE15 = Cell(
    "ost-issue15", "ostquant", 32, 128, steps=16, batch=1, note="the issue-15 study's setting: 16 steps of one 128-token window, Cayley SGD"
)
ADAM_W16 = replace(ISSUE15, optimizer="riemannian_adam", bits="w16a4kv4")
CELLS: dict[str, Cell] = {
    c.name: c
    for c in (
        quarot(32, 128, generate=True),
        replace(ISSUE15, name="ost0-32x128", steps=0, generate=True, note="OSTQuant's start alone, then GPTQ"),
        replace(
            ISSUE15, name="ost-issue15-adam", optimizer="riemannian_adam", generate=True, note="issue-15 budget, Riemannian Adam at the paper's rates"
        ),
        quarot(64, 256, generate=True),
        Cell(
            "ost-16k-adam",
            "ostquant",
            64,
            256,
            steps=16,
            batch=4,
            optimizer="riemannian_adam",
            generate=True,
            note="8x the issue-15 tokens: 16 steps of 4 x 256",
        ),
        ISSUE15,
        quarot(32, 128, "w16a4kv4"),
        replace(ISSUE15, name="ost0-32x128-w16a4kv4", steps=0, bits="w16a4kv4"),
        replace(ISSUE15, name="ost-issue15-w16a4kv4", bits="w16a4kv4"),
        replace(ISSUE15, name="ost-issue15-adam-w16a4kv4", optimizer="riemannian_adam", bits="w16a4kv4"),
        replace(ADAM_W16, name="ost-issue15-adam-noscales-w16a4kv4", flags=("--no-smoothing",), note="Adam, rotations only (no smoothing scales)"),
        replace(
            ADAM_W16,
            name="ost-issue15-adam-scalesonly-w16a4kv4",
            rotation_lr=1e-9,
            note="Adam, smoothing scales only (rotations frozen by a rate of 1e-9)",
        ),
        replace(
            ISSUE15,
            name="ost-issue15-lowlr-w16a4kv4",
            rotation_lr=0.0017,
            scale_lr=0.00018,
            bits="w16a4kv4",
            note="Cayley SGD at a tenth of the rates",
        ),
    )
}


# --- runs --------------------------------------------------------------------------------------------


def run_key(cell: str, seed: int) -> str:
    return f"{cell}-s{seed}"


def record_path(work: Path, key: str) -> Path:
    return work / "records" / f"{key}.json"


def fp_args(out: Path) -> list[str]:
    return ["eval", "--model", MODEL, "--tasks", "ppl", "--ppl-samples", "8", "--out", str(out)]


def execute(work: Path, key: str, args: list[str], cell: Cell | None, seed: int | None, records_copy: Path | None) -> None:
    """Run one aaq command into WORK/runs/KEY (from scratch) and write its record (PPL, verdict shares, calibration metrics, CPU)."""
    folder = fresh_run_folder(work, key)
    rc, cpu_s, wall_s = run_aaq(args, work / "logs" / f"{key}.log")
    if rc != 0:
        log.warning("%s failed (exit %d); see %s", key, rc, work / "logs" / f"{key}.log")
        return
    report, run = run_outputs(folder)
    record: dict[str, Any] = {
        "key": key, "cell": None if cell is None else asdict(cell), "seed": seed, "command": "aaq " + " ".join(args),
        "ppl": report["metrics"]["ppl"], "cpu_s": cpu_s, "wall_s": wall_s, "timings": run.get("timings"),
        "method_metrics": run.get("method_metrics"), "git_commit": run.get("git_commit", report.get("git_commit")),
        "torch_threads": run.get("torch_threads", report.get("torch_threads")),
    }  # fmt: skip
    generations = folder / "generations.jsonl"
    harmful, benign = (verdicts(generations, "refusal"), verdicts(generations, "benign")) if generations.is_file() else ({}, {})
    if harmful and benign:
        h, b = shares(harmful), shares(benign)
        record |= {"refusal": h["refused"], "harmful_complied": h["complied"], "harmful_garbled": h["garbled"]}
        record |= {"benign_compliance": b["complied"], "benign_garbled": b["garbled"], "garbled_all": _garbled_all(harmful, benign)}
    drop_bulky_outputs(folder)
    store_record(record, record_path(work, key), records_copy, generations if harmful else None)
    log.info("%s: PPL %.2f, garbled %s (%.0f CPU-s)", key, record["ppl"], record.get("garbled_all"), cpu_s)


def _garbled_all(harmful: dict[str, str], benign: dict[str, str]) -> float:
    """Garbled answers / all tuning answers (harmful and benign together)."""
    answers = list(harmful.values()) + list(benign.values())
    return sum(v == "garbled" for v in answers) / len(answers)


def planned(cells: list[str], seeds: list[int]) -> list[tuple[str, Cell | None, int | None]]:
    """FP first; then seed by seed, each cell's QuaRot partner before the cell."""
    out: list[tuple[str, Cell | None, int | None]] = [("fp", None, None)]
    for seed in seeds:
        for name in cells:
            cell = CELLS[name]
            partner = CELLS.get(cell.quarot_partner) if cell.method != "quarot" else None
            for c in ([partner] if partner else []) + [cell]:
                key = run_key(c.name, seed)
                if key not in [k for k, _, _ in out]:
                    out.append((key, c, seed))
    return out


def run_cells(work: Path, cells: list[str], seeds: list[int], records_copy: Path | None) -> None:
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells: {', '.join(unknown)}; see the `cells` command")
    for key, cell, seed in planned(cells, seeds):
        if record_path(work, key).is_file():
            continue
        log.info("run %s", key)
        args = fp_args(run_folder(work, key)) if cell is None else cell.args(seed, run_folder(work, key))
        execute(work, key, args, cell, seed, records_copy)


# --- report ------------------------------------------------------------------------------------------


def cell_summary(cell: Cell, records: dict[str, dict], fp_ppl: float) -> dict | None:
    """A cell's figures over its finished seeds: PPL, gap closed against its QuaRot partner (paired), garbled, CPU, calibration."""
    runs = {r["seed"]: r for r in records.values() if r["cell"] and r["cell"]["name"] == cell.name}
    if not runs:
        return None
    seeds = sorted(runs)
    out: dict[str, Any] = {"cell": asdict(cell), "seeds": seeds, "budget_tokens": cell.budget_tokens}
    out["ppl"] = mean_sd([runs[s]["ppl"] for s in seeds])
    out["cpu_min"] = mean_sd([runs[s]["cpu_s"] / 60 for s in seeds])
    for metric in ("garbled_all", "harmful_garbled", "benign_garbled", "refusal", "harmful_complied", "benign_compliance"):
        if all(metric in runs[s] for s in seeds):
            out[metric] = mean_sd([runs[s][metric] for s in seeds])
    partner = {r["seed"]: r for r in records.values() if r["cell"] and r["cell"]["name"] == cell.quarot_partner}
    paired = [s for s in seeds if s in partner]
    if cell.method != "quarot" and paired:
        gaps = [(partner[s]["ppl"] - runs[s]["ppl"]) / (partner[s]["ppl"] - fp_ppl) for s in paired]
        out["gap_closed"] = t_interval(gaps) | {"values": gaps, "seeds": paired}
        if all("garbled_all" in runs[s] and "garbled_all" in partner[s] for s in paired):
            out["garbled_minus_quarot"] = t_interval([runs[s]["garbled_all"] - partner[s]["garbled_all"] for s in paired])
    metrics = [runs[s].get("method_metrics") or {} for s in seeds]
    if any(m.get("transform_movement") for m in metrics):
        out["movement"] = {k: mean_sd([m["transform_movement"][k] for m in metrics]) for k in ("r1", "r2_mean", "scale_rms")}
    curves = {s: runs[s]["method_metrics"]["heldout_curve"] for s in seeds if (runs[s].get("method_metrics") or {}).get("heldout_curve")}
    if curves:
        out["heldout_curves"] = curves
        out["heldout_start_to_end"] = mean_sd([c[-1]["heldout_loss"] - c[0]["heldout_loss"] for c in curves.values()])
        out["heldout_best_step"] = [runs[s]["method_metrics"].get("heldout_best_step") for s in curves]
    return out


def aggregate(records_folder: Path) -> dict:
    """Every cell's summary over the records in ``records_folder``, with the FP PPL and the CPU time spent."""
    records = read_records(records_folder)
    if "fp" not in records:
        raise SystemExit("no FP record yet; run some cells first")
    fp_ppl = records["fp"]["ppl"]
    cells = {name: s for name, cell in CELLS.items() if (s := cell_summary(cell, records, fp_ppl)) is not None}
    return {"fp_ppl": fp_ppl, "cells": cells, "cpu_h": sum(r["cpu_s"] for r in records.values()) / 3600, "runs": len(records)}


def _fmt(stats: dict | None, digits: int = 3, sign: bool = False) -> str:
    if stats is None:
        return "–"
    value = f"{stats['mean']:+.{digits}f}" if sign else f"{stats['mean']:.{digits}f}"
    if stats.get("ci95"):
        return value + f" [{stats['ci95'][0]:+.{digits}f}, {stats['ci95'][1]:+.{digits}f}]"
    return value + (f" ± {stats['sd']:.{digits}f}" if stats.get("sd") is not None else "")


def markdown(body: dict) -> str:
    lines = [
        f"FP PPL {body['fp_ppl']:.3f}. CPU in finished runs: {body['cpu_h']:.2f} CPU-hours over {body['runs']} runs.",
        "",
        cells_table(body["cells"]),
    ]
    return "\n".join(lines)


def cells_table(cells_by_name: dict) -> str:
    """One row per cell: its budget and optimizer, and the seeds' PPL, gap closed, garbled rate, held-out loss and movement."""
    header = ["cell", "bits", "windows × len", "steps × batch (tokens)", "optimizer, lr rot / scale", "seeds", "PPL", "gap closed vs QuaRot"]
    header += ["garbled (all tuning answers)", "garbled − QuaRot", "held-out loss end − start", "R1 moved", "scales rms", "CPU-min"]
    rows = []
    for name, s in cells_by_name.items():
        c = s["cell"]
        train = f"{c['steps']} × {c['batch']} ({s['budget_tokens']})" if c["method"] == "ostquant" else "–"
        opt = f"{c['optimizer']}, {c['rotation_lr']:g} / {c['scale_lr']:g}" if c["method"] == "ostquant" and c["steps"] else "–"
        move = s.get("movement", {})
        rows.append([name, c["bits"], f"{c['windows']} × {c['seq_len']}", train, opt, str(len(s["seeds"])), _fmt(s["ppl"], 2),
                     _fmt(s.get("gap_closed"), 2, True), _fmt(s.get("garbled_all")), _fmt(s.get("garbled_minus_quarot"), 3, True),
                     _fmt(s.get("heldout_start_to_end"), 3), _fmt(move.get("r1")), _fmt(move.get("scale_rms"), 5), _fmt(s["cpu_min"], 1)])  # fmt: skip
    return markdown_table(header, rows)


def plot(body: dict, path: Path) -> None:
    """Left: PPL of every cell (seeds as points); right: the held-out loss curves of the learned cells (seed 0 or the first)."""
    figure, (left, right) = pyplot().subplots(1, 2, figsize=(15, 6), dpi=110, gridspec_kw={"width_ratios": [1.3, 1]})
    from matplotlib import ticker

    names = list(body["cells"])
    for y, name in enumerate(names):
        s = body["cells"][name]
        color = {"quarot": "tab:gray"}.get(s["cell"]["method"], "tab:blue" if s["cell"]["steps"] else "tab:orange")
        left.scatter(s["ppl"]["values"], [y] * len(s["ppl"]["values"]), color=color, alpha=0.5, s=20)
        left.scatter([s["ppl"]["mean"]], [y], color=color, marker="|", s=300)
    left.axvline(body["fp_ppl"], color="gold", linewidth=2, label=f"FP {body['fp_ppl']:.2f}")
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.set_xscale("log")
    # plain numbers at a few round PPLs: the default log labels (2 x 10^1, 3 x 10^1, ...) run into each other
    left.xaxis.set_major_locator(ticker.FixedLocator([10, 15, 20, 30, 50, 100, 200, 500]))
    left.xaxis.set_major_formatter(ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(ticker.NullFormatter())
    left.set_xlabel("held-out PPL (8 x 512 tokens), seeds as points, mean as bar")
    left.grid(True, axis="x", alpha=0.3)
    left.legend(fontsize=8)
    for name, s in body["cells"].items():
        curves = s.get("heldout_curves")
        if not curves or not s["cell"]["steps"]:
            continue
        curve = curves[min(curves, key=int)]
        right.plot([e["step"] for e in curve], [e["heldout_loss"] for e in curve], marker=".", label=f"{name} (held-out)")
        trained = [e for e in curve if e["train_loss"] is not None]
        right.plot([e["step"] for e in trained], [e["train_loss"] for e in trained], linestyle=":", color=right.lines[-1].get_color())
    right.set_xlabel("calibration step")
    right.set_ylabel("KL-top loss (solid: 4 held-out windows; dotted: training batches)")
    right.grid(True, alpha=0.3)
    if right.lines:
        right.legend(fontsize=6)
    figure.suptitle(f"{MODEL}: OSTQuant vs QuaRot across calibration budgets", fontsize=10)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report", "cells"))
    parser.add_argument("--work", type=Path, default=Path("runs/transform_budget"))
    parser.add_argument("--cells", default="", help="comma list of cell names (see `cells`)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--records-copy", type=Path, default=None, help="also copy each finished run's record (and answers) here")
    parser.add_argument("--records", type=Path, default=None, help="report: read the records here (default WORK/records)")
    parser.add_argument("--out", type=Path, default=RESULTS / "transform_budget.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "transform_budget.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.command == "cells":
        for cell in CELLS.values():
            print(f"{cell.name}: aaq {' '.join(cell.args(0, Path('OUT')))}" + (f"  # {cell.note}" if cell.note else ""))
        return
    if args.command == "run":
        run_cells(args.work, [c for c in args.cells.split(",") if c], [int(s) for s in args.seeds.split(",")], args.records_copy)
        return
    cells_defined = {n: asdict(c) for n, c in CELLS.items()}
    body = aggregate(args.records or args.work / "records") | {"design": __doc__, "model": MODEL, "cells_defined": cells_defined}
    write_report(body, args.out, plot, args.plot, markdown, bool(body["cells"]))


if __name__ == "__main__":
    main()
