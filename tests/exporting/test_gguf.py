"""GGUF files written with the gguf library load back in transformers as the model they were written from."""

import pytest
import torch

from aaq.errors import AaqError
from aaq.exporting.gguf import FILE_TYPES, write_gguf
from aaq.models.loading import load_model
from tests.helpers import logits_of, make_tiny_model

# Relative logit error of the tiny model after a round trip through each file type (measured: F16 4e-4, Q8_0 0.012,
# Q5_1 0.055, Q5_0 0.075, Q4_1 and Q4_0 0.13; a query/key permutation gone wrong would show at F16 already).
BOUNDS = {"F16": 2e-3, "Q8_0": 0.025, "Q5_1": 0.1, "Q5_0": 0.12, "Q4_1": 0.2, "Q4_0": 0.2}


def bpe_model(tokenizer):
    model = make_tiny_model("llama", hidden_size=64, num_heads=4)
    model.resize_token_embeddings(len(tokenizer))
    return model


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_every_writable_type_loads_back_with_the_same_tokenizer(tmp_path, tiny_bpe_tokenizer, file_type):
    model = bpe_model(tiny_bpe_tokenizer)
    path = write_gguf(model, tiny_bpe_tokenizer, tmp_path / f"tiny.{file_type}.gguf", file_type)
    loaded, tokenizer = load_model(str(path))
    assert tokenizer.get_vocab() == tiny_bpe_tokenizer.get_vocab() and tokenizer.chat_template == tiny_bpe_tokenizer.chat_template
    text = "How do I cook rice ? I cannot help with that request ."
    assert tokenizer(text)["input_ids"] == tiny_bpe_tokenizer(text)["input_ids"]
    tokens = torch.tensor([tiny_bpe_tokenizer(text)["input_ids"]])
    reference = logits_of(model, tokens)
    relative = ((logits_of(loaded, tokens) - reference).norm() / reference.norm()).item()
    assert 0 < relative < BOUNDS[file_type]


def test_writing_refuses_what_it_cannot_write(tmp_path, tiny_bpe_tokenizer, tiny_tokenizer):
    model = bpe_model(tiny_bpe_tokenizer)
    with pytest.raises(AaqError, match="cannot write GGUF file type 'Q4_K_M'"):
        write_gguf(model, tiny_bpe_tokenizer, tmp_path / "a.gguf", "Q4_K_M")
    with pytest.raises(AaqError, match="Llama-architecture models, not 'qwen2'"):
        write_gguf(make_tiny_model("qwen2"), tiny_bpe_tokenizer, tmp_path / "a.gguf")
    with pytest.raises(AaqError, match="byte-level BPE tokenizer"):
        write_gguf(model, tiny_tokenizer, tmp_path / "a.gguf")
    (tmp_path / "taken.gguf").write_text("someone else's")
    with pytest.raises(AaqError, match="exists; aaq does not replace"):
        write_gguf(model, tiny_bpe_tokenizer, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "someone else's"
