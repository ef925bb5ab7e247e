"""Chat-form calibration: conversations from the calibration-split docs, rendered with the chat template."""

import itertools

import pytest
import torch

from aaq.api import CalibrationConfig, calibration_windows
from aaq.data.chat import (
    ChatDataConfig,
    Exchange,
    benign_train_exchanges,
    chat_token_windows,
    docs_exchanges,
    plain_text,
    render_exchanges,
    rst_sections,
)
from aaq.data.corpus import TextDataConfig, token_windows
from aaq.errors import AaqError
from aaq.eval.prompts import benign_records, benign_train_records, harmbench_prompts

# Words of the tiny tokenizer, so rendered windows can be checked token by token; "Paris" appears only in the
# held-out file and in a calibration file outside the chat folders.
FAQ = """
=============
The Rice FAQ
=============

.. contents::

How do I cook rice ?
--------------------

Boil water , add rice and wait . The quick brown fox jumps over the lazy dog .
Is this safe ? It is safe .

What is the capital of France
-----------------------------

.. index::
   single: capital

The quick brown fox jumps over the lazy dog . The quick brown fox jumps over the lazy dog , yes .
"""
TUTORIAL = """
Cooking Rice
============

.. note::

   Boil water , add rice and wait . The quick brown fox jumps over the lazy dog . Sure !

Short
-----

yes .
"""
HELD_OUT = "Paris Options\n=============\n\nParis is the capital . Paris is the capital . Paris is the capital .\n" * 2


@pytest.fixture
def chat_docs(fake_data_dir):
    """`fake_data_dir` plus a FAQ and a tutorial with sections, and a held-out library file with sections."""
    docs = fake_data_dir / "python-docs-3.11"
    (docs / "faq").mkdir()
    (docs / "faq" / "rice.rst.txt").write_text(FAQ)
    (docs / "tutorial" / "cooking.rst.txt").write_text(TUTORIAL)
    (docs / "library" / "sys.rst.txt").write_text(HELD_OUT)  # held out: s-z
    (docs / "library" / "abc.rst.txt").write_text(HELD_OUT)  # calibration split, but not a chat folder
    return fake_data_dir


def test_rst_markup_is_reduced_to_what_a_reader_sees():
    rst = (
        "Use :func:`breakpoint` or :mod:`the debugger <pdb>` (:pep:`8`, :keyword:`!if`, :ref:`tut-if`).\n"
        "See `Pylint <https://pylint.org>`_ and ``x = 1``.  For example::\n\n"
        "   >>> x\n\n"
        ".. index::\n   single: debugger\n\n"
        ".. A comment that a reader never sees\n   over two lines.\n\n"
        ".. note::\n\n   Notes are kept.\n"
    )
    assert plain_text(rst) == (
        "Use `breakpoint` or `the debugger` (PEP 8, `if`, tut-if).\n"
        "See Pylint and `x = 1`.  For example:\n\n"
        "   >>> x\n\n"
        "   Notes are kept."
    )


def test_sections_split_at_titles_of_every_level_and_drop_overlines():
    sections = rst_sections(FAQ)
    assert [title for title, _ in sections] == ["The Rice FAQ", "How do I cook rice ?", "What is the capital of France"]
    assert "=====" not in sections[0][1] and sections[1][1].strip().startswith("Boil water")


def test_exchanges_come_from_the_chat_folders_of_the_calibration_split_only(chat_docs):
    exchanges = docs_exchanges()
    users = [e.user for e in exchanges]
    # The FAQ title is asked verbatim (a question word gets its question mark); the tutorial title is templated;
    # "Short" and the FAQ's own title are too short to answer; library files are never read.
    assert users[:2] == ["How do I cook rice ?", "What is the capital of France?"]
    assert len(users) == 3 and "Cooking Rice" in users[2] and users[2] != "Cooking Rice"
    assert all("Paris" not in e.user + e.assistant for e in exchanges)
    assert "single: capital" not in exchanges[1].assistant and "Sure !" in exchanges[2].assistant


def test_chat_windows_open_with_the_template_and_hold_no_held_out_text(chat_docs, tiny_tokenizer):
    config = ChatDataConfig(n_samples=6, seq_len=40, seed=3)
    windows = chat_token_windows(tiny_tokenizer, config)
    vocab = tiny_tokenizer.get_vocab()
    assert windows.shape == (6, 40) and windows.dtype == torch.int64
    # The tiny tokenizer splits the template's markers into "<|", role, "|>".
    user_turn = [tiny_tokenizer.bos_token_id, vocab["<|"], vocab["user"], vocab["|>"]]
    assert all(window[:4].tolist() == user_turn for window in windows)
    assert (windows == vocab["assistant"]).any(dim=1).all()
    assert not (windows == vocab["Paris"]).any()
    assert torch.equal(windows, chat_token_windows(tiny_tokenizer, config))
    assert not torch.equal(windows, chat_token_windows(tiny_tokenizer, ChatDataConfig(6, 40, seed=4)))
    rendered = render_exchanges(tiny_tokenizer, docs_exchanges())
    from_each_start = [list(itertools.chain.from_iterable(rendered[s:] + rendered[:s] + rendered))[:40] for s in range(len(rendered))]
    assert all(window.tolist() in from_each_start for window in windows)


def test_calibration_config_selects_the_chat_form(chat_docs, tiny_tokenizer):
    chat = CalibrationConfig(n_samples=4, seq_len=30, form="chat")
    assert torch.equal(calibration_windows(tiny_tokenizer, chat, seed=1), chat_token_windows(tiny_tokenizer, ChatDataConfig(4, 30, 1)))
    raw = calibration_windows(tiny_tokenizer, CalibrationConfig(dataset="python-docs", n_samples=4, seq_len=30), seed=1)
    assert torch.equal(raw, token_windows(tiny_tokenizer, TextDataConfig("calibration", 4, 30, "python-docs", seed=1)))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"form": "markdown"}, "raw, chat"),
        ({"form": "chat", "dataset": "wikitext2"}, "Python docs"),
        ({"benign_train": True}, "--calib-form chat"),
    ],
)
def test_bad_calibration_forms_are_one_line_errors(kwargs, needle):
    with pytest.raises(AaqError, match=needle):
        CalibrationConfig(**kwargs)


def test_a_tokenizer_without_chat_template_is_refused(tiny_tokenizer):
    plain = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    with pytest.raises(AaqError, match="chat template"):
        render_exchanges(plain, [Exchange("a", "b")])


def test_benign_training_conversations_are_opt_in_and_never_evaluation_prompts(chat_docs, fake_data_with_harmbench, tiny_tokenizer):
    exchanges = benign_train_exchanges()
    prompts = {e.user for e in exchanges}
    assert len(exchanges) >= 200 and prompts <= {r.text for r in benign_train_records()}
    assert not prompts & {r.text for r in benign_records()}
    assert not prompts & set(harmbench_prompts("test")) and all(e.assistant.strip() for e in exchanges)
    config = ChatDataConfig(n_samples=200, seq_len=20, seed=0)
    without = chat_token_windows(tiny_tokenizer, config)
    with_benign = chat_token_windows(tiny_tokenizer, ChatDataConfig(200, 20, 0, benign_train=True))
    assert without.unique(dim=0).shape[0] <= 3 < with_benign.unique(dim=0).shape[0]
