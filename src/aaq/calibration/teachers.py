"""On-disk cache of the teachers' top-k targets, so calibration keeps only the student resident.

The aligned model ``M_a`` and the reference ``M_b`` never change during calibration, so their part of the
loss is a function of the calibration batch alone. :func:`build_teacher_cache` runs both once over the
calibration set and stores, per sequence and position, exactly the :class:`~aaq.calibration.losses.TeacherTargets`
fields (int32 indices, fp16 probabilities by default) as memory-mapped ``.npy`` files; afterwards the
reference can be freed and each calibration step is one student forward+backward. With a reference the
build also measures how far the two models are apart on the calibration windows
(:class:`~aaq.calibration.pair_stats.PairStatistics`, kept in the metadata), at no extra forward pass.

Size per position: ``k`` pull tokens and ``push_k`` push tokens at 4 (int32 index) + 2 (fp16 probability)
bytes each; the full-vocabulary push stores probabilities only (indices implicit), ``2 * V`` bytes.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from aaq.calibration.losses import LossConfig, TeacherTargets, teacher_targets
from aaq.calibration.pair_stats import PairStatistics, PushSet
from aaq.errors import AaqError
from aaq.runs.folders import TEMP_SUFFIX, check_free_space, publish
from aaq.runs.records import write_json
from aaq.runtime import distributed
from aaq.runtime.devices import model_device

__all__ = [
    "CacheMeta",
    "LogitsFn",
    "Teacher",
    "TeacherCache",
    "build_teacher_cache",
    "cached_teacher",
    "head_only_teacher",
    "live_teacher",
    "open_or_build",
    "tokens_fingerprint",
]

log = logging.getLogger(__name__)

# A model's forward: token ids (batch, seq_len) -> logits (batch, seq_len, vocab).
LogitsFn = Callable[[Tensor], Tensor]
# What calibration asks for each step: calibration-sequence indices -> the teachers' targets (top-k
# losses) or the aligned logits (full-logit losses).
Teacher = Callable[[Tensor], TeacherTargets | Tensor]

_META_FILE = "meta.json"
_FORMAT_VERSION = 1
_VALUE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_PULL_FIELDS = ("pull_idx", "pull_prob")
_PUSH_FIELDS = ("push_idx", "push_prob", "push_ref")
_VOCAB_PUSH_FIELDS = ("push_prob", "push_ref")  # the full-vocabulary push: indices 0..V-1 are implicit
# Rows of teacher logits turned into targets at once: bounds the fp32 softmax temporaries to a few
# (rows x V) buffers instead of several copies of a whole batch of logits.
_ROWS_PER_CHUNK = 512


@dataclass(frozen=True)
class CacheMeta:
    """What a teacher cache holds: sizes, value dtype, push tokens and the fingerprint of the tokens it was built for.

    ``push_tokens``/``push_k``: the push tokens ``I_d`` (``push_k`` None: ``k``). ``pair_statistics``: the
    :class:`~aaq.calibration.pair_stats.PairSummary` of the two teachers on the cached windows (with a reference).
    """

    k: int
    vocab_size: int
    num_sequences: int
    seq_len: int
    value_dtype: str
    has_push: bool
    fingerprint: str
    format_version: int = _FORMAT_VERSION
    push_tokens: str = "diff"
    push_k: int | None = None
    pair_statistics: dict[str, Any] | None = None

    @property
    def k_eff(self) -> int:
        """The stored top-k size: ``k`` capped at the vocabulary size."""
        return min(self.k, self.vocab_size)

    @property
    def push_width(self) -> int:
        """Values stored per position for the push: ``push_k`` (default ``k``) capped at V, or V for "vocab"."""
        if self.push_tokens == "vocab":
            return self.vocab_size
        return min(self.k if self.push_k is None else self.push_k, self.vocab_size)

    @property
    def push_set(self) -> PushSet:
        """The push tokens of this cache as a :class:`~aaq.calibration.pair_stats.PushSet`."""
        return PushSet(self.push_tokens, None if self.push_tokens == "vocab" else self.push_width)

    @property
    def fields(self) -> tuple[str, ...]:
        """The names of the arrays stored in the cache."""
        if not self.has_push:
            return _PULL_FIELDS
        return _PULL_FIELDS + (_VOCAB_PUSH_FIELDS if self.push_tokens == "vocab" else _PUSH_FIELDS)

    def field_spec(self, field: str) -> tuple[tuple[int, ...], np.dtype]:
        """The expected shape and dtype of one stored array."""
        rows = (self.num_sequences, self.seq_len)
        if field == "push_ref":
            return rows, np.dtype(np.float32)
        dtype = np.int32 if field.endswith("_idx") else self.value_dtype
        width = self.k_eff if field.startswith("pull") else self.push_width
        return (*rows, width), np.dtype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (their `.npy` headers aside)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in map(self.field_spec, self.fields))


def tokens_fingerprint(tokens: Tensor) -> str:
    """The sha256 hex digest of a token-id tensor's shape and int64 values."""
    array = np.ascontiguousarray(tokens.detach().cpu().to(torch.int64).numpy())
    digest = hashlib.sha256(repr(tuple(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _rebuild_hint(directory: Path) -> str:
    """The fix for any unusable cache, appended to its error message."""
    return f"delete {directory} and rerun to rebuild the teacher cache"


class TeacherCache:
    """A teacher cache on disk, memory-mapped; :meth:`targets` serves the targets of a batch of sequences."""

    def __init__(self, directory: Path, meta: CacheMeta, arrays: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.meta = meta
        self._arrays = arrays

    @staticmethod
    def exists(out_dir: Path) -> bool:
        """Whether ``out_dir`` holds a completed cache (its ``meta.json`` is written last)."""
        return (Path(out_dir) / _META_FILE).is_file()

    @classmethod
    def open(cls, out_dir: Path, expected_tokens: Tensor) -> TeacherCache:
        """The cache in ``out_dir``, validated against the tokens it must have been built for."""
        directory = Path(out_dir)
        meta = _read_meta(directory)
        if meta.fingerprint != tokens_fingerprint(expected_tokens):
            raise AaqError(
                f"teacher cache in {directory} was built for other calibration tokens; {_rebuild_hint(directory)}"
            )
        arrays = {field: _open_array(directory, meta, field) for field in meta.fields}
        return cls(directory, meta, arrays)

    def targets(self, seq_indices: Tensor | Sequence[int], device: torch.device | str = "cpu") -> TeacherTargets:
        """The targets of the given sequences, positions flattened in order (as from ``teacher_targets``).

        Indices come back as int64 and values as fp32, whatever the stored dtypes.
        """
        rows = np.asarray(torch.as_tensor(seq_indices, dtype=torch.int64).cpu(), dtype=np.int64)
        if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= self.meta.num_sequences:
            raise AaqError(
                f"sequence indices must be a non-empty list in [0, {self.meta.num_sequences}), got {rows.tolist()}"
            )

        def load(field: str, dtype: torch.dtype) -> Tensor | None:
            if field not in self._arrays:
                return None
            values = torch.from_numpy(np.ascontiguousarray(self._arrays[field][rows]))
            flat = values.reshape(-1) if field == "push_ref" else values.reshape(-1, values.shape[-1])
            return flat.to(device=device, dtype=dtype)

        return TeacherTargets(
            pull_idx=load("pull_idx", torch.int64),
            pull_prob=load("pull_prob", torch.float32),
            push_idx=load("push_idx", torch.int64),
            push_prob=load("push_prob", torch.float32),
            push_ref=load("push_ref", torch.float32),
        )


def _read_meta(directory: Path) -> CacheMeta:
    """The parsed ``meta.json`` of a cache folder, or a one-line error naming the fix."""
    path = directory / _META_FILE
    if not path.is_file():
        raise AaqError(f"no teacher cache in {directory} (missing {_META_FILE}); build it with build_teacher_cache")
    try:
        meta = CacheMeta(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise AaqError(f"teacher cache metadata {path} is unreadable ({error}); {_rebuild_hint(directory)}") from None
    if meta.format_version != _FORMAT_VERSION or meta.value_dtype not in _VALUE_DTYPES:
        raise AaqError(f"teacher cache in {directory} has an unsupported format; {_rebuild_hint(directory)}")
    return meta


def _open_array(directory: Path, meta: CacheMeta, field: str) -> np.ndarray:
    """One cached array memory-mapped read-only, checked against the shape and dtype in the metadata."""
    path = directory / f"{field}.npy"
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as error:
        raise AaqError(
            f"teacher cache file {path} is missing or corrupt ({error}); {_rebuild_hint(directory)}"
        ) from None
    shape, dtype = meta.field_spec(field)
    if array.shape != shape or array.dtype != dtype:
        raise AaqError(
            f"teacher cache file {path} holds {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}; "
            f"{_rebuild_hint(directory)}"
        )
    return array


def _dtype_name(value_dtype: torch.dtype) -> str:
    """The cache's name for a probability dtype, or an error for one it cannot store."""
    for name, dtype in _VALUE_DTYPES.items():
        if dtype == value_dtype:
            return name
    raise AaqError(f"teacher cache values must be torch.float16 or torch.float32, got {value_dtype}")


def _teacher_logits(teacher: LogitsFn, batch: Tensor, role: str) -> Tensor:
    """A teacher's logits for a batch of token ids, checked to be ``(b, T, V)``."""
    logits = teacher(batch)
    if logits.dim() != 3 or logits.shape[:2] != batch.shape:
        raise AaqError(
            f"{role} model returned logits of shape {tuple(logits.shape)} for tokens {tuple(batch.shape)}; "
            "a teacher callable must return (batch, seq_len, vocab) logits"
        )
    return logits


def _partial_path(directory: Path, field: str) -> Path:
    """Where an array is written before it is moved into place (a temporary name the next aaq run removes if this one is killed)."""
    return directory / f".{field}.npy{TEMP_SUFFIX}"


@contextmanager
def _partial_files_removed_on_error(directory: Path, arrays: dict[str, np.ndarray]) -> Iterator[None]:
    """On any error, drop the memory maps in `arrays` and delete the partial files; a failed write becomes an AaqError."""
    try:
        yield
    except BaseException as error:
        arrays.clear()
        for field in _PULL_FIELDS + _PUSH_FIELDS:
            _partial_path(directory, field).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise AaqError(f"could not write the teacher cache in {directory} ({error.strerror or error}); free some disk space and run again") from None
        raise


def build_teacher_cache(
    aligned: LogitsFn,
    reference: LogitsFn | None,
    batches: Tensor,
    out_dir: Path,
    k: int,
    value_dtype: torch.dtype = torch.float16,
    batch_size: int = 1,
    push_k: int | None = None,
    push_tokens: str = "diff",
) -> TeacherCache:
    """Run the aligned model (and the reference, if any) once over ``batches`` and store their top-k targets.

    ``batches`` holds token ids ``(N_seq, T)``. Each batch goes through both teachers, its targets are
    written, and both logits are dropped, so peak memory is one batch of logits per teacher. The reference
    callable is no longer needed afterwards; the caller can drop it. ``push_k``/``push_tokens`` choose the
    push tokens (see :func:`aaq.calibration.losses.teacher_targets`). Returns the opened cache, whose metadata holds the
    pair statistics of the two teachers on ``batches`` (with a reference).

    Split over processes (:mod:`aaq.runtime.distributed`), each process runs the teachers on its share of the
    batches and writes their rows into the same memory-mapped files, which process 0 creates, fills
    with nothing else and moves into place; the files are those one process writes.
    """
    if batches.dim() != 2 or batches.shape[0] == 0:
        raise AaqError(
            f"calibration tokens must be a non-empty (num_sequences, seq_len) tensor, got {tuple(batches.shape)}"
        )
    if batch_size < 1 or k < 1:
        raise AaqError(f"teacher cache batch_size and k must be >= 1, got batch_size={batch_size}, k={k}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    main = distributed.is_main_process()
    num_sequences, seq_len = batches.shape
    mine = distributed.share_of_batches(num_sequences, batch_size)
    starts = range(mine.start, mine.stop, batch_size)
    arrays: dict[str, np.ndarray] = {}
    with _partial_files_removed_on_error(directory, arrays), torch.no_grad():
        with distributed.agreed("the teacher targets"):
            if main:
                # An older cache stays "complete" until its meta.json is gone; remove that first so a build
                # killed half-way can never be mistaken for a valid cache.
                (directory / _META_FILE).unlink(missing_ok=True)
            first = _teachers_logits(aligned, reference, batches[starts[0] : starts[0] + batch_size]) if starts else None
        vocab = max(distributed.gather(0 if first is None else first[0].shape[-1], "the teacher targets"))
        meta = CacheMeta(
            k=k,
            vocab_size=vocab,
            num_sequences=num_sequences,
            seq_len=seq_len,
            value_dtype=_dtype_name(value_dtype),
            has_push=reference is not None,
            fingerprint=tokens_fingerprint(batches),
            push_tokens=push_tokens,
            push_k=push_k,
        )
        arrays.update(_partial_arrays(directory, meta))
        statistics = None if reference is None else PairStatistics(meta.push_set.with_alternatives(meta.k_eff))
        with distributed.agreed("the teacher targets"):
            for start in tqdm(starts, desc="teacher targets", unit="batch", disable=not main):
                z_a, z_b = first if start == starts[0] else _teachers_logits(aligned, reference, batches[start : start + batch_size])
                first = None
                _write_batch_targets(arrays, meta, start, z_a, z_b, statistics)
                del z_a, z_b
            for array in arrays.values():
                array.flush()
        statistics = None if statistics is None else PairStatistics.combined(distributed.gather(statistics, "the teacher targets"))
        with distributed.agreed("the teacher cache"):
            if main:
                for field in arrays:
                    publish(_partial_path(directory, field), directory / f"{field}.npy")
        arrays.clear()
    if statistics is not None:
        meta = replace(meta, pair_statistics=statistics.summary().to_dict())
    with distributed.agreed("the teacher cache"):
        if main:
            write_json(directory / _META_FILE, asdict(meta))
            log.info("teacher cache: %d x %d positions, k=%d, %s values", num_sequences, seq_len, meta.k_eff, meta.value_dtype)
    return TeacherCache.open(directory, batches)


def _teachers_logits(aligned: LogitsFn, reference: LogitsFn | None, batch: Tensor) -> tuple[Tensor, Tensor | None]:
    """The aligned model's (and the reference's) logits for a batch of token ids."""
    z_a = _teacher_logits(aligned, batch, "aligned")
    return z_a, None if reference is None else _teacher_logits(reference, batch, "reference")


def _partial_arrays(directory: Path, meta: CacheMeta) -> dict[str, np.ndarray]:
    """Writable memory maps of every cached field at their temporary paths: process 0 creates them (checking and taking the disk space), the others open them."""
    arrays = {}
    with distributed.agreed("the creation of the teacher cache"):
        if distributed.is_main_process():
            log.info("teacher cache: %.1f MB in %s (push tokens %s)", meta.nbytes / 1e6, directory, meta.push_set.label)
            check_free_space(directory, {"teacher cache": meta.nbytes})
            arrays = _create_partial_arrays(directory, meta)
    with distributed.agreed("the opening of the teacher cache"):
        if not distributed.is_main_process():
            arrays = {field: np.load(_partial_path(directory, field), mmap_mode="r+") for field in meta.fields}
    return arrays


def _create_partial_arrays(directory: Path, meta: CacheMeta) -> dict[str, np.ndarray]:
    """Writable ``.npy`` memory maps for every cached field, at their temporary paths, with their disk space allocated."""
    arrays = {}
    for field in meta.fields:
        shape, dtype = meta.field_spec(field)
        path = _partial_path(directory, field)
        arrays[field] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        _allocate(path, arrays[field].nbytes)
    return arrays


def _allocate(path: Path, data_bytes: int) -> None:
    """Give the (sparse) `.npy` file at `path` its disk blocks now, raising OSError if the disk is full.

    Writing through a memory map into a file the disk has no room for kills the process with
    SIGBUS ("Bus error") instead of raising an error. `data_bytes`: the array's bytes, which follow
    the header at the end of the file.
    """
    size = path.stat().st_size
    with path.open("r+b") as handle:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(handle.fileno(), 0, size)
                return
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
        # No fallocate on this system or file system: real writes of the array's zeros raise on a full disk too.
        chunk = bytes(1 << 20)
        handle.seek(size - data_bytes)
        for offset in range(0, data_bytes, len(chunk)):
            handle.write(chunk[: data_bytes - offset])
        handle.flush()
        os.fsync(handle.fileno())


def _write_batch_targets(
    arrays: dict[str, np.ndarray],
    meta: CacheMeta,
    start: int,
    z_a: Tensor,
    z_b: Tensor | None,
    statistics: PairStatistics | None,
) -> None:
    """The targets of one batch of teacher logits, written into the cache arrays from sequence ``start`` on.

    The chunks of logits also go into ``statistics`` (when given), which costs no extra forward pass.
    """
    vocab = z_a.shape[-1]
    if vocab != meta.vocab_size:
        raise AaqError(f"aligned model vocabulary changed from {meta.vocab_size} to {vocab} between batches")
    flat_a = z_a.reshape(-1, vocab)
    flat_b = None if z_b is None else z_b.reshape(-1, z_b.shape[-1])
    row0 = start * meta.seq_len
    for first in range(0, flat_a.shape[0], _ROWS_PER_CHUNK):
        rows = slice(first, first + _ROWS_PER_CHUNK)
        chunk_b = None if flat_b is None else flat_b[rows]
        chunk = teacher_targets(flat_a[rows], chunk_b, meta.k, meta.push_k, meta.push_tokens)
        if statistics is not None and chunk_b is not None:
            statistics.add(flat_a[rows], chunk_b)
        out = slice(row0 + first, row0 + first + chunk.num_positions)
        for field in meta.fields:
            values: Tensor = getattr(chunk, field)
            array = arrays[field]
            target = array.reshape(-1) if field == "push_ref" else array.reshape(-1, array.shape[-1])
            target[out] = values.cpu().numpy().astype(target.dtype)


def _settings(meta: CacheMeta) -> tuple[int, str, bool, str | None]:
    """What a resumed run must share with the cache it reuses: k, value dtype, reference, push tokens."""
    return (meta.k_eff, meta.value_dtype, meta.has_push, meta.push_set.label if meta.has_push else None)


def open_or_build(
    aligned: LogitsFn,
    reference: LogitsFn | None,
    batches: Tensor,
    out_dir: Path,
    k: int,
    value_dtype: torch.dtype = torch.float16,
    batch_size: int = 1,
    push_k: int | None = None,
    push_tokens: str = "diff",
) -> TeacherCache:
    """The cache in ``out_dir`` if a valid one for these tokens and settings exists (resume), else a new build.

    The teachers are only called when building. A cache for other settings is an error, not overwritten.
    Split over processes, process 0 decides whether the cache exists, and every process checks it.
    """
    directory = Path(out_dir)
    if not distributed.from_main(TeacherCache.exists(directory), "the search for the teacher cache"):
        return build_teacher_cache(aligned, reference, batches, directory, k, value_dtype, batch_size, push_k, push_tokens)
    with distributed.agreed("the opening of the teacher cache"):
        cache = TeacherCache.open(directory, batches)
        wanted = _settings(
            replace(cache.meta, k=k, value_dtype=_dtype_name(value_dtype), has_push=reference is not None, push_k=push_k, push_tokens=push_tokens)
        )
        found = _settings(cache.meta)
        if wanted != found:
            raise AaqError(
                f"teacher cache in {directory} has (k, dtype, reference, push tokens) = {found}, this run wants {wanted}; "
                f"{_rebuild_hint(directory)}"
            )
    log.info("reusing teacher cache in %s", directory)
    return cache


@torch.no_grad()
def head_only_teacher(model: PreTrainedModel, batches: Tensor, batch_size: int, device: torch.device) -> LogitsFn:
    """`model` as a teacher callable for `build_teacher_cache` that needs only a copy of its output head on the device.

    The model's final (normed) hidden states of this process's share of `batches` are computed now,
    in batches of `batch_size` sequences (those the build runs), and kept on the host; the callable
    looks a batch's hidden states up by its token ids and applies the head to them, which gives the
    logits the model would give. Afterwards the model itself can wait on the host while the reference runs.
    """
    mine = distributed.share_of_batches(batches.shape[0], batch_size)
    decoder = model.get_decoder()
    hidden = [
        decoder(input_ids=batches[start : start + batch_size].to(device), use_cache=False).last_hidden_state.cpu()
        for start in range(mine.start, mine.stop, batch_size)
    ]
    hidden = torch.cat(hidden) if hidden else torch.empty(0, model.config.hidden_size, dtype=model.dtype)
    rows = {sequence.numpy().tobytes(): row for row, sequence in enumerate(batches[mine].cpu())}
    head = copy.deepcopy(model.get_output_embeddings()).to(device)

    def logits(batch: Tensor) -> Tensor:
        index = torch.tensor([rows[sequence.numpy().tobytes()] for sequence in batch.cpu()])
        return head(hidden[index].to(device))

    return logits


def cached_teacher(cache: TeacherCache, device: torch.device | str = "cpu") -> Teacher:
    """The teacher that reads its targets from the on-disk cache, onto `device`."""
    return lambda indices: cache.targets(indices, device)


def live_teacher(aligned: PreTrainedModel, reference: PreTrainedModel | None, tokens: Tensor, loss: LossConfig) -> Teacher:
    """The teacher that runs the teacher models on each batch: top-k targets, or the aligned logits for full-logit losses."""

    device = model_device(aligned)

    @torch.no_grad()
    def teacher(indices: Tensor) -> TeacherTargets | Tensor:
        batch = tokens[indices].to(device)
        z_a = aligned(input_ids=batch, use_cache=False).logits
        if not loss.cacheable:
            return z_a
        z_b = None if reference is None else reference(input_ids=batch, use_cache=False).logits
        return teacher_targets(z_a, z_b, loss.k, loss.push_k, loss.push_tokens)

    return teacher
