"""Publishing an export: build it beside the target, prove parity there, and only then swap it
in. A failed export, a failed check or a kill at any moment loses nothing, and only a previous
toolkit export (or an empty folder) is ever replaced."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.fileio import DIR_MODE
from toolkit.export.verify import DEFAULT_ATOL, DEFAULT_MAX_ACC_DROP, DEFAULT_RTOL, ParityReport, verify_export
from toolkit.export.writers import ExportOptions, export_checkpoint


def export_verified(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions,
    *,
    verify: bool = True,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
    on_exported: Callable[[dict[str, Any]], None] | None = None,
    on_verified: Callable[[ParityReport], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], ParityReport | None]:
    """Export `checkpoint` beside `out`, prove parity there, and only then replace `out`.

    Returns the manifest and the parity report (None with verify=False). A failed check raises a
    `ParityError` (its subclass says what failed, `.report` has the figures) and replaces nothing.
    `on_exported(manifest)` and `on_verified(report)` let a caller show each stage as it ends;
    `progress(backend)` names the backend being checked.
    """
    options.validate()
    # Named after `out`, not the staging dir it is written in.
    options = dataclasses.replace(options, triton_name=options.triton_name or Export(out).served_name)
    with staged_directory(out) as stage:
        manifest = export_checkpoint(checkpoint, stage, options)
        if on_exported is not None:
            on_exported(manifest)
        if not verify:
            return manifest, None
        report = verify_export(stage, data_dir=options.data_dir, atol=atol, rtol=rtol,
                               max_acc_drop=max_acc_drop, progress=progress)
        if on_verified is not None:
            on_verified(report)
        report.raise_for_failure(f"parity check failed, nothing was replaced in {out} (--no-verify, or "
                                 "verify=False, keeps the artifacts anyway)")
    return manifest, report


@contextlib.contextmanager
def staged_directory(target: str | Path, keep_previous: str | Path | None = None) -> Iterator[Path]:
    """Build into a fresh sibling dir; swap it in for `target` only if the block succeeds.

    A symbolic link is followed: the folder it points to is replaced, the link stays. With
    `keep_previous` (a sibling path), the replaced folder is moved there, replacing what was
    kept before, instead of being deleted. The swap waits for `target`'s lock (see `replacing`).
    """
    with staging_beside(target, keep_previous) as (target, stage):
        yield stage
        with replacing(target, wait=True):
            swap_in(stage, target, keep_previous)


@contextlib.contextmanager
def staging_beside(target: str | Path, keep_previous: str | Path | None = None, *,
                   named_by: str | None = "out") -> Iterator[tuple[Path, Path]]:
    """(target resolved, a fresh sibling dir to build in), once `target` and `keep_previous`
    are known to be replaceable; the dir is removed on the way out unless `swap_in` moved it in.
    `named_by` is the setting that named `target`, for the messages."""
    try:  # '.', '..' and links name the folder they stand for
        target = Path(target).resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise ToolkitError(f"cannot write to {target}: {exc}") from None
    _check_replaceable(target, named_by)
    if keep_previous is not None:
        _check_replaceable(Path(keep_previous), None)  # what was kept before is an export too, or nothing
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stages(target)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
        os.chmod(stage, DIR_MODE)
    except OSError as exc:
        raise ToolkitError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    try:
        yield target, stage
    except OSError as exc:
        raise ToolkitError(f"cannot write export to {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def swap_in(stage: Path, target: Path, keep_previous: str | Path | None = None, *,
            named_by: str | None = "out") -> None:
    """Replace `target` with `stage` by two renames; the replaced folder goes to `keep_previous`,
    or is deleted. The caller holds `replacing(target)`."""
    _check_replaceable(target, named_by)  # again: a person may have added a file while the work ran
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, backup)
    os.replace(stage, target)
    if keep_previous is not None and backup.exists():
        shutil.rmtree(keep_previous, ignore_errors=True)
        os.replace(backup, keep_previous)
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def replacing(target: Path, *, wait: bool, required: bool = True) -> Iterator[None]:
    """Hold the lock that replacing the export at `target` takes (`.NAME.lock` beside it).

    `export --out` takes it for its swap and waits for it; `promote` and `rollback` hold it for
    all their work (scoring included) and refuse when it is taken, so no export is swapped in
    while a promotion compares against or replaces the one there. The lock file is removed on
    the way out (while still held); a waiter that then finds it gone takes a new one. With
    `required=False`, a folder whose parent this user cannot write to is used unlocked: no
    process of this user can replace it either (a read-only model store).
    """
    lock = target.with_name(f".{target.name}.lock")
    while True:
        try:
            handle = open(lock, "a")  # noqa: SIM115  (held for the block)
        except OSError as exc:
            if required or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ToolkitError(f"cannot lock {target}: {exc.strerror or exc}") from None
            handle = None
        if handle is None:
            yield
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise ToolkitError(f"{target} is being replaced by another export, promotion or rollback; try "
                                   "again when it is done") from None
            if _still_at(handle, lock):
                try:
                    yield
                finally:
                    lock.unlink(missing_ok=True)
                return


def _still_at(handle: IO[str], path: Path) -> bool:
    """Whether the open file is still the one at `path` (not removed by the holder before us)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _check_replaceable(target: Path, named_by: str | None = "out") -> None:
    """Only a previous export or an empty folder may be replaced, so a mistyped `--out .` or
    `--out ~/Documents`, or a folder that merely holds a manifest.json, is refused instead of
    deleted. A previous export is a folder whose manifest parses as this toolkit's and lists
    every file in it: nothing a person added beside the artifacts is ever removed. The
    messages name the setting `named_by` that chose `target` (None: no setting did)."""
    if not target.exists():
        return
    other = f"choose another `{named_by}`" if named_by else "move it away"
    if not target.is_dir():
        raise ToolkitError(f"{target} exists and is not a folder; {other}")
    if not any(target.iterdir()):
        return
    export = Export(target)
    try:
        manifest = export.manifest()
    except ToolkitError as exc:
        raise ToolkitError(f"{target} is a folder but not a toolkit export ({exc}); refusing to replace it, "
                           f"{other}") from None
    them_away = "move them away" + (f" or choose another `{named_by}`" if named_by else "")
    integrity = export.integrity(manifest)
    unlisted = integrity.unlisted
    if unlisted:
        raise ToolkitError(f"{target} holds files its manifest does not list ({_some(unlisted)}); refusing to "
                           f"replace it, {them_away}")
    changed = integrity.changed
    if changed:
        raise ToolkitError(f"{target} holds files changed since it was exported ({_some(changed)}); refusing to "
                           f"replace it, {them_away}")


def _some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _remove_abandoned_stages(target: Path) -> None:
    """Staging dirs left by a killed export (their process is gone) are debris, not data."""
    for stage in target.parent.glob(f".{target.name}.staging-*"):
        pid = stage.name.removeprefix(f".{target.name}.staging-").split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; another user owns it
    return True
