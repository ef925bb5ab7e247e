"""The library's runs: quantize -> save -> evaluate -> run.json, and evaluating any model or run folder."""

import json

import pytest
import torch

from aaq.api import CalibrationConfig, QuantizeConfig
from aaq.errors import AaqError
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig
from aaq.methods import AAQConfig, QuaRotConfig, RTNConfig
from aaq.runs.checkpoint import is_quantized_folder
from aaq.runs.folders import MARKER, make_work_folder
from aaq.runs.records import write_json
from aaq.workflows.run import RUN_RECORD, RunConfig, evaluate_source, prepare_run_folder, run_quantization

TINY_CALIBRATION = CalibrationConfig(n_samples=4, seq_len=32)
PPL = EvalConfig(tasks="ppl", ppl=PerplexityConfig(n_samples=2, seq_len=32))


def test_a_run_is_saved_evaluated_and_recorded(tmp_path, tiny_model_dir, fake_data_dir):
    config = RunConfig(
        model=str(tiny_model_dir),
        out=tmp_path / "run",
        quantize=QuantizeConfig(method=QuaRotConfig(), calibration=TINY_CALIBRATION, seed=2),
        evaluation=PPL,
        command="test",
    )
    result = run_quantization(config)
    record = json.loads((tmp_path / "run" / RUN_RECORD).read_text())
    assert record == json.loads(json.dumps(result.record))
    assert record["seed"] == 2 and record["command"] == "test" and record["config"] == config.quantize.to_dict()
    assert record["metrics"]["ppl"] == result.report["metrics"]["ppl"] > 1
    assert {"load_s", "quantize_s", "save_s", "eval_s"} <= set(record["timings"]) and record["versions"]["torch"]
    assert record["method_metrics"] == {}  # QuaRot learns nothing; ostquant/aaq record their loss and transform movement
    assert is_quantized_folder(tmp_path / "run")
    report = evaluate_source(str(tmp_path / "run"), PPL, tmp_path / "eval")
    assert report["method"] == "quarot" and report["metrics"]["ppl"] == pytest.approx(record["metrics"]["ppl"], rel=1e-6)


def test_the_scorer_is_loaded_after_the_quantized_model_is_freed(tmp_path, tiny_model_dir, fake_data_with_harmbench, monkeypatch):
    """A run (and an evaluation of its folder) loads the garbled check's full-precision scorer only once the quantized model's answers are in and its weights are freed."""
    import aaq.workflows.run as workflow

    events = []
    real_release, real_load = workflow.release_weights, workflow.load_scorer
    monkeypatch.setattr(workflow, "release_weights", lambda model: (events.append("release"), real_release(model))[1])
    monkeypatch.setattr(workflow, "load_scorer", lambda *args: (events.append("load scorer"), real_load(*args))[1])
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("How do I cook rice ?\nWhat is the capital of France ?\n")
    evaluation = EvalConfig(tasks="ppl,refusal", harmful_prompts=str(harmful), max_new_tokens=4, ppl=PerplexityConfig(n_samples=2, seq_len=32))
    quantize = QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), calibration=TINY_CALIBRATION)
    report = run_quantization(RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=quantize, evaluation=evaluation)).report
    assert events == ["release", "load scorer"]
    assert report["coherence"]["scorer"] == str(tiny_model_dir) and "scorer_load" in report["seconds"]
    again = evaluate_source(str(tmp_path / "run"), evaluation, tmp_path / "eval")
    assert events == ["release", "load scorer"] * 2
    assert again["metrics"]["refusal_rate"] == report["metrics"]["refusal_rate"] and again["coherence"]["threshold"] == report["coherence"]["threshold"]


def test_a_run_without_saving_the_model_records_only(tmp_path, tiny_model_dir, fake_data_dir):
    config = RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=RTNConfig()), save_model=False)
    assert run_quantization(config).report is None
    assert (tmp_path / "run" / RUN_RECORD).is_file() and not is_quantized_folder(tmp_path / "run")


def test_the_reference_is_required_exactly_when_the_method_pushes(tmp_path):
    with pytest.raises(AaqError, match=r"needs the unaligned reference model; pass one \(`reference`\)"):
        RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(method=AAQConfig()))
    with pytest.raises(AaqError, match="`reference` has no effect with method quarot"):
        RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(), reference="base")


def test_a_finished_run_is_replaced_only_when_asked(tmp_path):
    out = tmp_path / "run"
    prepare_run_folder(out, overwrite=False)
    make_work_folder(out, "teacher_cache")
    write_json(out / RUN_RECORD, {})
    write_json(out / "teacher_cache" / "meta.json", {})
    with pytest.raises(AaqError, match="already holds a finished run") as info:
        prepare_run_folder(out, overwrite=False)
    assert info.value.setting == "overwrite"
    prepare_run_folder(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_a_new_attempt_clears_the_failure_of_the_last_one(tmp_path):
    out = tmp_path / "run"
    prepare_run_folder(out, overwrite=False)
    write_json(out / "failed.json", {"stage": "quantize"})
    prepare_run_folder(out, overwrite=False)
    assert not (out / "failed.json").exists() and "failed.json" not in json.loads((out / MARKER).read_text())["files"]


def test_an_adapter_on_a_run_folder_is_refused(tmp_path, tiny_model_dir, fake_data_dir):
    run_quantization(RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=RTNConfig())))
    with pytest.raises(AaqError, match="applies to full-precision models"):
        evaluate_source(str(tmp_path / "run"), PPL, None, adapter="lora")


@pytest.fixture
def family_dir(tmp_path, tiny_tokenizer, request):
    """A tiny random model of the requested family saved with the tiny tokenizer."""
    from tests.helpers import make_tiny_model

    model = make_tiny_model(request.param)
    model.resize_token_embeddings(len(tiny_tokenizer))
    folder = tmp_path / request.param
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family_dir", ["llama", "qwen2", "qwen3", "mistral"], indirect=True)
def test_bfloat16_runs_keep_exact_integer_codes_through_save_reload_and_export(tmp_path, family_dir, fake_data_dir):
    from safetensors.torch import load_file

    from aaq.exporting import ExportConfig, export
    from aaq.quant.fake_quant import QuantLinear
    from aaq.runs.checkpoint import WEIGHTS, load_quantized
    from aaq.runtime.devices import Placement
    from tests.helpers import logits_of

    placement = Placement(device="cpu", dtype="bfloat16")
    config = RunConfig(
        model=str(family_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=QuaRotConfig(), calibration=TINY_CALIBRATION),
        placement=placement, evaluation=PPL,
    )  # fmt: skip
    run = run_quantization(config)
    assert run.record["placement"]["dtype"] == "bfloat16" and run.record["metrics"]["ppl"] > 1
    reloaded, _, info = load_quantized(tmp_path / "run")
    assert info["dtype"] == "bfloat16" and {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    codes = {n: m.codes for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert codes and all(c is not None and torch.equal(c.dequantize(torch.bfloat16), reloaded.get_submodule(n).weight) for n, c in codes.items())
    tokens = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    export(tmp_path / "run", tmp_path / "packed", ExportConfig(format="aaq"))
    run_files, packed_files = load_file(tmp_path / "run" / WEIGHTS), load_file(tmp_path / "packed" / WEIGHTS)
    assert run_files.keys() == packed_files.keys() and all(torch.equal(run_files[k], packed_files[k]) for k in run_files)
    packed, _, _ = load_quantized(tmp_path / "packed")
    assert torch.equal(logits_of(packed, tokens), logits_of(reloaded, tokens))


@pytest.mark.parametrize("error,recorded", [(AaqError("the disk is full"), "the disk is full"), (KeyboardInterrupt(), "interrupted")])
def test_a_failed_run_records_its_error_and_stage(tmp_path, tiny_model_dir, fake_data_dir, monkeypatch, error, recorded):
    import aaq.workflows.run

    def fail(*args, **kwargs):
        raise error

    config = RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=RTNConfig()))
    with monkeypatch.context() as patch, pytest.raises(type(error)):
        patch.setattr(aaq.workflows.run, "save_quantized", fail)
        run_quantization(config)
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert (failed["status"], failed["stage"], failed["error"]) == ("failed", "save", recorded) and failed["versions"]["torch"]
    run_quantization(config)
    assert not (tmp_path / "run" / "failed.json").exists() and (tmp_path / "run" / RUN_RECORD).is_file()


def test_the_disk_space_a_run_plans_for_is_what_it_saves(tmp_path, tiny_model_dir, fake_data_dir):
    from safetensors.torch import load_file

    from aaq.models.loading import load_model
    from aaq.quant.packing import SUFFIXES
    from aaq.quant.quantizers import QuantScheme, SchemeOptions
    from aaq.runs.checkpoint import TRANSFORMS, WEIGHTS
    from aaq.workflows.run import planned_run_bytes

    def stored(file, codes: bool) -> int:
        tensors = load_file(file) if file.is_file() else {}
        return sum(t.numel() * t.element_size() for name, t in tensors.items() if (name.rpartition(".")[2] in SUFFIXES) == codes)

    grouped = QuantScheme.from_string("w4a16").with_options(SchemeOptions(weight_group_size=32))
    for method, bits, scheme in ((RTNConfig(), "w4a16", None), (QuaRotConfig(weight_quantizer="rtn"), "w4a4kv4", None), (RTNConfig(), "w4a16", grouped)):
        model, _ = load_model(str(tiny_model_dir))
        out = tmp_path / f"{method.name}-{bits}-{scheme is None}"
        config = RunConfig(model=str(tiny_model_dir), out=out, quantize=QuantizeConfig(method=method, bits=bits, scheme=scheme))
        planned = planned_run_bytes(config, model, calibration=None)
        run_quantization(config, model=model, tokenizer=None)
        codes = stored(out / WEIGHTS, codes=True)
        rest = stored(out / WEIGHTS, codes=False) + stored(out / TRANSFORMS, codes=False)
        # The codes exactly; the other tensors exactly without fusion, with it at most the rotations' float64 bound more.
        assert planned["teacher cache"] == 0 and codes + rest <= planned["weights"] <= codes + rest + (8 * 100_000 if method.name == "quarot" else 0)
    aaq = RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(method=AAQConfig(), calibration=TINY_CALIBRATION), reference="r")
    k = min(1000, model.config.vocab_size)
    assert planned_run_bytes(aaq, model, calibration=None)["teacher cache"] == 4 * 32 * (2 * k * (4 + 2) + 4)
    rtn = RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(method=RTNConfig()), save_model=False)
    assert planned_run_bytes(rtn, model, calibration=None) == {"teacher cache": 0, "weights": 0, "tokenizer": 0}
