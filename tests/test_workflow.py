"""The library's runs: quantize -> save -> evaluate -> run.json, and evaluating any model or run folder."""

import json

import pytest

from aaq.api import CalibrationConfig, QuantizeConfig
from aaq.checkpoint import is_quantized_folder
from aaq.errors import AaqError
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig
from aaq.folders import MARKER
from aaq.methods import AAQConfig, QuaRotConfig, RTNConfig
from aaq.runs import write_json
from aaq.workflow import RUN_RECORD, RunConfig, evaluate_source, prepare_run_folder, run_quantization

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
    assert is_quantized_folder(tmp_path / "run")
    report = evaluate_source(str(tmp_path / "run"), PPL, tmp_path / "eval")
    assert report["method"] == "quarot" and report["metrics"]["ppl"] == pytest.approx(record["metrics"]["ppl"], rel=1e-6)


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
    write_json(out / RUN_RECORD, {})
    write_json(out / "teacher_cache" / "meta.json", {})
    with pytest.raises(AaqError, match="already holds a finished run") as info:
        prepare_run_folder(out, overwrite=False)
    assert info.value.setting == "overwrite"
    prepare_run_folder(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_an_adapter_on_a_run_folder_is_refused(tmp_path, tiny_model_dir, fake_data_dir):
    run_quantization(RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=RTNConfig())))
    with pytest.raises(AaqError, match="applies to full-precision models"):
        evaluate_source(str(tmp_path / "run"), PPL, None, adapter="lora")


@pytest.mark.parametrize("error,recorded", [(AaqError("the disk is full"), "the disk is full"), (KeyboardInterrupt(), "interrupted")])
def test_a_failed_run_records_its_error_and_stage(tmp_path, tiny_model_dir, fake_data_dir, monkeypatch, error, recorded):
    import aaq.workflow

    def fail(*args, **kwargs):
        raise error

    config = RunConfig(model=str(tiny_model_dir), out=tmp_path / "run", quantize=QuantizeConfig(method=RTNConfig()))
    with monkeypatch.context() as patch, pytest.raises(type(error)):
        patch.setattr(aaq.workflow, "save_quantized", fail)
        run_quantization(config)
    failed = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert (failed["status"], failed["stage"], failed["error"]) == ("failed", "save", recorded) and failed["versions"]["torch"]
    run_quantization(config)
    assert not (tmp_path / "run" / "failed.json").exists() and (tmp_path / "run" / RUN_RECORD).is_file()


def test_the_disk_space_a_run_plans_for(tmp_path, tiny_model_dir):
    from aaq.loading import load_model
    from aaq.workflow import planned_run_bytes

    model, _ = load_model(str(tiny_model_dir))
    weights = sum(p.numel() * 4 for p in model.parameters())  # fp32, the tied lm_head counted once
    aaq = RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(method=AAQConfig(), calibration=TINY_CALIBRATION), reference="r")
    planned = planned_run_bytes(aaq, model, calibration=None)
    k = min(1000, model.config.vocab_size)
    assert planned == {"teacher cache": 4 * 32 * (2 * k * (4 + 2) + 4), "GPTQ progress": weights, "weights": weights}
    rtn = RunConfig(model="m", out=tmp_path, quantize=QuantizeConfig(method=RTNConfig()), save_model=False)
    assert planned_run_bytes(rtn, model, calibration=None) == {"teacher cache": 0, "GPTQ progress": 0, "weights": 0}
