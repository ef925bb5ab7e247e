"""The calibration loop: learn the transforms against the teachers' targets, with exact resume.

The loop runs over an explicit state (transform parameters, optimiser state, step); the batch of a
step is a pure function of (seed, step), so a state saved after step t and restored reproduces the
uninterrupted run bit for bit. The teacher side is a callable from calibration-sequence indices to
targets: either the on-disk top-k cache (one student forward+backward per step) or live aligned and
reference models (three forwards per step, `--no-cache`), sharing one loss implementation.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import geoopt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from aaq.calibration.losses import LossConfig, LossTerms, TeacherTargets, chunked_loss
from aaq.calibration.teachers import Teacher
from aaq.errors import AaqError
from aaq.runs.records import write_atomic, write_json
from aaq.runtime import distributed
from aaq.runtime.devices import model_device
from aaq.transforms.learnable import LearnableTransforms

logger = logging.getLogger(__name__)

OptimizerName = Literal["cayley_sgd", "riemannian_adam"]
_OPTIMIZERS = ("cayley_sgd", "riemannian_adam")
_CHECKPOINT_FILE = "checkpoint.json"
# Settings that may change between a killed run and its resume without changing the trajectory.
_RESUMABLE_CHANGES = (
    "steps", "checkpoint_every", "activation_checkpointing", "teacher_batch", "micro_batch", "sequential_teachers", "restore_best", "heldout_patience",
)  # fmt: skip


@dataclass(frozen=True)
class CalibrationSettings:
    """How the transforms are learned.

    Paper defaults (OSTQuant/AAQ): 100-200 steps, rotation lr 0.017 (Cayley SGD on the Stiefel
    manifold), scale lr 0.0018, momentum 0.9. `cache`: read teacher targets from the on-disk top-k
    cache (else run the teachers every step); `cache_dtype`: its probability dtype. A loss that is
    not finite or moves more than `divergence_factor` x max(|initial loss|, 1) away from the initial
    loss stops the run. `max_grad_norm` clips the gradient norm of all transform parameters together
    (None: no clipping). `weights_in_loop`: fake-quantize the weights every step (None: the method
    decides; OSTQuant/AAQ do so when RTN quantizes the weights afterwards or nothing else is quantized).
    `activation_checkpointing`: recompute each decoder layer's forward during the backward instead of
    keeping its activations (transformers' activation checkpointing): measured on smollm2-135m at
    2 x 256 tokens, about half the peak memory for a third more time per step. `teacher_batch`:
    calibration sequences per teacher forward when the targets are computed (None: the calibration
    data batch size, smaller if one batch of full-vocabulary logits would not fit in half the free
    device memory). `micro_batch`: sequences per forward+backward within a step, whose gradients
    add up to the step's (None: the whole step batch at once): the same loss and gradients in a
    fraction of the activation memory. `sequential_teachers`: compute the targets with one teacher
    on the device at a time (the aligned model's final hidden states first, kept on the host, then
    the reference, while the aligned model waits on the host): the device holds one model instead of two.
    """

    steps: int = 150
    batch_size: int = 4
    rotation_lr: float = 0.017
    scale_lr: float = 0.0018
    momentum: float = 0.9
    optimizer: OptimizerName = "cayley_sgd"
    loss: LossConfig = field(default_factory=lambda: LossConfig(name="kl_top"))
    cache: bool = True
    cache_dtype: Literal["float16", "float32"] = "float16"
    checkpoint_every: int = 10
    max_grad_norm: float | None = None
    divergence_factor: float = 10.0
    weights_in_loop: bool | None = None
    activation_checkpointing: bool = False
    teacher_batch: int | None = None
    heldout_windows: int = 0
    heldout_every: int = 10
    restore_best: bool = False
    heldout_patience: int | None = None
    micro_batch: int | None = None
    sequential_teachers: bool = False

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise AaqError("calibration needs steps >= 0, batch_size >= 1 and checkpoint_every >= 1")
        if self.optimizer not in _OPTIMIZERS:
            raise AaqError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(_OPTIMIZERS)}")
        if not (self.rotation_lr > 0 and self.scale_lr >= 0 and 0 <= self.momentum < 1):
            raise AaqError("calibration needs rotation_lr > 0, scale_lr >= 0 and momentum in [0, 1)")
        if self.cache and not self.loss.cacheable:
            raise AaqError(f"loss {self.loss.name!r} needs full teacher logits, which the top-k teacher cache does not hold; turn the teacher cache off ({{setting}})", setting="cache")
        if self.cache_dtype not in ("float16", "float32"):
            raise AaqError(f"cache_dtype must be float16 or float32, got {self.cache_dtype!r}")
        if self.divergence_factor <= 1:
            raise AaqError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if self.teacher_batch is not None and self.teacher_batch < 1:
            raise AaqError(f"teacher_batch must be >= 1 (or None: sized to the device), got {self.teacher_batch}", setting="teacher_batch")
        if self.heldout_windows < 0 or self.heldout_every < 1:
            raise AaqError(f"calibration needs heldout_windows >= 0 and heldout_every >= 1, got {self.heldout_windows} and {self.heldout_every}")
        if self.heldout_patience is not None and self.heldout_patience < 1:
            raise AaqError(f"heldout_patience must be >= 1 (or None: never stop early), got {self.heldout_patience}")
        if (self.restore_best or self.heldout_patience is not None) and not self.heldout_windows:
            raise AaqError("restore_best and heldout_patience need held-out windows; set {setting}", setting="heldout_windows")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise AaqError(f"{{setting}} must be >= 1 (or None: the whole step batch at once), got {self.micro_batch}", setting="micro_batch")


@dataclass
class CalibrationState:
    """Everything that determines the rest of a calibration run."""

    transforms: LearnableTransforms
    optimizers: dict[str, torch.optim.Optimizer]
    step: int = 0
    initial_loss: float | None = None
    heldout: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Tensor] | None = None


@dataclass
class CalibrationResult:
    """Per-step loss terms, the step count reached, and the held-out curve (one entry per measurement, empty without held-out windows).

    A held-out entry holds the step, the held-out loss terms (`heldout_loss`, `heldout_pull`, ...) and the mean
    training loss of the steps since the previous measurement (`train_loss`, None at step 0). `best_step`: the
    step with the lowest held-out loss; `restored_best`: the transforms were set back to it.
    """

    history: list[dict[str, float]]
    steps: int
    initial_loss: float | None
    heldout: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    restored_best: bool = False


def build_optimizers(transforms: LearnableTransforms, settings: CalibrationSettings) -> dict[str, torch.optim.Optimizer]:
    """Stiefel optimiser for the rotations and Euclidean optimiser for the scales (absent without scales)."""
    rotations, scales = transforms.rotation_parameters(), transforms.scale_parameters()
    if settings.optimizer == "cayley_sgd":
        # geoopt's Stiefel manifold retracts with the Cayley transform: this is Cayley SGD with momentum.
        optimizers = {"rotation": geoopt.optim.RiemannianSGD(rotations, lr=settings.rotation_lr, momentum=settings.momentum)}
        if scales:
            optimizers["scale"] = torch.optim.SGD(scales, lr=settings.scale_lr, momentum=settings.momentum)
    else:
        betas = (settings.momentum, 0.999)
        optimizers = {"rotation": geoopt.optim.RiemannianAdam(rotations, lr=settings.rotation_lr, betas=betas)}
        if scales:
            optimizers["scale"] = torch.optim.Adam(scales, lr=settings.scale_lr, betas=betas)
    return optimizers


def batch_indices(step: int, num_sequences: int, batch_size: int, seed: int) -> Tensor:
    """The calibration sequences of step `step`: consecutive slices of seeded per-epoch permutations."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in positions.div(num_sequences, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = positions.div(num_sequences, rounding_mode="floor") == epoch
        out[mask] = perm[positions[mask] % num_sequences]
    return out


def heldout_split(num_sequences: int, heldout: int, seed: int) -> tuple[Tensor, Tensor]:
    """The training and held-out sequence indices (both sorted): `heldout` of them chosen with the seed, the rest train."""
    if heldout == 0:
        return torch.arange(num_sequences), torch.empty(0, dtype=torch.int64)
    if heldout >= num_sequences:
        raise AaqError(f"{heldout} held-out windows leave none of the {num_sequences} calibration sequences to train on; hold out fewer ({{setting}})", setting="heldout_windows")
    chosen = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 1_000_003 + 999_983))[:heldout]
    mask = torch.ones(num_sequences, dtype=torch.bool)
    mask[chosen] = False
    return mask.nonzero().flatten(), chosen.sort().values


def student_loss(model: PreTrainedModel, batch: Tensor, teacher: TeacherTargets | Tensor, loss: LossConfig) -> LossTerms:
    """The configured loss of the student on one batch of token ids.

    The decoder runs as usual; its output head runs inside the loss, a chunk of positions at a time
    (`chunked_loss`), so the batch's full-vocabulary logits are never formed at once. Every supported
    family's logits are its output embedding applied to the decoder's final (normed) hidden states
    (as perplexity computes them, `aaq.eval.perplexity.window_nll_sum`).
    """
    hidden = model.get_decoder()(input_ids=batch, use_cache=False).last_hidden_state
    return chunked_loss(hidden, model.get_output_embeddings(), teacher, loss)


def _tensor_state(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimiser's state split into tensors (for safetensors) and JSON-able scalars/param groups."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().as_subclass(torch.Tensor).contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Load an optimiser state written by `_tensor_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            pid, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    # load_state_dict turns a Python int "step" (geoopt's Adam) into a float32 tensor, which changes
    # its bias corrections slightly; put the saved Python scalars back as they were.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        optimizer.state[params[int(pid)]][key] = value


def _settings_record(settings: CalibrationSettings) -> dict[str, Any]:
    """The settings a resumed run must share with the run it resumes."""
    return {k: v for k, v in asdict(settings).items() if k not in _RESUMABLE_CHANGES}


def save_checkpoint(directory: Path, state: CalibrationState, settings: CalibrationSettings, seed: int) -> None:
    """Write the state atomically: tensors to `state-<step>.safetensors`, then `checkpoint.json` naming them."""
    tensors = {f"transforms.{k}": v.detach().as_subclass(torch.Tensor).contiguous() for k, v in state.transforms.state_dict().items()}
    tensors |= {f"best.{k}": v.contiguous() for k, v in (state.best or {}).items()}
    optimizers = {}
    for name, optimizer in state.optimizers.items():
        opt_tensors, optimizers[name] = _tensor_state(optimizer, f"optim.{name}")
        tensors.update(opt_tensors)
    filename = f"state-{state.step:06d}.safetensors"
    write_atomic(directory / filename, lambda tmp: save_file(tensors, str(tmp)))
    record = {
        "step": state.step,
        "initial_loss": state.initial_loss,
        "seed": seed,
        "settings": _settings_record(settings),
        "tensors": filename,
        "optimizers": optimizers,
        "heldout": state.heldout,
    }
    write_json(directory / _CHECKPOINT_FILE, record)
    for old in directory.glob("state-*.safetensors"):
        if old.name != filename:
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path, state: CalibrationState, settings: CalibrationSettings, seed: int) -> bool:
    """Restore `state` from `directory`; False when there is no checkpoint there."""
    path = directory / _CHECKPOINT_FILE
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
        current = json.loads(json.dumps(_settings_record(settings)))
        if record["settings"] != current or record["seed"] != seed:
            raise AaqError(
                f"checkpoint in {directory} was made with other calibration settings or seed; resume with the same ones or start afresh (without {{setting}})", setting="resume"
            )
        tensors = load_file(str(directory / record["tensors"]))
        prefix = "transforms."
        with torch.no_grad():
            state.transforms.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        for name, optimizer in state.optimizers.items():
            _restore_optimizer(optimizer, f"optim.{name}", tensors, record["optimizers"][name])
        state.step = record["step"]
        state.initial_loss = record["initial_loss"]
        state.heldout = record.get("heldout", [])
        best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
        state.best = best or None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise AaqError(
            f"calibration checkpoint in {directory} is corrupt or incomplete ({type(err).__name__}); delete it or start afresh (without {{setting}})", setting="resume"
        ) from None
    return True


def _check_losses(losses: list[dict[str, float]], first_step: int, state: CalibrationState, settings: CalibrationSettings, kept: str) -> None:
    """Raise a one-line AaqError at the first loss (of steps `first_step`, `first_step + 1`, ...) that is not finite or has exploded."""
    for offset, scalars in enumerate(losses):
        value = scalars["loss"]
        if state.initial_loss is None:
            state.initial_loss = value
        # Measured from the initial loss in units of max(|initial|, 1 nat): APC losses can start near 0 or below.
        initial = state.initial_loss
        exploded = abs(value - initial) > settings.divergence_factor * max(abs(initial), 1.0)
        if math.isfinite(value) and not exploded:
            continue
        what = "is not finite" if not math.isfinite(value) else f"exploded to {value:.4g} (initial {initial:.4g})"
        raise AaqError(
            f"calibration diverged: the loss {what} at step {first_step + offset}; {kept}; lower the learning rates "
            f"(rotation_lr {settings.rotation_lr}, scale_lr {settings.scale_lr}) or set max_grad_norm"
        )


@contextmanager
def activation_checkpointing(model: PreTrainedModel, enabled: bool) -> Iterator[None]:
    """Within the block, `model` recomputes each decoder layer in the backward pass (when `enabled`)."""
    if not enabled:
        yield
        return
    if not model.supports_gradient_checkpointing:
        raise AaqError(f"{type(model).__name__} does not support activation checkpointing; drop activation_checkpointing")
    # transformers only checkpoints in training mode, which must not switch dropout on.
    if getattr(model.config, "attention_dropout", 0.0) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise AaqError("the model has dropout, which activation checkpointing (training mode) would switch on; drop activation_checkpointing")
    was_training, had_input_hooks = model.training, bool(getattr(model, "_require_grads_hooks", None))
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        # enable() also makes the embedding output require grad, which disable() leaves in place
        # (for peft models only it is removed): every later forward would build a graph.
        if not had_input_hooks:
            model.disable_input_require_grads()
        model.train(was_training)


def calibrate(
    model: PreTrainedModel,
    transforms: LearnableTransforms,
    tokens: Tensor,
    teacher: Teacher,
    settings: CalibrationSettings,
    seed: int,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    device: torch.device | None = None,
) -> CalibrationResult:
    """Optimise `transforms` (already installed in `model`) for `settings.steps` steps; returns the loss history.

    Batches go to `device` (default: the model's). With `checkpoint_dir`, the state is saved every
    `checkpoint_every` steps and at the end; `resume=True` continues from the checkpoint found there
    (if any) to the same final state as an uninterrupted run. The losses are read on the host only
    every `checkpoint_every` steps (and at the end), so a GPU never waits in between; a diverged
    loss is caught there, before that checkpoint is written.

    Split over processes (`aaq.runtime.distributed`), each process backpropagates its share of every step's
    batch; the gradients and loss terms are all-reduced before the optimiser step, which then runs
    the same on every process, so all of them hold the transforms of a one-process run with the same
    batch and stop together on a diverged loss. Process 0 writes the checkpoints; all read them.
    """
    device = device or model_device(model)
    state = CalibrationState(transforms=transforms, optimizers=build_optimizers(transforms, settings))
    kept = "no checkpoint was kept"
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with distributed.agreed("the reading of the calibration checkpoint"):
            resumed = resume and load_checkpoint(checkpoint_dir, state, settings, seed)
        if resumed:
            logger.info("resuming calibration from step %d (%s)", state.step, checkpoint_dir)
            kept = f"the last good checkpoint (step {state.step}) is in {checkpoint_dir}"
    if distributed.world().size > settings.batch_size:
        logger.warning("the step batch (%d) is smaller than the number of processes (%d): some of them idle in every step", settings.batch_size, distributed.world().size)
    parameters = transforms.rotation_parameters() + transforms.scale_parameters()
    train, heldout = heldout_split(tokens.shape[0], settings.heldout_windows, seed)

    def measure(since: list[LossTerms]) -> None:
        scalars = _heldout_scalars(model, tokens, heldout, teacher, settings, device, state.step)
        _record_heldout(state, scalars, [terms.scalars()["loss"] for terms in since])

    history: list[dict[str, float]] = []
    pending: list[LossTerms] = []
    since_heldout: list[LossTerms] = []
    bar = tqdm(range(state.step, settings.steps), initial=state.step, total=settings.steps, desc="calibration", unit="step", disable=not distributed.is_main_process())
    with activation_checkpointing(model, settings.activation_checkpointing):
        if len(heldout) and not state.heldout:
            measure([])
        for step in bar:
            if _patience_exhausted(state, settings):
                break
            indices = train[batch_indices(step, len(train), settings.batch_size, seed)]
            for optimizer in state.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            with distributed.agreed(f"calibration step {step}"):
                terms = _backward_share(model, tokens, indices, teacher, settings, device)
            terms = _summed_over_processes(terms, parameters, settings.loss, f"calibration step {step}")
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            for optimizer in state.optimizers.values():
                optimizer.step()
            pending.append(terms)
            since_heldout.append(terms)
            state.step = step + 1
            if len(heldout) and (state.step % settings.heldout_every == 0 or state.step == settings.steps):
                measure(since_heldout)
                since_heldout = []
            stopping = _patience_exhausted(state, settings)
            if state.step % settings.checkpoint_every == 0 or state.step == settings.steps or stopping:
                scalars = [terms.scalars() for terms in pending]
                _check_losses(scalars, state.step - len(scalars), state, settings, kept)
                history += scalars
                pending = []
                bar.set_postfix({k: f"{v:.4f}" for k, v in scalars[-1].items()})
                if checkpoint_dir is not None:
                    with distributed.agreed("the writing of the calibration checkpoint"):
                        if distributed.is_main_process():
                            save_checkpoint(checkpoint_dir, state, settings, seed)
                    kept = f"the last good checkpoint (step {state.step}) is in {checkpoint_dir}"
            if stopping:
                logger.info("held-out loss did not improve in %d measurements: calibration stops at step %d", settings.heldout_patience, state.step)
                break
    best_step = _best(state.heldout)["step"] if state.heldout else None
    restored = settings.restore_best and state.best is not None
    if restored:
        with torch.no_grad():
            transforms.load_state_dict(state.best)
        logger.info("calibration: transforms of step %d restored (held-out loss %.4f)", best_step, _best(state.heldout)["heldout_loss"])
    return CalibrationResult(
        history=history, steps=state.step, initial_loss=state.initial_loss, heldout=state.heldout, best_step=best_step, restored_best=restored
    )


def _heldout_scalars(
    model: PreTrainedModel, tokens: Tensor, heldout: Tensor, teacher: Teacher, settings: CalibrationSettings, device: torch.device, step: int
) -> dict[str, float]:
    """The student's loss terms on the held-out windows (their mean; in batches of the micro-batch or step size; no gradients), summed over the processes."""
    count = 3 if settings.loss.needs_reference else 2
    totals = torch.zeros(count, device=device)
    with distributed.agreed(f"the held-out loss at step {step}"), torch.no_grad():
        for chunk in heldout.split(settings.micro_batch or settings.batch_size):
            share = distributed.share(chunk)
            if len(share):
                terms = student_loss(model, tokens[share].to(device), teacher(share), settings.loss)
                totals += torch.stack(terms[:count]).float() * len(share)
    distributed.sum_([totals], "the held-out loss")
    return LossTerms(*(totals / len(heldout)).unbind()).scalars()


def _best(curve: list[dict[str, float]]) -> dict[str, float]:
    """The held-out measurement with the lowest loss (the earliest among equals)."""
    return min(curve, key=lambda entry: entry["heldout_loss"])


def _record_heldout(state: CalibrationState, scalars: dict[str, float], train_losses: list[float]) -> None:
    """Append a held-out measurement to the curve; keep a copy of the transforms when it is the best so far."""
    entry = {"step": state.step} | {f"heldout_{name}": value for name, value in scalars.items()}
    entry |= {"train_loss": sum(train_losses) / len(train_losses) if train_losses else None, "train_steps": len(train_losses)}
    improved = not state.heldout or entry["heldout_loss"] < _best(state.heldout)["heldout_loss"]
    state.heldout.append(entry)
    if improved:
        state.best = {k: v.detach().as_subclass(torch.Tensor).clone() for k, v in state.transforms.state_dict().items()}
    logger.info("calibration step %d: held-out loss %.4f%s", state.step, entry["heldout_loss"], "" if entry["train_loss"] is None else f", training loss {entry['train_loss']:.4f}")


def _patience_exhausted(state: CalibrationState, settings: CalibrationSettings) -> bool:
    """Whether the last `heldout_patience` held-out measurements all failed to improve on the best."""
    if settings.heldout_patience is None or not state.heldout:
        return False
    best_index = state.heldout.index(_best(state.heldout))
    return len(state.heldout) - 1 - best_index >= settings.heldout_patience


def _backward_share(model: PreTrainedModel, tokens: Tensor, indices: Tensor, teacher: Teacher, settings: CalibrationSettings, device: torch.device) -> LossTerms | None:
    """Backpropagate the loss of this process's share of a step's batch (all of it in one process); its detached terms.

    The share runs `settings.micro_batch` sequences at a time, each part's loss weighted by its
    fraction of the step's batch (as is each process's share when there are several), so that the
    sums of the parts' gradients and terms are those of the whole batch. None for an empty share.
    """
    share = distributed.share(indices)
    if len(share) == 0:
        return None
    total = None
    for part in share.split(settings.micro_batch or len(share)):
        terms = student_loss(model, tokens[part].to(device), teacher(part), settings.loss)
        if len(part) < len(indices):
            terms = terms.scaled(len(part) / len(indices))
        terms.total.backward()
        total = terms.detached() if total is None else total.plus(terms.detached())
    return total


def _summed_over_processes(terms: LossTerms | None, parameters: list[torch.nn.Parameter], loss: LossConfig, what: str) -> LossTerms:
    """The gradients of `parameters` and the loss terms summed over the processes (one all-reduce); `terms` in one process."""
    if not distributed.active():
        return terms
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    count = 3 if loss.needs_reference else 2
    values = torch.zeros(count, device=parameters[0].device) if terms is None else torch.stack(terms[:count]).float()
    distributed.sum_([p.grad for p in parameters] + [values], what)
    return LossTerms(*values.unbind())
