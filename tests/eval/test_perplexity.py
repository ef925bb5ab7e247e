"""Tests for aaq.eval.perplexity: agreement with an independent cross-entropy and the uniform-model bound."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aaq.data.corpus import TextDataConfig, token_windows
from aaq.eval.perplexity import PerplexityConfig, evaluate_perplexity
from aaq.models.loading import load_model

CONFIG = PerplexityConfig(dataset="python-docs", n_samples=3, seq_len=16, batch_size=2)


def test_perplexity_is_exp_of_cross_entropy_on_the_heldout_windows(fake_data_dir, tiny_llama, tiny_tokenizer):
    result = evaluate_perplexity(tiny_llama, tiny_tokenizer, CONFIG)
    windows = token_windows(tiny_tokenizer, TextDataConfig("heldout", 3, 16, "python-docs"))
    with torch.no_grad():
        logits = tiny_llama(windows).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result.n_tokens == 3 * 15
    assert result.dataset == "python-docs"
    assert result.nll == pytest.approx(expected.item(), rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected.item()), rel=1e-6)
    assert result.seconds > 0


def test_the_lm_head_sees_a_chunk_of_positions_at_a_time(fake_data_dir, tiny_llama, tiny_tokenizer, monkeypatch):
    # The (batch, seq, vocab) logits of a large vocabulary are the largest tensor of an evaluation.
    full = evaluate_perplexity(tiny_llama, tiny_tokenizer, CONFIG)
    monkeypatch.setattr("aaq.eval.perplexity.NLL_CHUNK", 7)
    rows = []
    hook = tiny_llama.lm_head.register_forward_hook(lambda module, args, output: rows.append(output.shape[:-1].numel()))
    chunked = evaluate_perplexity(tiny_llama, tiny_tokenizer, CONFIG)
    hook.remove()
    assert max(rows) == 7 and sum(rows) == 3 * 15
    assert chunked.nll == pytest.approx(full.nll, rel=1e-6)


def test_batch_size_does_not_change_the_result(fake_data_dir, tiny_llama, tiny_tokenizer):
    one = evaluate_perplexity(tiny_llama, tiny_tokenizer, PerplexityConfig("python-docs", 3, 16, batch_size=1))
    three = evaluate_perplexity(tiny_llama, tiny_tokenizer, PerplexityConfig("python-docs", 3, 16, batch_size=3))
    assert one.ppl == pytest.approx(three.ppl, rel=1e-6)


class UniformLM(nn.Module):
    """A causal LM that gives every token the same logit, returning a plain tuple like a wrapped model might."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.bias.expand(*input_ids.shape, self.vocab_size),)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary_size(fake_data_dir, tiny_tokenizer):
    model = UniformLM(vocab_size=len(tiny_tokenizer)).train()
    result = evaluate_perplexity(model, tiny_tokenizer, CONFIG)
    assert result.ppl == pytest.approx(len(tiny_tokenizer), rel=1e-5)  # fp32 log-softmax: a few ulps
    assert model.training


def test_bad_batch_size_is_an_error():
    from aaq.errors import AaqError

    with pytest.raises(AaqError, match="batch_size"):
        PerplexityConfig(batch_size=0)


@pytest.mark.slow
def test_smollm2_perplexity_on_python_docs_matches_the_reference():
    model, tokenizer = load_model("smollm2-135m-instruct")
    result = evaluate_perplexity(model, tokenizer, PerplexityConfig(dataset="python-docs"))
    assert result.n_tokens == 24 * 511
    assert result.ppl == pytest.approx(12.41, abs=0.05)
