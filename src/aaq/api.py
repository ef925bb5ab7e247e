"""The library entry point: `quantize(model, config)` on a transformers model the caller holds."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from aaq.data.chat import ChatDataConfig, chat_token_windows
from aaq.data.corpus import TextDataConfig, token_windows
from aaq.errors import AaqError
from aaq.methods import MethodConfig, MethodContext, QuaRotConfig, ReleasableModel, apply_method, method_config_from_dict
from aaq.models import transform_plan
from aaq.quant.quantizers import QuantScheme
from aaq.runs.folders import prepare_output_folder
from aaq.runtime import distributed
from aaq.runtime.devices import Placement, StageMeter, StageRecord, placement_of
from aaq.transforms.rotation import AppliedTransforms
from aaq.typed import checked_value, dataclass_from_dict

logger = logging.getLogger(__name__)

# 2: one TransformConfig for every method (QuaRot's `rotation` became `transforms`).
CONFIG_VERSION = 2
CONFIG_KEYS = ("version", "method", "bits", "scheme", "calibration", "seed")


CALIBRATION_FORMS = ("raw", "chat")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration text: which corpus, in which form, how many windows of how many tokens.

    ``form``: "raw" = windows of the corpus text as it is (the paper's setting); "chat" = conversations built
    from the Python docs, rendered with the model's chat template (see :mod:`aaq.data.chat`; needs dataset
    "auto" or "python-docs"). ``benign_train``: with "chat", also the shipped benign training prompts with the
    instruct model's answers (the demo adapter was trained on them). ``batch_size``: sequences per teacher forward.
    """

    dataset: str = "auto"
    n_samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    form: str = "raw"
    benign_train: bool = False

    def __post_init__(self) -> None:
        if self.n_samples <= 0 or self.seq_len <= 1 or self.batch_size <= 0:
            raise AaqError("calibration needs n_samples > 0, seq_len > 1 and batch_size > 0")
        if self.form not in CALIBRATION_FORMS:
            raise AaqError(f"unknown calibration form {self.form!r}; use one of: {', '.join(CALIBRATION_FORMS)}")
        if self.form == "chat" and self.dataset not in ("auto", "python-docs"):
            raise AaqError(f"chat-form calibration is built from the Python docs, not {self.dataset}; use dataset python-docs (or auto)")
        if self.benign_train and self.form != "chat":
            raise AaqError("the benign training conversations are part of chat-form calibration only; add form chat (--calib-form chat)")


@dataclass
class QuantizeConfig:
    """One quantization run: the method, the bit widths, the calibration data and the seed.

    `bits` is a string such as `w4a4kv4`; `scheme`, when given, replaces the specs it implies
    (for example group-128 symmetric weights to match a deployment format).
    """

    method: MethodConfig = field(default_factory=QuaRotConfig)
    bits: str = "w4a4kv4"
    scheme: QuantScheme | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        self.resolved_scheme()

    def resolved_scheme(self) -> QuantScheme:
        """The quantization scheme this run uses."""
        return self.scheme if self.scheme is not None else QuantScheme.from_string(self.bits)

    def to_dict(self) -> dict[str, Any]:
        """Versioned JSON-serialisable form; `from_dict` gives back an equal config."""
        return {
            "version": CONFIG_VERSION,
            "method": self.method.to_dict(),
            "bits": self.bits,
            "scheme": self.resolved_scheme().to_dict(),
            "calibration": asdict(self.calibration),
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizeConfig:
        """Inverse of `to_dict`; missing parts take their defaults (so a recipe may name only what it changes)."""
        version = data.get("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise AaqError(f"config version {version} is not supported by this aaq (it reads version {CONFIG_VERSION}); quantize again with this aaq")
        unknown = sorted(set(data) - set(CONFIG_KEYS))
        if unknown:
            raise AaqError(f"unknown recipe key(s) {', '.join(unknown)}; a recipe (a quantization config) has {', '.join(CONFIG_KEYS)}")
        method = data.get("method", {"name": QuaRotConfig.name})
        scheme = data.get("scheme")
        return cls(
            method=method_config_from_dict({"name": method} if isinstance(method, str) else method),
            bits=checked_value(data.get("bits", cls.bits), str, "bits"),
            scheme=QuantScheme.from_dict(scheme) if scheme else None,
            calibration=dataclass_from_dict(CalibrationConfig, data.get("calibration", {}), "calibration"),
            seed=checked_value(data.get("seed", cls.seed), int, "seed"),
        )


@dataclass
class QuantizeResult:
    """The quantized model (modified in place), its config, the transforms the method applied, and its stages.

    `stages`: seconds and peak memory of each stage (`calibration_data`, the method's, `quantize` for
    the whole); `timings`: the seconds alone, as `<stage>_s`; `metrics`: what the method measured (for
    `ostquant`/`aaq`: the calibration loss and `transform_movement`, how far R1, R2 and the scales moved).
    """

    model: PreTrainedModel
    config: QuantizeConfig
    transforms: AppliedTransforms
    stages: dict[str, StageRecord]
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage, named `<stage>_s`."""
        return {f"{name}_s": record.seconds for name, record in self.stages.items()}


def calibration_tokens(tokenizer: PreTrainedTokenizerBase, config: QuantizeConfig) -> torch.Tensor:
    """The (n_samples, seq_len) calibration windows of a run."""
    return calibration_windows(tokenizer, config.calibration, config.seed)


def calibration_windows(tokenizer: PreTrainedTokenizerBase, cal: CalibrationConfig, seed: int) -> torch.Tensor:
    """The (n_samples, seq_len) windows of calibration text described by ``cal``, drawn with ``seed``."""
    if cal.form == "chat":
        return chat_token_windows(tokenizer, ChatDataConfig(cal.n_samples, cal.seq_len, seed, cal.benign_train))
    return token_windows(
        tokenizer,
        TextDataConfig(dataset=cal.dataset, split="calibration", n_samples=cal.n_samples, seq_len=cal.seq_len, seed=seed),
    )


def check_reference_compatible(
    model: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    reference_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise AaqError unless `reference` shares the vocabulary (and, when both are given, the tokenizer) of `model`."""
    rows = (model.get_input_embeddings().weight.shape[0], reference.get_input_embeddings().weight.shape[0])
    _check_vocabularies(model.config, reference.config, tokenizer, reference_tokenizer)
    if rows[0] != rows[1]:
        raise AaqError(f"model and reference vocabularies differ ({rows[0]} vs {rows[1]} embedding rows); {_SAME_TOKENIZER}")


_SAME_TOKENIZER = "pass a reference built on the same tokenizer (e.g. the base model of the instruct model)"


def _check_vocabularies(
    config: PretrainedConfig,
    reference_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    reference_tokenizer: PreTrainedTokenizerBase | None,
) -> None:
    """Raise AaqError unless two model configs (and tokenizers, when both are given) share their vocabulary."""
    sizes = (config.get_text_config().vocab_size, reference_config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise AaqError(f"model and reference vocabularies differ ({sizes[0]} vs {sizes[1]} tokens); {_SAME_TOKENIZER}")
    if tokenizer is not None and reference_tokenizer is not None and tokenizer.get_vocab() != reference_tokenizer.get_vocab():
        raise AaqError("model and reference tokenizers map tokens to different ids; pass a reference that shares the model's tokenizer")


def check_reference_source(source: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Raise AaqError unless the reference at `source` shares `model`'s vocabulary and tokenizer; reads only its config and tokenizer."""
    from aaq.models.loading import load_config_and_tokenizer

    reference_config, reference_tokenizer = load_config_and_tokenizer(source)
    _check_vocabularies(model.config, reference_config, tokenizer, reference_tokenizer)


def load_reference(
    source: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, placement: Placement | None = None
) -> PreTrainedModel:
    """The reference model loaded from `source` (with `placement`), checked to share `model`'s vocabulary and tokenizer."""
    from aaq.models.loading import load_model

    reference, reference_tokenizer = load_model(source, placement)
    check_reference_compatible(model, reference, tokenizer, reference_tokenizer)
    return reference


def quantize(
    model: PreTrainedModel,
    config: QuantizeConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: torch.Tensor | None = None,
    reference: PreTrainedModel | Callable[[], PreTrainedModel] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    placement: Placement | None = None,
) -> QuantizeResult:
    """Quantize `model` in place with `config`; returns the model with its run description.

    Methods that need calibration data take it from `calibration` (token ids, shape
    (n_samples, seq_len)) or build it from `tokenizer` and `config.calibration`. `reference` is the
    unaligned model of the `aaq` method, or a function loading it (then it is resident only while
    its teacher targets are computed); the method frees it once they are cached, if the caller
    holds no other reference to it. `run_dir` (an empty folder or an aaq run folder) holds the
    teacher cache and the calibration checkpoints, and `resume` continues a killed calibration from
    them. `placement`: where the stages compute (default: where the model is, no offloading).

    Called on every process of an initialised `torch.distributed` process group (`torchrun`), the
    processes share the work (`aaq.runtime.distributed`) and each returns the same quantized model; only
    process 0 writes into `run_dir`.
    """
    if run_dir is not None:
        with distributed.agreed("the preparation of the run folder"):
            if distributed.is_main_process():
                prepare_output_folder(run_dir, "run")
    if config.method.needs_reference() and reference is None:
        raise AaqError(f"method {config.method.name} needs the unaligned reference model; pass one ({{setting}})", setting="reference")
    if isinstance(reference, PreTrainedModel):
        check_reference_compatible(model, reference)
    plan = transform_plan(model)
    placement = placement or placement_of(model)
    placement.check_available()
    meter = StageMeter(placement.compute_device)
    if config.method.needs_calibration() and calibration is None:
        if tokenizer is None:
            raise AaqError(f"method {config.method.name} needs calibration data: pass a tokenizer or calibration token ids")
        with meter.stage("calibration_data"):
            calibration = calibration_tokens(tokenizer, config)
    model.eval()
    context = MethodContext(
        model=model,
        plan=plan,
        scheme=config.resolved_scheme(),
        method=config.method,
        calibration_tokens=calibration,
        seed=config.seed,
        placement=placement,
        batch_size=config.calibration.batch_size,
        reference=None if reference is None else ReleasableModel(reference),
        run_dir=None if run_dir is None else Path(run_dir),
        resume=resume,
    )
    del reference  # the context holds the only reference this function keeps, so the method can free it
    with meter.stage("quantize"):
        result = apply_method(context)
    stages = {**meter.records, **result.stages, "quantize": meter.records["quantize"]}
    logger.info("quantized with %s %s in %.1f s", config.method.name, config.bits, stages["quantize"].seconds)
    return QuantizeResult(model=model, config=config, transforms=result.transforms, stages=stages, metrics=result.metrics)
