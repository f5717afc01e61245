"""Atomic file writes and hashing: a killed process never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp make 0600 files and 0700 folders; artifacts get the permissions any new
# file or folder of this user would get, so that another account (a Triton container, a web
# server) can read an export.
_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK
DIR_MODE = 0o777 & ~_UMASK


def _temp_file_beside(target: Path) -> Path:
    """Create an empty temporary file in `target`'s folder (made if missing), or fail clearly."""
    if target.is_dir():
        raise ToolkitError(f"cannot write {target}: it is a directory")
    if target.parent.exists() and not target.parent.is_dir():
        raise ToolkitError(f"cannot write to {target.parent}: it is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ToolkitError(f"cannot write to {target.parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.chmod(tmp_name, _FILE_MODE)
    return Path(tmp_name)


def check_writable(target: str | Path) -> Path:
    """Fail now, before long work, if `target` could not be written when the work is done."""
    target = Path(target)
    _temp_file_beside(target).unlink()
    return target


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    tmp = _temp_file_beside(target)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ToolkitError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def files_together(folder: str | Path) -> Iterator[Callable[[str], Path]]:
    """Yield `stage(name)`: a temporary path standing for `folder/name`. When the block succeeds
    every staged file replaces its target; when it fails none does, so a report is never half
    old and half new."""
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []

    def stage(name: str) -> Path:
        target = folder / name
        staged.append((_temp_file_beside(target), target))
        return staged[-1][0]

    try:
        yield stage
        for tmp, _ in staged:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
    except OSError as exc:
        raise ToolkitError(f"cannot write to {folder}: {exc.strerror or exc}") from exc
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_atomic(target: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(tmp_path)` and move the result to `target` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Write bytes atomically. Serialize to memory first, then write here: C++ writers (torch.save,
    torch.jit.save) report a full disk as an opaque RuntimeError, Python's write as an OSError."""
    return write_atomic(target, lambda tmp: tmp.write_bytes(data))


def write_json(target: str | Path, data: Any) -> Path:
    """Write `data` as pretty JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return write_atomic(target, lambda tmp: tmp.write_text(text))


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning every failure into a ToolkitError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ToolkitError(f"file not found: {path}") from exc
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5,000-digit number
        raise ToolkitError(f"cannot read {path} as JSON: {str(exc)[:200]}") from exc
    except RecursionError:  # nested deeper than the parser's stack
        raise ToolkitError(f"cannot read {path} as JSON: nested too deeply") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
