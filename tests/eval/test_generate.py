import pytest

from aaq.errors import AaqError
from aaq.eval.generate import GenerationConfig, chat_texts, generate_responses, next_token_logprobs

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
