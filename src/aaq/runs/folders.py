"""Output folders: which files aaq wrote, so that it never replaces or deletes anyone else's.

Every folder aaq writes into holds its marker, `aaq_folder.json`: the kind of output (a run, an
evaluation, a comparison report, an export, an adapter, pair diagnostics), the work subfolders a run
created to keep its progress in (listed just before they are made), and every file aaq wrote there
with its size and sha256, recorded just before the file is moved into place. A folder is aaq's only
when it holds the marker; everything else in it that the marker does not list is foreign, and aaq
refuses to write into a folder with foreign entries. Temporary files (hidden, ending in `.aaq-tmp`)
are what a killed write leaves behind; the next aaq command in that folder removes them. Checksums
let a reader notice a file that changed after aaq wrote it (`verify_file`).

A marker is trusted no further than its folder: every entry must be a plain name inside it (no
`..`, no absolute path, no symbolic link), or aaq refuses the folder, and a listed file is removed
only while it still has the checksum aaq recorded (a file the user edited is never deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from aaq.errors import AaqError

logger = logging.getLogger(__name__)

MARKER = "aaq_folder.json"
MARKER_FORMAT = "aaq-folder"
MARKER_VERSION = 1
# Suffix of every temporary file or folder aaq writes next to its outputs.
TEMP_SUFFIX = ".aaq-tmp"
# The mode a plain open() gives new files under this process's umask (read without changing it for good).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK
FolderKind = Literal["run", "eval", "report", "export", "adapter", "diagnostics", "audit"]
# How many foreign names an error message lists before it says how many more there are.
_NAMES_SHOWN = 5


def _is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of aaq's temporary names (left behind only by a killed write)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of `folder`, or None when aaq has not written into it; AaqError when it is damaged or names anything outside the folder."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise AaqError(f"{path} is unreadable ({error}); restore it, or move the folder's files away and run again") from None
    if not _is_marker(data):
        raise AaqError(f"{path} is not an aaq folder marker; move it away (and the files it came with) and run again")
    for name in [*data["files"], *data["folders"]]:
        problem = _outside(Path(folder), name)
        if problem is not None:
            raise AaqError(
                f"{path} lists {name!r}, {problem}: aaq acts only on what it wrote inside its folders, so it will not use this "
                "marker (edited, or from elsewhere); move the folder's files away yourself and run again"
            )
    return data


def _is_marker(data: object) -> bool:
    """Whether `data` has the shape of a marker: format, kind, a list of folder names, a size and checksum per file."""
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or not isinstance(data.get("kind"), str):
        return False
    files, folders = data.get("files"), data.get("folders")
    records = isinstance(files, dict) and all(
        isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str) for r in files.values()
    )
    return records and isinstance(folders, list) and all(isinstance(name, str) for name in folders)


def _outside(folder: Path, name: str) -> str | None:
    """Why the marker entry `name` does not name an entry of `folder` itself (None when it does)."""
    if name in ("", ".", "..", MARKER) or name != Path(name).name or "\\" in name or "\0" in name:
        return "which is not the name of an entry inside the folder"
    entry = folder / name
    if entry.is_symlink():
        return f"a symbolic link to {os.readlink(entry)}, which aaq never writes"
    if entry.resolve().parent != folder.resolve():
        return "which resolves outside the folder"
    return None


def folder_kind(folder: str | Path) -> str | None:
    """The kind of aaq output `folder` holds (run, eval, report, export, adapter), or None when it is not aaq's."""
    marker = _read_marker(folder) if Path(folder).is_dir() else None
    return None if marker is None else marker["kind"]


def foreign_entries(folder: str | Path) -> list[str]:
    """The names in `folder` that aaq did not write (sorted; subfolders end with `/`)."""
    folder = Path(folder)
    marker = _read_marker(folder) or {"files": {}, "folders": []}
    ours = set(marker["files"]) | set(marker["folders"]) | {MARKER}
    foreign = []
    for entry in folder.iterdir():
        if entry.name in ours or _is_temporary(entry.name):
            continue
        # Another aaq output nested inside (an evaluation of a run, say) is aaq's too.
        if entry.is_dir() and not entry.is_symlink() and (entry / MARKER).is_file():
            continue
        foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return sorted(foreign)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown if len(names) <= _NAMES_SHOWN else f"{shown} and {len(names) - _NAMES_SHOWN} more"


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest existing ancestor."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(folder: str | Path, kind: FolderKind, joins: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Raise AaqError unless aaq may write an output of `kind` into `folder`; changes nothing.

    Allowed: a new or empty folder, or an aaq folder of the same kind or one of `joins` (an
    evaluation may join a run folder); with `overwrite`, any aaq folder whose files are as aaq wrote
    them (it is replaced). Never a folder with foreign entries, a marker naming anything outside
    it, a file, or a place this process cannot write to.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AaqError(f"{folder} is a file, not a folder; choose a folder for the output ({{setting}})", setting="out")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise AaqError(f"cannot create {folder}: {existing} is a file; choose another folder ({{setting}})", setting="out")
    _check_writable(existing)
    if not folder.exists():
        return
    foreign = foreign_entries(folder)
    if foreign:
        raise AaqError(
            f"{folder} holds files aaq did not write ({_listing(foreign)}); aaq never replaces or deletes them: "
            f"choose an empty or new folder ({{setting}}), or move them away",
            setting="out",
        )
    marker = _read_marker(folder)
    if marker is None:
        return
    if marker["kind"] != kind and marker["kind"] not in joins and not overwrite:
        raise AaqError(f"{folder} is an aaq {marker['kind']} folder, not an aaq {kind} folder; choose another folder ({{setting}})", setting="out")
    if overwrite:
        removable(folder, marker)


def _check_writable(folder: Path) -> None:
    """AaqError unless this process can create files in the existing folder `folder` (tried with a temporary file, removed at once).

    A permission check alone would pass for root on read-only or virtual file systems (/proc, /sys).
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".aaq-probe.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as error:
        raise AaqError(
            f"cannot write in {folder}: creating a file there fails ({error.strerror}); it is read-only, a virtual file "
            "system, or not writable by this user; choose another folder ({setting})",
            setting="out",
        ) from None
    os.close(fd)
    os.unlink(name)


def prepare_output_folder(folder: str | Path, kind: FolderKind, joins: tuple[str, ...] = (), overwrite: bool = False) -> list[str]:
    """Make `folder` an aaq output folder of `kind`, after `check_output_folder`; returns what `overwrite` removed.

    Removes the temporary files a killed aaq command left there. With `overwrite`, removes every
    file and work folder aaq wrote there before (never other aaq outputs nested inside, never
    foreign files, which `check_output_folder` refuses), after checking that every such file is
    unchanged (`removable`); a file changed since is an error and nothing is removed.
    """
    folder = Path(folder)
    check_output_folder(folder, kind, joins, overwrite)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AaqError(f"cannot create {folder} ({error.strerror}); choose another folder ({{setting}})", setting="out") from None
    _remove_temporary_files(folder)
    marker = _read_marker(folder)
    removed = _remove_aaq_files(folder, marker) if overwrite and marker is not None else []
    if marker is None or overwrite:
        marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "folders": [], "files": {}}
    _write_marker(folder, marker)
    return removed


def removable(folder: str | Path, marker: dict[str, Any]) -> list[str]:
    """The entries the marker of `folder` lists that exist (folders end with `/`), each checked to be as aaq left it.

    AaqError naming the files that changed since aaq wrote them (edited, replaced by a folder) and
    the work folders that are no longer folders: aaq never deletes them, the user moves them away.
    """
    folder = Path(folder)
    files = [name for name in sorted(marker["files"]) if os.path.lexists(folder / name)]
    folders = [name for name in sorted(marker["folders"]) if os.path.lexists(folder / name)]
    changed = [name for name in files if not _unchanged(folder / name, marker["files"][name])]
    changed += [name for name in folders if not (folder / name).is_dir()]
    if changed:
        it = "them" if len(changed) > 1 else "it"
        raise AaqError(
            f"{_listing(changed)} in {folder} changed after aaq wrote {it}, so aaq will not delete {it}; "
            f"move {it} away (or delete {it} yourself) and run again"
        )
    return files + [name + "/" for name in folders]


def _unchanged(path: Path, recorded: dict[str, Any]) -> bool:
    """Whether `path` is a regular file with the size and sha256 aaq recorded."""
    return path.is_file() and path.stat().st_size == recorded["bytes"] and _file_record(path)["sha256"] == recorded["sha256"]


def _remove_aaq_files(folder: Path, marker: dict[str, Any]) -> list[str]:
    """Delete the files and work folders the marker lists, all checked first (`removable`); returns their names."""
    names = removable(folder, marker)
    for name in names:
        if name.endswith("/"):
            shutil.rmtree(folder / name)
        else:
            (folder / name).unlink()
    return names


def remove_file(path: str | Path) -> None:
    """Delete the file aaq wrote at `path` (if it is there) and drop it from its folder's marker."""
    path = Path(path)
    path.unlink(missing_ok=True)
    marker = _read_marker(path.parent)
    if marker is not None and marker["files"].pop(path.name, None) is not None:
        _write_marker(path.parent, marker)


def make_work_folder(folder: str | Path, name: str) -> Path:
    """The work subfolder `name` of the aaq folder `folder` (a run's teacher cache, say), listed in its marker first and then created.

    Outside an aaq folder (a temporary work folder) it is only created.
    """
    folder = Path(folder)
    marker = _read_marker(folder)
    if marker is not None and name not in marker["folders"]:
        marker["folders"] = sorted([*marker["folders"], name])
        _write_marker(folder, marker)
    (folder / name).mkdir(parents=True, exist_ok=True)
    return folder / name


def remove_work_folder(folder: str | Path, name: str) -> None:
    """Delete the work subfolder `name` of `folder`, then drop it from the folder's marker."""
    folder = Path(folder)
    if (folder / name).is_dir() and not (folder / name).is_symlink():
        shutil.rmtree(folder / name)
    marker = _read_marker(folder)
    if marker is not None and name in marker["folders"]:
        marker["folders"].remove(name)
        _write_marker(folder, marker)


def remove_aaq_folder(folder: str | Path) -> None:
    """Delete the aaq folder `folder` (its files and work folders, then the folder); AaqError if anything else is in it."""
    folder = Path(folder)
    check_output_folder(folder, kind=folder_kind(folder) or "run", overwrite=True)
    _remove_temporary_files(folder)
    marker = _read_marker(folder)
    if marker is not None:
        _remove_aaq_files(folder, marker)
        (folder / MARKER).unlink()
    try:
        folder.rmdir()
    except OSError:
        raise AaqError(f"{folder} still holds other aaq outputs ({_listing(sorted(p.name for p in folder.iterdir()))}); move them away and run again") from None


def _remove_temporary_files(folder: str | Path) -> None:
    """Delete aaq's temporary files and folders anywhere under `folder` (what a killed write leaves behind)."""
    freed, count = 0, 0
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if _is_temporary(d)]:
            freed += folder_bytes(Path(root) / name)
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            dirs.remove(name)
            count += 1
        for name in [f for f in files if _is_temporary(f)]:
            path = Path(root) / name
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
            count += 1
    if count:
        logger.info("removed %d temporary file(s) (%.1f MB) an interrupted aaq command left in %s", count, freed / 1e6, folder)


def _file_record(path: Path) -> dict[str, Any]:
    """What the marker keeps about a file: its size and sha256."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"bytes": path.stat().st_size, "sha256": digest}


def record_file(path: str | Path, content: str | Path | None = None) -> None:
    """List `path` in the marker of its folder (if the folder is aaq's), with the checksum of `content` (default: `path`).

    Writers call it with the temporary file that is about to become `path`, so the marker lists a
    file before it appears under its name.
    """
    path = Path(path)
    marker = _read_marker(path.parent)
    if marker is None:
        return
    marker["files"][path.name] = _file_record(Path(content or path))
    _write_marker(path.parent, marker)


def mark_folder(folder: str | Path, kind: FolderKind) -> None:
    """Make `folder`, which this process has just filled on its own (a staging folder), an aaq folder listing all its files."""
    folder = Path(folder)
    files = {entry.name: _file_record(entry) for entry in sorted(folder.iterdir()) if entry.is_file()}
    _write_marker(folder, {"format": MARKER_FORMAT, "version": MARKER_VERSION, "kind": kind, "folders": [], "files": files})


def _write_marker(folder: Path, marker: dict[str, Any]) -> None:
    try:
        replace_atomically(folder / MARKER, lambda tmp: tmp.write_text(json.dumps(marker, indent=1) + "\n"), record=False)
    except OSError as error:
        raise AaqError(f"cannot write to {folder} ({error.strerror}); free some space or choose another folder ({{setting}})", setting="out") from None


def publish(tmp: str | Path, path: str | Path, record: bool = True) -> None:
    """Move the finished temporary file `tmp` to `path` as an ordinary file, listed in the folder's marker first (with `record`)."""
    if record:
        record_file(path, tmp)
    os.chmod(tmp, FILE_MODE)  # mkstemp makes it owner-only; outputs are ordinary files
    os.replace(tmp, path)


def replace_atomically(path: str | Path, write: Callable[[Path], None], record: bool = True) -> None:
    """Call `write(tmp)` on a temporary file next to `path`, then `publish` it: a reader sees the old file or the complete new one.

    The one way aaq writes a file in place; on any failure the temporary file is removed and the error raised.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        publish(tmp, path, record)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_file(path: str | Path, remedy: str) -> None:
    """Raise AaqError when `path` differs from the file aaq recorded in its folder's marker (folders without one are not checked)."""
    path = Path(path)
    marker = _read_marker(path.parent)
    if marker is None:
        return
    recorded = marker["files"].get(path.name)
    if recorded is None:
        raise AaqError(f"{path} is not listed in {path.parent / MARKER}: aaq did not write it, so it cannot be trusted; {remedy}")
    if path.stat().st_size != recorded["bytes"] or _file_record(path)["sha256"] != recorded["sha256"]:
        raise AaqError(f"{path} changed after aaq wrote it (its checksum does not match {MARKER}): the file is corrupt; {remedy}")


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under `folder` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def check_free_space(folder: str | Path, planned: dict[str, int], already: int = 0) -> None:
    """Raise AaqError when the disk holding `folder` has less free space than the `planned` bytes (by what they are for).

    `already`: bytes of those files already on disk (a resumed run's teacher cache), not needed again.
    """
    needed = max(sum(planned.values()) - already, 0)
    free = shutil.disk_usage(_nearest_existing(Path(folder))).free
    if needed > free:
        parts = ", ".join(f"{what} {size / 1e6:.0f} MB" for what, size in planned.items() if size)
        raise AaqError(
            f"not enough free disk space for {folder}: {free / 1e6:.0f} MB free, about {needed / 1e6:.0f} MB needed ({parts}); "
            f"free some space or choose a folder on another disk ({{setting}})",
            setting="out",
        )
