"""`toolkit serve`'s options: the served name, found without loading a model, and an export that
cannot be served being one message whether one process serves it or several."""

import shutil

import pytest

from tests.conftest import run_cli
from toolkit.core.errors import ToolkitError
from toolkit.serving.launch import free_port
from toolkit.serving.options import ServeOptions


def test_the_served_name_is_known_without_loading_the_model(tmp_path):
    export = tmp_path / "my export"
    export.mkdir()
    (export / "model.onnx").write_bytes(b"not a model: served_name must not read it")
    assert ServeOptions().served_name(export) == "my_export"
    assert ServeOptions().served_name(export / "model.onnx") == "my_export"  # a bare .onnx: its folder's name
    assert ServeOptions(name="digits").served_name(export) == "digits"
    with pytest.raises(ToolkitError, match="no ONNX model at"):
        ServeOptions().served_name(tmp_path / "missing")


def test_a_tampered_export_is_the_same_one_line_with_workers(quick_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(quick_export, target)
    model = target / "model.onnx"
    model.write_bytes(model.read_bytes().replace(b"lenet", b"lenex", 1))
    alone = run_cli("serve", target, "--port", free_port(), "--provider", "cpu")
    pooled = run_cli("serve", target, "--port", free_port(), "--provider", "cpu", "--workers", "2")
    assert alone.returncode == pooled.returncode == 1 and "does not match the sha256" in alone.stderr
    assert pooled.stderr.strip() == alone.stderr.strip() and len(alone.stderr.strip().splitlines()) == 1, (
        alone.stderr, pooled.stderr)
