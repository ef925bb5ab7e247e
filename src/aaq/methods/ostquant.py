"""OSTQuant: learned orthogonal and scaling transforms, calibrated with the KL-top loss, then GPTQ/RTN weights.

Hu et al. 2025, "OSTQuant: Refining Large Language Model Quantization with Orthogonal and Scaling
Transformations for Better Distribution Fitting". The same pipeline with the contrastive APC loss
and an unaligned reference is the `aaq` method (`aaq.methods.aaq`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from aaq.calibrate import CalibrationSettings, Teacher, cached_teacher, calibrate, live_teacher
from aaq.errors import AaqError
from aaq.methods.registry import MethodConfig, MethodContext, register_method
from aaq.methods.weights import FusedWeightQuantization, quantize_fused_weights
from aaq.pair_stats import PairSummary, push_warning, summary_line
from aaq.quantizers import QuantScheme
from aaq.runs import write_atomic
from aaq.teachers import TeacherCache, build_teacher_cache, open_or_build
from aaq.transforms import TransformConfig, attach_learnable_transforms, fuse_learned_transforms, remove_learnable_transforms

logger = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
TEACHER_CACHE_DIR = "teacher_cache"
SCALES_FILE = "smoothing_scales.safetensors"


@dataclass
class OSTQuantConfig(FusedWeightQuantization, MethodConfig):
    """Learnable transforms, how they are calibrated, and the weight quantizer run on the fused weights."""

    name: ClassVar[str] = "ostquant"
    transforms: TransformConfig = field(default_factory=TransformConfig)
    training: CalibrationSettings = field(default_factory=CalibrationSettings)

    def calibrates_quantized_weights(self, scheme: QuantScheme) -> bool:
        """Whether calibration fake-quantizes the weights: `training.weights_in_loop`, by default before RTN or with 16-bit activations.

        GPTQ re-quantizes the fused weights against the calibration activations anyway, so before
        GPTQ the transforms are trained against activation and KV-cache quantization alone (as
        SpinQuant does), at about half the cost per step. Without activation quantization (W4A16)
        the weights are the only thing R1 and the scales can act on, so they stay in the loop.
        """
        chosen = self.training.weights_in_loop
        if chosen is not None:
            return chosen
        return self.weight_quantizer == "rtn" or scheme.activations is None

    def needs_calibration(self) -> bool:
        """Calibration text drives the transform training."""
        return True

    def needs_reference(self) -> bool:
        """Only a loss with a push term (apc) needs the unaligned reference."""
        return self.training.loss.needs_reference


def _teacher(context: MethodContext, settings: CalibrationSettings, work_dir: Path) -> Teacher:
    """The teacher for calibration, taken from the still untransformed model (and the reference).

    Cached: the targets go to disk and the reference is released. Uncached: a frozen copy of the
    aligned model stays resident next to the reference.
    """
    tokens = context.calibration_tokens
    reference = context.reference if settings.loss.needs_reference else None
    if not settings.cache:
        aligned = copy.deepcopy(context.model).requires_grad_(False)
        return live_teacher(aligned, reference, tokens, settings.loss)

    def logits_of(model):
        return lambda batch: model(input_ids=batch, use_cache=False).logits

    build = open_or_build if context.resume else build_teacher_cache
    cache = build(
        logits_of(context.model),
        None if reference is None else logits_of(reference),
        tokens,
        work_dir / TEACHER_CACHE_DIR,
        settings.loss.k,
        getattr(torch, settings.cache_dtype),
        context.batch_size,
        settings.loss.push_k,
        settings.loss.push_tokens,
    )
    del reference
    context.reference = None
    _log_pair_statistics(cache)
    return cached_teacher(cache)


def _log_pair_statistics(cache: TeacherCache) -> None:
    """Log how far the two teachers are apart on the calibration windows, with a warning if the push sees nothing."""
    if cache.meta.pair_statistics is None:
        return
    summary = PairSummary.from_dict(cache.meta.pair_statistics)
    where = "the calibration windows"
    logger.info(summary_line(summary, where))
    warning = push_warning(summary, cache.meta.push_set, where)
    if warning is not None:
        logger.warning(warning)


def learn_transforms_and_quantize(context: MethodContext, config: OSTQuantConfig) -> None:
    """Cache the teachers, learn the transforms, fuse them, then quantize the fused weights."""
    if context.calibration_tokens is None:
        raise AaqError(f"method {config.name} needs calibration tokens; pass a tokenizer or calibration ids to aaq.quantize")
    if config.needs_reference() and context.reference is None:
        raise AaqError(f"method {config.name} (loss {config.training.loss.name}) needs the unaligned reference; pass --reference MODEL")
    # The resolved choice goes into the settings, so checkpoints record it and a resume must match it.
    settings = replace(config.training, weights_in_loop=config.calibrates_quantized_weights(context.scheme))
    with ExitStack() as stack:
        work_dir = context.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aaq-")))
        start = time.perf_counter()
        teacher = _teacher(context, settings, work_dir)
        context.timings["teachers_s"] = time.perf_counter() - start
        installed = attach_learnable_transforms(
            context.adapter, context.scheme, config.transforms, context.seed, weights_in_loop=settings.weights_in_loop
        )
        start = time.perf_counter()
        try:
            result = calibrate(
                context.model,
                installed.transforms,
                context.calibration_tokens,
                teacher,
                settings,
                context.seed,
                checkpoint_dir=None if context.run_dir is None else context.run_dir / CALIBRATION_DIR,
                resume=context.resume,
            )
        except BaseException:
            remove_learnable_transforms(installed)
            raise
        del teacher
        context.reference = None
        context.timings["calibration_s"] = time.perf_counter() - start
        if result.history:
            logger.info("calibration: loss %.4f -> %.4f in %d steps", result.history[0]["loss"], result.history[-1]["loss"], result.steps)
    learned = fuse_learned_transforms(installed)
    context.transforms = learned.fused
    context.online = config.transforms.online
    if context.run_dir is not None and learned.scales:
        write_atomic(context.run_dir / SCALES_FILE, lambda tmp: save_file(learned.scales, str(tmp)))
    quantize_fused_weights(context, config)


@register_method(OSTQuantConfig)
def apply_ostquant(context: MethodContext) -> None:
    """OSTQuant: learn R1/R2/smoothing with the KL-top loss, fuse them, quantize the weights."""
    learn_transforms_and_quantize(context, context.method)
