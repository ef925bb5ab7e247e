"""A saved quantized folder loads back to the same fake-quantized model; broken folders fail clearly."""

import json

import pytest
import torch

from aaq.api import QuantizeConfig, quantize
from aaq.errors import AaqError
from aaq.methods import QuaRotConfig, RTNConfig
from aaq.runs.checkpoint import AAQ_CONFIG, WEIGHTS, is_quantized_folder, load, load_quantized, save_quantized
from tests.helpers import make_tiny_model

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _saved_run(tmp_path, tiny_tokenizer, method, family="llama"):
    model = make_tiny_model(family)
    result = quantize(model, QuantizeConfig(method=method, bits="w4a4kv4", seed=3))
    with torch.no_grad():
        logits = model(TOKENS).logits
    save_quantized(result, tiny_tokenizer, tmp_path / "run", source="tiny")
    return tmp_path / "run", logits, result


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_save_load_gives_identical_logits(tmp_path, tiny_tokenizer, family):
    folder, logits, result = _saved_run(tmp_path, tiny_tokenizer, QuaRotConfig(weight_quantizer="rtn"), family)
    model, tokenizer, info = load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits)
    assert info["quantize"] == result.config.to_dict()
    assert info["transforms"] == {"r1": "random_hadamard", "r2": "random_hadamard", "r3": True, "r4": True, "smoothing": False}
    assert (folder / "transforms.safetensors").is_file()
    assert len(tokenizer) == len(tiny_tokenizer)


def test_tied_model_without_rotation_round_trips(tmp_path, tiny_tokenizer):
    folder, logits, _ = _saved_run(tmp_path, tiny_tokenizer, RTNConfig())
    model, _ = load(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, logits)


def test_config_round_trip(tmp_path, tiny_tokenizer):
    config = QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w4a8kv8", seed=7)
    assert QuantizeConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()


def test_truncated_weights_are_a_clear_error(tmp_path, tiny_tokenizer):
    folder, _, _ = _saved_run(tmp_path, tiny_tokenizer, RTNConfig())
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AaqError, match="corrupt"):
        load_quantized(folder)


def test_unfinished_folder_is_not_a_run(tmp_path, tiny_tokenizer):
    folder, _, _ = _saved_run(tmp_path, tiny_tokenizer, RTNConfig())
    (folder / AAQ_CONFIG).unlink()
    assert not is_quantized_folder(folder)
    with pytest.raises(AaqError, match="not a finished aaq run"):
        load_quantized(folder)


def test_wrong_format_version_is_a_clear_error(tmp_path, tiny_tokenizer):
    folder, _, _ = _saved_run(tmp_path, tiny_tokenizer, RTNConfig())
    info = json.loads((folder / AAQ_CONFIG).read_text())
    info["format_version"] = 99
    (folder / AAQ_CONFIG).write_text(json.dumps(info))
    with pytest.raises(AaqError, match="re-run"):
        load_quantized(folder)


def test_saving_without_rotations_removes_stale_transforms(tmp_path, tiny_tokenizer):
    from aaq.runs.checkpoint import TRANSFORMS

    folder, _, _ = _saved_run(tmp_path, tiny_tokenizer, QuaRotConfig(weight_quantizer="rtn"))
    assert (folder / TRANSFORMS).is_file()
    result = quantize(make_tiny_model("llama"), QuantizeConfig(method=RTNConfig(), bits="w4a16"))
    save_quantized(result, tiny_tokenizer, folder)
    assert not (folder / TRANSFORMS).exists()


def test_saving_into_a_folder_of_foreign_files_is_refused(tmp_path, tiny_tokenizer):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("the user's")
    result = quantize(make_tiny_model("llama"), QuantizeConfig(method=RTNConfig(), bits="w4a16"))
    with pytest.raises(AaqError, match=r"holds files aaq did not write \(config.json\)"):
        save_quantized(result, tiny_tokenizer, tmp_path / "run")
    assert (tmp_path / "run" / "config.json").read_text() == "the user's"


def test_weights_changed_after_the_save_are_refused_on_load(tmp_path, tiny_tokenizer):
    folder, _, _ = _saved_run(tmp_path, tiny_tokenizer, RTNConfig())
    with (folder / WEIGHTS).open("r+b") as handle:
        handle.seek(4096)
        handle.write(bytes(4096))
    with pytest.raises(AaqError, match="aaq_model.safetensors changed after aaq wrote it .* write the folder again"):
        load_quantized(folder)


def test_an_unfinished_run_folder_is_still_a_run_folder(tmp_path, tiny_tokenizer):
    from aaq.runs.checkpoint import is_run_folder
    from aaq.runs.folders import prepare_output_folder

    assert not is_run_folder(tmp_path / "nothing") and not is_run_folder("some/hub-id")
    prepare_output_folder(tmp_path / "killed", "run")
    assert is_run_folder(tmp_path / "killed") and not is_quantized_folder(tmp_path / "killed")
    with pytest.raises(AaqError, match=r"not a finished aaq run; finish it with `aaq quantize` into that folder with `resume`"):
        load(tmp_path / "killed")
