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
    make_work_folder,
    mark_folder,
    prepare_output_folder,
    remove_aaq_folder,
    remove_file,
    remove_work_folder,
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
    assert prepare_output_folder(out, "run") == []
    assert json.loads((out / MARKER).read_text())["folders"] == []  # no work folder is claimed before it is made
    make_work_folder(out, "calibration")
    write_json(out / "run.json", {"a": 1})
    write_staged(out, lambda staging: (staging / "tokenizer.json").write_text("{}"))
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "run" and marker["folders"] == ["calibration"] and (out / "calibration").is_dir()
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
    prepare_output_folder(out, "run")
    make_work_folder(out, "teacher_cache")
    write_json(out / "run.json", {})
    write_json(out / "teacher_cache" / "meta.json", {})
    prepare_output_folder(out / "eval", "eval")
    write_json(out / "eval" / "report.json", {})
    removed = prepare_output_folder(out, "run", overwrite=True)
    assert removed == ["run.json", "teacher_cache/"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "eval"] and (out / "eval" / "report.json").is_file()


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_command(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run")
    make_work_folder(out, "teacher_cache")
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
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(AaqError, match=r"cannot write in .*: creating a file there fails \(Read-only file system\); it is read-only, a virtual file system"):
        check_output_folder(tmp_path / "out", "run")


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    check_output_folder(tmp_path / "new", "run")
    assert list(tmp_path.iterdir()) == []


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


def _hostile(folder, files=(), folders=()):
    """An aaq run folder whose marker was edited to list `files` and `folders` (names as given)."""
    prepare_output_folder(folder, "run")
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] |= {name: {"bytes": 8, "sha256": "0" * 64} for name in files}
    marker["folders"] += list(folders)
    (folder / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "files,folders,needle",
    [
        (["../victim.txt"], [], "'../victim.txt', which is not the name of an entry inside the folder"),
        ([], [".."], "'..', which is not the name of an entry inside the folder"),
        ([], [""], "'', which is not the name of an entry inside the folder"),
        (["ABSOLUTE"], [], "which is not the name of an entry inside the folder"),
        ([], ["sub/inner"], "'sub/inner', which is not the name"),
        ([MARKER], [], f"'{MARKER}', which is not the name"),
    ],
)
def test_a_marker_naming_anything_outside_its_folder_is_refused_and_nothing_is_deleted(tmp_path, files, folders, needle):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    _hostile(out, [str(victim) if name == "ABSOLUTE" else name for name in files], folders)
    before = snapshot(tmp_path)
    for act in (lambda: prepare_output_folder(out, "run", overwrite=True), lambda: remove_aaq_folder(out), lambda: check_output_folder(out, "run")):
        with pytest.raises(AaqError, match=needle):
            act()
    assert snapshot(tmp_path) == before


def test_a_symlink_listed_in_the_marker_is_refused_and_its_target_kept(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    out = tmp_path / "run"
    _hostile(out, folders=["gptq_progress"])
    (out / "gptq_progress").symlink_to(target)
    with pytest.raises(AaqError, match=f"lists 'gptq_progress', a symbolic link to {target}, which aaq never writes"):
        prepare_output_folder(out, "run", overwrite=True)
    assert (target / "notes.txt").read_text() == "precious"


def test_overwrite_never_deletes_a_file_changed_since_aaq_wrote_it(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run")
    write_json(out / "config.json", {"a": 1})
    write_json(out / "run.json", {"b": 2})
    (out / "config.json").write_text('{"a": 1, "mine": true}')
    before = snapshot(out)
    with pytest.raises(AaqError, match=r"config.json in .*run changed after aaq wrote it, so aaq will not delete it; move it away"):
        prepare_output_folder(out, "run", overwrite=True)
    assert snapshot(out) == before  # run.json, unchanged, is not removed either: everything is checked first
    (out / "config.json").unlink()
    (out / "config.json").mkdir()  # a folder where aaq wrote a file is not aaq's
    with pytest.raises(AaqError, match="config.json in"):
        prepare_output_folder(out, "run", overwrite=True)


def test_work_folders_are_listed_while_they_exist(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run")
    make_work_folder(out, "gptq_progress")
    write_json(out / "gptq_progress" / "layer.json", {})
    assert json.loads((out / MARKER).read_text())["folders"] == ["gptq_progress"]
    remove_work_folder(out, "gptq_progress")
    assert json.loads((out / MARKER).read_text())["folders"] == [] and not (out / "gptq_progress").exists()
    (out / "gptq_progress").mkdir()  # the user's own folder of that name is foreign again
    assert foreign_entries(out) == ["gptq_progress/"]


def test_a_removed_file_leaves_the_marker(tmp_path):
    out = tmp_path / "run"
    prepare_output_folder(out, "run")
    write_json(out / "failed.json", {})
    remove_file(out / "failed.json")
    remove_file(out / "never-written.json")
    assert json.loads((out / MARKER).read_text())["files"] == {} and not (out / "failed.json").exists()
