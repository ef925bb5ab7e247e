"""Run folders: atomic writes, checksums of stored tensors, and the provenance every output records (versions, git commit)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from aaq.errors import AaqError
from aaq.runs.folders import FOLDER_MODE, TEMP_SUFFIX, publish, replace_atomically

_PACKAGES = ("aaq", "torch", "transformers", "safetensors", "gguf", "geoopt", "peft", "lm-eval", "compressed-tensors")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place.

    A reader never sees a half-written file: it sees the old one or the complete new one. In an
    aaq output folder the file is listed in the folder's marker first (`aaq.runs.folders`). A failed
    write (a full disk, say) removes the temporary file and raises AaqError.
    """
    path = Path(path)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, write)


def write_staged(folder: str | Path, save: Callable[[Path], Any]) -> None:
    """Call `save(staging)` (a `save_pretrained`, say) on a temporary folder inside `folder`, then move each file it wrote into `folder`.

    Each file is replaced atomically and, in an aaq output folder, listed in its marker first.
    """
    folder = Path(folder)
    with _write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=TEMP_SUFFIX, dir=folder))
        try:
            save(staging)
            # save_pretrained writes flat folders; anything nested would not be listed in the marker.
            for file in sorted(entry for entry in staging.iterdir() if entry.is_file()):
                publish(file, folder / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def write_folder_atomic(target: str | Path, build: Callable[[Path], None]) -> None:
    """Call `build(staging)` on a new folder next to `target`, then rename it to `target`: the folder is complete or absent.

    `target` must not exist (the caller removes what it replaces); on any failure the staging folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    try:
        build(staging)
        staging.chmod(FOLDER_MODE)  # mkdtemp makes it owner-only; outputs and caches are ordinary folders
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (full disk, read-only or vanished folder) into a one-line AaqError."""
    try:
        yield
    except OSError as error:
        raise AaqError(f"could not write {path} ({error.strerror or error}); free some disk space or write to another folder") from None
    except SafetensorError as error:
        # safetensors reports its I/O failures (a full disk) as SafetensorError "... I/O error: ..."; others are bugs.
        if "I/O error" not in str(error):
            raise
        raise AaqError(f"could not write {path} ({str(error).splitlines()[0]}); free some disk space or write to another folder") from None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of named tensors: each name, dtype, shape and the raw bytes, in name order (independent of the file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"))


def library_versions() -> dict[str, str | None]:
    """Installed versions of Python and the libraries that shape results."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """Commit of the aaq source tree (with `+dirty` for local changes), or None outside git.

    Cached: the first call's answer describes the code this process loaded, even if the tree
    changes during a long run. The CLI calls it at start-up.
    """
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=source, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


def provenance() -> dict[str, Any]:
    """What every output folder records about where it came from."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }
