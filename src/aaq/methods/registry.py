"""Method registry: a quantization method is a config class plus one function that applies it.

Adding a method means writing `@dataclass class FooConfig(MethodConfig)` with a unique `name` and
decorating one `apply(context) -> MethodResult` function with `@register_method(FooConfig)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import PreTrainedModel

from aaq.calibration.loop import CalibrationSettings
from aaq.errors import AaqError
from aaq.methods.options import MethodOptions
from aaq.models.plan import NO_TRANSFORMS, TransformConfig, TransformPlan
from aaq.quant.quantizers import QuantScheme
from aaq.runs.folders import make_work_folder, remove_work_folder
from aaq.runtime import distributed
from aaq.runtime.devices import Placement, StageRecord
from aaq.transforms.rotation import AppliedTransforms
from aaq.typed import dataclass_from_dict

if TYPE_CHECKING:
    from aaq.methods.gptq import GPTQConfig

Options = dict[str, Any]


@dataclass
class MethodConfig:
    """Base of every method's settings; subclasses set `name` and add typed fields.

    A method answers for itself what a run of it needs and produces, so that the workflow, the memory
    planner and export ask it instead of reading its fields.
    """

    name: ClassVar[str] = ""

    def needs_calibration(self) -> bool:
        """True when the method reads calibration tokens."""
        return False

    def needs_reference(self) -> bool:
        """True when the method needs the unaligned reference model."""
        return False

    def stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """The stages a run of the method goes through with `scheme`, in order, named as its measurements name them.

        Among them: `teachers` (teacher targets cached), `calibration` (transforms learned), `fusion`,
        `gptq` or `rtn` (the weight step).
        """
        return ()

    def calibration_settings(self) -> CalibrationSettings | None:
        """The settings of the calibration that learns the method's transforms (None: it learns none)."""
        return None

    def with_calibration_settings(self, **changes: Any) -> MethodConfig:
        """This config with calibration settings changed (it has none to change: itself)."""
        return self

    def gptq_settings(self) -> GPTQConfig | None:
        """The settings of the GPTQ solver that quantizes the method's weights (None: GPTQ does not)."""
        return None

    def with_gptq_settings(self, **changes: Any) -> MethodConfig:
        """This config with GPTQ settings changed (it has none to change: itself)."""
        return self

    def learned_transforms(self) -> TransformConfig | None:
        """The transforms the method learns, starting from the given kinds (None: it learns none)."""
        return None

    def calibrates_quantized_weights(self, scheme: QuantScheme) -> bool:
        """Whether its calibration fake-quantizes the weights in the loop (the weight form of the learnable transforms)."""
        return False

    def teacher_cache_bytes(self, num_sequences: int, seq_len: int, vocab_size: int) -> int:
        """Disk bytes of the teacher cache the method writes for that calibration set (0: it writes none)."""
        return 0

    def work_folders(self) -> tuple[str, ...]:
        """The subfolders of a run folder where the method may keep resumable progress (`MethodContext.work_folder` makes them)."""
        return ()

    def export_blocker(self, scheme: QuantScheme) -> AaqError | None:
        """Why a run of the method with `scheme` could not be exported (None when it can)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings, tagged with the method name."""
        return {"name": self.name, **asdict(self)}

    def with_options(self, options: MethodOptions) -> MethodConfig:
        """This config with `options` applied; AaqError naming an option this method would ignore."""
        config, unused = self.apply_options(options.given())
        if unused:
            setting = next(iter(unused))
            raise AaqError(f"{{setting}} has no effect with method {self.name}; drop it or pick a method it applies to", setting=setting)
        return config

    def apply_options(self, options: Options) -> tuple[MethodConfig, Options]:
        """This config with the options it understands applied, and the options it left over."""
        return self, options


def take_options(options: Options, names: tuple[str, ...]) -> tuple[Options, Options]:
    """The options among `names`, and the others."""
    return {k: v for k, v in options.items() if k in names}, {k: v for k, v in options.items() if k not in names}


class ReleasableModel:
    """A model a method uses for a while and then lets go of, so that its memory can be freed (the unaligned reference).

    Given a loader instead of a model, the model is loaded on first use: it is then resident only
    between `get` and `release`.
    """

    def __init__(self, model: PreTrainedModel | Callable[[], PreTrainedModel]) -> None:
        self._model: PreTrainedModel | None = None if callable(model) and not isinstance(model, torch.nn.Module) else model
        self._loader = model if self._model is None else None
        self._released = False

    def get(self) -> PreTrainedModel:
        """The model (loaded now if it was given as a loader); AaqError once released."""
        if self._released:
            raise AaqError("the reference model was already released by this run; pass it again to quantize another model")
        if self._model is None:
            self._model = self._loader()
        return self._model

    def release(self) -> None:
        """Drop this holder's references to the model and its loader."""
        self._model, self._loader, self._released = None, None, True


@dataclass(frozen=True)
class MethodContext:
    """What a method reads: the model with its plan, the scheme, its settings, calibration data and the run folder.

    `placement`: where the stages compute (GPTQ onloads layers to its device; forward passes are
    dispatched within its memory budgets). `reference`: the unaligned model (methods with a push
    term), released once the method no longer needs it. `run_dir` holds resumable progress (teacher
    cache, checkpoints, GPTQ layers).
    """

    model: PreTrainedModel
    plan: TransformPlan
    scheme: QuantScheme
    method: MethodConfig
    calibration_tokens: torch.Tensor | None
    seed: int
    placement: Placement
    batch_size: int = 8
    reference: ReleasableModel | None = None
    run_dir: Path | None = None
    resume: bool = False

    def work_folder(self, name: str) -> Path | None:
        """The run folder's work subfolder `name`, one of the method's `work_folders` (None without a run folder).

        Process 0 lists it in the run folder's marker and creates it (`aaq.runs.folders.make_work_folder`):
        a run folder lists only the work folders its runs made.
        """
        if name not in self.method.work_folders():
            raise ValueError(f"method {self.method.name} does not declare the work folder {name!r} in work_folders()")
        if self.run_dir is None:
            return None
        if distributed.is_main_process():
            make_work_folder(self.run_dir, name)
        return self.run_dir / name

    def drop_work_folder(self, name: str) -> None:
        """Delete the run folder's work subfolder `name` (on process 0) and drop it from the marker."""
        if self.run_dir is not None and distributed.is_main_process():
            remove_work_folder(self.run_dir, name)


@dataclass
class MethodResult:
    """What a method made: the transforms it fused and runs online, its stages' seconds and peak memory, and
    `metrics` it measured on the way (JSON-ready; the calibrated methods: loss and how far the transforms moved)."""

    transforms: AppliedTransforms = field(default_factory=lambda: AppliedTransforms(config=NO_TRANSFORMS))
    stages: dict[str, StageRecord] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


MethodFn = Callable[[MethodContext], MethodResult]
_METHODS: dict[str, tuple[type[MethodConfig], MethodFn]] = {}


def register_method(config_cls: type[MethodConfig]) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering `fn` as the function that applies `config_cls`."""

    def decorator(fn: MethodFn) -> MethodFn:
        if config_cls.name in _METHODS:
            raise ValueError(f"method {config_cls.name!r} registered twice")
        _METHODS[config_cls.name] = (config_cls, fn)
        return fn

    return decorator


def method_names() -> list[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)


def method_config_class(name: str) -> type[MethodConfig]:
    """The config class registered under `name`."""
    if name not in _METHODS:
        raise AaqError(f"unknown method {name!r}; choose one of {', '.join(method_names())}")
    return _METHODS[name][0]


def method_config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Inverse of `MethodConfig.to_dict`, rebuilding nested config dataclasses."""
    if not isinstance(data, dict) or "name" not in data:
        raise AaqError(f"method settings need a name (one of {', '.join(method_names())}), e.g. method: {{name: quarot}}")
    return dataclass_from_dict(method_config_class(data["name"]), data, "method")


def apply_method(context: MethodContext) -> MethodResult:
    """Run the function registered for `context.method`."""
    return _METHODS[context.method.name][1](context)
