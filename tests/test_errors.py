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
from tests.helpers import UINT8, cli_in_process, foreign_onnx, rewrite_manifest
from toolkit.core.locate import EXAMPLES_DIR, example_label


@pytest.fixture(scope="module")
def bad(tmp_path_factory, quick_export, quick_run):
    """A folder of broken inputs of every kind, named by what is wrong with them."""
    export_dir = quick_export
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.pt").write_bytes((export_dir / "model.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    (root / "not-an-image.png").write_text("hello")
    (root / "empty-dir").mkdir()
    no_manifest = root / "no-manifest"
    shutil.copytree(export_dir, no_manifest)
    (no_manifest / "manifest.json").unlink()
    (root / "corrupt.onnx").write_bytes(b"\x08\x01garbage")
    _odd_exports(root, export_dir, quick_run / "last.pt")
    _foreign_models(root)
    _odd_checkpoints(root, export_dir, quick_run / "last.pt")
    torch.save({"weights": torch.zeros(3)}, root / "protocol-3.pt", pickle_protocol=3)  # torch.load warns
    torch.save({"weights": torch.zeros(3)}, root / "protocol-4.pt", pickle_protocol=4)  # it cannot read it
    return root


def _odd_exports(root, export_dir, other_checkpoint):
    """Folders that look like exports but cannot be proven to be one."""
    not_ours = root / "not-ours"  # the reproduction: a folder that merely holds a manifest.json
    (not_ours / "src").mkdir(parents=True)
    (not_ours / "manifest.json").write_text('{"name": "ext"}')
    (not_ours / "src" / "a.js").write_text("x")
    (not_ours / "NOTES.md").write_text("n")
    edits = {
        "list-manifest": lambda m: [m],
        "no-format": lambda m: {k: v for k, v in m.items() if k != "format"},
        "unlisted-model": lambda m: {**m, "artifacts": {k: v for k, v in m["artifacts"].items() if k != "model.onnx"}},
        "no-sha": lambda m: {**m, "artifacts": {**m["artifacts"], "model.onnx": {"bytes": 1}}},
        "escape": lambda m: {**m, "artifacts": {**m["artifacts"], "../model.onnx": m["artifacts"]["model.onnx"]}},
        "absolute": lambda m: {**m, "artifacts": {**m["artifacts"], "/etc/passwd": m["artifacts"]["model.onnx"]}},
    }
    for name, edit in edits.items():
        shutil.copytree(export_dir, root / name)
        rewrite_manifest(root / name, edit)
    swapped = root / "swapped"  # another model in its place and the manifest removed
    shutil.copytree(export_dir, swapped)
    shutil.copy(export_dir / "model.int8.onnx", swapped / "model.onnx")
    (swapped / "manifest.json").unlink()
    shutil.copytree(export_dir, root / "manifest-dir")
    (root / "manifest-dir" / "manifest.json").unlink()
    (root / "manifest-dir" / "manifest.json").mkdir()
    shutil.copytree(export_dir, root / "with-notes")
    (root / "with-notes" / "NOTES.md").write_text("mine")
    shutil.copytree(export_dir, root / "with-empty-folder")
    (root / "with-empty-folder" / "drafts" / "later").mkdir(parents=True)
    shutil.copytree(export_dir, root / "edited")
    with open(root / "edited" / "model.pt", "ab") as fh:
        fh.write(b"a person's edit")
    shutil.copytree(export_dir, root / "pt-swapped")  # no ONNX model: evaluate runs model.pt
    (root / "pt-swapped" / "model.onnx").unlink()
    shutil.copy(other_checkpoint, root / "pt-swapped" / "model.pt")
    for name, text in {"nested-manifest": "[" * 100_000 + "]" * 100_000,
                       "huge-version": '{"manifest_version": ' + "9" * 5000 + "}"}.items():
        shutil.copytree(export_dir, root / name)
        (root / name / "manifest.json").write_text(text)
    (root / "loop").symlink_to(root / "loop")


def _foreign_models(root):
    """Bare ONNX models that break the serving contract, one way each."""
    for name, signature in {
        "other-input-name": {"input_name": "x"},
        "rgb-32": {"input_shape": ("N", 3, 32, 32)},
        "uint8-input": {"input_type": UINT8},
        "no-output": {"outputs": ()},
        "one-output": {"outputs": (("logits", 2, 10),)},
        "3d-outputs": {"outputs": (("logits", 3, 10), ("probabilities", 3, 10))},
        "1000-classes": {"outputs": (("logits", 2, 1000), ("probabilities", 2, 1000))},
        "3-class-names": {"class_names": ["a", "b", "c"]},
    }.items():
        foreign_onnx(root / f"{name}.onnx", **signature)


def _odd_checkpoints(root, export_dir, last_checkpoint):
    """The export's checkpoint with one field of the wrong type each."""
    good = torch.load(export_dir / "model.pt", weights_only=True)
    for field, value in {
        "format_version": "1", "model_kwargs": "num_classes=10", "normalization": {"mean": 0.1},
        "state_dict": "weights", "class_names": 10, "metrics": "good",
        "framing": {"box": 28, "centre": "box", "stroke": 27.9},  # thickening that would take minutes
    }.items():
        torch.save({**good, field: value}, root / f"bad-{field}.pt")
    nan = {name: torch.full_like(tensor, float("nan")) for name, tensor in good["state_dict"].items()}
    odd = {
        "nan-weights": {"state_dict": nan},
        "complex-weights": {"state_dict": {k: v.to(torch.complex64) for k, v in good["state_dict"].items()}},
        "nan-accuracy": {"metrics": {"test_acc": float("nan")}},
        "1000-names": {"class_names": [f"class {i}" for i in range(1000)]},
    }
    for name, fields in odd.items():
        torch.save({**good, **fields}, root / f"{name}.pt")
    last = torch.load(last_checkpoint, weights_only=True)
    for name, fields in {"no-epoch": {"epoch": None}, "no-history": {"metrics": {"history": []}},
                         "foreign-optimizer": {"optimizer_state": {"x": 1}}}.items():
        run = root / f"run-{name}"
        run.mkdir()
        torch.save({k: v for k, v in {**last, **fields}.items() if v is not None}, run / "last.pt")


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
    ("bench infer {export} --batch-sizes 10000000", "batch sizes must be positive and at most 8192", 1),
    ("bench infer {export} --threads 100000", "threads must be between 1 and", 1),
    ("bench infer {export} --rounds 0", "rounds must be at least 1", 1),
    ("bench serve {export} --clients 0", "--clients must be positive", 1),
    ("bench serve {export} --server serve --workers 0", "--workers must be positive", 1),
    ("serve {export} --workers 0", "--workers must be between 1 and 64", 1),
    ("bench infer {export} --seconds -1", "--seconds must be positive", 1),
    ("bench infer {export} --json {bad}", "it is a directory", 1),
    ("bench train --json {bad}/not-an-image.png/out.json", "cannot write to", 1),
    ("bench train --notebook-batches 0", "--notebook-batches must be positive", 1),
    ("bench train --target 99", "--target is a test accuracy between 0 and 1", 1),
    ("bench serve {export} --malformed-every -1", "Invalid value for '--malformed-every'", 2),
    ("frobnicate", "No such command 'frobnicate'", 2),
    # Exports that cannot be proven to be one (issue #16): refused, never replaced or served.
    ("export {export}/model.pt --no-verify --out {bad}/not-ours", "not a toolkit export", 1),
    ("export {export}/model.pt --no-verify --out {bad}/with-notes", "holds files its manifest does not list "
     "(NOTES.md)", 1),
    ("predict {digit} --model {bad}/swapped", "has no manifest.json", 1),
    ("predict {digit} --model {bad}/manifest-dir", "manifest.json is not a file", 1),
    ("predict {digit} --model {bad}/list-manifest", "(a JSON list, not an object)", 1),
    ("predict {digit} --model {bad}/no-format", "no 'toolkit-export' format marker", 1),
    ("predict {digit} --model {bad}/unlisted-model", "does not list model.onnx", 1),
    ("predict {digit} --model {bad}/no-sha", "has no sha256 for model.onnx", 1),
    ("evaluate {bad}/swapped", "has no manifest.json", 1),
    ("demo {bad}/swapped", "has no manifest.json", 1),
    ("verify {bad}/escape", "lists an artifact outside the export dir or not a file: '../model.onnx'", 1),
    ("verify {bad}/absolute", "lists an artifact outside the export dir or not a file: '/etc/passwd'", 1),
    # Foreign ONNX models: the contract is checked where the file enters.
    ("predict {digit} --model {bad}/other-input-name.onnx", "takes inputs ['x'], not one input 'image'", 1),
    ("predict {digit} --model {bad}/rgb-32.onnx", "input has shape ['N', 3, 32, 32], expected [N, 1, 28, 28]", 1),
    ("predict {digit} --model {bad}/uint8-input.onnx", "input is tensor(uint8), expected tensor(float)", 1),
    ("predict {digit} --model {bad}/no-output.onnx", "has outputs [], not logits and probabilities", 1),
    ("predict {digit} --model {bad}/one-output.onnx", "has outputs ['logits'], not logits and probabilities", 1),
    ("predict {digit} --model {bad}/3d-outputs.onnx", "'logits' output is tensor(float) ['N', 1, 10]", 1),
    ("predict {digit} --model {bad}/1000-classes.onnx", "has 1000 classes but its metadata names 10", 1),
    ("evaluate {bad}/3-class-names.onnx", "has 10 classes but its metadata names 3", 1),
    ("demo {bad}/rgb-32.onnx", "expected [N, 1, 28, 28]", 1),
    # Checkpoint fields of the wrong type, and a pickle protocol torch.load warns about.
    ("export {bad}/bad-format_version.pt", "'format_version' is str, expected int", 1),
    ("export {bad}/bad-model_kwargs.pt", "'model_kwargs' is str, expected dict", 1),
    ("inspect {bad}/bad-normalization.pt", "'normalization' needs a finite 'mean' and a positive 'std'", 1),
    ("evaluate {bad}/bad-state_dict.pt", "'state_dict' is str, expected dict", 1),
    ("export {bad}/bad-class_names.pt", "'class_names' is int, expected list or tuple", 1),
    ("export {bad}/bad-metrics.pt", "'metrics' is str, expected dict", 1),
    ("export {bad}/protocol-3.pt", "not a toolkit checkpoint", 1),
    ("export {bad}/protocol-4.pt", "saved with a pickle protocol that safe loading cannot read", 1),
    # Numbers out of range, and options a resumed run cannot take.
    ("train lenet --seed 99999999999999999999", "--seed must be between 0 and 4294967295", 1),
    ("train lenet --seed -1", "--seed must be between 0 and 4294967295", 1),
    ("train lenet --lr inf", "--lr must be positive and finite, got inf", 1),
    ("train lenet --lr nan", "--lr must be positive and finite, got nan", 1),
    ("predict {digit} --model {export} --threads 100000000000000000000", "threads must be between 1 and", 1),
    ("demo {export} --threads 1000000", "threads must be between 1 and", 1),
    ("train lenet --resume {run} --lr 3", "--lr cannot be changed with --resume", 1),
    ("train lenet --resume {run} --name other", "--name cannot be changed with --resume", 1),
    ("train mlp --resume {run}", "is a lenet run, not mlp", 1),
    # Found by a hostile probe of the first fixes.
    ("evaluate {bad}/pt-swapped", "model.pt does not match the sha256", 1),
    ("export {bad}/bad-framing.pt --no-verify", "stroke 0..box/4", 1),
    ("export {export}/model.pt --no-verify --out {bad}/loop", "cannot write to", 1),
    ("predict {digit} --model {bad}/nested-manifest", "nested too deeply", 1),
    ("verify {bad}/huge-version", "cannot read", 1),
    ("train lenet --batch-size 100000000000000000000", "--batch-size must be at most", 1),
    ("train lenet --resume {bad}/run-no-epoch", "holds no consistent training state", 1),
    ("train lenet --resume {bad}/run-no-history", "holds no consistent training state", 1),
    ("train lenet --resume {bad}/run-foreign-optimizer", "holds no consistent training state", 1),
    ("evaluate {bad}/nan-weights.pt", "output is not finite", 1),
    ("export {bad}/nan-weights.pt --no-verify", "output is not finite", 1),
    ("export {bad}/complex-weights.pt", "not named real-valued tensors", 1),
    ("export {bad}/nan-accuracy.pt", "'metrics' needs a numeric 'test_acc'", 1),
    ("export {bad}/1000-names.pt --no-verify", "answers 10 classes but the checkpoint names 1000", 1),
    ("verify {export} --atol inf", "atol must be a finite number >= 0, got inf", 1),
    ("inspect {run} --out {bad}/not-an-image.png", "it is a file, not a folder", 1),
    # Found by a second probe.
    ("train lenet --name " + "a" * 300, "--name must be a plain folder name", 1),
    ("bench infer {export} --seconds nan", "--seconds must be positive and finite, got nan", 1),
    ("train lenet --epochs 1 --limit-train 200 --lr 1e30 --device cpu --runs-dir {bad}/runs-nan --name x",
     "training diverged in epoch 1", 1),
    # Fine-tuning on labelled images.
    ("train mlp --init-from {run}", "holds a lenet model, not mlp", 1),
    ("train lenet --init-from {run} --dataset fashion-mnist", "was trained on mnist, not fashion-mnist", 1),
    ("train lenet --extra-data {bad}/nowhere", "is not a folder of class folders", 1),
    ("train lenet --extra-weight 0", "--extra-weight must be a whole number from 1 to 1000, got 0", 1),
    ("train lenet --extra-weight 5", "--extra-weight applies to --extra-data only", 1),
    ("evaluate {export} --images {bad}", "holds no readable images in class folders named 0, 1", 1),
    ("evaluate {export} --images {bad} --dataset mnist", "--dataset evaluates the test set of a dataset", 1),
    # Serving and checking a served endpoint.
    ("serve {export} --max-batch-size 0", "--max-batch-size must be between 1 and 4096, got 0", 1),
    ("serve {export} --max-batch-delay-ms nan", "--max-batch-delay-ms must be between 0 and 1000 ms", 1),
    ("serve {export} --name a/b", "--name must be letters, digits", 1),
    ("serve {export} --port 9000 --grpc-port 9000", "--grpc-port must differ from the HTTP port 9000", 1),
    ("serve {bad}/swapped", "refusing to serve", 1),
    ("verify {export} --model lenet", "--model applies to --endpoint only", 1),
    ("verify {export} --endpoint ftp://example.org", "--endpoint not an http(s) URL", 1),
    ("verify {export} --endpoint http://127.0.0.1:1", "cannot reach http://127.0.0.1:1", 1),
    ("verify {export} --deadline 5", "--deadline applies to --endpoint only", 1),
    ("verify {export} --endpoint http://127.0.0.1:1 --deadline 0", "--deadline must be a finite number > 0", 1),
    ("verify {export} --endpoint http://127.0.0.1:1 --max-answer-mb nan", "--max-answer-mb must be a finite", 1),
]


# Run as real processes, for what only a process shows: exit codes through the interpreter,
# usage errors from the parser, and warnings libraries print to stderr.
AS_PROCESS = {"frobnicate", "train lenet --epochs abc", "train resnet9000", "export {bad}/protocol-3.pt",
              "verify {bad}/escape", "predict {digit} --model {bad}/swapped"}
# KServe's and tritonclient's gRPC protos both define the `inference` package, so kserve cannot
# be imported into a test process that has imported tritonclient.grpc (the gRPC tests' client).
AS_PROCESS |= {command for command, _, _ in CASES if command.startswith("serve ")}


@pytest.mark.parametrize(("command", "message", "code"), CASES, ids=[c[0].split(" {")[0] for c in CASES])
def test_user_errors_are_one_clear_line(bad, quick_export, quick_run, command, message, code):
    digit = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    args = [part.format(bad=bad, export=quick_export, run=quick_run, digit=digit) for part in command.split()]
    result = (run_cli if command in AS_PROCESS else cli_in_process)(*args)
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


@pytest.mark.parametrize("folder", [".", "not-ours", "with-notes", "with-empty-folder", "edited"])
def test_export_never_replaces_a_folder_it_did_not_write(bad, quick_export, folder):
    """Not the bad folder itself, nor one holding a foreign manifest.json, nor an export a person
    added a file to: each is refused and left byte for byte as it was."""
    target = bad / folder
    before = {p.relative_to(target): p.read_bytes() if p.is_file() else None for p in target.rglob("*")}
    result = cli_in_process("export", quick_export / "model.pt", "--out", target, "--no-verify")
    assert result.returncode == 1 and "refusing to replace it" in result.stderr, result.stderr
    assert {p.relative_to(target): p.read_bytes() if p.is_file() else None for p in target.rglob("*")} == before
    assert not list(target.parent.glob(f".{target.name}.*"))


def test_a_positional_argument_is_named_as_the_user_typed_it(bad, tmp_path):
    """`feedback export DIR OUT` has no `--out` option: the message names the folder given."""
    result = cli_in_process("feedback", "export", tmp_path, bad / "with-notes")
    assert result.returncode == 1 and "--out" not in result.stderr
    assert result.stderr.startswith(f"error: {bad / 'with-notes'} exists and is not an empty folder")


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
