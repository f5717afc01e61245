"""Every user-facing error of every command: non-zero exit, one clear line on stderr, no traceback."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from toolkit.app import EXAMPLES_DIR
from toolkit.bench import example_label


@pytest.fixture(scope="module")
def bad(tmp_path_factory, export_dir):
    """A folder of broken inputs of every kind, named by what is wrong with them."""
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.pt").write_bytes((export_dir / "model.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "not-an-image.png").write_text("hello")
    (root / "empty-dir").mkdir()
    no_manifest = root / "no-manifest"
    shutil.copytree(export_dir, no_manifest)
    (no_manifest / "manifest.json").unlink()
    (root / "corrupt.onnx").write_bytes(b"\x08\x01garbage")
    return root


CASES = [
    # (command line, with {bad} and {export} placeholders; what stderr must say; exit code)
    ("train resnet9000", "unknown model 'resnet9000'; known models:", 1),
    ("train lenet --epochs 0", "--epochs must be positive", 1),
    ("train lenet --batch-size -4", "--batch-size must be positive", 1),
    ("train lenet --lr 0", "--lr must be positive", 1),
    ("train lenet --epochs abc", "Invalid value for '--epochs'", 2),
    ("train lenet --optimizer rmsprop", "Invalid value for '--optimizer'", 2),
    ("train lenet --dataset cifar", "unknown dataset 'cifar'", 1),
    ("train lenet --data-dir /nonexistent/mnist", "not found under /nonexistent/mnist", 1),
    ("train lenet --data-dir {bad}/corrupt.pt", "is not a directory", 1),
    ("train lenet --resume /nonexistent/run", "checkpoint not found", 1),
    ("train lenet --resume {bad}/corrupt.pt", "corrupt or truncated", 1),
    ("train lenet --resume {bad}/foreign.pt", "not a toolkit checkpoint", 1),
    ("train lenet --resume {export}/model.pt", "no training state to resume from", 1),
    ("train lenet --device cuda --limit-train 10", "no CUDA GPU is usable", 1),
    ("export /nonexistent.pt --out {bad}/out", "checkpoint not found", 1),
    ("export {bad}/corrupt.pt --out {bad}/out", "not a readable PyTorch checkpoint", 1),
    ("export {bad}/not-an-image.png --out {bad}/out", "not a readable PyTorch checkpoint", 1),
    ("export {export}/model.onnx --out {bad}/out", "is an ONNX model, not a training checkpoint", 1),
    ("export {export}/model.ts --out {bad}/out", "is a TorchScript program, not a training checkpoint", 1),
    ("inspect {export}/model.pt2", "is a torch.export program, not a training checkpoint", 1),
    ("export {export}/model.pt --opset 7 --out {bad}/out", "unsupported --opset 7", 1),
    ("export {export}/model.pt --quantize int4 --out {bad}/out", "unsupported --quantize 'int4'", 1),
    ("export {export}/model.pt --format pdf", "Invalid value for '--format'", 2),
    ("export {export}/model.pt --out {bad}/not-an-image.png", "exists and is not a folder", 1),
    ("export --runs-dir {bad}/empty-dir", "no checkpoint found under", 1),
    ("verify {bad}/missing", "export dir not found", 1),
    ("verify {bad}/no-manifest", "has no manifest.json", 1),
    ("predict {bad}/not-an-image.png --model {bad}/missing", "no ONNX model at", 1),
    ("predict {bad}/not-an-image.png --model {bad}/corrupt.onnx", "is not a valid ONNX model", 1),
    ("predict {bad}/not-an-image.png --model {export}/model.pt", "is a PyTorch file, not an ONNX model", 1),
    ("verify {export} --atol -1", "Invalid value for '--atol'", 2),
    ("predict {bad}/not-an-image.png --model {export} --provider cuda", "CUDA is not usable", 1),
    ("predict {bad}/not-an-image.png --model {export} --top-k 0", "Invalid value for '--top-k'", 2),
    ("predict {bad}/not-an-image.png --model {export} --threads 0", "Invalid value for '--threads'", 2),
    ("demo {bad}/empty-dir", "no ONNX model at", 1),
    ("demo {export} --port 70000", "Invalid value for '--port'", 2),
    ("evaluate {bad}/foreign.pt", "not a toolkit checkpoint", 1),
    ("evaluate {export} --dataset cifar", "unknown dataset 'cifar'", 1),
    ("inspect resnet9000", "neither a checkpoint file nor a model name", 1),
    ("inspect {bad}/empty-dir", "is a folder with no checkpoint in it", 1),
    ("compare mlp nope", "unknown model 'nope'", 1),
    ("compare mlp tinycnn mlp", "named more than once: mlp", 1),
    ("compare mlp tinycnn --epochs 0", "--epochs must be positive", 1),
    ("train lenet --optimizer sgd --momentum 5", "--momentum must be in [0, 1)", 1),
    ("train lenet --momentum 0.5", "--momentum applies to --optimizer sgd only", 1),
    ("train lenet --name ../elsewhere", "--name must be a plain folder name", 1),
    ("train lenet --runs-dir {bad} --name no-manifest", "already exists; pass another --name or --resume", 1),
    ("train lenet --runs-dir {bad} --name not-an-image.png", "already exists; pass another --name or --resume", 1),
    ("bench infer {bad}/empty-dir", "is not an export dir", 1),
    ("bench infer {export} --batch-sizes 0", "batch sizes must be positive", 1),
    ("bench infer {export} --rounds 0", "rounds must be at least 1", 1),
    ("bench serve {export} --clients 0", "--clients and --requests must be positive", 1),
    ("bench infer {export} --seconds -1", "--seconds must be positive", 1),
    ("bench infer {export} --json {bad}", "it is a directory", 1),
    ("bench train --json {bad}/not-an-image.png/out.json", "cannot write to", 1),
    ("bench train --notebook-batches 0", "--notebook-batches must be positive", 1),
    ("bench train --target 99", "--target is a test accuracy between 0 and 1", 1),
    ("bench serve {export} --malformed-every -1", "Invalid value for '--malformed-every'", 2),
    ("frobnicate", "No such command 'frobnicate'", 2),
]


@pytest.mark.parametrize(("command", "message", "code"), CASES, ids=[c[0].split(" {")[0] for c in CASES])
def test_user_errors_are_one_clear_line(bad, export_dir, command, message, code):
    args = [part.format(bad=bad, export=export_dir) for part in command.split()]
    result = run_cli(*args)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_predict_reports_unreadable_files_without_stopping(bad, export_dir):
    good = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    result = run_cli("predict", bad / "not-an-image.png", good, "--model", export_dir, "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert "error" in rows[0] and rows[1]["label"] == example_label(good)


def test_predict_takes_folders_of_images(tmp_path, export_dir):
    examples = sorted(EXAMPLES_DIR.glob("*.png"))
    (tmp_path / "scans" / "more").mkdir(parents=True)
    for index, path in enumerate(examples):
        shutil.copy(path, tmp_path / "scans" / ("more" if index % 2 else ".") / path.name)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    result = run_cli("predict", tmp_path / "scans", tmp_path / "empty", "--model", export_dir, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [Path(r["file"]).name for r in rows[:-1]] == [p.name for p in sorted(
        (tmp_path / "scans").rglob("*.png"))]
    assert sum(r["label"] == example_label(Path(r["file"])) for r in rows[:-1]) >= 0.8 * len(examples)
    assert rows[-1] == {"file": str(tmp_path / "empty"), "error": "no image files in this folder"}


def test_export_never_replaces_a_folder_it_did_not_write(bad, export_dir):
    before = sorted(p.relative_to(bad) for p in bad.rglob("*"))
    result = run_cli("export", export_dir / "model.pt", "--out", bad)
    assert result.returncode == 1
    assert "not a toolkit export (no manifest.json); refusing to replace it" in result.stderr
    assert sorted(p.relative_to(bad) for p in bad.rglob("*")) == before
    assert not list(bad.parent.glob(f".{bad.name}.*"))


@pytest.mark.parametrize("command", ["compare mlp tinycnn mlp", "train lenet --name ../elsewhere"])
def test_an_error_before_training_prints_nothing_but_the_error(command):
    result = run_cli(*command.split())
    assert result.returncode == 1 and result.stderr.startswith("error: ")
    assert result.stdout == ""  # no progress display was started, so no blank line from it either


def test_output_piped_into_a_reader_that_leaves_early_is_not_a_traceback():
    """`toolkit | head -12`: head leaves after 12 lines of the help and the rest cannot be written."""
    result = subprocess.run(f"{shlex.quote(sys.executable)} -m toolkit | head -12", shell=True,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "100"})
    assert len(result.stdout.splitlines()) == 12
    assert result.stderr == "", result.stderr
