"""A clumsy or hostile user at the command line (issue 23): folders that cannot be turned against their user,
weights that carry their own checksums, and a one-line error (exit 2) instead of a traceback.

The three ways to lose data (a hostile marker, a marker claiming more than its run wrote, an edited file) and the
silently wrong result (a copied folder with flipped weight bytes) run `aaq` in a child process, as a user would;
the other cases call the same entry point in this process, on real files.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aaq.cli import COMMANDS, main
from aaq.runs.folders import MARKER
from tests.helpers import cli_error_line, snapshot

SOURCE = Path(__file__).resolve().parents[2] / "src"
TINY_RUN = ["--calib-samples", "4", "--calib-seq-len", "32", "--ppl-samples", "2", "--ppl-seq-len", "32"]
PPL = ["--tasks", "ppl", "--ppl-samples", "2", "--ppl-seq-len", "32"]


def _aaq(*argv) -> subprocess.CompletedProcess:
    """`aaq ARGV` in a child process with this checkout's source and one thread (the data folder from AAQ_DATA_DIR)."""
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "aaq", *map(str, argv)], env=env, capture_output=True, text=True, timeout=600, check=False)


def _refused_in_a_child(argv: list, *unchanged: Path) -> str:
    """Run `aaq argv` in a child process, expecting exit 2, one error line and every folder in `unchanged` as it was; returns the line."""
    before = [snapshot(folder) for folder in unchanged]
    done = _aaq(*argv)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert [snapshot(folder) for folder in unchanged] == before
    return done.stderr.strip().splitlines()[-1]


def _refused(argv: list, capsys, *unchanged: Path) -> str:
    """Run `aaq argv` in this process, expecting exit 2, one error line and every folder in `unchanged` as it was."""
    before = [snapshot(folder) for folder in unchanged]
    assert main([str(a) for a in argv]) == 2
    line = cli_error_line(capsys)
    assert [snapshot(folder) for folder in unchanged] == before
    return line


def _run(out: Path, model_dir: Path, method: str = "rtn", *flags) -> Path:
    assert main(["quantize", "--model", str(model_dir), "--method", method, "--out", str(out), *TINY_RUN, *flags]) == 0
    return out


def _edit_marker(folder: Path, files: dict | None = None, folders: list | None = None) -> None:
    marker = json.loads((folder / MARKER).read_text())
    marker["files"] |= files or {}
    marker["folders"] += folders or []
    (folder / MARKER).write_text(json.dumps(marker))


# --- the three ways to lose data, and the silently wrong result: a user's command in a child process ------------


def test_a_hostile_marker_deletes_nothing_outside_its_folder(tmp_path, tiny_model_dir, fake_data_dir):
    """The issue's case: a marker edited to list ../victim.txt and ../victimdir, then `quantize --overwrite`."""
    run = _run(tmp_path / "run", tiny_model_dir)
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "victimdir").mkdir()
    (tmp_path / "victimdir" / "notes.txt").write_text("precious")
    _edit_marker(run, files={"../victim.txt": {"bytes": 8, "sha256": "0" * 64}}, folders=["../victimdir"])
    line = _refused_in_a_child(["quantize", "--model", tiny_model_dir, "--method", "rtn", "--out", run, *TINY_RUN, "--overwrite"], tmp_path)
    assert "aaq_folder.json lists '../victim.txt', which is not the name of an entry inside the folder" in line
    assert "will not use this marker" in line


def test_a_folder_of_the_users_beside_a_finished_run_is_not_the_runs(tmp_path, tiny_model_dir, fake_data_dir):
    """The marker lists only the work folders the run made (and still has): GPTQ's progress is gone after the run."""
    run = _run(tmp_path / "run", tiny_model_dir, "quarot")
    assert json.loads((run / MARKER).read_text())["folders"] == []
    (run / "gptq_progress").mkdir()
    (run / "gptq_progress" / "mine.txt").write_text("the user's")
    line = _refused_in_a_child(["quantize", "--model", tiny_model_dir, "--method", "quarot", "--out", run, *TINY_RUN, "--overwrite"], tmp_path)
    assert "holds files aaq did not write (gptq_progress/)" in line


def test_overwrite_never_deletes_a_file_the_user_edited(tmp_path, tiny_model_dir, fake_data_dir):
    run = _run(tmp_path / "run", tiny_model_dir)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(config | {"my_note": "tuned by hand"}))
    line = _refused_in_a_child(["quantize", "--model", tiny_model_dir, "--method", "rtn", "--out", run, *TINY_RUN, "--overwrite"], tmp_path)
    assert "config.json in" in line and "changed after aaq wrote it, so aaq will not delete it; move it away" in line


def test_a_copy_without_its_marker_and_with_flipped_weight_bytes_is_refused(tmp_path, tiny_model_dir, fake_data_dir):
    run = _run(tmp_path / "run", tiny_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / MARKER).unlink()
    with (copy / "aaq_model.safetensors").open("r+b") as handle:  # bytes in the middle of the tensor data
        handle.seek((copy / "aaq_model.safetensors").stat().st_size // 2)
        handle.write(os.urandom(2048))
    line = _refused_in_a_child(["eval", "--model", copy, *PPL, "--out", tmp_path / "eval"], copy)
    assert "aaq_model.safetensors does not match the checksum in aaq_config.json: it changed after aaq wrote it and is corrupt" in line
    assert not (tmp_path / "eval").exists()


# --- markers that name anything outside their folder ---------------------------------------------------------


@pytest.mark.parametrize("entry", ["absolute", "empty", "symlink"])
def test_every_command_refuses_a_marker_that_names_anything_outside_its_folder(tmp_path, tiny_model_dir, fake_data_dir, entry, capsys):
    run = _run(tmp_path / "run", tiny_model_dir)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("precious")
    if entry == "absolute":
        _edit_marker(run, files={str(tmp_path / "elsewhere" / "notes.txt"): {"bytes": 8, "sha256": "0" * 64}})
    elif entry == "empty":
        _edit_marker(run, folders=[""])  # rmtree(run / "") is the run folder itself
    else:
        (run / "teacher_cache").symlink_to(tmp_path / "elsewhere")
        _edit_marker(run, folders=["teacher_cache"])
    needle = "a symbolic link to" if entry == "symlink" else "which is not the name of an entry inside the folder"
    for argv in (["quantize", "--model", tiny_model_dir, "--method", "rtn", "--out", run, *TINY_RUN, "--overwrite"],
                 ["quantize", "--model", tiny_model_dir, "--method", "rtn", "--out", run, *TINY_RUN, "--resume"],
                 ["eval", "--model", tiny_model_dir, *PPL, "--out", run],
                 ["export", run, "--out", tmp_path / "export"]):  # fmt: skip
        assert needle in _refused(argv, capsys, tmp_path)


# --- integrity without the marker ----------------------------------------------------------------------------


def test_a_copy_without_its_marker_is_checked_by_its_own_checksums(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    run = _run(tmp_path / "run", tiny_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / MARKER).unlink()
    assert main(["eval", "--model", str(copy), *PPL, "--out", str(tmp_path / "eval")]) == 0  # intact: it loads
    ppl = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]["ppl"]
    assert ppl == pytest.approx(json.loads((run / "run.json").read_text())["metrics"]["ppl"], rel=1e-6)
    config = json.loads((copy / "aaq_config.json").read_text())
    del config["checksums"]  # what an older aaq wrote: then only a marker can vouch for the weights
    (copy / "aaq_config.json").write_text(json.dumps(config))
    line = _refused(["export", copy, "--out", tmp_path / "export"], capsys, copy)
    assert "records no checksum of" in line and "has no aaq_folder.json, so aaq cannot tell whether it changed" in line
    data = (copy / "aaq_model.safetensors").read_bytes()
    (copy / "aaq_model.safetensors").write_bytes(data[: len(data) // 2])
    assert "is corrupt or truncated" in _refused(["eval", "--model", copy, *PPL, "--out", tmp_path / "e2"], capsys, copy)


@pytest.mark.parametrize(("scale", "shown"), [("nan", "nan"), (1000.0, "inf")])
def test_a_perplexity_that_is_not_finite_is_an_error_after_the_report(tmp_path, tiny_model_dir, fake_data_dir, scale, shown, capsys):
    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        if scale == "nan":
            model.model.norm.weight.fill_(float("nan"))
        else:
            model.model.embed_tokens.weight.mul_(scale)  # logits so large that exp(mean NLL) overflows
    model.save_pretrained(broken)
    out = tmp_path / "eval"
    line = _refused(["eval", "--model", broken, *PPL, "--scorer", "none", "--out", out], capsys)
    assert f"the perplexity of {broken} is {shown}: its outputs overflow or are NaN" in line and f"(report in {out})" in line
    assert f"| PPL | {shown} |" in (out / "report.md").read_text()


def test_huge_perplexities_are_printed_readably(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    report = {"model": "m", "method": "rtn", "bits": "w4a4kv4", "metrics": {"ppl": 7.638e172, "refusal_rate": 0.5}}
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| 7.638e+172 |" in printed and not re.search(r"\d{20}", printed)
    assert "| 7.638e+172 |" in (tmp_path / "cmp" / "report.md").read_text()


# --- tracebacks that became one line ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["folder", "binary"])
def test_a_recipe_that_is_no_yaml_file_is_one_line(tmp_path, recipe, capsys):
    path = tmp_path / "recipe"
    if recipe == "folder":
        path.mkdir()
    else:
        path.write_bytes(bytes(range(256)) * 4)
    line = _refused(["quantize", "--model", "m", "--recipe", path, "--out", tmp_path / "o"], capsys, tmp_path)
    assert line.endswith("is a folder; pass a YAML file" if recipe == "folder" else "is not a text file (not UTF-8); pass a YAML file")


@pytest.mark.parametrize("broken", ["truncated safetensors", "random gguf"])
def test_a_broken_weights_file_is_one_line(tmp_path, tiny_model_dir, broken, capsys):
    if broken == "truncated safetensors":
        data = (tiny_model_dir / "model.safetensors").read_bytes()
        (tiny_model_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
        model, needle = tiny_model_dir, "incomplete metadata, file not fully covered"
    else:
        model = tmp_path / "random.gguf"
        model.write_bytes(os.urandom(4096))
        needle = "does not start with the GGUF magic bytes"
    line = _refused(["eval", "--model", model, "--tasks", "ppl", "--out", tmp_path / "e"], capsys, tmp_path)
    assert f"could not load model '{model}' (" in line and needle in line
    assert line.endswith("it is damaged or not a model: download or write it again, or pass another model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a torch without CUDA")
@pytest.mark.parametrize("command", ["quantize", "eval", "export"])
def test_a_missing_gpu_is_one_line_before_anything_touches_it(tmp_path, tiny_model_dir, fake_data_dir, command, capsys):
    out = tmp_path / "out"
    argv = {
        "quantize": ["quantize", "--model", tiny_model_dir, "--method", "rtn", *TINY_RUN],
        "eval": ["eval", "--model", tiny_model_dir, *PPL],
        "export": ["export", _run(tmp_path / "run", tiny_model_dir) if command == "export" else None],
    }[command]
    line = _refused([*argv, "--device", "cuda", "--out", out], capsys, tmp_path)
    assert "device cuda is not available on this machine; pick another (--device) or use cpu" in line and not out.exists()


@pytest.mark.parametrize("command", [command.NAME for command in COMMANDS])
def test_a_bad_command_line_is_one_line_naming_the_commands_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"aaq {command}: error: ") and err.strip().endswith(f"see aaq {command} --help")


# --- free space and places that cannot be written -------------------------------------------------------------


def test_the_free_space_check_asks_for_what_the_run_writes(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    """Less free space than the model's weights as loaded, but more than the run folder takes: the run goes ahead."""
    loaded = (tiny_model_dir / "model.safetensors").stat().st_size
    free = loaded // 2
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=free))
    out = _run(tmp_path / "run", tiny_model_dir, "rtn", "--bits", "w4a16")
    written = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    assert written < free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=written // 2))
    line = _refused(["quantize", "--model", tiny_model_dir, "--method", "rtn", "--out", tmp_path / "run2", *TINY_RUN], capsys, tmp_path)
    assert "not enough free disk space" in line and "weights" in line and "tokenizer" in line


@pytest.mark.parametrize("place", ["/proc/aaq-run", "/sys/aaq-run"])
def test_a_place_that_cannot_be_written_is_not_a_disk_space_problem(tmp_path, place, capsys):
    if not Path(place).parent.is_dir():
        pytest.skip(f"no {Path(place).parent} here")
    line = _refused(["quantize", "--model", "m", "--method", "rtn", "--out", place], capsys)
    assert f"cannot write in {Path(place).parent}: creating a file there fails (" in line
    assert "it is read-only, a virtual file system, or not writable by this user; choose another folder (--out)" in line


# --- export follows quantize's folder rules; failed.json belongs to one attempt ------------------------------


def test_an_export_is_replaced_only_when_asked_and_never_over_an_edited_file(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    run = _run(tmp_path / "run", tiny_model_dir)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    line = _refused(["export", run, "--format", "compressed-tensors", "--out", out], capsys, out)
    assert "already holds an aaq export; choose another folder or replace it (--overwrite)" in line
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "aaq_export.json").read_text())["format"] == "compressed-tensors" and not (out / "aaq_model.safetensors").exists()
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + " ")
    assert "tokenizer.json in" in _refused(["export", run, "--out", out, "--overwrite"], capsys, out)


def test_an_export_of_a_run_whose_config_is_broken_is_one_line(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    run = _run(tmp_path / "run", tiny_model_dir)
    (run / "config.json").write_text("{broken")
    line = _refused(["export", run, "--out", tmp_path / "export"], capsys, run)
    assert f"{run / 'config.json'} cannot be read (" in line and line.endswith("write the folder again (`aaq quantize`)")
    assert not (tmp_path / "export").exists()


def test_a_later_attempt_never_reports_an_earlier_attempts_failure(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    import aaq.workflows.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(out), *TINY_RUN]
    with monkeypatch.context() as patch:
        patch.setattr(aaq.workflows.run, "quantize", interrupted)  # the first attempt: Ctrl-C while quantizing
        assert main(argv) == 130
    assert json.loads((out / "failed.json").read_text())["stage"] == "quantize"
    with monkeypatch.context() as patch:  # the second attempt dies while saving, with no chance to record it (SIGKILL)
        patch.setattr(aaq.workflows.run, "save_quantized", interrupted)
        patch.setattr(aaq.workflows.run, "_record_failure", lambda *args: None)
        assert main(argv) == 130
    line = _refused(["eval", "--model", out, *PPL, "--out", tmp_path / "e"], capsys, out)
    assert "is not a finished aaq run; finish it" in line and "failed in stage" not in line
