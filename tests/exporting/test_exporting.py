"""Exports: packed int4 aaq folders round-trip exactly; compressed-tensors folders load with transformers and
with compressed-tensors' own apply functions and give the logits of aaq's simulation of the same settings."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import aaq
from aaq.errors import AaqError
from aaq.exporting import ExportConfig, export
from aaq.methods import GPTQConfig, RTNConfig
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runs.checkpoint import AAQ_CONFIG, WEIGHTS, load, load_quantized
from tests.helpers import FAMILIES, logits_of, saved_run, snapshot

# --- codes and packing -----------------------------------------------------------------------------------------














# --- the packed aaq format -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_export_loads_back_to_the_same_logits(tmp_path, tiny_tokenizer, family):
    run, logits = saved_run(tmp_path, tiny_tokenizer, family=family)
    report = export(run, tmp_path / "packed", ExportConfig(format="aaq", dtype="float32"))
    stored = load_file(tmp_path / "packed" / WEIGHTS)
    assert "model.layers.1.mlp.down_proj.qweight" in stored and "model.layers.1.mlp.down_proj.weight" not in stored
    assert (tmp_path / "packed" / "transforms.safetensors").read_bytes() == (run / "transforms.safetensors").read_bytes()
    assert report.linear_ratio <= 0.28
    run_model, _, _ = load_quantized(run)
    model, tokenizer = load(tmp_path / "packed")
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), run_model.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(logits_of(model), logits)
    assert len(tokenizer) == len(tiny_tokenizer)


def test_packed_export_of_gptq_asymmetric_weights_is_exact(tmp_path, tiny_tokenizer):
    scheme = dataclasses.replace(QuantScheme.from_string("w4a16"), weights=QuantSpec(bits=4, symmetric=False, group_size=32))
    run, logits = saved_run(tmp_path, tiny_tokenizer, method=GPTQConfig(static_groups=True), bits="w4a16", scheme=scheme)
    aaq.export(run, tmp_path / "packed", aaq.ExportConfig(format="aaq", dtype="float32"))  # the lazy public API
    assert "model.layers.0.mlp.up_proj.zero" in load_file(tmp_path / "packed" / WEIGHTS)
    model, _ = load(tmp_path / "packed")
    assert torch.equal(logits_of(model), logits)




def test_truncated_packed_weights_are_a_clear_error(tmp_path, tiny_tokenizer):
    run, _ = saved_run(tmp_path, tiny_tokenizer)
    folder = tmp_path / "packed"
    export(run, folder, ExportConfig(format="aaq"))
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AaqError, match="corrupt.*aaq export"):
        load(folder)


@pytest.mark.parametrize(("bits", "problem"), [(8, "packed weight shape"), (2, "exceed the 2-bit range")])
def test_config_with_a_wrong_bit_width_is_a_clear_error(tmp_path, tiny_tokenizer, bits, problem):
    run, _ = saved_run(tmp_path, tiny_tokenizer)
    folder = tmp_path / "packed"
    export(run, folder, ExportConfig(format="aaq"))
    info = json.loads((folder / AAQ_CONFIG).read_text())
    info["quantize"]["scheme"]["weights"]["bits"] = bits
    (folder / AAQ_CONFIG).write_text(json.dumps(info))
    with pytest.raises(AaqError, match=problem):
        load(folder)


# --- compressed-tensors ----------------------------------------------------------------------------------------




















def test_re_exporting_in_another_format_leaves_no_stale_files(tmp_path, tiny_tokenizer):
    run, logits = saved_run(tmp_path, tiny_tokenizer, bits="w4a16")
    folder = tmp_path / "out"
    export(run, folder, ExportConfig(format="aaq", dtype="float32"))
    before = snapshot(folder)
    with pytest.raises(AaqError, match="already holds an aaq export; choose another folder or replace it") as refused:
        export(run, folder, ExportConfig(format="compressed-tensors", scheme="W4A4"))
    assert refused.value.setting == "overwrite" and snapshot(folder) == before
    export(run, folder, ExportConfig(format="compressed-tensors", scheme="W4A4"), overwrite=True)
    assert not (folder / AAQ_CONFIG).exists() and not (folder / WEIGHTS).exists()
    assert not (folder / "transforms.safetensors").exists()  # carried by the aaq format only
    export(run, folder, ExportConfig(format="aaq", dtype="float32"), overwrite=True)
    assert not (folder / "model.safetensors").exists()
    assert torch.equal(logits_of(load(folder)[0]), logits)
    with pytest.raises(AaqError, match="is an aaq run folder"):
        export(folder, run, ExportConfig(format="aaq"))


def test_full_precision_weights_cannot_be_exported(tmp_path, tiny_tokenizer):
    run, _ = saved_run(tmp_path, tiny_tokenizer, method=RTNConfig(), bits="w16a8")
    with pytest.raises(AaqError, match="full precision"):
        export(run, tmp_path / "packed", ExportConfig(format="aaq"))


# --- command line ----------------------------------------------------------------------------------------------

EVAL = ["--tasks", "ppl", "--ppl-samples", "2", "--ppl-seq-len", "32"]


def test_cli_export_then_eval_gives_the_run_perplexity(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    from aaq.cli import main

    run, packed = tmp_path / "run", tmp_path / "packed"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "quarot", "--out", str(run), "--no-eval", "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    assert main(["export", str(run), "--format", "aaq", "--dtype", "float32", "--out", str(packed)]) == 0
    assert "of fp16" in capsys.readouterr().out
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "e1"), *EVAL]) == 0
    assert main(["eval", "--model", str(packed), "--out", str(tmp_path / "e2"), *EVAL]) == 0
    ppl = [json.loads((tmp_path / e / "report.json").read_text())["metrics"]["ppl"] for e in ("e1", "e2")]
    assert ppl[0] == ppl[1]  # the packed folder rebuilds the run bit for bit




def test_cli_scheme_with_the_aaq_format_is_an_error(tmp_path, capsys):
    from aaq.cli import main

    assert main(["export", str(tmp_path), "--format", "aaq", "--scheme", "W4A4", "--out", str(tmp_path / "o")]) == 2
    assert "--scheme applies to --format compressed-tensors" in capsys.readouterr().err
