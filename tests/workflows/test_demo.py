"""`aaq demo` end to end on a tiny aligned/reference pair: every method is evaluated and the table is written."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from aaq.api import CalibrationConfig
from aaq.errors import AaqError
from aaq.eval.perplexity import PerplexityConfig
from aaq.workflows.demo import DemoConfig, run_demo


def _perturbed_copy(folder, target):
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    shutil.copytree(folder, target)
    model.save_pretrained(target)
    return target


def test_demo_compares_all_methods(tmp_path, tiny_model_dir, fake_data_with_harmbench):
    config = DemoConfig(
        model=str(tiny_model_dir),
        reference=str(_perturbed_copy(tiny_model_dir, tmp_path / "reference")),
        out=tmp_path / "demo",
        methods=("aaq", "rtn", "ostquant", "quarot"),
        tasks="ppl,refusal",
        steps=2,
        calibration=CalibrationConfig(n_samples=4, seq_len=32),
        heldout_windows=1,
        ppl=PerplexityConfig(n_samples=2, seq_len=32),
        max_new_tokens=4,
    )
    table = run_demo(config)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    methods = [run["method"] for run in report["runs"]]
    assert methods == ["fp", "rtn", "quarot", "ostquant", "aaq"]
    assert report["config"]["lam"] == DemoConfig.lam and report["config"]["steps"] == 2 and "git_commit" in report
    aaq_run = json.loads((tmp_path / "demo" / "aaq" / "run.json").read_text())
    assert len(aaq_run["method_metrics"]["heldout_curve"]) >= 2  # the held-out loss before and after the steps
    ppl = {run["method"]: run["metrics"]["ppl"] for run in report["runs"]}
    assert all(value > 1 for value in ppl.values())
    assert ppl["fp"] != ppl["quarot"] and ppl["ostquant"] != ppl["aaq"]
    assert all(0 <= run["metrics"]["refusal_rate"] <= 1 for run in report["runs"])
    assert all(run["meta"]["quantize_s"] >= 0 for run in report["runs"][1:])
    for method in methods:
        assert f"| {method} |" in table
    assert (tmp_path / "demo" / "report.md").read_text().count("\n|") >= 6
    assert (tmp_path / "demo" / "safety_vs_ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_sized_config_scales_calibration_and_evaluation():
    full = DemoConfig().paper_sized()
    assert (full.calibration.n_samples, full.calibration.seq_len, full.steps) == (128, 2048, 150)
    assert full.ppl.n_samples * full.ppl.seq_len > DemoConfig().ppl.n_samples * DemoConfig().ppl.seq_len
    assert full.max_prompts is None and DemoConfig().max_prompts == 48
    aaq = full.method_configs()[-1]
    assert aaq.name == "aaq" and aaq.training.loss.lam == 0.1 and aaq.training.steps == 150
    assert aaq.training.activation_checkpointing and not DemoConfig().method_configs()[-1].training.activation_checkpointing
    assert (aaq.training.optimizer, aaq.training.heldout_windows) == ("cayley_sgd", 0)
    assert DemoConfig().method_configs()[-1].training.optimizer == "riemannian_adam"


def _fails(*args, **kwargs):
    pytest.fail("the work started")


def test_a_reference_with_another_tokenizer_is_refused_before_any_evaluation(tmp_path, tiny_model_dir, fake_data_with_harmbench, monkeypatch):
    from transformers import AutoTokenizer

    import aaq.workflows.demo

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["extra"])
    tokenizer.save_pretrained(other)
    monkeypatch.setattr(aaq.workflows.demo, "evaluate", _fails)
    monkeypatch.setattr(aaq.workflows.demo, "run_quantization", _fails)
    with pytest.raises(AaqError, match="tokenizers map tokens to different ids"):
        run_demo(DemoConfig(model=str(tiny_model_dir), reference=str(other), out=tmp_path / "demo", tasks="ppl"))


def test_a_demo_folder_with_foreign_files_is_refused_before_loading(tmp_path, monkeypatch):
    import aaq.workflows.demo
    from aaq.runs.folders import prepare_output_folder

    monkeypatch.setattr(aaq.workflows.demo, "load_model", _fails)
    prepare_output_folder(tmp_path / "demo", "report")  # an earlier demo, where the user then added notes to a run
    prepare_output_folder(tmp_path / "demo" / "rtn", "run")
    (tmp_path / "demo" / "rtn" / "notes.txt").write_text("mine")
    with pytest.raises(AaqError, match=r"rtn holds files aaq did not write \(notes.txt\)"):
        run_demo(DemoConfig(out=tmp_path / "demo", methods=("rtn", "aaq")))
    assert (tmp_path / "demo" / "rtn" / "notes.txt").read_text() == "mine"


def test_the_default_methods_leave_rtn_out_and_an_unknown_method_is_refused():
    assert [m.name for m in DemoConfig().method_configs()] == ["quarot", "ostquant", "aaq"]
    with pytest.raises(AaqError, match="the demo compares some of rtn, quarot, ostquant, aaq, not gptq; list them in --methods"):
        DemoConfig(methods=("quarot", "gptq"))
