"""An export folder as one object: where its files are, its manifest, the proof that its files
are the ones written, its parity status and the name it is served under. No torch import.

Every stage that takes an export (serve, verify, promote, evaluate, bench) takes an `Export`;
only this module turns a folder into file names or decides whether the files are intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.contract import serving_name
from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import files_together, read_json, sha256_file, write_json
from toolkit.core.formats import FORMATS
from toolkit.core.manifest import (
    FORMAT,
    MANIFEST,
    PARITY,
    PARITY_VERSION,
    VERSION,
    IntegrityError,
    check_manifest,
    external_data_files,
)

ONNX = FORMATS["onnx"].artifact  # the served model
REFERENCE = "model.pt"  # the PyTorch checkpoint every export carries: parity's reference
VERIFIED = "verified against its manifest"
NOT_CHECKED = "not checked (skipped on request)"


@dataclass(frozen=True)
class Integrity:
    """What the proof of a whole export found."""

    problems: dict[str, str]  # file -> what is wrong: listed files first, then files not listed
    changed: list[str]  # listed files that are there but not as listed
    unlisted: list[str]  # files the manifest does not list


class Export:
    """The export folder at `path` (a toolkit export only if its manifest says so)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"Export({str(self.path)!r})"

    @classmethod
    def holding(cls, file: Path) -> Export | None:
        """The export `file` is part of: its folder, when a manifest.json (even a broken one) sits
        beside it, since then the file must be proven; otherwise None."""
        manifest = file.parent / MANIFEST
        return cls(file.parent) if manifest.exists() or manifest.is_symlink() else None

    # Layout: every file name comes from the format table or the constants above.
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def parity_path(self) -> Path:
        return self.path / PARITY

    @property
    def onnx(self) -> Path:
        return self.path / ONNX

    @property
    def reference(self) -> Path:
        return self.path / REFERENCE

    def artifact(self, fmt: str) -> Path:
        """Where the export keeps the artifact of format `fmt` (a name of `formats.FORMATS`)."""
        return self.path / FORMATS[fmt].artifact

    @property
    def served_name(self) -> str:
        return serving_name(self.path)

    # The manifest.
    def manifest(self) -> dict[str, Any]:
        """The export's manifest, checked: a JSON object with this toolkit's format marker and
        version, and an artifact table of safe relative names with sizes and sha256s."""
        path = self.manifest_path
        if not path.exists():
            raise IntegrityError(f"{self.path} has no {MANIFEST}")
        if not path.is_file():
            raise IntegrityError(f"{path} is not a file")
        return check_manifest(path, read_json(path))

    def manifest_if_readable(self) -> dict[str, Any]:
        try:
            return self.manifest()
        except ToolkitError:
            return {}

    def create_manifest(self, **fields: Any) -> dict[str, Any]:
        """List every file now in the folder (size and sha256) and write the manifest, with
        `fields` and no parity yet; return it."""
        manifest = {"format": FORMAT, "manifest_version": VERSION, **fields, "artifacts": {
            name: {"bytes": (self.path / name).stat().st_size, "sha256": sha256_file(self.path / name)}
            for name in files_in(self.path) if name not in (MANIFEST, PARITY) and not name.endswith("/")},
            "parity": None}
        write_json(self.manifest_path, manifest)
        return manifest

    def record_parity(self, report: dict[str, Any], summary: dict[str, Any]) -> None:
        """Write parity.json (`report`, as `ParityReport.to_json` makes it) and, with it, the
        manifest's parity summary carrying that file's sha256: the verdict gates read is the
        report's (`parity_problem`). Both files are replaced together or not at all."""
        manifest = self.manifest()
        with files_together(self.path) as stage:
            staged = write_json(stage(PARITY), report)
            manifest["parity"] = {"report_sha256": sha256_file(staged), **summary}
            write_json(stage(MANIFEST), manifest)

    # Integrity.
    def check(self, name: str, manifest: dict[str, Any]) -> None:
        """The file `name` exists as listed: a regular file with the listed sha256, and for an ONNX
        model, every external-data file it reads too."""
        entry = manifest["artifacts"].get(name)
        if entry is None:
            raise IntegrityError(f"{self.path}/{MANIFEST} does not list {name}")
        path = self.path / name
        if path.is_symlink() or not path.is_file():
            raise IntegrityError(f"{path} is listed in {MANIFEST} but is missing or not a regular file")
        if sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{path} does not match the sha256 in {MANIFEST} (changed after export?)")
        if name.endswith(".onnx"):
            folder = posixpath.dirname(name)
            for location in external_data_files(path):
                self.check(posixpath.normpath(posixpath.join(folder, location)), manifest)

    def integrity(self, manifest: dict[str, Any]) -> Integrity:
        """The proof of the whole export: every listed file as listed (`check`), and no file the
        manifest does not list (the manifest and parity report aside)."""
        problems, changed = {}, []
        for name in manifest["artifacts"]:
            try:
                self.check(name, manifest)
            except IntegrityError as exc:
                problems[name] = str(exc)
                if (self.path / name).exists():
                    changed.append(name)
        listed = set(manifest["artifacts"]) | {MANIFEST, PARITY}
        unlisted = [name for name in files_in(self.path) if name not in listed]
        problems |= {name: f"not listed in {MANIFEST} (added after export?)" for name in unlisted}
        return Integrity(problems, changed, unlisted)

    def prove(self, name: str, action: str) -> dict[str, Any]:
        """The manifest, once it proves the file `name`; otherwise one line saying what is missing
        and the way past the check."""
        try:
            manifest = self.manifest()
            self.check(name, manifest)
        except IntegrityError as exc:
            raise IntegrityError(f"refusing to {action} {self.path / name}: {exc}; re-export it, or pass "
                                 "`skip_integrity_check` if you trust it") from None
        return manifest

    # Parity.
    def parity_problem(self, manifest: dict[str, Any]) -> str | None:
        """Why the export's parity is not proven, or None (it reads after "its parity ...").

        The verdict is parity.json's, never the manifest's summary: the summary names parity.json
        by its sha256, and parity.json names every artifact it checked by theirs, which must be
        exactly the manifest's artifacts. With the artifacts checked against the manifest
        (`check`), an edited verdict, a report borrowed from another export and one older than
        the artifacts are each caught; only rewriting the report, every hash and the manifest
        together is not.
        """
        summary = manifest.get("parity")
        if not isinstance(summary, dict) or not summary:
            return "was not verified"
        path = self.parity_path
        if not (path.exists() or path.is_symlink()):
            return f"was not verified (no {PARITY})"
        recorded = summary.get("report_sha256")
        if not isinstance(recorded, str):
            return f"was recorded by an older toolkit, whose {MANIFEST} does not hold the sha256 of {PARITY}"
        if path.is_symlink() or not path.is_file():
            return f"report {PARITY} is not a regular file"
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f"report {PARITY} cannot be read ({exc.strerror or exc})"
        if hashlib.sha256(data).hexdigest() != recorded:
            return f"report {PARITY} does not match the sha256 in {MANIFEST} (edited after the check?)"
        try:
            report = json.loads(data)
        except (ValueError, RecursionError):
            return f"report {PARITY} is not valid JSON"
        if not isinstance(report, dict) or report.get("parity_version") != PARITY_VERSION:
            version = report.get("parity_version") if isinstance(report, dict) else None
            return f"report {PARITY} has version {version!r}; this toolkit reads {PARITY_VERSION}"
        if report.get("artifacts") != {name: entry["sha256"] for name, entry in manifest["artifacts"].items()}:
            return f"report {PARITY} checked other files than {MANIFEST} lists (changed after the check?)"
        backends = report.get("backends")
        if (report.get("passed") is not True or report.get("integrity") or not isinstance(backends, dict)
                or not backends or not all(isinstance(r, dict) and r.get("passed") is True for r in backends.values())):
            return f"check failed (see {PARITY})"
        return None

    @staticmethod
    def parity_label(manifest: dict[str, Any]) -> str | None:
        """What the model card says of parity: "passed", "FAILED", or None when never checked."""
        parity = manifest.get("parity") or {}
        return None if not parity else ("passed" if parity.get("passed") else "FAILED")


def files_in(folder: Path) -> list[str]:
    """Every entry under `folder` as a POSIX relative name: files, links, FIFOs..., and empty
    folders (with a trailing '/'); symbolic links to folders are not followed. A folder that
    cannot be read is an error, not a folder without files."""
    def unreadable(exc: OSError) -> None:
        raise ToolkitError(f"cannot read {exc.filename}: {exc.strerror or exc}")

    found = []
    try:
        for root, dirs, files in os.walk(folder, onerror=unreadable):
            links = [d for d in dirs if (Path(root) / d).is_symlink()]
            dirs[:] = [d for d in dirs if d not in links]
            found += [(Path(root) / name).relative_to(folder).as_posix() for name in files + links]
            if not dirs and not files and not links and Path(root) != folder:
                found.append(Path(root).relative_to(folder).as_posix() + "/")
    except OSError as exc:  # a name too long for the system, a loop of links
        raise ToolkitError(f"cannot read {folder}: {exc.strerror or exc}") from exc
    return sorted(found)
