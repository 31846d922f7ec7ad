"""Atomic file writes: a reader (or a later run) sees the old file or the new one, never half.

Every output a run writes (checkpoints, ``model.pt``, ``metrics.json``, ``config.yaml``)
goes to a temporary file in the same folder, is flushed to disk, then renamed over the
target. A run killed mid-write leaves the previous file intact and a temporary file
behind; the next write to the same target removes such leftovers.

Files are created with the user's umask (``0o666 & ~umask``), like ``open(path, "w")``, so a
shared ``model.pt`` is as readable as any other file the user writes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "remove_stale_temporaries",
    "write_json",
    "write_yaml",
]

#: This machine's name as it goes into temporary and owner file names.
HOSTNAME = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"
# `.{target}.{host}.{pid}.{random}.tmp`, written by this module
_OURS = re.compile(r"^(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
# `.{target}.{8 characters}`, written by tempfile.mkstemp in selmix <= 0.1.0
_MKSTEMP = re.compile(r"^[A-Za-z0-9_]{8}$")


def _temporary_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.{HOSTNAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def process_is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Removes temporary files that killed writes to ``target`` left behind.

    A temporary file is stale when the process that wrote it, on this host, has exited
    (or it comes from selmix <= 0.1.0, whose names carry no process id). Files of live
    writers and of writers on other hosts sharing the folder are left alone.

    Args:
        target: the file whose leftovers to remove, e.g. ``out/finetune_state.pt``.

    Returns:
        The paths removed.
    """
    target = Path(target)
    prefix = f".{target.name}."
    removed: list[Path] = []
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for path in candidates:
        rest = path.name[len(prefix) :]
        ours = _OURS.match(rest)
        if ours:
            stale = ours["host"] == HOSTNAME and not process_is_alive(int(ours["pid"]))
        else:
            stale = bool(_MKSTEMP.match(rest))
        if stale and path.is_file():
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass  # someone else removed it, or the folder is read-only: not our concern
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, rename).

    Creates the parent folder if needed and first removes stale temporary files of
    ``path`` (see :func:`remove_stale_temporaries`).

    Raises:
        OSError: the write failed (disk full, read-only folder...); the message names
            ``path`` and the previous file at ``path``, if any, is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot create the folder {str(path.parent)!r}: {error.strerror}"
        ) from None
    remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    try:
        # 0o666 & ~umask, as open() would give; mkstemp would force 0o600
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.write(handle, view)
                view = view[written:]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        reason = error.strerror or str(error) or type(error).__name__
        raise OSError(error.errno, f"cannot write {str(path)!r}: {reason}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Writes ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    """Writes ``data`` as JSON (plus a final newline) to ``path`` atomically.

    The data is serialised before the file is touched, so data that is not JSON
    (a ``TypeError``) leaves the previous file unchanged.
    """
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    """Writes ``data`` as YAML (``yaml.safe_dump``, keys in insertion order) atomically."""

    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
