"""The benchmark scripts' run-folder and record helpers, on a made-up finished run (no model, no subprocess)."""

import json
from pathlib import Path

from benchmarks.aaq_runs import drop_bulky_outputs, fresh_run_folder, read_records, run_outputs, save_figure, store_record


def _finished_run(work: Path) -> Path:
    folder = work / "runs" / "quarot-s0"
    for work_folder in ("calibration", "teacher_cache"):
        (folder / work_folder).mkdir(parents=True)
        (folder / work_folder / "state.pt").write_bytes(b"x")
    for weights in ("aaq_model.safetensors", "transforms.safetensors"):
        (folder / weights).write_bytes(b"weights")
    (folder / "report.json").write_text(json.dumps({"metrics": {"ppl": 19.2}}))
    (folder / "generations.jsonl").write_text('{"task": "refusal", "prompt": "p", "verdict": "refused"}\n')
    return folder


def test_a_fresh_run_folder_is_empty_even_after_an_interrupted_run(tmp_path):
    _finished_run(tmp_path)
    folder = fresh_run_folder(tmp_path, "quarot-s0")
    assert folder == tmp_path / "runs" / "quarot-s0"
    assert folder.parent.is_dir() and not folder.exists()


def test_run_outputs_read_the_report_and_an_absent_run_record_as_empty(tmp_path):
    folder = _finished_run(tmp_path)
    assert run_outputs(folder) == ({"metrics": {"ppl": 19.2}}, {})
    (folder / "run.json").write_text(json.dumps({"git_commit": "abc"}))
    assert run_outputs(folder)[1] == {"git_commit": "abc"}


def test_dropping_bulky_outputs_keeps_the_report_and_generations(tmp_path):
    folder = _finished_run(tmp_path)
    drop_bulky_outputs(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["generations.jsonl", "report.json"]


def test_a_stored_record_is_written_and_copied_with_its_generations(tmp_path):
    folder = _finished_run(tmp_path)
    path, copies = tmp_path / "records" / "quarot-s0.json", tmp_path / "committed"
    store_record({"key": "quarot-s0", "ppl": 19.2}, path, copies, folder / "generations.jsonl")
    assert json.loads(path.read_text()) == {"key": "quarot-s0", "ppl": 19.2}
    assert (copies / "quarot-s0.json").read_text() == path.read_text()
    assert (copies / "quarot-s0.generations.jsonl").read_text() == (folder / "generations.jsonl").read_text()
    store_record({"key": "fp"}, tmp_path / "records" / "fp.json", copies, None)
    assert (copies / "fp.json").is_file() and not (copies / "fp.generations.jsonl").exists()


def test_read_records_are_the_stored_records_by_name_without_their_generations(tmp_path):
    folder = _finished_run(tmp_path)
    records, copies = tmp_path / "records", tmp_path / "committed"
    for key, ppl in (("quarot-s1", 19.5), ("fp", 15.5), ("quarot-s0", 19.2)):
        store_record({"key": key, "ppl": ppl}, records / f"{key}.json", copies, folder / "generations.jsonl")
    assert read_records(copies) == read_records(records)
    assert list(read_records(copies)) == ["fp", "quarot-s0", "quarot-s1"]
    assert read_records(copies)["quarot-s1"] == {"key": "quarot-s1", "ppl": 19.5}
    assert read_records(tmp_path / "empty") == {}


def test_a_saved_figure_is_a_png_in_a_new_folder(tmp_path):
    from benchmarks.aaq_runs import pyplot

    figure, ax = pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "plots" / "line.png"
    save_figure(figure, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.number not in pyplot().get_fignums()
