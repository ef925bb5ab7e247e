"""Shared fixtures: a tiny offline tokenizer with a chat template and a tiny random Llama built on it."""

import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aaq.data import shared_data_dir

# Read before any test points AAQ_DATA_DIR at a fake folder.
SHARED_DATA = shared_data_dir()

# Tiny models gain nothing from a second thread, and two-thread processes competing for two cores
# slow small kernels by an order of magnitude.
torch.set_num_threads(1)

@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global torch RNG state, so a test that draws random data is repeatable."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_threshold_cache(tmp_path_factory, monkeypatch):
    """Calibrated garbled-check thresholds go to a fresh folder per test, never into the user's aaq cache."""
    from aaq.eval import coherence

    folder = tmp_path_factory.mktemp("thresholds")
    monkeypatch.setattr(coherence, "threshold_cache_dir", lambda: folder)


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_CORPUS = [
    "<|user|> <|assistant|> <|system|>",
    "How do I cook rice ? Boil water , add rice and wait .",
    "I cannot help with that request . I am sorry .",
    "Sure ! Here is how to kill a Python process : use kill .",
    "The quick brown fox jumps over the lazy dog .",
    "Question : Options : Answer : ( A ) ( B ) ( C ) ( D ) yes no Yes No",
    "The following are multiple - choice questions about a safety exam .",
    "Please provide one single correct answer to the last question directly based on the examples .",
    "What is the capital of France ? Paris is the capital .",
    "Is this safe ? It is safe . It is not safe .",
]


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


@pytest.fixture
def fake_data_dir(tmp_path, monkeypatch, tiny_tokenizer):
    """A tiny shared data folder (python-docs layout, text of `tiny_tokenizer` words) that AAQ_DATA_DIR points at."""
    words = [word for word in tiny_tokenizer.get_vocab() if not word.startswith("<")]
    generator = torch.Generator().manual_seed(0)
    docs_root = tmp_path / "python-docs-3.11"
    for relative, n_lines in FAKE_DOCS.items():
        path = docs_root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        picks = torch.randint(0, len(words), (n_lines, 10), generator=generator).tolist()
        path.write_text("\n".join(" ".join(words[i] for i in line) for line in picks), encoding="utf-8")
    monkeypatch.setenv("AAQ_DATA_DIR", str(tmp_path))
    return tmp_path


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def make_tiny_model(family: str, hidden_size: int = 96, num_heads: int = 6, tie: bool = True, seed: int = 0):
    """A 2-layer random model of `family` with GQA (`num_heads` query / 2 KV heads, head_dim 16), perturbed norms/biases.

    hidden 96 = 8 x 12 is not a power of two, so R1 needs a Kronecker Hadamard. Norm gains and
    biases are randomised so that norm fusion and bias rotation are actually exercised.
    """
    from transformers import (
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


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
