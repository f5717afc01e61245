"""Publishing an export: build it beside the target, prove parity there, and only then swap it
in. A failed export, a failed check or a kill at any moment loses nothing, and only a previous
toolkit export (or an empty folder) is ever replaced."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit.contract import serving_name
from toolkit.errors import ToolkitError
from toolkit.export import ExportOptions, export_checkpoint
from toolkit.fileio import DIR_MODE, write_json
from toolkit.manifest import MANIFEST, IntegrityError, check_artifact, read_manifest, unlisted_files
from toolkit.verify import DEFAULT_ATOL, DEFAULT_MAX_ACC_DROP, DEFAULT_RTOL, ParityReport, verify_export


def attach_parity(export_dir: str | Path, report: ParityReport) -> None:
    """Record the parity summary in the manifest."""
    path = Path(export_dir) / MANIFEST
    manifest = read_manifest(export_dir)
    manifest["parity"] = {
        "passed": report.passed, "atol": report.atol, "rtol": report.rtol,
        "reference_accuracy": report.reference_accuracy,
        "backends": {name: {"accuracy": r.accuracy, "max_abs_diff": r.max_abs_diff,
                            "top1_agreement": r.top1_agreement, "passed": r.passed}
                     for name, r in report.backends.items()},
    }
    write_json(path, manifest)


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
    options = dataclasses.replace(options, triton_name=options.triton_name or serving_name(out))
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
        attach_parity(stage, report)
    return manifest, report


@contextlib.contextmanager
def staged_directory(target: str | Path, keep_previous: str | Path | None = None) -> Iterator[Path]:
    """Build into a fresh sibling dir; swap it in for `target` only if the block succeeds.

    A symbolic link is followed: the folder it points to is replaced, the link stays. With
    `keep_previous` (a sibling path), the replaced folder is moved there, replacing what was
    kept before, instead of being deleted.
    """
    try:  # '.', '..' and links name the folder they stand for
        target = Path(target).resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise ToolkitError(f"cannot write to {target}: {exc}") from None
    _check_replaceable(target)
    if keep_previous is not None:
        _check_replaceable(Path(keep_previous))  # what was kept before is an export too, or nothing
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_stages(target)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
        os.chmod(stage, DIR_MODE)
    except OSError as exc:
        raise ToolkitError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    try:
        yield stage
        _check_replaceable(target)  # again: a person may have added a file while the export ran
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        if target.exists():
            os.replace(target, backup)
        os.replace(stage, target)
        if keep_previous is not None and backup.exists():
            shutil.rmtree(keep_previous, ignore_errors=True)
            os.replace(backup, keep_previous)
        shutil.rmtree(backup, ignore_errors=True)
    except OSError as exc:
        raise ToolkitError(f"cannot write export to {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_replaceable(target: Path) -> None:
    """Only a previous export or an empty folder may be replaced, so a mistyped `--out .` or
    `--out ~/Documents`, or a folder that merely holds a manifest.json, is refused instead of
    deleted. A previous export is a folder whose manifest parses as this toolkit's and lists
    every file in it: nothing a person added beside the artifacts is ever removed."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ToolkitError(f"{target} exists and is not a folder; choose another `out`")
    if not any(target.iterdir()):
        return
    try:
        manifest = read_manifest(target)
    except ToolkitError as exc:
        raise ToolkitError(f"{target} is a folder but not a toolkit export ({exc}); refusing to replace it, "
                           "choose a new or empty `out`") from None
    unlisted = unlisted_files(target, manifest)
    if unlisted:
        raise ToolkitError(f"{target} holds files its manifest does not list ({_some(unlisted)}); refusing to "
                           "replace it, move them away or choose another `out`")
    present = [name for name in manifest["artifacts"] if (target / name).exists()]
    changed = [name for name in present if not _as_listed(target, name, manifest)]
    if changed:
        raise ToolkitError(f"{target} holds files changed since it was exported ({_some(changed)}); refusing to "
                           "replace it, move them away or choose another `out`")


def _as_listed(export_dir: Path, name: str, manifest: dict[str, Any]) -> bool:
    try:
        check_artifact(export_dir, name, manifest)
    except IntegrityError:
        return False
    return True


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
