"""Merge several reports into one table and a safety-vs-perplexity plot (`aaq report`).

The report.json of several runs become report.md (a comparison table), report.json and safety_vs_ppl.png.
"""

import argparse
from pathlib import Path

from aaq.eval.report import REPORT_MD, merge_reports, write_comparison

NAME = "report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The report command's arguments."""
    p.add_argument("runs", nargs="+", type=Path, help="folders holding report.json (or report.json files)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder")


def run(args: argparse.Namespace) -> int:
    """Merge the reports and print the table."""
    print(write_comparison(merge_reports(args.runs), args.out, "aaq comparison"))
    print(f"wrote {args.out / REPORT_MD}")
    return 0
