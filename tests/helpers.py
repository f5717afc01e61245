"""Shared test helpers: the CLI run in-process, and builders of the odd files the boundary
tests feed the toolkit (ONNX models with foreign signatures, exports with edited manifests)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolkit.core.fileio import sha256_file

FLOAT, UINT8, DOUBLE = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.DOUBLE


def cli_in_process(*args: Any) -> subprocess.CompletedProcess:
    """`toolkit ARGS` through the same `main()` as the command, inside the test process: no
    interpreter and torch start-up per call. Warnings are pytest's here, so a test of what a
    library warns on stderr runs the command as a subprocess (`run_cli`)."""
    from toolkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = ["toolkit", *map(str, args)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def foreign_onnx(
    path: Path,
    *,
    input_name: str = "image",
    input_type: int = FLOAT,
    input_shape: tuple[Any, ...] = ("N", 1, 28, 28),
    outputs: tuple[tuple[str, int, int], ...] = (("logits", 2, 10), ("probabilities", 2, 10)),
    output_type: int = FLOAT,
    class_names: list[str] | None = None,
    weight: float = 0.01,
) -> Path:
    """A working ONNX model with the given signature: outputs (name, rank 2 or 3, classes) are a
    linear map of the flattened input; `weight` NaN makes every output NaN."""
    features = int(np.prod([d for d in input_shape[1:]]))
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=FLOAT),
             helper.make_node("Flatten", ["xf"], ["flat"], axis=1)]
    initializers, graph_outputs = [], []
    for index, (name, rank, classes) in enumerate(outputs):
        weights = np.full((features, classes), weight, dtype=np.float32)
        weights[:, 0] += np.linspace(0, 1, features, dtype=np.float32) if np.isfinite(weight) else 0
        initializers.append(numpy_helper.from_array(weights, f"w{index}"))
        scores = f"scores{index}"
        nodes.append(helper.make_node("MatMul", ["flat", f"w{index}"], [scores]))
        if rank == 3:
            initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"axis{index}"))
            nodes.append(helper.make_node("Unsqueeze", [scores, f"axis{index}"], [f"shaped{index}"]))
            scores = f"shaped{index}"
        nodes.append(helper.make_node("Cast", [scores], [name], to=output_type))
        shape = ["N", classes] if rank == 2 else ["N", 1, classes]
        graph_outputs.append(helper.make_tensor_value_info(name, output_type, shape))
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", input_type, list(input_shape))],
                              graph_outputs, initializers)
    # The graph's input is renamed last so that every signature, even odd names, stays a valid graph.
    graph.input[0].name = input_name
    for node in graph.node:
        node.input[:] = [input_name if name == "x" else name for name in node.input]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if class_names is not None:
        helper.set_model_props(model, {"class_names": json.dumps(class_names), "dataset": json.dumps("mnist")})
    onnx.save_model(model, str(path))
    return path


def rewrite_manifest(export_dir: Path, edit: Any) -> None:
    """Replace the export's manifest with `edit(manifest)` (any JSON value), written as given."""
    path = export_dir / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def relist(export_dir: Path, *names: str) -> None:
    """Record the current size and sha256 of `names` in the export's manifest."""
    def update(manifest: dict[str, Any]) -> dict[str, Any]:
        for name in names:
            manifest["artifacts"][name] = {"bytes": (export_dir / name).stat().st_size,
                                           "sha256": sha256_file(export_dir / name)}
        return manifest
    rewrite_manifest(export_dir, update)
