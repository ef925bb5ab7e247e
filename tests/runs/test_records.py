"""Run folders' writes are atomic, and every output records where it came from."""

import errno
import json

import pytest

from aaq.errors import AaqError
from aaq.runs.records import git_commit, provenance, write_atomic, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(AaqError, match=r"could not write .*data.txt \(No space left on device\); free some disk space"):
        write_atomic(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_json_is_written_whole_with_paths_as_text(tmp_path):
    write_json(tmp_path / "sub" / "r.json", {"out": tmp_path, "x": 1})
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"out": str(tmp_path), "x": 1}


def test_provenance_names_versions_commit_and_threads():
    record = provenance()
    assert record["versions"]["torch"] and record["versions"]["python"]
    assert record["torch_threads"] >= 1 and "created" in record
    assert record["git_commit"] == git_commit()
