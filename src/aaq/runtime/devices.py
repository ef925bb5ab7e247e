"""Where a run computes: the device, the model dtype, memory budgets for offloading, and TF32.

Every stage takes its device and dtype from the model (or, when aaq loads the model, from a
`Placement`). With `max_memory` the model rests on the CPU: forward-only stages run it through
accelerate's dispatch within those budgets (CPU or disk offload), and GPTQ onloads one decoder layer
at a time to the compute device (sequential onloading).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from aaq.errors import AaqError
from aaq.runtime import distributed

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_device() -> str:
    """`cuda` when a GPU is available, else `cpu`."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _process_gpu(device: torch.device) -> torch.device:
    """`cuda` without an index as this process's GPU when the run is split over processes (torchrun: one GPU per process)."""
    this = distributed.this_process()
    if device.type == "cuda" and device.index is None and this.size > 1:
        return torch.device("cuda", this.local_rank)
    return device


def parse_memory(text: str) -> dict[str, str]:
    """`cuda:0=20GiB,cpu=64GiB` as accelerate's max_memory mapping."""
    budgets = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, amount = part.partition("=")
        if not sep or not device or not amount:
            raise AaqError(f"bad memory budget {part!r}; write DEVICE=AMOUNT, e.g. cuda:0=20GiB,cpu=64GiB")
        budgets[device.strip()] = amount.strip()
    return budgets


@dataclass(frozen=True)
class Placement:
    """Where and in which dtype a model runs.

    `device`: the compute device (`cuda`, `cuda:1`, `cpu`; None: `cuda` when available, else `cpu`). When
    the run is split over processes (torchrun), `cuda` is each process's own GPU, `cuda:LOCAL_RANK`.
    `dtype`: the model dtype (None: bfloat16 on CUDA, float32 on CPU). `max_memory`: per-device
    budgets (`{"cuda:0": "20GiB", "cpu": "64GiB"}`); when set, the model rests on the CPU and is
    dispatched by accelerate for forward passes (models dispatched at the same time share them). `fusion_device`: where transforms are fused into the
    weights in float64 (None: the compute device; `cpu` spares a GPU with slow float64).
    `tf32`: allow TF32 matmuls on CUDA.
    """

    device: str | None = None
    dtype: str | None = None
    max_memory: dict[str, str] | None = None
    fusion_device: str | None = None
    tf32: bool = True

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise AaqError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}", setting="dtype")
        self.compute_device  # noqa: B018 - validates the device name

    def check_available(self) -> None:
        """AaqError unless the compute device exists on this machine."""
        device = self.compute_device
        if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
            raise AaqError(f"device {device} is not available on this machine; pick another ({{setting}}) or use cpu", setting="device")

    @property
    def compute_device(self) -> torch.device:
        """The device the model computes on."""
        try:
            return _process_gpu(torch.device(self.device or default_device()))
        except RuntimeError:
            raise AaqError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N", setting="device") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model dtype."""
        if self.dtype is not None:
            return DTYPES[self.dtype]
        return torch.bfloat16 if self.compute_device.type == "cuda" else torch.float32

    @property
    def fusion_target(self) -> torch.device:
        """Where transforms are fused into the weights in float64."""
        return torch.device(self.fusion_device) if self.fusion_device else self.compute_device

    @property
    def rest_device(self) -> torch.device:
        """Where the weights live between stages: the CPU when offloading, else the compute device."""
        return torch.device("cpu") if self.max_memory else self.compute_device


def dtype_name(dtype: torch.dtype) -> str:
    """The name `Placement.dtype` uses for a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise AaqError(f"models in {dtype} are not supported; use one of {', '.join(DTYPES)}")


def placement_of(model: nn.Module) -> Placement:
    """The placement a model already has: its device and dtype, no offloading."""
    param = next(model.parameters())
    return Placement(device=str(model_device(model)), dtype=dtype_name(param.dtype))


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the CUDA allocator's view, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 2**30  # no /proc: assume a modest machine


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the first one that is not on `meta`)."""
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("meta")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small transform math runs in for tensors of `dtype`: at least float32."""
    return torch.promote_types(dtype, torch.float32)


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls on CUDA within the block, restoring the previous setting."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def _remaining(placement: Placement) -> dict[str, str] | None:
    """`max_memory` minus what is already allocated on each CUDA device (another dispatched model)."""
    if not placement.max_memory:
        return None
    budgets = {}
    for device, amount in placement.max_memory.items():
        if device.startswith("cuda") and torch.cuda.is_available():
            from accelerate.utils import convert_file_size_to_int

            left = convert_file_size_to_int(amount) - torch.cuda.memory_allocated(torch.device(device))
            budgets[device] = max(left, 0)
        else:
            budgets[device] = amount
    return budgets


@contextmanager
def dispatched(model: nn.Module, placement: Placement) -> Iterator[None]:
    """Within the block, `model`'s forward passes run on the compute device.

    Without `max_memory` the model already lives there and nothing changes. With it, accelerate
    places each decoder layer on a device within the budgets (the rest offloaded to the CPU or to a
    temporary folder on disk) and streams weights in for each forward; on exit every weight is back
    on the CPU. Weights must not be changed inside the block.
    """
    if not placement.max_memory:
        yield
        return
    import tempfile

    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    no_split = getattr(model, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(model, max_memory=_remaining(placement), no_split_module_classes=list(no_split))
    if device_map.get("") == "disk":
        raise AaqError(f"the memory budgets {placement.max_memory} cannot hold even the embeddings; raise them ({{setting}})", setting="max_memory")
    with tempfile.TemporaryDirectory(prefix="aaq-offload-") as offload_dir:
        dispatch_model(model, device_map=device_map, main_device=placement.compute_device, offload_dir=offload_dir)
        try:
            yield
        finally:
            remove_hook_from_module(model, recurse=True)
            model.to(placement.rest_device)
            # Dispatching gives tied weights (embeddings and lm_head) separate copies; tie them again.
            if hasattr(model, "tie_weights"):
                model.tie_weights()


@contextmanager
def resting_on_host(model: nn.Module, placement: Placement, enabled: bool = True) -> Iterator[None]:
    """Within the block `model` rests on the host (when `enabled`; with memory budgets it rests there anyway), then goes back where it rests."""
    moved = enabled and placement.rest_device.type != "cpu"
    if moved:
        model.to("cpu")
    try:
        yield
    finally:
        if moved:
            model.to(placement.rest_device)


@dataclass
class StageRecord:
    """A measured stage: wall seconds and peak bytes on the host and the CUDA device.

    `peak_host`: the resident set. `peak_host_anon`: its anonymous part (sampled every 20 ms): the
    pages of memory-mapped weight files count in the resident set while mapped, but are clean file
    pages the kernel can drop whenever memory is short, so the anonymous part is what a stage needs.
    """

    seconds: float
    peak_host: int | None
    peak_device: int | None
    peak_host_anon: int | None = None


# The peak resident set (and the CUDA allocator's peak) is one window per process: before a stage
# resets it, the peak so far is handed to every stage still open, outermost first.
_OPEN_STAGES: list[dict[str, int]] = []
_ANON_SAMPLE_SECONDS = 0.02


def _measures_cuda(device: torch.device) -> bool:
    """Whether the CUDA allocator's peaks can be read for `device` (never on a torch built without CUDA)."""
    return device.type == "cuda" and torch.cuda.is_available()


def _fold_peaks(device: torch.device) -> None:
    host = _host_peak() or 0
    cuda = torch.cuda.max_memory_allocated(device) if _measures_cuda(device) else 0
    for peaks in _OPEN_STAGES:
        peaks["host"], peaks["device"] = max(peaks["host"], host), max(peaks["device"], cuda)
    _fold_anon()


def _fold_anon() -> None:
    anon = _status_bytes("RssAnon") or 0
    for peaks in list(_OPEN_STAGES):  # noqa: PERF101 (a snapshot: the sampler thread runs this while stages open and close)
        peaks["anon"] = max(peaks["anon"], anon)


def _sample_anon_while_stages_are_open() -> None:
    while _OPEN_STAGES:
        _fold_anon()
        time.sleep(_ANON_SAMPLE_SECONDS)


@dataclass
class StageMeter:
    """Measures stages (`with meter.stage("gptq"): ...`), nested or one after another."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: dict[str, StageRecord] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block and record its peak memory under `name`."""
        _fold_peaks(self.device)
        release_freed_host_memory()
        _reset_host_peak()
        if _measures_cuda(self.device):
            torch.cuda.reset_peak_memory_stats(self.device)
        peaks = {"host": 0, "device": 0, "anon": 0}
        _OPEN_STAGES.append(peaks)
        if len(_OPEN_STAGES) == 1:
            threading.Thread(target=_sample_anon_while_stages_are_open, name="aaq-memory-sampler", daemon=True).start()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            _fold_peaks(self.device)
            del _OPEN_STAGES[next(i for i, open_peaks in enumerate(_OPEN_STAGES) if open_peaks is peaks)]
            device_peak = peaks["device"] if _measures_cuda(self.device) else None
            self.records[name] = StageRecord(seconds, peaks["host"] or None, device_peak, peaks["anon"] or None)

    def to_dict(self) -> dict[str, dict]:
        """The records, JSON-serialisable."""
        return {name: asdict(record) for name, record in self.records.items()}


def _host_peak() -> int | None:
    """The process's peak resident set since the last reset (Linux), in bytes."""
    return _status_bytes("VmHWM")


def _status_bytes(key: str) -> int | None:
    """A size from /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(f"{key}:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def _reset_host_peak() -> None:
    """Start a new peak-resident-set window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def release_freed_host_memory() -> None:
    """Hand host memory freed so far back to the OS (glibc keeps freed heap memory mapped); a no-op off glibc."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
