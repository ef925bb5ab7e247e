"""`aaq.quantize` arguments for the learned-transform methods: the reference model and its vocabulary check."""

import copy

import pytest
import torch

from aaq.api import CalibrationConfig, QuantizeConfig, check_reference_compatible, quantize
from aaq.errors import AaqError
from aaq.methods import AAQConfig
from tests.helpers import make_tiny_model


def test_reference_with_another_vocabulary_size_is_rejected():
    model = make_tiny_model("llama")
    other = make_tiny_model("llama")
    other.resize_token_embeddings(130)
    with pytest.raises(AaqError, match="vocabularies differ"):
        check_reference_compatible(model, other)
    check_reference_compatible(model, copy.deepcopy(model))


def test_reference_with_another_tokenizer_is_rejected(tiny_tokenizer):
    model = make_tiny_model("llama")
    vocab = tiny_tokenizer.get_vocab()
    swapped = dict(vocab)
    a, b = sorted(vocab)[-2:]
    swapped[a], swapped[b] = vocab[b], vocab[a]
    other_tokenizer = copy.deepcopy(tiny_tokenizer)
    other_tokenizer.get_vocab = lambda: swapped
    with pytest.raises(AaqError, match="tokenizers map tokens to different ids"):
        check_reference_compatible(model, copy.deepcopy(model), tiny_tokenizer, other_tokenizer)
    check_reference_compatible(model, copy.deepcopy(model), tiny_tokenizer, copy.deepcopy(tiny_tokenizer))


def test_mismatch_fails_before_any_work(monkeypatch):
    import aaq.api

    monkeypatch.setattr(aaq.api, "apply_method", lambda context: pytest.fail("the method ran"))
    model, other = make_tiny_model("llama"), make_tiny_model("llama")
    other.resize_token_embeddings(200)
    config = QuantizeConfig(method=AAQConfig(), calibration=CalibrationConfig(n_samples=2, seq_len=8))
    with pytest.raises(AaqError, match="vocabularies differ"):
        quantize(model, config, calibration=torch.zeros(2, 8, dtype=torch.long), reference=other)


def test_aaq_without_reference_is_a_clear_error():
    config = QuantizeConfig(method=AAQConfig(), calibration=CalibrationConfig(n_samples=2, seq_len=8))
    with pytest.raises(AaqError, match=r"pass one \(`reference`\)"):
        quantize(make_tiny_model("llama"), config, calibration=torch.zeros(2, 8, dtype=torch.long))


def test_a_reference_source_is_checked_from_its_config_and_tokenizer_alone(tmp_path, tiny_tokenizer, monkeypatch):
    import aaq.models.loading
    from aaq.api import check_reference_source

    monkeypatch.setattr(aaq.models.loading, "_load_pretrained", lambda *a, **k: pytest.fail("the reference's weights were loaded"))
    model = make_tiny_model("llama")
    model.resize_token_embeddings(len(tiny_tokenizer))
    other = make_tiny_model("llama")
    for name, reference in (("same", model), ("other", other)):
        reference.save_pretrained(tmp_path / name)
        tiny_tokenizer.save_pretrained(tmp_path / name)
    check_reference_source(str(tmp_path / "same"), model, tiny_tokenizer)
    with pytest.raises(AaqError, match=rf"vocabularies differ \({len(tiny_tokenizer)} vs 128 tokens\)"):
        check_reference_source(str(tmp_path / "other"), model, tiny_tokenizer)
