"""Pair diagnostics: can AAQ's push see anything of an aligned/reference pair on the chosen calibration text?

:func:`diagnose_pair` runs both models over three kinds of text and reports, per kind, the mean per-token
KL(aligned || reference) and, for each choice of push tokens ``I_d``, the reference's probability mass and
the contrast ``sum_(I_d) |p_a - p_b|`` there (:mod:`aaq.calibration.pair_stats` says why the contrast decides):

- ``calibration``: the calibration windows a quantize run with the same calibration settings and seed uses;
- ``benign chat``: the shipped benign *training* prompts, chat-formatted, at the first answer tokens;
- ``harmful chat``: the 40-behaviour HarmBench test tuning split, chat-formatted, at the first answer tokens.

The answer tokens are the aligned model's own greedy answer (its first ``answer_tokens`` tokens), so the
positions are the ones at which the aligned model starts to refuse or to answer. HarmBench val is never read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.api import CalibrationConfig, QuantizeConfig, calibration_windows, check_reference_compatible, load_reference
from aaq.calibration.losses import LossConfig
from aaq.calibration.pair_stats import PairStatistics, PairSummary, PushSet, push_warning
from aaq.errors import AaqError
from aaq.eval.generate import chat_texts
from aaq.eval.prompts import benign_train_records, evenly_spaced, harmbench_tuning_records
from aaq.models.loading import ModelSource, load_model
from aaq.runs.folders import check_output_folder, prepare_output_folder
from aaq.runs.records import provenance, write_atomic, write_json
from aaq.runtime.devices import Placement, model_device

__all__ = ["DiagnosticsConfig", "PairDiagnostics", "TextDiagnostics", "diagnose_pair", "diagnose_sources", "push_of", "save_diagnostics"]

CALIBRATION = "calibration"
BENIGN = "benign chat"
HARMFUL = "harmful chat"


@dataclass(frozen=True)
class DiagnosticsConfig:
    """What :func:`diagnose_pair` measures.

    ``calibration``/``seed``: the calibration windows (as ``aaq quantize`` draws them). ``push``: the push
    tokens of the run the warning is about. ``push_ks``: the top-k sizes at which the "diff" and "reference"
    push tokens are measured (``push.k`` is always among them). ``answer_tokens``: how many first answer tokens
    of each chat prompt are measured. ``max_prompts``: an evenly spaced subset of each prompt set (None: all).
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seed: int = 0
    push: PushSet = field(default_factory=PushSet)
    push_ks: tuple[int, ...] = (10, 100, 1000)
    answer_tokens: int = 8
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        if self.answer_tokens < 1 or any(k < 1 for k in self.push_ks):
            raise AaqError(f"answer_tokens and every push k must be >= 1, got {self.answer_tokens} and {self.push_ks}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise AaqError(f"max_prompts must be >= 1, got {self.max_prompts}; drop it to use every prompt")

    def push_sets(self) -> tuple[PushSet, ...]:
        """Every push set measured: "diff" and "reference" at each k, then the whole vocabulary."""
        ks = sorted(set(self.push_ks) | ({self.push.k} if self.push.k is not None else set()))
        return (*(PushSet(tokens, k) for tokens in ("diff", "reference") for k in ks), PushSet("vocab", None))


@dataclass(frozen=True)
class TextDiagnostics:
    """The pair on one kind of text: what it is, the summary, and (for chat prompts) the KL at the first answer token."""

    name: str
    description: str
    summary: PairSummary
    first_token_kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "description": self.description, "first_token_kl": self.first_token_kl, **self.summary.to_dict()}


@dataclass(frozen=True)
class PairDiagnostics:
    """The measurements of :func:`diagnose_pair` and the warning about the configured push (None: it sees something)."""

    config: DiagnosticsConfig
    texts: tuple[TextDiagnostics, ...]
    warning: str | None

    def of(self, name: str) -> TextDiagnostics:
        """The measurements on one kind of text (``calibration``, ``benign chat``, ``harmful chat``)."""
        return next(text for text in self.texts if text.name == name)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: config, one entry per kind of text, warning."""
        return {"config": asdict(self.config), "texts": [t.to_dict() for t in self.texts], "warning": self.warning}

    def table(self) -> str:
        """Two markdown tables: KL per kind of text, and reference mass / contrast per push set and text."""
        rows = ["| text | tokens | KL(aligned ‖ reference), nats/token | KL at the first answer token |", "|---|---|---|---|"]
        for text in self.texts:
            first = "–" if text.first_token_kl is None else f"{text.first_token_kl:.4f}"
            rows.append(f"| {text.name}: {text.description} | {text.summary.positions} | {text.summary.kl:.4f} | {first} |")
        header = " | ".join(f"{t.name} mass | {t.name} contrast" for t in self.texts)
        rows += ["", f"| push tokens I_d | {header} |", "|---|" + "---|" * (2 * len(self.texts))]
        for push in self.config.push_sets():
            cells = " | ".join(f"{t.summary.of(push).mass:.4f} | {t.summary.of(push).contrast:.4f}" for t in self.texts)
            mark = " (the run's)" if push == self.config.push else ""
            rows.append(f"| {push.label}{mark} | {cells} |")
        return "\n".join(rows)

    def markdown(self, title: str) -> str:
        """A markdown page: `title`, the tables and the warning."""
        return "\n\n".join([f"# {title}", self.table()] + ([f"WARNING: {self.warning}"] if self.warning else [])) + "\n"


def _forward_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits for a batch of token ids, on the model's device."""
    return model(input_ids=ids.to(model_device(model)), use_cache=False).logits


@torch.no_grad()
def _calibration_summary(
    aligned: PreTrainedModel, reference: PreTrainedModel, windows: torch.Tensor, batch_size: int, push_sets: tuple[PushSet, ...]
) -> PairSummary:
    """The pair statistics over every position of the calibration windows."""
    statistics = PairStatistics(push_sets)
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="calibration windows", unit="batch", leave=False):
        batch = windows[start : start + batch_size]
        statistics.add(_forward_logits(aligned, batch), _forward_logits(reference, batch))
    return statistics.summary()


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Iterator[torch.Tensor]:
    """Each prompt as a single user turn rendered by the chat template, as ``(1, T)`` token ids."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    for text in chat_texts(tokenizer, prompts):
        # A rendered chat template already carries its own BOS; adding special tokens again would double it.
        yield tokenizer(text, add_special_tokens=not templated, return_tensors="pt")["input_ids"]


@torch.no_grad()
def _answer_start_summaries(
    aligned: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    answer_tokens: int,
    push_sets: tuple[PushSet, ...],
) -> tuple[PairSummary, PairSummary]:
    """The pair statistics at the first ``answer_tokens`` answer positions of each prompt, and at the first alone.

    One prompt at a time, without padding, so the positions are exactly those of an unbatched chat.
    """
    statistics, first = PairStatistics(push_sets), PairStatistics()
    for prompt_ids in tqdm(_prompt_ids(tokenizer, prompts), total=len(prompts), desc="chat prompts", unit="prompt", leave=False):
        n, ids = prompt_ids.shape[1], prompt_ids
        if answer_tokens > 1:
            device = model_device(aligned)
            ids = aligned.generate(
                input_ids=prompt_ids.to(device), attention_mask=torch.ones_like(prompt_ids, device=device), max_new_tokens=answer_tokens - 1,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True,
            ).cpu()  # fmt: skip
        # The logits at positions n-1 .. predict the answer's first, second, ... token.
        z_a, z_b = _forward_logits(aligned, ids)[0, n - 1 :], _forward_logits(reference, ids)[0, n - 1 :]
        statistics.add(z_a, z_b)
        first.add(z_a[:1], z_b[:1])
    return statistics.summary(), first.summary()


def diagnose_pair(
    aligned: PreTrainedModel, reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DiagnosticsConfig | None = None
) -> PairDiagnostics:
    """How far ``aligned`` and ``reference`` are apart on calibration text and chat prompts, and what the push sees."""
    config = config or DiagnosticsConfig()
    check_reference_compatible(aligned, reference)
    aligned.eval()
    reference.eval()
    push_sets = config.push_sets()
    cal = config.calibration
    windows = calibration_windows(tokenizer, cal, config.seed)
    where = f"{cal.dataset} {cal.form}{' + benign training' if cal.benign_train else ''}, {cal.n_samples} x {cal.seq_len} tokens, seed {config.seed}"
    texts = [TextDiagnostics(CALIBRATION, where, _calibration_summary(aligned, reference, windows, cal.batch_size, push_sets))]
    prompt_sets = (
        (BENIGN, "benign training prompts", benign_train_records()),
        (HARMFUL, "HarmBench test tuning-split behaviours", harmbench_tuning_records()),
    )
    for name, what, records in prompt_sets:
        prompts = [record.text for record in evenly_spaced(records, config.max_prompts)]
        summary, first = _answer_start_summaries(aligned, reference, tokenizer, prompts, config.answer_tokens, push_sets)
        description = f"{len(prompts)} {what}, first {config.answer_tokens} answer tokens (the aligned model's)"
        texts.append(TextDiagnostics(name, description, summary, first.kl))
    return PairDiagnostics(config, tuple(texts), _calibration_warning(texts[0], config.push))


def _calibration_warning(calibration: TextDiagnostics, push: PushSet) -> str | None:
    """The push warning on the calibration windows, naming the push set that sees the most there."""
    warning = push_warning(calibration.summary, push, "the calibration windows")
    if warning is None:
        return None
    best = max(calibration.summary.push, key=lambda s: s.contrast)
    return f"{warning}; the largest contrast on them: {best.push.label} {best.contrast:.4f}"


def save_diagnostics(result: PairDiagnostics, out_dir: str | Path, title: str, meta: dict[str, Any]) -> Path:
    """Write `diagnostics.json` (`meta`, the measurements, provenance) and `diagnostics.md` into an aaq output folder; returns it."""
    out = Path(out_dir)
    prepare_output_folder(out, "diagnostics")
    write_json(out / "diagnostics.json", {**meta, **result.to_dict(), **provenance()})
    write_atomic(out / "diagnostics.md", lambda tmp: tmp.write_text(result.markdown(title)))
    return out


def push_of(config: QuantizeConfig, push_tokens: str | None = None, push_k: int | None = None) -> PushSet:
    """The push tokens a quantize run with `config` uses (an apc loss's defaults when its loss has none), with `push_tokens`/`push_k` changed."""
    settings = config.method.calibration_settings()
    loss = settings.loss if settings is not None and settings.loss.name == "apc" else LossConfig(name="apc")
    return PushSet.of_loss(loss.with_push(push_tokens, push_k))


def diagnose_sources(
    model: str,
    reference: str,
    config: DiagnosticsConfig,
    adapter: str | None = None,
    placement: Placement | None = None,
    out: str | Path | None = None,
) -> tuple[PairDiagnostics, str]:
    """`aaq diagnose`: load the aligned `model` (with an optional LoRA `adapter`) and `reference`, diagnose the pair, write it to `out`.

    Returns the diagnostics and their title. The output folder is checked before anything is loaded.
    """
    if out is not None:
        check_output_folder(out, "diagnostics")
    aligned, tokenizer = load_model(ModelSource(model, adapter=adapter), placement)
    result = diagnose_pair(aligned, load_reference(reference, aligned, tokenizer, placement), tokenizer, config)
    title = f"Pair diagnostics: {model if adapter is None else f'{model} + {adapter}'} (aligned) vs {reference} (reference)"
    if out is not None:
        save_diagnostics(result, out, title, {"model": model, "adapter": adapter, "reference": reference, "seed": config.seed})
    return result, title
