"""Several processes (`torchrun`): who is who, each process's share of the work, sums over processes, and shared errors.

aaq splits a run over the processes of a `torch.distributed` process group: each process computes
its share of the calibration sequences (teacher targets, calibration batches, GPTQ's layer inputs),
and what the single-process run would sum over all of them (the transforms' gradients and loss terms,
GPTQ's Hessians) is all-reduced, so every process then takes the same optimiser step, or solves its
share of a layer's weights with the same Hessians and hands their codes to the others. Only process
0 writes files, logs information and shows progress bars.

Without a process group (or with one process) every function here is the identity, so a
single-process run computes exactly what it computed before. The CLI starts the process group from
`torchrun`'s environment (`process_group`); through the Python API, aaq works in whatever default
group the caller has initialised.

Errors: a process that fails inside an `agreed` block tells the others at the block's end, and all
of them stop with a one-line error; a process that dies (killed) is noticed by the others at their
next collective (gloo sees the closed connection, torchrun stops the others with SIGTERM, which
`sigterm_as_error` turns into a one-line error), and a process that hangs by the group's timeout.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from aaq.errors import AaqError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# How long a collective waits for the other processes before it fails (a hung process; a dead one is noticed at once).
TIMEOUT = timedelta(minutes=30)
_RESUME = "fix that and continue the run with {setting}"


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes: `rank` of `size`, and `local_rank` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes files, logs information and shows progress."""
        return self.rank == 0


def launched() -> World:
    """The world `torchrun` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def world() -> World:
    """The world of the initialised default process group, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank, size = dist.get_rank(), dist.get_world_size()
    local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else rank % max(torch.cuda.device_count(), 1)
    return World(rank, size, local)


def this_process() -> World:
    """This process's world: the process group's, or, before it is initialised, the one torchrun describes."""
    return world() if dist.is_available() and dist.is_initialized() else launched()


def active() -> bool:
    """Whether this run is split over more than one process."""
    return world().size > 1


def is_main_process() -> bool:
    """Whether this process writes the run's files, logs information and shows progress bars (process 0, or the only one)."""
    return world().is_main


def share(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous share of `items` (shares differ in size by at most one); all of them in one process."""
    rank, size = world().rank, world().size
    if size == 1:
        return items
    count = len(items)
    return items[rank * count // size : (rank + 1) * count // size]


def balanced_share(costs: dict[str, float]) -> list[str]:
    """This process's share of the named tasks, balanced by cost (the largest first, each to the least loaded process); all in one process.

    Every process computes the same assignment, so the shares cover each task once.
    """
    rank, size = world().rank, world().size
    if size == 1:
        return list(costs)
    loads = [0.0] * size
    mine = []
    for name in sorted(costs, key=lambda name: -costs[name]):  # stable: equal costs keep their order
        owner = loads.index(min(loads))
        loads[owner] += costs[name]
        if owner == rank:
            mine.append(name)
    return mine


def share_of_batches(num_rows: int, batch_size: int) -> slice:
    """The rows of this process's share of the batches `[0, batch_size)`, `[batch_size, 2 * batch_size)`, ... of `num_rows` rows.

    Each process takes whole batches, so every batch has the rows (and the float sums) it has in one process.
    """
    starts = share(range(0, num_rows, batch_size))
    return slice(starts.start, min(starts.stop, num_rows))


class Stopped(AaqError):
    """This process was stopped from outside (torchrun's SIGTERM after another process failed)."""


@contextmanager
def sigterm_as_error() -> Iterator[None]:
    """Within the block, SIGTERM raises a one-line `Stopped` error; after it, SIGTERM is ignored (the process is ending anyway).

    For the CLI under torchrun, which stops the other processes with SIGTERM when one fails: the
    error then names what happened, and a SIGTERM that arrives while the error is printed or the
    interpreter shuts down cannot add a traceback to that one line.
    """
    this = launched()

    def stopped(_signum: int, _frame: Any) -> None:
        if sys.exc_info()[1] is not None:
            # An error is already on its way out (e.g. lost contact), and its handler is recording it
            # (failed.json): raising here would cut that short, and the error names what happened.
            return
        raise Stopped(f"process {this.rank} of {this.size} was stopped by the launcher: another process of the run failed or was killed; {_RESUME}", setting="resume")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if this.size > 1 else previous)


def _lost_contact(what: str, error: BaseException) -> AaqError:
    """The one-line error of a collective that failed: another process died, hung past the timeout, or broke off."""
    logger.debug("collective during %s failed: %s", what, error)
    this = world()
    return AaqError(
        f"process {this.rank} of {this.size} lost contact with the other processes during {what} "
        f"(one of them stopped, was killed or hung; its own output says why); {_RESUME}",
        setting="resume",
    )


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective (the gloo or NCCL error of a dead or hung peer) into a one-line AaqError."""
    try:
        yield
    except RuntimeError as error:
        raise _lost_contact(what, error) from None


def _one_line(error: BaseException) -> str:
    """An error as one line: an AaqError's message, else its type and first line."""
    if isinstance(error, AaqError):
        return str(error)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


@contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run the block on every process; at its end all learn whether any process failed in it, and then all stop.

    The process that failed raises its own error; the others raise a one-line AaqError naming that
    process and its error. A `Stopped` process does not wait for the others. In one process the block
    just runs.
    """
    if not active():
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Stopped:
        raise
    except BaseException as error:  # noqa: BLE001 - told to the others, then re-raised
        failure = error
    messages = gather(None if failure is None else _one_line(failure), what)
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise AaqError(f"process {rank} of {len(messages)} failed during {what}: {message}")


def gather(value: T, what: str) -> list[T]:
    """`value` of every process (a small picklable object), in rank order; `[value]` in one process."""
    if not active():
        return [value]
    values: list[Any] = [None] * world().size
    with _collective(what):
        dist.all_gather_object(values, value)
    return values


def from_main(value: T, what: str) -> T:
    """Process 0's `value` (a small picklable object), on every process."""
    if not active():
        return value
    box = [value]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_(tensors: Sequence[Tensor], what: str) -> None:
    """Replace each tensor (same dtype and device) by its sum over the processes, in one collective.

    Several tensors are summed as one flat copy (one collective for many small ones); a single tensor
    in place (no copy of a large one).
    """
    if not active() or not tensors:
        return
    with _collective(what):
        if len(tensors) == 1:
            dist.all_reduce(tensors[0], op=dist.ReduceOp.SUM)
            return
        flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Within the block, the default process group of a `torchrun` launch: gloo for CPU tensors, NCCL for CUDA ones.

    Nothing happens in a single process or when the caller has initialised a group already. CUDA
    processes compute on their own GPU (`cuda:LOCAL_RANK`).
    """
    this = launched()
    if this.size == 1 or dist.is_initialized():
        yield
        return
    backend = "gloo"
    if device.type == "cuda":
        if device.index != this.local_rank:
            raise AaqError(f"under torchrun each process computes on its own GPU (cuda:LOCAL_RANK), not all on {device}; use {{setting}} cuda", setting="device")
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as error:
        raise AaqError(f"process {this.rank} of {this.size} could not join the other processes ({_one_line(error)}); start aaq with torchrun") from None
    try:
        yield
    finally:
        dist.destroy_process_group()
