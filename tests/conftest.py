"""Shared fixtures: a tiny offline tokenizer with a chat template and a tiny random Llama built on it."""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.helpers import FAMILIES, SHARED_DATA, TINY_CHAT_TEMPLATE, TINY_CORPUS, make_tiny_model

# Tiny models gain nothing from a second thread, and two-thread processes competing for two cores
# slow small kernels by an order of magnitude.
torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global torch RNG state, so a test that draws random data is repeatable."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Calibrated garbled-check thresholds and corpus token ids go to fresh folders per test, never into the user's aaq cache."""
    from aaq.data import corpus as data
    from aaq.eval import coherence

    thresholds, tokens = tmp_path_factory.mktemp("thresholds"), tmp_path_factory.mktemp("tokens")
    monkeypatch.setattr(coherence, "threshold_cache_dir", lambda: thresholds)
    monkeypatch.setattr(data, "token_cache_dir", lambda: tokens)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a few sentences, with BOS/EOS/PAD and a simple chat template."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the kind a GGUF file stores, llama.cpp's `gpt2`) trained on the tiny corpus, with the chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<|endoftext|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


@pytest.fixture
def tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    """A 2-layer, hidden-64 random Llama (fp32, eval mode) sized to `tiny_tokenizer`'s vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def fluent_tiny_llama(tiny_tokenizer) -> LlamaForCausalLM:
    """A tiny Llama trained (about 3 s) on chat turns of `TINY_CORPUS`: its own answers are fluent to it, word salad is not.

    Each user turn is one corpus sentence and the assistant answers with the next one, plus the plain sentences.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    sentences = TINY_CORPUS[1:]
    turns = [
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
        + " " + sentences[(i + 1) % len(sentences)]
        for i, s in enumerate(sentences)
    ]  # fmt: skip
    batch = tiny_tokenizer(turns + sentences, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model.eval()


FAKE_DOCS = {
    "library/abc.rst.txt": 40,
    "library/string.rst.txt": 30,
    "library/Sys.rst.txt": 20,
    "library/zipfile.rst.txt": 10,
    "tutorial/venv.rst.txt": 40,
    "LICENSE.rst.txt": 5,
}


@pytest.fixture
def fake_data_with_harmbench(fake_data_dir):
    """`fake_data_dir` plus a copy of the real HarmBench files (the safety tasks' prompts)."""
    shutil.copytree(SHARED_DATA / "harmbench", fake_data_dir / "harmbench")
    return fake_data_dir


def write_fake_data(folder, tokenizer) -> None:
    """A tiny shared data folder in `folder`: the python-docs layout, with text of `tokenizer`'s words."""
    words = [word for word in tokenizer.get_vocab() if not word.startswith("<")]
    generator = torch.Generator().manual_seed(0)
    docs_root = folder / "python-docs-3.11"
    for relative, n_lines in FAKE_DOCS.items():
        path = docs_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        picks = torch.randint(0, len(words), (n_lines, 10), generator=generator).tolist()
        path.write_text("\n".join(" ".join(words[i] for i in line) for line in picks), encoding="utf-8")


@pytest.fixture
def fake_data_dir(tmp_path, monkeypatch, tiny_tokenizer):
    """A tiny shared data folder (python-docs layout, text of `tiny_tokenizer` words) that AAQ_DATA_DIR points at."""
    write_fake_data(tmp_path, tiny_tokenizer)
    monkeypatch.setenv("AAQ_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """A tiny random model of each supported family."""
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A tiny random Llama saved as a transformers folder with its tokenizer."""
    model = make_tiny_model("llama")
    model.resize_token_embeddings(len(tiny_tokenizer))
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder
