"""Every kind of checkpoint an audit reads, on tiny models: what it is called before loading, and the model it loads."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from aaq.auditing.sources import AAQ, COMPRESSED, FULL_PRECISION, GGUF, TRANSFORMERS, check_same_vocabulary, describe_source, load_source
from aaq.errors import AaqError
from aaq.exporting import ExportConfig, export
from aaq.exporting.gguf import write_gguf
from aaq.methods import QuaRotConfig
from aaq.models.loading import load_model
from aaq.models.plan import TransformConfig
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runs.checkpoint import load_quantized
from tests.helpers import logits_of, make_tiny_model, saved_run

NO_R4 = QuaRotConfig(weight_quantizer="rtn", transforms=TransformConfig(r4=False))
W4A4 = QuantScheme(weights=QuantSpec(bits=4, symmetric=True, group_size=32, clip_search=True), activations=QuantSpec(bits=4, symmetric=True, half_range_scale=True))


def test_gguf_file_or_folder_names_its_type_and_loads_as_transformers_reads_it(tmp_path, tiny_bpe_tokenizer):
    model = make_tiny_model("llama", hidden_size=64, num_heads=4)
    model.resize_token_embeddings(len(tiny_bpe_tokenizer))
    path = write_gguf(model, tiny_bpe_tokenizer, tmp_path / "gguf" / "tiny.Q4_0.gguf", "Q4_0")
    for source in (path, path.parent):
        info = describe_source(str(source))
        assert (info.kind, info.format) == (GGUF, "GGUF Q4_0")
        # Every linear weight Q4_0, the tied embeddings Q8_0, the five norms F32.
        assert info.details["tensor_types"] == {"Q4_0": 14, "F32": 5, "Q8_0": 1} and info.details["architecture"] == "llama"
    loaded, tokenizer = load_source(describe_source(str(path)))
    check_same_vocabulary(tiny_bpe_tokenizer, tokenizer, str(path))
    torch.testing.assert_close(logits_of(loaded), logits_of(load_model(str(path))[0]))


def test_aaq_run_and_export_folders_are_rebuilt_as_aaqs_simulation(tmp_path, tiny_tokenizer):
    run, _ = saved_run(tmp_path, tiny_tokenizer)
    export(run, tmp_path / "packed", ExportConfig(format="aaq", dtype="float32"))
    expected = logits_of(load_quantized(run)[0])
    for folder, kind in ((run, "run"), (tmp_path / "packed", "export")):
        info = describe_source(str(folder))
        assert (info.kind, info.format) == (AAQ, f"aaq {kind} quarot w4a4kv4")
        torch.testing.assert_close(logits_of(load_source(info)[0]), expected)


def test_compressed_tensors_weight_only_loads_through_transformers(tmp_path, tiny_tokenizer):
    run, _ = saved_run(tmp_path, tiny_tokenizer, method=NO_R4, bits="w4a16")
    export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors", scheme="W4A16", strict=True, dtype="float32"))
    info = describe_source(str(tmp_path / "ct"))
    assert (info.kind, info.format, info.details["simulated"]) == (COMPRESSED, "compressed-tensors W4A16 (pack-quantized)", False)
    model, tokenizer = load_source(info)
    assert tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    torch.testing.assert_close(logits_of(model), logits_of(load_quantized(run)[0]), rtol=1e-5, atol=1e-5)


def test_compressed_tensors_w4a4_with_online_r4_is_simulated_by_compressed_tensors(tmp_path, tiny_tokenizer):
    run, _ = saved_run(tmp_path, tiny_tokenizer, scheme=W4A4, hidden_size=64, num_heads=4)
    export(run, tmp_path / "ct", ExportConfig(format="compressed-tensors", scheme="W4A4", strict=True, dtype="float32"))
    info = describe_source(str(tmp_path / "ct"))
    assert (info.kind, info.format, info.details["simulated"], info.details["transforms"]) == (COMPRESSED, "compressed-tensors W4A4 (pack-quantized)", True, ["R4"])
    model, _ = load_source(info)
    # transformers alone would skip the online R4 and the activation quantization: its logits differ.
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    simulated, plain_logits = logits_of(model), logits_of(plain)
    assert (simulated - plain_logits).norm() / plain_logits.norm() > 0.05
    # aaq's simulation of the exported scheme rounds the fast Hadamard differently; it agrees to within a few int4 codes.
    aaq_logits = logits_of(load_quantized(run, scheme=W4A4, transforms=TransformConfig(r3=False, r4=True))[0])
    assert (simulated - aaq_logits).norm() / aaq_logits.norm() < 0.05


def write_fp8_folder(model, tokenizer, folder, block: int = 32):
    """`model` as a block-wise FP8 (e4m3) checkpoint in the format transformers' `fp8` quantizer reads (weight + weight_scale_inv per linear)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("proj.weight"):
            rows, columns = tensor.shape
            blocks = tensor.reshape(rows // block, block, columns // block, block)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, columns).to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale_inv")] = scale.float()
        elif name != "lm_head.weight":
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [block, block]}
    (folder / "config.json").write_text(json.dumps(config))


def test_a_transformers_quantization_with_a_cpu_path_loads_through_transformers(tmp_path, tiny_tokenizer):
    model = make_tiny_model("llama", hidden_size=64, num_heads=4)
    write_fp8_folder(model, tiny_tokenizer, tmp_path / "fp8")
    info = describe_source(str(tmp_path / "fp8"))
    assert (info.kind, info.format) == (TRANSFORMERS, "fp8")
    loaded, _ = load_source(info)
    reference = logits_of(model)
    assert 0 < ((logits_of(loaded) - reference).norm() / reference.norm()).item() < 0.1
    for file in (tmp_path / "fp8").iterdir():
        if file.suffix not in (".safetensors",) and file.name not in ("config.json", "generation_config.json"):
            file.unlink()
    with pytest.raises(AaqError, match="holds no tokenizer transformers can read .*; copy the original's tokenizer files into it"):
        load_source(info)


def _with_quantization(tmp_path, tiny_tokenizer, quantization):
    folder = tmp_path / quantization["quant_method"]
    model = make_tiny_model("llama", hidden_size=64, num_heads=4)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quantization}))
    return folder


def test_what_cannot_be_loaded_is_one_line_naming_the_fix(tmp_path, tiny_tokenizer):
    # transformers would load a method it does not know as a plain model, its packed weights as garbage.
    with pytest.raises(AaqError, match=r"quantized with 'exl3', which transformers .* cannot load .*convert the model to GGUF"):
        describe_source(str(_with_quantization(tmp_path, tiny_tokenizer, {"quant_method": "exl3"})))
    gptq = describe_source(str(_with_quantization(tmp_path, tiny_tokenizer, {"quant_method": "gptq", "bits": 4, "group_size": 128})))
    assert (gptq.kind, gptq.format) == (TRANSFORMERS, "gptq 4-bit")
    with pytest.raises(AaqError, match=r"needs a package that is not installed: .*pip install .*; install it") as error:
        load_source(gptq)
    assert "\n" not in str(error.value)
    # transformers names bitsandbytes configs by their flags (bitsandbytes_4bit): known, not refused as an unknown method.
    bnb = describe_source(str(_with_quantization(tmp_path, tiny_tokenizer, {"quant_method": "bitsandbytes", "load_in_4bit": True})))
    assert (bnb.kind, bnb.format) == (TRANSFORMERS, "bitsandbytes 4-bit")
    with pytest.raises(AaqError, match=r"bitsandbytes 4-bit\) needs a package that is not installed: .*pip install -U bitsandbytes"):
        load_source(bnb)
    with pytest.raises(AaqError, match=r"quantized with 'fp8', which transformers .* cannot load \(.*\); repair its quantization_config"):
        describe_source(str(_with_quantization(tmp_path, tiny_tokenizer, {"quant_method": "fp8", "weight_block_size": [1, 2, 3]})))
    with pytest.raises(AaqError, match="does not exist|not exactly one"):
        load_source(describe_source(str(tmp_path / "no-such.gguf")))
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    with pytest.raises(AaqError, match="neither a .gguf file nor a model folder"):
        describe_source(str(tmp_path / "two"))


def test_full_precision_folders_and_aliases(tiny_model_dir):
    assert describe_source(str(tiny_model_dir)).kind == FULL_PRECISION
    assert describe_source("smollm2-135m-safe").kind == FULL_PRECISION


def test_a_tokenizer_that_is_not_the_originals_is_refused(tiny_tokenizer, tiny_bpe_tokenizer):
    check_same_vocabulary(tiny_tokenizer, tiny_tokenizer, "same")
    with pytest.raises(AaqError, match=r"the tokenizer of other.gguf differs from the original's \(\d+ vs \d+ tokens"):
        check_same_vocabulary(tiny_tokenizer, tiny_bpe_tokenizer, "other.gguf")
