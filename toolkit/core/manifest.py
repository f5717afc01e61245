"""The export manifest: what an export dir holds, and the proof that its files are the ones written.

`manifest.json` lists every file of an export with its size and sha256. It is the one thing that
makes a folder a toolkit export: only a folder whose manifest parses as this toolkit's and
lists every file in it may be replaced by a new export, and a model is served only when its
bytes (and those of its ONNX external data) match the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Any

from toolkit.core.errors import ToolkitError
from toolkit.core.fileio import read_json, sha256_file

MANIFEST = "manifest.json"
PARITY = "parity.json"
# Of parity.json. 2: it lists the sha256 of every artifact it checked, and the manifest's parity
# summary carries its own sha256 (`parity_problem`).
PARITY_VERSION = 2
FORMAT = "toolkit-export"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(ToolkitError):
    """An export's files cannot be proven to be the ones its manifest lists."""


def read_manifest(export_dir: str | Path) -> dict[str, Any]:
    """The export's manifest, checked: a JSON object with this toolkit's format marker and
    version, and an artifact table of safe relative names with sizes and sha256s."""
    path = Path(export_dir) / MANIFEST
    if not path.exists():
        raise IntegrityError(f"{export_dir} has no {MANIFEST}")
    if not path.is_file():
        raise IntegrityError(f"{path} is not a file")
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} is not a toolkit export manifest (a JSON {type(manifest).__name__}, "
                             "not an object)")
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not a toolkit export manifest (no '{FORMAT}' format marker)")
    version = manifest.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise IntegrityError(f"{path} has manifest version {version!r}; this toolkit reads 1..{VERSION}")
    artifacts = manifest.get("artifacts")
    if not isinstance(artifacts, dict):
        raise IntegrityError(f"{path} has no artifact table")
    for name, entry in artifacts.items():
        _check_entry(path, name, entry)
    return manifest


def _check_entry(path: Path, name: Any, entry: Any) -> None:
    """An artifact entry must name a file inside the export and carry its size and sha256."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or name.startswith("/") or "\\" in name or ".." in parts or ":" in name or name in (MANIFEST, PARITY):
        raise IntegrityError(f"{path} lists an artifact outside the export dir or not a file: {name!r}")
    if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
            or not _SHA256.fullmatch(entry["sha256"])):
        raise IntegrityError(f"{path} has no sha256 for {name}")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise IntegrityError(f"{path} has no size for {name}")


def files_in(export_dir: Path) -> list[str]:
    """Every entry under `export_dir` as a POSIX relative name: files, links, FIFOs..., and empty
    folders (with a trailing '/'); symbolic links to folders are not followed. A folder that
    cannot be read is an error, not a folder without files."""
    def unreadable(exc: OSError) -> None:
        raise ToolkitError(f"cannot read {exc.filename}: {exc.strerror or exc}")

    found = []
    try:
        for root, dirs, files in os.walk(export_dir, onerror=unreadable):
            links = [d for d in dirs if (Path(root) / d).is_symlink()]
            dirs[:] = [d for d in dirs if d not in links]
            found += [(Path(root) / name).relative_to(export_dir).as_posix() for name in files + links]
            if not dirs and not files and not links and Path(root) != export_dir:
                found.append(Path(root).relative_to(export_dir).as_posix() + "/")
    except OSError as exc:  # a name too long for the system, a loop of links
        raise ToolkitError(f"cannot read {export_dir}: {exc.strerror or exc}") from exc
    return sorted(found)


def unlisted_files(export_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files in the export that its manifest does not list (the manifest and parity report aside)."""
    listed = set(manifest["artifacts"]) | {MANIFEST, PARITY}
    return [name for name in files_in(export_dir) if name not in listed]


def check_artifact(export_dir: Path, name: str, manifest: dict[str, Any]) -> None:
    """The file `name` exists as listed: a regular file with the listed sha256, and for an ONNX
    model, every external-data file it reads too."""
    entry = manifest["artifacts"].get(name)
    if entry is None:
        raise IntegrityError(f"{export_dir}/{MANIFEST} does not list {name}")
    path = export_dir / name
    if path.is_symlink() or not path.is_file():
        raise IntegrityError(f"{path} is listed in {MANIFEST} but is missing or not a regular file")
    if sha256_file(path) != entry["sha256"]:
        raise IntegrityError(f"{path} does not match the sha256 in {MANIFEST} (changed after export?)")
    if name.endswith(".onnx"):
        folder = posixpath.dirname(name)
        for location in external_data_files(path):
            check_artifact(export_dir, posixpath.normpath(posixpath.join(folder, location)), manifest)


def part_of_export(path: Path) -> bool:
    """Whether `path` sits beside a manifest.json (even a broken one): then it must be proven."""
    manifest = path.parent / MANIFEST
    return manifest.exists() or manifest.is_symlink()


def prove(path: Path, action: str) -> dict[str, Any]:
    """The manifest of the export `path` belongs to, once it proves `path`; otherwise one line
    saying what is missing and the way past the check."""
    try:
        manifest = read_manifest(path.parent)
        check_artifact(path.parent, path.name, manifest)
    except IntegrityError as exc:
        raise IntegrityError(f"refusing to {action} {path}: {exc}; re-export it, or pass `skip_integrity_check` "
                             "if you trust it") from None
    return manifest


def parity_problem(export_dir: Path, manifest: dict[str, Any]) -> str | None:
    """Why the export's parity is not proven, or None (it reads after "its parity ...").

    The verdict is parity.json's, never the manifest's summary: the summary names parity.json by
    its sha256, and parity.json names every artifact it checked by theirs, which must be exactly
    the manifest's artifacts. With the artifacts checked against the manifest (`check_artifact`),
    an edited verdict, a report borrowed from another export and one older than the artifacts
    are each caught; only rewriting the report, every hash and the manifest together is not.
    """
    summary = manifest.get("parity")
    if not isinstance(summary, dict) or not summary:
        return "was not verified"
    path = export_dir / PARITY
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
    if (report.get("passed") is not True or report.get("integrity") or not isinstance(backends, dict) or not backends
            or not all(isinstance(r, dict) and r.get("passed") is True for r in backends.values())):
        return f"check failed (see {PARITY})"
    return None


def external_data_files(model_path: Path) -> list[str]:
    """The files an ONNX model keeps tensors in (its external data), relative to its folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ToolkitError(f"{model_path} is not a valid ONNX model ({type(exc).__name__})") from exc
    locations = {ExternalDataInfo(tensor).location for tensor in _tensors(model.graph) if uses_external_data(tensor)}
    odd = [location for location in locations if "\\" in location]
    if odd:  # onnxruntime opens the name as written, which no manifest entry can name
        raise IntegrityError(f"{model_path} keeps tensors in {odd[0]!r}: a name with a backslash")
    return sorted(locations)


def _tensors(graph: Any) -> list[Any]:
    """Initializers and tensor-valued attributes of a graph and its subgraphs."""
    tensors = list(graph.initializer) + [sparse.values for sparse in graph.sparse_initializer]
    for node in graph.node:
        for attribute in node.attribute:
            tensors += ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                tensors += _tensors(subgraph)
    return tensors
