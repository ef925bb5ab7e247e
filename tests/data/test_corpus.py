"""Tests for aaq.data.corpus: the python-docs split, the data folder lookup and token windows."""

import sys
from pathlib import Path

import pytest
import torch

from aaq.data import corpus as data
from aaq.data.corpus import TextDataConfig, corpus_token_ids, is_heldout_doc, python_docs_files, resolve_dataset, shared_data_dir, token_windows
from aaq.errors import AaqError


def test_real_python_docs_split_is_disjoint_and_follows_the_readme(monkeypatch):
    monkeypatch.delenv("AAQ_DATA_DIR", raising=False)
    root = shared_data_dir() / "python-docs-3.11"
    heldout = python_docs_files("heldout")
    calibration = python_docs_files("calibration")
    assert heldout and calibration
    assert not set(heldout) & set(calibration)
    for path in heldout:
        relative = path.relative_to(root)
        assert relative.parts[0] == "library" and relative.name[0].lower() in "stuvwxyz"
    for path in calibration:
        relative = path.relative_to(root)
        assert relative.parts[0] != "library" or relative.name[0].lower() < "s"
    everything = {path for path in root.rglob("*.rst.txt") if path.name != "LICENSE.rst.txt"}
    assert set(heldout) | set(calibration) == everything
    assert heldout == sorted(heldout) and calibration == sorted(calibration)


def test_fake_corpus_split_files(fake_data_dir):
    root = fake_data_dir / "python-docs-3.11"
    names = lambda paths: [str(path.relative_to(root)) for path in paths]  # noqa: E731
    assert names(python_docs_files("heldout")) == [
        "library/Sys.rst.txt",
        "library/string.rst.txt",
        "library/zipfile.rst.txt",
    ]
    assert names(python_docs_files("calibration")) == ["library/abc.rst.txt", "tutorial/venv.rst.txt"]


def test_heldout_rule_is_case_insensitive_and_library_only():
    assert is_heldout_doc(Path("library/Tkinter.rst.txt"))
    assert not is_heldout_doc(Path("library/re.rst.txt"))
    assert not is_heldout_doc(Path("tutorial/stdlib.rst.txt"))


def test_missing_data_dir_env_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AAQ_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(AaqError, match="AAQ_DATA_DIR"):
        shared_data_dir()


def test_heldout_windows_are_consecutive_from_the_start_and_deterministic(fake_data_dir, tiny_tokenizer):
    config = TextDataConfig(split="heldout", n_samples=4, seq_len=16, dataset="python-docs")
    windows = token_windows(tiny_tokenizer, config)
    assert windows.shape == (4, 16) and windows.dtype == torch.int64
    ids = corpus_token_ids(tiny_tokenizer, "python-docs", "heldout")
    assert torch.equal(windows.flatten(), ids[:64])
    assert torch.equal(windows, token_windows(tiny_tokenizer, TextDataConfig("heldout", 4, 16, "python-docs", seed=7)))


def test_calibration_windows_are_seeded_slices_of_the_calibration_text(fake_data_dir, tiny_tokenizer):
    config = TextDataConfig(split="calibration", n_samples=5, seq_len=8, dataset="python-docs", seed=0)
    windows = token_windows(tiny_tokenizer, config)
    assert windows.shape == (5, 8) and windows.dtype == torch.int64
    assert torch.equal(windows, token_windows(tiny_tokenizer, config))
    other_seed = token_windows(tiny_tokenizer, TextDataConfig("calibration", 5, 8, "python-docs", seed=1))
    assert not torch.equal(windows, other_seed)
    all_slices = corpus_token_ids(tiny_tokenizer, "python-docs", "calibration").unfold(0, 8, 1)
    for window in windows:
        assert (all_slices == window).all(dim=1).any()


def test_corpus_ids_are_cached_per_tokenizer_and_text_and_read_back_without_tokenizing(fake_data_dir, tiny_tokenizer, monkeypatch):
    fresh = torch.tensor(tiny_tokenizer(data.DOCUMENT_SEPARATOR.join(data.CORPORA["python-docs"]("heldout")), add_special_tokens=False)["input_ids"])
    first = corpus_token_ids(tiny_tokenizer, "python-docs", "heldout")
    assert torch.equal(first, fresh) and first.dtype == torch.int64
    cached = list(data.token_cache_dir().glob("*.npy"))
    assert len(cached) == 1
    with monkeypatch.context() as patch:
        patch.setattr(type(tiny_tokenizer), "__call__", lambda *a, **k: pytest.fail("tokenized again"))
        assert torch.equal(corpus_token_ids(tiny_tokenizer, "python-docs", "heldout"), fresh)
    corpus_token_ids(tiny_tokenizer, "python-docs", "calibration")  # another text, another file
    assert len(list(data.token_cache_dir().glob("*.npy"))) == 2
    cached[0].write_bytes(b"not an array")
    assert torch.equal(corpus_token_ids(tiny_tokenizer, "python-docs", "heldout"), fresh)  # a damaged file is rebuilt


def test_too_short_text_names_the_maximum(fake_data_dir, tiny_tokenizer):
    n_tokens = corpus_token_ids(tiny_tokenizer, "python-docs", "heldout").numel()
    with pytest.raises(AaqError, match=f"at most {n_tokens // 100} windows of 100 tokens"):
        token_windows(tiny_tokenizer, TextDataConfig("heldout", 1000, 100, "python-docs"))
    calibration_tokens = corpus_token_ids(tiny_tokenizer, "python-docs", "calibration").numel()
    with pytest.raises(AaqError, match=f"seq_len <= {calibration_tokens}"):
        token_windows(tiny_tokenizer, TextDataConfig("calibration", 1, calibration_tokens + 1, "python-docs"))


@pytest.mark.parametrize(
    "kwargs", [{"dataset": "wikitext103"}, {"split": "test"}, {"n_samples": 0}, {"seq_len": 1}]
)
def test_bad_config_is_an_error(kwargs):
    settings = {"split": "heldout", "n_samples": 2, "seq_len": 8} | kwargs
    with pytest.raises(AaqError):
        TextDataConfig(**settings)


def test_auto_uses_wikitext2_only_when_it_loads_offline(monkeypatch):
    def unavailable(split, allow_network=True):
        assert not allow_network
        raise AaqError("WikiText-2 is not in the local datasets cache")

    monkeypatch.setattr(data, "_wikitext2_documents", unavailable)
    assert resolve_dataset("auto") == "python-docs"
    monkeypatch.setattr(data, "_wikitext2_documents", lambda split, allow_network=True: ["text"])
    assert resolve_dataset("auto") == "wikitext2"
    assert resolve_dataset("c4") == "c4"


def test_hub_corpora_without_datasets_are_a_clear_error(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(AaqError, match="needs the `datasets` library"):
        token_windows(tiny_tokenizer, TextDataConfig("heldout", 1, 8, "c4"))
    assert resolve_dataset("auto") == "python-docs"
