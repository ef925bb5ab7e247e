"""OSTQuant: learned orthogonal and scaling transforms, calibrated with the KL-top loss, then GPTQ/RTN weights.

Hu et al. 2025, "OSTQuant: Refining Large Language Model Quantization with Orthogonal and Scaling
Transformations for Better Distribution Fitting". The same pipeline with the contrastive APC loss
and an unaligned reference is the `aaq` method (`aaq.methods.aaq`).
"""

from __future__ import annotations

import copy
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel

from aaq.calibration.loop import CalibrationSettings, calibrate
from aaq.calibration.pair_stats import PairSummary, push_warning, summary_line
from aaq.calibration.teachers import (
    CacheMeta,
    Teacher,
    TeacherCache,
    build_teacher_cache,
    cached_teacher,
    head_only_teacher,
    live_teacher,
    open_or_build,
)
from aaq.errors import AaqError
from aaq.methods.registry import MethodConfig, MethodContext, MethodResult, Options, register_method, take_options
from aaq.methods.weight_step import FusedWeightQuantization, quantize_fused_weights
from aaq.models.plan import TRANSFORM_SWITCHES, TransformConfig, TransformPlan
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.runtime import distributed
from aaq.runtime.devices import StageMeter, dispatched, free_memory, model_device, resting_on_host
from aaq.transforms.learnable import (
    InstalledTransforms,
    LearnableTransforms,
    fuse_learned_transforms,
    install_activation_form,
    install_weight_form,
    remove_learnable_transforms,
)
from aaq.transforms.online import OnlineRotations, install_online_rotations
from aaq.transforms.rotation import AppliedTransforms, fuse_norms

logger = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"
TEACHER_CACHE_DIR = "teacher_cache"
TRAINING_OPTIONS = (
    "steps", "batch_size", "cache", "weights_in_loop", "activation_checkpointing", "teacher_batch", "micro_batch", "sequential_teachers",
    "optimizer", "rotation_lr", "scale_lr",
    "heldout_windows", "heldout_every", "restore_best", "heldout_patience",
)  # fmt: skip
LOSS_OPTIONS = {"loss": "name", "lam": "lam", "top_k": "k"}
PUSH_OPTIONS = ("push_tokens", "push_k")


@dataclass
class OSTQuantConfig(FusedWeightQuantization, MethodConfig):
    """Learnable transforms (R1/R2 from `transforms.r1/r2`, smoothing on by default), their calibration, and the weight quantizer run on the fused weights."""

    name: ClassVar[str] = "ostquant"
    transforms: TransformConfig = field(default_factory=lambda: TransformConfig(smoothing=True))
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

    def stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """The teachers' targets, the calibration of the transforms, their fusion, then the weight step."""
        return ("teachers", "calibration", "fusion", *self.weight_stages(scheme))

    def calibration_settings(self) -> CalibrationSettings:
        """The settings of the transforms' calibration."""
        return self.training

    def with_calibration_settings(self, **changes: Any) -> OSTQuantConfig:
        """This config with calibration settings changed."""
        return replace(self, training=replace(self.training, **changes))

    def learned_transforms(self) -> TransformConfig:
        """R1/R2 (from their start kinds) and the smoothing scales, when on."""
        return self.transforms

    def work_folders(self) -> tuple[str, ...]:
        """The teacher cache (when cached), the calibration checkpoints and the weight step's progress."""
        cache = (TEACHER_CACHE_DIR,) if self.training.cache else ()
        return (*cache, CALIBRATION_DIR, *super().work_folders())

    def needs_reference(self) -> bool:
        """Only a loss with a push term (apc) needs the unaligned reference."""
        return self.training.loss.needs_reference

    def teacher_cache_bytes(self, num_sequences: int, seq_len: int, vocab_size: int) -> int:
        """Disk bytes of the top-k teacher cache (0 when calibration runs the teachers live)."""
        if not self.training.cache:
            return 0
        loss = self.training.loss
        meta = CacheMeta(loss.k, vocab_size, num_sequences, seq_len, self.training.cache_dtype, loss.needs_reference, "", push_tokens=loss.push_tokens, push_k=loss.push_k)
        return meta.nbytes

    def apply_options(self, options: Options) -> tuple[OSTQuantConfig, Options]:
        """This config with the transform, calibration and weight-step options applied."""
        transforms, rest = take_options(options, TRANSFORM_SWITCHES)
        training, rest = take_options(rest, TRAINING_OPTIONS)
        loss, rest = take_options(rest, tuple(LOSS_OPTIONS))
        push, rest = take_options(rest, PUSH_OPTIONS)
        config, rest = self.apply_weight_options(rest)
        loss_config = replace(self.training.loss, **{LOSS_OPTIONS[k]: v for k, v in loss.items()}).with_push(**push)
        return (
            replace(
                config,
                transforms=replace(self.transforms, **transforms),
                training=replace(self.training, loss=loss_config, **training),
            ),
            rest,
        )


def teacher_batch_size(settings: CalibrationSettings, context: MethodContext, vocab_size: int) -> int:
    """Sequences per teacher forward: the setting, or the data batch size shrunk until two teachers' logits fit half the free memory.

    Split over processes, the smallest of their sizes (every process must cut the same batches).
    """
    if settings.teacher_batch is not None:
        return settings.teacher_batch
    seq_len = context.calibration_tokens.shape[1]
    per_sequence = 2 * seq_len * vocab_size * context.placement.torch_dtype.itemsize
    fits = free_memory(context.placement.compute_device) // (2 * per_sequence)
    return min(distributed.gather(max(1, min(context.batch_size, fits)), "the sizing of the teacher batches"))


def _teacher(context: MethodContext, settings: CalibrationSettings, work_dir: Path) -> Teacher:
    """The teacher for calibration, taken from the still untransformed model (and the reference).

    Cached: the targets go to disk in teacher batches, and the reference is released (with a
    loader, it was resident only meanwhile). With `sequential_teachers` the aligned model's hidden
    states come first and the model waits on the host while the reference runs. Uncached: a frozen
    copy of the aligned model stays resident next to the reference.
    """
    tokens = context.calibration_tokens
    if not settings.cache:
        reference = context.reference.get() if settings.loss.needs_reference else None
        aligned = copy.deepcopy(context.model).requires_grad_(False)
        return live_teacher(aligned, reference, tokens, settings.loss)

    device = context.placement.compute_device
    batch_size = teacher_batch_size(settings, context, context.plan.geometry.vocab_size)
    # A resumed run whose cache is complete calls no teacher: nothing to compute first.
    resumed = context.resume and TeacherCache.exists(work_dir / TEACHER_CACHE_DIR)
    sequential = settings.sequential_teachers and settings.loss.needs_reference and not resumed

    def logits_of(model):
        return lambda batch: model(input_ids=batch.to(device), use_cache=False).logits

    build = open_or_build if context.resume else build_teacher_cache
    with ExitStack() as placed:
        if sequential:
            with dispatched(context.model, context.placement):
                aligned = head_only_teacher(context.model, tokens, batch_size, device)
            placed.enter_context(resting_on_host(context.model, context.placement))
        else:
            placed.enter_context(dispatched(context.model, context.placement))
            aligned = logits_of(context.model)
        reference = context.reference.get() if settings.loss.needs_reference else None
        if reference is not None:
            placed.enter_context(dispatched(reference, context.placement))
        cache = build(
            aligned,
            None if reference is None else logits_of(reference),
            tokens,
            context.work_folder(TEACHER_CACHE_DIR) or work_dir / TEACHER_CACHE_DIR,
            settings.loss.k,
            getattr(torch, settings.cache_dtype),
            batch_size,
            settings.loss.push_k,
            settings.loss.push_tokens,
        )
        del reference, aligned
        if context.reference is not None:
            context.reference.release()
    _log_pair_statistics(cache)
    return cached_teacher(cache, device)


def _log_pair_statistics(cache: TeacherCache) -> None:
    """Log how far the two teachers are apart on the calibration windows, with a warning if the push sees nothing."""
    if cache.meta.pair_statistics is None or not distributed.is_main_process():
        return
    summary = PairSummary.from_dict(cache.meta.pair_statistics)
    where = "the calibration windows"
    logger.info(summary_line(summary, where))
    warning = push_warning(summary, cache.meta.push_set, where)
    if warning is not None:
        logger.warning(warning)


@dataclass
class CalibrationSetup:
    """A model prepared for calibration: learnable transforms installed, with the online rotations that run meanwhile."""

    installed: InstalledTransforms
    online: OnlineRotations

    @property
    def transforms(self) -> LearnableTransforms:
        """The learnable parameters."""
        return self.installed.transforms

    def remove(self) -> None:
        """Take every transform out again (after a failed calibration): the model keeps its fused norms and quantizers."""
        remove_learnable_transforms(self.installed)
        self.online.remove()

    def fuse(self, device: torch.device | None = None) -> AppliedTransforms:
        """Fuse the learned transforms into the weights (in float64 on `device`, default where each weight lives) and put the remaining online rotations in place."""
        applied = fuse_learned_transforms(self.installed, device)
        install_online_rotations(self.installed.model, self.installed.plan, applied.config, "final")
        return applied


def install_for_calibration(
    model: PreTrainedModel,
    plan: TransformPlan,
    scheme: QuantScheme,
    config: TransformConfig,
    seed: int,
    weights_in_loop: bool,
    device: torch.device | None = None,
) -> CalibrationSetup:
    """Fuse norms, install the quantizers and online rotations, and put fresh learnable transforms in place.

    `weights_in_loop`: the weight form (weights fake-quantized every step) instead of the activation
    form. Both forms apply R4 themselves while they learn, so the online R4 waits for fusion. The
    transforms live on `device` (default: the model's).
    """
    fuse_norms(model, plan)
    install_quantizers(model, plan, scheme)
    online = install_online_rotations(model, plan, config, "calibration")
    transforms = LearnableTransforms(plan.geometry, config, seed).to(device or model_device(model))
    if weights_in_loop:
        installed = install_weight_form(model, plan, transforms, scheme.weights)
    else:
        installed = install_activation_form(model, plan, transforms, scheme.activations)
    return CalibrationSetup(installed, online)


def learn_transforms_and_quantize(context: MethodContext, config: OSTQuantConfig) -> MethodResult:
    """Cache the teachers, learn the transforms, fuse them, then quantize the fused weights."""
    if context.calibration_tokens is None:
        raise AaqError(f"method {config.name} needs calibration data; pass a tokenizer or calibration token ids")
    if config.needs_reference() and context.reference is None:
        raise AaqError(f"method {config.name} (loss {config.training.loss.name}) needs the unaligned reference model; pass one ({{setting}})", setting="reference")
    # The resolved choice goes into the settings, so checkpoints record it and a resume must match it.
    settings = replace(config.training, weights_in_loop=config.calibrates_quantized_weights(context.scheme))
    placement = context.placement
    if placement.max_memory and settings.weights_in_loop:
        raise AaqError(
            "an offloaded model (memory budgets set) can only calibrate in the activation form; quantize the weights with GPTQ "
            "and turn off {setting}, or drop the memory budgets",
            setting="weights_in_loop",
        )
    meter = StageMeter(placement.compute_device)
    with ExitStack() as stack:
        work_dir = context.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aaq-")))
        with meter.stage("teachers"):
            teacher = _teacher(context, settings, work_dir)
        setup = install_for_calibration(
            context.model, context.plan, context.scheme, config.transforms, context.seed, settings.weights_in_loop, placement.compute_device
        )
        start = setup.transforms.snapshot()
        try:
            with meter.stage("calibration"), dispatched(context.model, placement):
                result = calibrate(
                    context.model,
                    setup.transforms,
                    context.calibration_tokens,
                    teacher,
                    settings,
                    context.seed,
                    checkpoint_dir=context.work_folder(CALIBRATION_DIR),
                    resume=context.resume,
                    device=placement.compute_device,
                )
        except BaseException:
            setup.remove()
            raise
        del teacher
        movement = setup.transforms.movement(start)
        metrics = {"calibration_steps": result.steps, "transform_movement": movement.to_dict()}
        if result.history:
            metrics |= {"loss_first": result.history[0], "loss_last": result.history[-1]}
            logger.info("calibration: loss %.4f -> %.4f in %d steps", result.history[0]["loss"], result.history[-1]["loss"], result.steps)
        if result.heldout:
            metrics |= {"heldout_curve": result.heldout, "heldout_best_step": result.best_step, "restored_best": result.restored_best}
        logger.info(
            "transforms moved from their start: R1 %.4f, R2 %.4f (mean; max %.4f) relative, scales %.4f (rms)",
            movement.r1, movement.r2_mean, movement.r2_max, movement.scale_rms,
        )  # fmt: skip
    with meter.stage("fusion"):
        transforms = setup.fuse(placement.fusion_target)
    quantize_fused_weights(context, config, meter)
    return MethodResult(transforms=transforms, stages=meter.records, metrics=metrics)


@register_method(OSTQuantConfig)
def apply_ostquant(context: MethodContext) -> MethodResult:
    """OSTQuant: learn R1/R2/smoothing with the KL-top loss, fuse them, quantize the weights."""
    return learn_transforms_and_quantize(context, context.method)
