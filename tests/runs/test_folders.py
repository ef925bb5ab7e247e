"""Output folders: aaq writes only into folders that are new, empty or its own, and lists every file it wrote."""

import hashlib
import json
import shutil

import pytest

from aaq.errors import AaqError
from aaq.runs.folders import (
    MARKER,
    TEMP_SUFFIX,
    check_free_space,
    check_output_folder,
    foreign_entries,
    mark_folder,
    prepare_output_folder,
    remove_aaq_folder,
    verify_file,
)
from aaq.runs.records import write_atomic, write_json, write_staged
from tests.helpers import snapshot


@pytest.fixture
def user_folder(tmp_path):
    """A folder of someone else's files, the kind aaq must never touch."""
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "notes" / "todo.txt").write_text("keep me")
    return folder


def test_every_file_aaq_writes_is_listed_with_its_checksum(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_folder(out, "run", work_folders=("calibration",)) == []
    write_json(out / "run.json", {"a": 1})
    write_staged(out, lambda staging: (staging / "tokenizer.json").write_text("{}"))
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "run" and marker["folders"] == ["calibration"]
    assert marker["files"]["run.json"]["sha256"] == hashlib.sha256((out / "run.json").read_bytes()).hexdigest()
    assert set(marker["files"]) == {"run.json", "tokenizer.json"}
    assert foreign_entries(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_foreign_files_is_refused_and_left_alone(user_folder, overwrite):
    before = snapshot(user_folder)
    with pytest.raises(AaqError, match=r"holds files aaq did not write \(config.json, model.safetensors, notes/\)") as info:
        prepare_output_folder(user_folder, "run", overwrite=overwrite)
    assert info.value.setting == "out"
    assert snapshot(user_folder) == before


def test_a_file_added_to_an_aaq_folder_is_foreign(tmp_path):
    out = tmp_path / "eval"
    prepare_output_folder(out, "eval")
    write_json(out / "report.json", {})
    (out / "mine.txt").write_text("mine")
    with pytest.raises(AaqError, match=r"\(mine.txt\)"):
        prepare_output_folder(out, "eval", overwrite=True)
    assert (out / "mine.txt").read_text() == "mine" and (out / "report.json").is_file()


def test_overwrite_removes_only_what_aaq_wrote_and_keeps_nested_outputs(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run", work_folders=("teacher_cache",))
    write_json(out / "run.json", {})
    write_json(out / "teacher_cache" / "meta.json", {})
    prepare_output_folder(out / "eval", "eval")
    write_json(out / "eval" / "report.json", {})
    removed = prepare_output_folder(out, "run", overwrite=True)
    assert removed == ["run.json", "teacher_cache/"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "eval"] and (out / "eval" / "report.json").is_file()


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_command(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run", work_folders=("teacher_cache",))
    (out / "teacher_cache").mkdir()
    leftovers = [out / f".aaq_model.safetensors.x1{TEMP_SUFFIX}", out / "teacher_cache" / f".pull_idx.npy{TEMP_SUFFIX}"]
    for path in leftovers:
        path.write_bytes(b"half")
    (out / f".staging.x2{TEMP_SUFFIX}").mkdir()
    prepare_output_folder(out, "run")
    assert not any(path.exists() for path in leftovers) and not (out / f".staging.x2{TEMP_SUFFIX}").exists()


def test_outputs_of_another_kind_are_not_mixed(tmp_path):
    run = tmp_path / "run"
    prepare_output_folder(run, "run")
    with pytest.raises(AaqError, match="is an aaq run folder, not an aaq export folder"):
        check_output_folder(run, "export")
    check_output_folder(run, "eval", joins=("run",))
    check_output_folder(run, "report", overwrite=True)


def test_a_file_or_a_path_under_a_file_is_not_an_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(AaqError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", "eval")
    with pytest.raises(AaqError, match="cannot create .* is a file"):
        check_output_folder(tmp_path / "file" / "out", "eval")


def test_an_unwritable_place_is_refused_before_any_work(tmp_path, monkeypatch):
    import aaq.runs.folders

    real_access = aaq.runs.folders.os.access
    monkeypatch.setattr(aaq.runs.folders.os, "access", lambda path, mode: path != tmp_path and real_access(path, mode))
    with pytest.raises(AaqError, match="cannot write to .*read-only file system"):
        check_output_folder(tmp_path / "out", "run")


def test_a_changed_file_fails_verification(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run")
    write_atomic(out / "w.bin", lambda tmp: tmp.write_bytes(bytes(10_000)))
    verify_file(out / "w.bin", "re-run")
    with (out / "w.bin").open("r+b") as handle:
        handle.seek(4096)
        handle.write(b"\xff" * 4096)
    with pytest.raises(AaqError, match="changed after aaq wrote it .* corrupt; re-run"):
        verify_file(out / "w.bin", "re-run")
    (out / "unlisted.bin").write_bytes(b"x")
    with pytest.raises(AaqError, match="not listed"):
        verify_file(out / "unlisted.bin", "re-run")


def test_too_little_disk_space_names_the_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5 * 10**6, 5 * 10**6))
    check_free_space(tmp_path, {"weights": 4 * 10**6})
    with pytest.raises(AaqError, match=r"5 MB free, about 8 MB needed \(teacher cache 4 MB, weights 5 MB\)"):
        check_free_space(tmp_path, {"teacher cache": 4 * 10**6, "weights": 5 * 10**6}, already=10**6)


def test_an_aaq_folder_is_removed_whole_but_never_with_foreign_files(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "adapter.bin").write_bytes(b"x")
    mark_folder(staging, "adapter")
    remove_aaq_folder(staging)
    assert not staging.exists()
    mark_folder(tmp_path, "adapter")
    (tmp_path / "late.txt").write_text("mine")
    with pytest.raises(AaqError, match="late.txt"):
        remove_aaq_folder(tmp_path)
    assert (tmp_path / "late.txt").is_file()


@pytest.mark.parametrize("content", ["{not json", '{"format": "aaq-folder"}', '["files"]'])
def test_a_damaged_marker_is_a_one_line_error(tmp_path, content):
    (tmp_path / MARKER).write_text(content)
    with pytest.raises(AaqError, match=f"{MARKER} is (unreadable|not an aaq folder marker)"):
        check_output_folder(tmp_path, "eval")
