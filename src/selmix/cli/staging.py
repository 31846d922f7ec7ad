"""A run's output folder that is never half-written: every file of a run goes to a staging
folder beside ``--out`` (``OUT.partial``, on the same filesystem) and is moved into ``--out``
only when the run is complete, so an earlier run there survives a bad input, a failure, a
Ctrl-C or a kill until the very end.

An interrupted run's files (its checkpoint, ``log.jsonl``) stay in the staging folder: the
run continues with ``--resume OUT.partial/finetune_state.pt`` and is moved into place when
it ends. ``--out`` holding an earlier run is replaced only with ``--overwrite`` (or
``--resume``, which continues a run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from selmix._io import HOSTNAME, process_is_alive
from selmix.cli.options import UsageError
from selmix.cli.run import RUN_FILES

#: The folders a run writes to ``--out`` (``hf``: ``--export hf``; ``hf.partial``: what a
#: killed export left there before exports were staged).
RUN_FOLDERS = ("hf", "hf.partial")
#: The checkpoints an interrupted run leaves in its staging folder, to resume from.
CHECKPOINTS = ("finetune_state.pt", "pretrain_state.pt")
#: In the staging folder: the host and process writing it (two runs never share one).
OWNER_FILE = ".selmix-owner"


def staging_path(out: str | os.PathLike) -> Path:
    """The staging folder of ``out``: ``OUT.partial`` beside it (the same filesystem, so the
    final move is a rename)."""
    out = Path(out)
    if out.name in ("", ".", ".."):  # --out . names no folder to put a sibling beside
        out = out.resolve()
    if not out.name:
        raise UsageError(f"`out` must be a folder below the file system's root, got {str(out)!r}")
    return out.with_name(out.name + ".partial")


def _owner(staging: Path) -> tuple[str, int] | None:
    try:
        host, _, pid = (staging / OWNER_FILE).read_text().strip().rpartition(".")
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _is_live(staging: Path, other_hosts: bool = True) -> bool:
    """Whether a live process writes ``staging``; one on another host sharing the folder
    cannot be checked and counts as live when ``other_hosts``."""
    owner = _owner(staging)
    if owner is None:
        return False
    host, pid = owner
    return other_hosts if host != HOSTNAME else process_is_alive(pid)


def earlier_run(out: Path) -> list[str]:
    """The names of an earlier run's files and folders in ``out`` (empty: none)."""
    names = (*RUN_FILES, *RUN_FOLDERS)
    return [name for name in names if (out / name).exists() or (out / name).is_symlink()]


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_out(
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    resume: str | os.PathLike | None = None,
    keep: Sequence[str | os.PathLike] = (),
    writer: bool = True,
) -> Path:
    """Checks that a run can be written to ``out`` and moved into place, touching nothing.

    Args:
        out: the ``--out`` folder.
        overwrite: whether an earlier run in ``out`` may be replaced (at the end of the run).
        resume: the checkpoint a resumed run continues from (an earlier run in ``out`` is
            then the run being continued).
        keep: files the run reads that may live in ``out`` (the starting model): never
            removed.
        writer: whether this process writes the staging folder (rank 0 under
            ``torchrun``; the other ranks would see rank 0's folder as another run's).

    Returns:
        ``out`` as a path.

    Raises:
        UsageError: ``out`` is a file, holds an earlier run (without ``overwrite``), has a
            folder where a run writes a file, cannot be written, or another run is writing
            its staging folder; the message names the setting to change.
    """
    out = Path(out)
    staging = staging_path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"`out` {str(out)!r} exists and is not a folder")
    if out.is_dir():
        for name in RUN_FILES:
            if (out / name).is_dir():
                raise UsageError(
                    f"`out` {str(out)!r} has a folder {name!r} where a run writes a file; move "
                    "it away or choose another --out"
                )
        for name in RUN_FOLDERS:
            if (out / name).exists() and not (out / name).is_dir():
                raise UsageError(
                    f"`out` {str(out)!r} has a file {name!r} where a run writes a folder; move "
                    "it away or choose another --out"
                )
        found = earlier_run(out)
        kept = {Path(path).resolve() for path in keep}
        found = [name for name in found if (out / name).resolve() not in kept]
        if found and not overwrite and resume is None:
            raise UsageError(
                f"`out` {str(out)!r} holds an earlier run ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}); pass --overwrite to replace it when "
                "this run ends, or choose another --out"
            )
        _check_replaceable(out, found)
    where = _nearest_existing(staging.parent)
    if not where.is_dir() or not _writable(where):
        raise UsageError(
            f"cannot write `out` {str(out)!r}: {str(where)!r} is not a writable folder"
        )
    if writer and staging.exists():
        resuming_here = resume is not None and Path(resume).resolve().parent == staging.resolve()
        # a resume names the folder itself: a job requeued on another node continues
        # the run its killed predecessor left there
        if _is_live(staging, other_hosts=not resuming_here):
            raise UsageError(
                f"another run is writing {str(staging)!r} (`out` {str(out)!r}); wait for it or "
                "choose another --out"
            )
        state = next((staging / name for name in CHECKPOINTS if (staging / name).is_file()), None)
        # without a checkpoint there is nothing to continue: the next run clears it
        if state is not None and not resuming_here and not overwrite:
            raise UsageError(
                f"{str(staging)!r} holds an interrupted run of `out` {str(out)!r}; continue it "
                f"with --resume {state}, or pass --overwrite to discard it"
            )
    return out


def _check_replaceable(out: Path, found: Iterable[str]) -> None:
    """The earlier run's entries can be removed at the end (a read-only ``hf/`` cannot)."""
    if not _writable(out):
        raise UsageError(f"`out` {str(out)!r} is read-only: the run cannot be moved into it")
    for name in found:
        folder = out / name
        if not folder.is_dir() or folder.is_symlink():
            continue
        for inner, _, _ in os.walk(folder):
            if not _writable(Path(inner)):
                raise UsageError(
                    f"`out` {str(out)!r} has a read-only folder {str(inner)!r} of an earlier "
                    "run, which this run would replace; make it writable (chmod -R u+w) or "
                    "choose another --out"
                )


class Staging:
    """The staging folder of one run: created (or, for a resume, continued) by
    :meth:`open`, moved into ``out`` by :meth:`commit`.

    Args:
        out: the ``--out`` folder.
        keep: files the run reads that may live in ``out`` (never removed).
        write: whether this process writes files (rank 0 under ``torchrun``).
    """

    def __init__(self, out: str | os.PathLike, keep: Sequence[str | os.PathLike] = (),
                 write: bool = True) -> None:  # fmt: skip
        self.out = Path(out)
        self.path = staging_path(self.out)
        self.keep = {Path(path).resolve() for path in keep}
        self.write = write

    def open(self, resume: str | os.PathLike | None = None, carry: Sequence[str] = ()) -> Path:
        """Makes the staging folder ready and returns it.

        A fresh run (``resume`` None) starts from an empty folder. A run resumed from a
        checkpoint in the staging folder continues there; one resumed from elsewhere (a
        checkpoint in ``out``) starts a staging folder with ``out``'s ``carry`` files (the
        log the resumed run extends).
        """
        if not self.write:
            return self.path
        continuing = (
            resume is not None and Path(resume).resolve().parent == self.path.resolve()
        )
        if not continuing:
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(
                error.errno, f"cannot create {str(self.path)!r} for `out`: {error.strerror}"
            ) from None
        (self.path / OWNER_FILE).write_text(f"{HOSTNAME}.{os.getpid()}\n")
        if not continuing:
            for name in carry:
                if (self.out / name).is_file():
                    shutil.copy2(self.out / name, self.path / name)
        return self.path

    def abandon(self, checkpoint: str | None = None) -> None:
        """After a failed or interrupted run: keeps the staging folder when it holds
        ``checkpoint`` (the run can be resumed from it), removes it otherwise."""
        if not self.write:
            return
        if checkpoint is not None and (self.path / checkpoint).is_file():
            with contextlib.suppress(OSError):
                (self.path / OWNER_FILE).unlink()
            return
        shutil.rmtree(self.path, ignore_errors=True)

    def drop(self, names: Iterable[str]) -> None:
        """Removes entries from the staging folder (a failed export's leftovers)."""
        for name in names:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()

    def commit(self) -> Path:
        """Moves the finished run into ``out``: the earlier run's files are replaced (or
        removed when this run has none of that name), other files in ``out`` stay.

        A new ``out`` is one rename; an existing one gets one rename per entry (each
        atomic, the whole within milliseconds), as its other files must stay.
        """
        if not self.write:
            return self.out
        with contextlib.suppress(OSError):
            (self.path / OWNER_FILE).unlink()
        if not self.out.exists():
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.path, self.out)  # one atomic step
            return self.out
        new = {entry.name for entry in self.path.iterdir()}
        for name in sorted(new):
            source, target = self.path / name, self.out / name
            if source.is_dir():
                old = self.out / f".{name}.replaced-{os.getpid()}"
                if target.exists():
                    os.rename(target, old)
                os.rename(source, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(source, target)
        for name in earlier_run(self.out):
            target = self.out / name
            if name in new or target.resolve() in self.keep:
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.rmdir(self.path)
        return self.out
