import json

import pytest

from aaq.errors import AaqError
from aaq.eval.report import comparison_table, is_full_precision, merge_reports, plot_safety_vs_ppl, write_report


def _report(method, bits, ppl, refusal, benign=0.9, sb=0.5, garbled=0.05):
    return {
        "model": "smollm2-135m-instruct", "method": method, "bits": bits, "seed": 0,
        "metrics": {"ppl": ppl, "refusal_rate": refusal, "garbled_rate": garbled, "refused_garbled_rate": 0.0,
                    "harmful_complied_rate": None if refusal is None else 1 - refusal - garbled, "benign_compliance": benign, "benign_refusal_rate": 0.05,
                    "benign_garbled_rate": garbled / 2, "safetybench_acc": sb,
                    "refusal_by_set": {"harmbench-val": {"refusal_rate": refusal, "garbled_rate": garbled, "refused_garbled_rate": 0.0,
                                                         "harmful_complied_rate": None if refusal is None else 1 - refusal - garbled, "n": 41}}},
        "coherence": {"check": True, "scorer": "smollm2-135m-safe", "threshold": 1.5, "quantile": 0.99,
                      "nll_quantile": 0.7, "n_answers": 198, "margin": 0.8, "rule": "the rule"},
        "breakdowns": {"refusal": {"illegal": refusal}}, "n_items": {"refusal": 41}, "seconds": {"refusal": 1.5},
        "versions": {"torch": "2"},
    }


RUNS = [
    ("fp", _report("fp", "w16a16", 12.1, 0.80)),
    ("rtn", _report("rtn", "w4a4kv4", 250.0, 0.10, sb=None) | {"meta": {"quantize_s": 12.34}}),
    ("quarot", _report("quarot", "w4a4kv4", 14.0, 0.55)),
    ("ostquant", _report("ostquant", "w4a4kv4", 13.6, 0.52)),
    ("aaq", _report("aaq", "w4a4kv4", 13.9, 0.74)),
]


@pytest.fixture
def run_dirs(tmp_path):
    dirs = []
    for name, report in RUNS:
        write_report(report, tmp_path / name)
        dirs.append(tmp_path / name)
    return dirs


def test_write_report_writes_json_and_markdown(run_dirs):
    assert json.loads((run_dirs[0] / "report.json").read_text())["metrics"]["ppl"] == 12.1
    markdown = (run_dirs[0] / "report.md").read_text()
    assert "| PPL | 12.10 |" in markdown and "| refusal | 80.0% |" in markdown and "illegal" in markdown
    assert "| harmful garbled | 5.0% |" in markdown and "| benign garbled | 2.5% |" in markdown
    assert "| refusal, harmbench-val (41) | 80.0% |" in markdown and "| harmful complied, harmbench-val (41) | 15.0% |" in markdown
    assert "Scorer `smollm2-135m-safe`, threshold 1.500 nats/token" in markdown and "the rule" in markdown


def test_markdown_says_when_the_garbled_check_was_off(tmp_path):
    report = _report("fp", "fp", 12.1, 0.8, garbled=0.0) | {"coherence": {"check": False, "reason": "turned off"}}
    write_report(report, tmp_path)
    assert "## Garbled check\n\noff (turned off)" in (tmp_path / "report.md").read_text()


def test_merge_and_comparison_table(run_dirs):
    reports = merge_reports(run_dirs)
    assert [r["method"] for r in reports] == ["fp", "rtn", "quarot", "ostquant", "aaq"]
    table = comparison_table(reports).splitlines()
    assert table[0] == (
        "| run | model | method | bits | PPL | harmful complied | refusal | refused, garbled | harmful garbled | benign complied "
        "| benign refused | benign garbled | SafetyBench | quantize (s) |"
    )
    assert len(table) == 2 + len(RUNS) + 2 and table[-2] == "" and "harmful complied = coherent answers that do not refuse" in table[-1]
    assert table[2].endswith("| 15.0% | 80.0% | 0.0% | 5.0% | 90.0% | 5.0% | 2.5% | 50.0% | – |")
    assert table[3] == "| rtn | smollm2-135m-instruct | rtn | w4a4kv4 | 250.00 | 85.0% | 10.0% | 0.0% | 5.0% | 90.0% | 5.0% | 2.5% | – | 12 |"


def test_merge_missing_report_is_a_clear_error(tmp_path):
    with pytest.raises(AaqError, match="aaq eval"):
        merge_reports([tmp_path / "nowhere"])


def test_plot_is_written(run_dirs, tmp_path):
    path = plot_safety_vs_ppl(merge_reports(run_dirs), tmp_path / "plot.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_needs_ppl_and_refusal(tmp_path):
    with pytest.raises(AaqError, match="perplexity"):
        plot_safety_vs_ppl([_report("fp", "fp", None, None)], tmp_path / "p.png")


def test_full_precision_detection():
    assert is_full_precision({"method": "fp"}) and is_full_precision({"method": "x", "bits": "W16A16"})
    assert not is_full_precision({"method": "aaq", "bits": "w4a4kv4"})


def test_a_comparison_is_read_as_its_runs_and_anything_else_is_refused(run_dirs, tmp_path):
    from aaq.eval.report import write_comparison

    write_comparison(merge_reports(run_dirs[:2]), tmp_path / "cmp", "first two")
    assert [r["method"] for r in merge_reports([tmp_path / "cmp", run_dirs[2]])] == ["fp", "rtn", "quarot"]
    for name, content in (("list", [RUNS[0][1]]), ("random", {"a": 1}), ("broken", {"kind": "aaq-comparison", "runs": [{"a": 1}]})):
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        with pytest.raises(AaqError, match=f"{name}.json is not an aaq report; pass folders written by `aaq eval"):
            merge_reports([tmp_path / f"{name}.json"])


def test_a_comparison_is_never_written_over_foreign_files(run_dirs, tmp_path):
    from aaq.eval.report import write_comparison

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my notes")
    with pytest.raises(AaqError, match=r"holds files aaq did not write \(report.md\)"):
        write_comparison(merge_reports(run_dirs), tmp_path / "mine", "title")
    assert (tmp_path / "mine" / "report.md").read_text() == "my notes"
