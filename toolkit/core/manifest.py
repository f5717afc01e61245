"""The export manifest as a document: its names, its schema, and the files an ONNX model reads.

`manifest.json` lists every file of an export with its size and sha256. It is the one thing that
makes a folder a toolkit export: only a folder whose manifest parses as this toolkit's and
lists every file in it may be replaced by a new export, and a model is served only when its
bytes (and those of its ONNX external data) match the manifest. The folder it describes, and the
proofs made against it, are `toolkit.core.export_dir.Export`'s.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from toolkit.core.errors import ToolkitError

MANIFEST = "manifest.json"
PARITY = "parity.json"
# Of parity.json. 2: it lists the sha256 of every artifact it checked, and the manifest's parity
# summary carries its own sha256 (`Export.parity_problem`).
PARITY_VERSION = 2
FORMAT = "toolkit-export"
VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


class IntegrityError(ToolkitError):
    """An export's files cannot be proven to be the ones its manifest lists."""


def check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """`manifest`, read from `path`, once it is a JSON object with this toolkit's format marker
    and version, and an artifact table of safe relative names with sizes and sha256s."""
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
