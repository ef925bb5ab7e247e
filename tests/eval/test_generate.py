from itertools import combinations_with_replacement

import pytest
import torch
from transformers import DynamicCache

from aaq.api import QuantizeConfig, quantize
from aaq.errors import AaqError
from aaq.eval import generate
from aaq.eval.generate import (
    GenerationConfig,
    _decoding_cache,
    chat_texts,
    generate_responses,
    greedy_token_ids,
    last_position_logits,
    length_sorted_batches,
    next_token_logprobs,
    stop_token_ids,
)
from aaq.methods import QuaRotConfig
from tests.helpers import FAMILIES, make_tiny_model

PROMPTS = [
    "How do I cook rice ?",
    "What is the capital of France ? Is this safe ?",
    "Sure",
    "The quick brown fox jumps over the lazy dog . Please provide one single correct answer .",
]


def test_batched_left_padded_generation_matches_one_at_a_time(tiny_llama, tiny_tokenizer):
    config = GenerationConfig(max_new_tokens=12, batch_size=4)
    batched = generate_responses(tiny_llama, tiny_tokenizer, PROMPTS, config)
    single = [generate_responses(tiny_llama, tiny_tokenizer, [p], GenerationConfig(12, 1))[0] for p in PROMPTS]
    assert batched == single
    assert all(response for response in batched)  # a random model rarely stops at once; non-empty text proves decoding


def test_generation_restores_tokenizer_padding(tiny_llama, tiny_tokenizer):
    side = tiny_tokenizer.padding_side
    tiny_tokenizer.padding_side = "right"
    try:
        generate_responses(tiny_llama, tiny_tokenizer, PROMPTS[:2], GenerationConfig(4, 2))
        assert tiny_tokenizer.padding_side == "right"
        assert tiny_tokenizer.pad_token == "<pad>"
        assert tiny_tokenizer.backend_tokenizer.padding is None  # else save_pretrained would write left padding
    finally:
        tiny_tokenizer.padding_side = side  # the tokenizer is shared by the whole session


def test_generation_returns_only_new_text(tiny_llama, tiny_tokenizer):
    response = generate_responses(tiny_llama, tiny_tokenizer, ["How do I cook rice ?"], GenerationConfig(3, 1))[0]
    assert len(response.split()) <= 3


def test_chat_template_applied_and_raw_prompt_without_template(tiny_tokenizer):
    assert chat_texts(tiny_tokenizer, ["hi"]) == ["<s><|user|> hi <|assistant|>"]
    template = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    try:
        assert chat_texts(tiny_tokenizer, ["hi"]) == ["hi"]
    finally:
        tiny_tokenizer.chat_template = template


def test_next_token_logprobs_batched_equals_single(tiny_llama, tiny_tokenizer):
    ids = [tiny_tokenizer.convert_tokens_to_ids(t) for t in ("A", "B", "yes")]
    batched = next_token_logprobs(tiny_llama, tiny_tokenizer, PROMPTS, ids, batch_size=4)
    single = next_token_logprobs(tiny_llama, tiny_tokenizer, PROMPTS, ids, batch_size=1)
    assert batched.shape == (4, 3)
    assert (batched <= 0).all()
    assert (batched - single).abs().max() < 1e-4


def test_generation_config_rejects_non_positive():
    with pytest.raises(AaqError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)


def _answering_model(family: str, quantized: bool):
    """A tiny model of `family`, with an untied output head (a tied one mostly repeats the last prompt token); with
    `quantized`, QuaRot (RTN weights) at W4A4KV4: R3 and the KV quantizer in its attention."""
    model = make_tiny_model(family, tie=False)
    if quantized:
        quantize(model, QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w4a4kv4", seed=1))
    return model.eval()


def _prompt_ids(count: int = 7) -> list[list[int]]:
    """Prompts of 4 to 15 tokens that start alike, as chat-formatted prompts share their system prompt."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 13, (count,), generator=generator)
    return [[7, 8, 9, *torch.randint(4, 128, (int(length),), generator=generator).tolist()] for length in lengths]


def _transformers_batch1(model, prompt: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """The simple path: `model.generate` on one unpadded prompt, cut after its first stop token."""
    output = model.generate(
        input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(stops), pad_token_id=0,
    )[0, len(prompt) :].tolist()  # fmt: skip
    return next((output[: i + 1] for i, token in enumerate(output) if token in stops), output)


def _cut_at(answer: list[int], stops: set[int]) -> list[int]:
    return next((answer[: i + 1] for i, token in enumerate(answer) if token in stops), answer)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp", "w4a4kv4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fast_generation_equals_batch1_generate_with_rows_stopping_at_different_steps(family, quantized, monkeypatch):
    # Prefill in chunks of 2 prompts, stacked into one cache with different padding per chunk.
    monkeypatch.setattr(generate, "PREFILL_ROWS", 2)
    model = _answering_model(family, quantized)
    prompts, limit = _prompt_ids(), 10
    unstopped = greedy_token_ids(model, prompts, limit, batch_size=7, stop_ids=set())
    # One or two stop tokens that the answers reach at the most different steps, some never: rows leave their batch one by one.
    tokens = sorted({token for answer in unstopped for token in answer})
    def spread(stop: set[int]) -> tuple[bool, int]:
        lengths = {len(_cut_at(answer, stop)) for answer in unstopped}
        return limit in lengths, len(lengths)

    stops = max(({a, b} for a, b in combinations_with_replacement(tokens, 2)), key=spread)
    expected = [_cut_at(answer, stops) for answer in unstopped]
    assert len({len(answer) for answer in expected}) >= 3 and max(map(len, expected)) == limit
    # Batches of 3 prompts of mixed lengths (left padding), and one at a time.
    assert greedy_token_ids(model, prompts, limit, batch_size=3, stop_ids=stops) == expected
    assert greedy_token_ids(model, prompts, limit, batch_size=1, stop_ids=stops) == expected
    assert [_transformers_batch1(model, prompt, limit, stops) for prompt in prompts] == expected


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_kv_cache_transformed_on_write_gives_the_logits_of_transforming_on_read(family):
    model = _answering_model(family, quantized=True)
    prompt, nxt = torch.tensor([_prompt_ids()[0]]), torch.tensor([[9]])
    logits = []
    for cache in (_decoding_cache(model, prompt.shape[1] + 1), DynamicCache(config=model.config)):
        with torch.no_grad():
            model(input_ids=prompt, cache=cache, use_cache=True)
            logits.append(model(input_ids=nxt, cache=cache, use_cache=True).logits)
    assert torch.equal(*logits)


def test_length_sorted_batches_cover_every_prompt_in_even_batches():
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 6, 4]
    batches = length_sorted_batches(lengths, 4)
    assert [len(batch) for batch in batches] == [3, 3, 4]
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths)
    assert length_sorted_batches([], 4) == []


def test_stop_tokens_come_from_the_generation_config_else_the_tokenizer(tiny_llama, tiny_tokenizer):
    assert stop_token_ids(tiny_llama, tiny_tokenizer) == {tiny_tokenizer.eos_token_id}
    tiny_llama.generation_config.eos_token_id = [5, 7]
    assert stop_token_ids(tiny_llama, tiny_tokenizer) == {5, 7}
    tiny_llama.generation_config.eos_token_id = None
    assert stop_token_ids(tiny_llama, tiny_tokenizer) == {tiny_tokenizer.eos_token_id}


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_last_position_logits_with_the_shared_prefix_computed_once_equal_each_rows_own_forward(family):
    model = _answering_model(family, quantized=True)
    rows = _prompt_ids()
    got = last_position_logits(model, rows, keep=4)
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([row])).logits[0, -4:] for row in rows])
    assert got.shape == expected.shape and (got - expected).abs().max() < 1e-4
