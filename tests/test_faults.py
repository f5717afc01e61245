"""Faults and untrusted input: killed processes, unwritable outputs, fuzzed images."""

import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tests.conftest import run_cli
from tests.helpers import DOUBLE, FLOAT, UINT8, foreign_onnx, relist, rewrite_manifest
from toolkit.cli.app import _caused_by_ctrl_c
from toolkit.core.errors import ToolkitError
from toolkit.core.locate import EXAMPLES_DIR
from toolkit.imaging.decode import ImageReadError, load_image
from toolkit.imaging.preprocess import preprocess
from toolkit.models.checkpoint import load_checkpoint
from toolkit.serving.launch import free_port

pytestmark = pytest.mark.faults

TRAIN = ["train", "lenet", "--epochs", "4", "--limit-train", "3000", "--batch-size", "100", "--device", "cpu"]


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "toolkit", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal


def _ctrl_c(process):
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, stderr


# What a shell shows as $? = 130 after Ctrl-C: exit(130), or death by SIGINT, which Popen reports
# as -2. Both are Ctrl-C as a user sees it, so both pass.
INTERRUPTED = (130, -signal.SIGINT)


def _wait_for(path, process, timeout=120):
    _wait_for_glob(path.parent, path.name, process, timeout)


def _wait_for_glob(folder, pattern, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not any(folder.glob(pattern)):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"nothing matched {pattern} in {folder}"
        time.sleep(0.05)


def _history(run_dir):
    history = load_checkpoint(run_dir / "last.pt")["metrics"]["history"]
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]


def test_sigkill_during_training_loses_nothing_and_resume_matches(tmp_path, mnist_dir):
    assert run_cli(*TRAIN, "--runs-dir", tmp_path, "--name", "whole", "--data-dir", mnist_dir).returncode == 0
    rng = random.Random(7)
    run_dir = tmp_path / "killed"
    process = _start(*TRAIN, "--runs-dir", tmp_path, "--name", "killed", "--data-dir", mnist_dir)
    for _ in range(2):  # kill, resume, kill again, resume to the end
        _wait_for(run_dir / "last.pt", process)
        time.sleep(rng.uniform(0.0, 1.5))  # mid-epoch or mid-checkpoint-write
        process.send_signal(signal.SIGKILL)
        process.wait()
        for checkpoint in run_dir.glob("*.pt"):
            load_checkpoint(checkpoint)  # every checkpoint on disk still loads
        process = _start("train", "lenet", "--resume", run_dir, "--data-dir", mnist_dir, "--device", "cpu")
    assert process.wait(timeout=300) == 0, process.stderr.read()
    assert _history(run_dir) == _history(tmp_path / "whole")


def test_ctrl_c_during_training_keeps_finished_epochs_and_names_the_resume_command(tmp_path, mnist_dir):
    run_dir = tmp_path / "cut"
    process = _start(*TRAIN, "--runs-dir", tmp_path, "--name", "cut", "--data-dir", mnist_dir)
    _wait_for(run_dir / "last.pt", process)
    code, stderr = _ctrl_c(process)
    assert code in INTERRUPTED, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    kept = load_checkpoint(run_dir / "last.pt")["epoch"]
    assert f"last.pt holds epoch {kept}/4" in stderr
    assert f"continue with: toolkit train lenet --resume {run_dir}" in stderr
    assert (run_dir / "curves.png").is_file()
    assert run_cli("train", "lenet", "--resume", run_dir, "--data-dir", mnist_dir, "--device", "cpu").returncode == 0
    assert [epoch["epoch"] for epoch in _history(run_dir)] == [1, 2, 3, 4]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_before_the_first_epoch_leaves_no_run_dir(tmp_path, mnist_dir, signum):
    run_dir = tmp_path / "early"
    # All 60,000 images: loading them and the first epoch take seconds, so the signal lands inside.
    process = _start("train", "lenet", "--device", "cpu", "--runs-dir", tmp_path, "--name", "early",
                     "--data-dir", mnist_dir)
    _wait_for(run_dir / "config.json", process)  # the run dir is claimed: the run has begun
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in INTERRUPTED, stderr
    assert "training interrupted before its first epoch finished; nothing was kept" in stderr
    assert not run_dir.exists()  # so the same --name can be used again


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_killed_export_keeps_the_previous_export(export_dir, trained_run, tmp_path, mnist_dir, signum):
    target = tmp_path / "exports" / "lenet"
    shutil.copytree(export_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    process = _start("export", trained_run / "best.pt", "--format", "all", "--quantize", "int8",
                     "--out", target, "--data-dir", mnist_dir)
    _wait_for_glob(target.parent, ".lenet.staging-*/model.onnx", process)  # mid-export, before the swap
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert run_cli("verify", target, "--data-dir", mnist_dir).returncode == 0
    if signum == signal.SIGINT:  # one line, and the export removes its own staging dir
        assert process.returncode in INTERRUPTED and stderr.strip() == "error: interrupted", stderr
    else:  # the next export clears the dead one's staging dir
        assert run_cli("export", trained_run / "best.pt", "--out", target, "--no-verify").returncode == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet"]


def test_ctrl_c_wrapped_in_a_library_error_is_still_ctrl_c():
    # The shape torch.onnx.export gives it when Ctrl-C lands while it imports torch._dynamo.
    def export():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")  # noqa: B904

    try:
        try:
            export()
        except AttributeError as exc:
            raise RuntimeError("Failed to export the model with torch.export") from exc
    except RuntimeError as wrapped:
        assert _caused_by_ctrl_c(wrapped)
    assert not _caused_by_ctrl_c(RuntimeError("a real failure"))


@pytest.mark.parametrize("where", ["/proc/toolkit-test/out", "{file}/out"])
def test_unwritable_output_is_a_clear_error_without_partial_files(trained_run, tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = where.format(file=blocker)
    for args in (["export", trained_run / "best.pt", "--out", out, "--no-verify"],
                 ["train", "lenet", "--limit-train", "100", "--epochs", "1", "--runs-dir", out]):
        result = run_cli(*args)
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: cannot write") and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _limit_file_size():
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG, as a full disk fails with ENOSPC.
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_export(export_dir, trained_run, tmp_path):
    target = tmp_path / "exports" / "lenet"
    shutil.copytree(export_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    for args in (["export", trained_run / "best.pt", "--format", "all", "--out", target, "--no-verify"],
                 ["train", "lenet", "--limit-train", "200", "--epochs", "1", "--runs-dir", tmp_path / "runs"]):
        result = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                                preexec_fn=_limit_file_size, timeout=300)
        assert result.returncode == 1
        assert result.stderr.startswith("error: cannot write") and "File too large" in result.stderr
        assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet"]
    assert not list((tmp_path / "runs").rglob("*.pt")) and not list((tmp_path / "runs").rglob(".*.tmp"))


pixel_dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, bool])
shapes = st.one_of(
    st.tuples(st.integers(0, 64), st.integers(0, 64)),
    st.tuples(st.integers(0, 40), st.integers(0, 40), st.sampled_from([1, 2, 3, 4, 5])),
    st.tuples(st.integers(1, 3), st.integers(0, 30), st.integers(0, 30)),
    st.tuples(st.just(1), st.integers(1, 3000)),
    st.tuples(st.integers(1, 3000), st.just(1)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays(pixel_dtypes, shapes))
def test_fuzzed_arrays_give_a_digit_nothing_or_a_clear_error(array):
    try:
        digit = preprocess(array)
    except ImageReadError as exc:
        assert str(exc).startswith("cannot read this image")
        return
    assert digit is None or (digit.shape == (28, 28) and np.isfinite(digit).all()
                             and digit.min() >= 0.0 and digit.max() <= 1.0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_fuzzed_bytes_never_crash_the_reader(data):
    with contextlib.suppress(ImageReadError):
        preprocess(data)


def _encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["PNG", "JPEG", "GIF", "TIFF", "BMP", "WEBP"]), st.integers(1, 600), st.integers(1, 600),
       st.sampled_from(["L", "RGB", "RGBA", "CMYK", "I;16", "1", "P"]), st.floats(0.05, 1.0))
def test_fuzzed_real_images_and_truncations(fmt, width, height, mode, keep):
    rng = np.random.default_rng(width * 1000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert(mode)
    try:
        data = _encoded(image, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode: nothing to test
    for blob in (data, data[: max(1, int(len(data) * keep))]):
        with contextlib.suppress(ImageReadError):  # pytest-timeout bounds the time
            preprocess(blob)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _encoded(Image.new("1", (20_000, 20_000)), "PNG")  # ~50 KB on disk, 400 megapixels
    with pytest.raises(ImageReadError, match="too large"):
        load_image(bomb)


def test_tampered_model_is_refused_before_serving(export_dir, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(export_dir, target)
    model = target / "model.onnx"
    model.write_bytes(model.read_bytes().replace(b"lenet", b"lenex", 1))
    digit = tmp_path / "digit.png"
    Image.new("L", (50, 50), 255).save(digit)
    refused = run_cli("predict", digit, "--model", target)
    assert refused.returncode == 1 and "does not match the sha256" in refused.stderr
    allowed = run_cli("predict", digit, "--model", target, "--skip-integrity-check", "--json")
    assert allowed.returncode == 0, allowed.stderr


def test_the_demo_is_local_private_and_serves_no_files_by_default(export_dir):
    import httpx

    from toolkit.demo.app import launch

    demo = launch(export_dir, port=free_port(), provider="cpu", block=False)
    try:
        assert demo.server_name == "127.0.0.1" and not demo.share
        for path in ("gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=../../etc/passwd"):
            response = httpx.get(f"{demo.local_url}{path}")
            assert response.status_code in (403, 404), path
            assert "root:" not in response.text
    finally:
        demo.close()



# Boundaries where a file enters: manifests, checkpoints and ONNX signatures, fuzzed.

ARTIFACT_NAMES = st.sampled_from(["model.onnx", "model.pt", "../model.onnx", "/etc/passwd", "a\\b", "", ".",
                                  "triton/m/1/model.onnx", "manifest.json", "c:model.onnx"])
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=8)


@st.composite
def manifests(draw, good):
    """The real manifest with some fields replaced by odd JSON, or odd artifact entries."""
    manifest = json.loads(json.dumps(good))
    for key in draw(st.lists(st.sampled_from(["format", "manifest_version", "artifacts", "metadata"]), max_size=2)):
        manifest[key] = draw(JSON_VALUES)
    if isinstance(manifest.get("artifacts"), dict) and draw(st.booleans()):
        entry = draw(st.one_of(JSON_VALUES, st.just(good["artifacts"]["model.onnx"])))
        manifest["artifacts"][draw(ARTIFACT_NAMES)] = entry
    return draw(st.one_of(st.just(manifest), JSON_VALUES)) if draw(st.integers(0, 9)) == 0 else manifest


def test_fuzzed_manifests_are_served_only_when_they_prove_the_model(export_dir, tmp_path):
    from toolkit.export.publish import _check_replaceable
    from toolkit.runtime.predictor import Predictor

    target = tmp_path / "export"
    shutil.copytree(export_dir, target, ignore=shutil.ignore_patterns("*.pt2", "*.ts", "triton"))
    good = json.loads((export_dir / "manifest.json").read_text())
    good["artifacts"] = {k: v for k, v in good["artifacts"].items() if (target / k).is_file()}

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(manifests(good))
    def check(manifest):
        (target / "manifest.json").write_text(json.dumps(manifest))
        try:
            predictor = Predictor(target, provider="cpu")
        except ToolkitError:
            served = False
        else:
            served = predictor.integrity.startswith("verified")
            assert served
        sound = (isinstance(manifest, dict) and manifest.get("format") == "toolkit-export"
                 and type(manifest.get("manifest_version")) is int and manifest["manifest_version"] == 1
                 and isinstance(manifest.get("artifacts"), dict)
                 and manifest["artifacts"].get("model.onnx") == good["artifacts"]["model.onnx"])
        assert served == (sound and _entries_sound(manifest["artifacts"])), manifest
        with contextlib.suppress(ToolkitError):  # refused in one line, or a real export: never a traceback
            _check_replaceable(target)

    check()


def _entries_sound(artifacts):
    return all(isinstance(name, str) and name not in ("", ".", "manifest.json") and not name.startswith("/")
               and ".." not in name.split("/") and "\\" not in name and ":" not in name
               and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
               and len(entry["sha256"]) == 64 and isinstance(entry.get("bytes"), int)
               and not isinstance(entry.get("bytes"), bool) and entry["bytes"] >= 0
               for name, entry in artifacts.items())


ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 10**20), st.floats(allow_nan=True),
                       st.text(max_size=5), st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=3), max_size=3),
                       st.builds(torch.zeros, st.integers(0, 3)))
FIELDS = ["format_version", "arch", "model_kwargs", "state_dict", "dataset", "class_names", "normalization",
          "framing", "metrics", "epoch", "config", "optimizer_state"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), ODD_VALUES, min_size=1, max_size=3))
def test_fuzzed_checkpoint_fields_are_refused_in_one_line(tmp_path_factory, odd):
    from toolkit.export.writers import model_metadata
    from toolkit.models import create_model
    from toolkit.models.checkpoint import build_deployable
    from toolkit.training.train import load_resume_state

    path = tmp_path_factory.mktemp("ck") / "odd.pt"
    good = {"arch": "lenet", "model_kwargs": {}, "state_dict": create_model("lenet").state_dict(),
            "dataset": "mnist", "class_names": [str(d) for d in range(10)],
            "normalization": {"mean": 0.1307, "std": 0.3081}, "metrics": {"test_acc": 0.9, "history": []},
            "epoch": 1, "config": {"arch": "lenet"}, "optimizer_state": {}}
    torch.save({"format": "toolkit-checkpoint", **good, **odd}, path)
    with contextlib.suppress(ToolkitError):
        checkpoint = load_checkpoint(path)
        build_deployable(checkpoint)
        model_metadata(checkpoint, "0" * 64)
        load_resume_state(path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["image", "x", "input"]), st.sampled_from([FLOAT, UINT8, DOUBLE]),
       st.sampled_from([("N", 1, 28, 28), ("N", 3, 32, 32), ("N", 28, 28, 1), ("N", 784, 1, 1), (1, 1, 28, 28)]),
       st.lists(st.tuples(st.sampled_from(["logits", "probabilities", "scores"]), st.sampled_from([2, 3]),
                          st.sampled_from([2, 10, 1000])), max_size=3, unique_by=lambda o: o[0]),
       st.sampled_from([FLOAT, DOUBLE]), st.sampled_from([None, 3, 10]))
def test_fuzzed_onnx_signatures_are_served_only_when_they_keep_the_contract(
        tmp_path_factory, input_name, input_type, input_shape, outputs, output_type, classes):
    from toolkit.runtime.predictor import Predictor

    names = None if classes is None else [f"class {i}" for i in range(classes)]
    path = foreign_onnx(tmp_path_factory.mktemp("onnx") / "model.onnx", input_name=input_name,
                        input_type=input_type, input_shape=input_shape, outputs=tuple(outputs),
                        output_type=output_type, class_names=names)
    expected = {"logits", "probabilities"} <= {o[0] for o in outputs} and all(
        rank == 2 and width == (classes or 10) for name, rank, width in outputs if name in ("logits", "probabilities"))
    keeps_contract = (input_name == "image" and input_type == FLOAT and input_shape[1:] == (1, 28, 28)
                      and output_type == FLOAT and expected)
    try:
        prediction = Predictor(path, provider="cpu").predict(np.zeros((28, 28), dtype=np.float32))
    except ToolkitError:
        assert not keeps_contract
    else:
        assert keeps_contract and len(prediction.labels) == (classes or 10)


def test_two_trainings_with_one_name_cannot_share_the_run_dir(tmp_path, mnist_dir):
    """The run dir is claimed before the data loads: one run gets it, the other is refused."""
    quick = ["--epochs", "1", "--limit-train", "2000", "--device", "cpu", "--runs-dir", tmp_path, "--name", "same",
             "--data-dir", mnist_dir]
    processes = {arch: _start("train", arch, *quick) for arch in ("mlp", "lenet")}
    outcomes = {arch: (p.wait(timeout=300), p.stderr.read()) for arch, p in processes.items()}
    winners = [arch for arch, (code, _) in outcomes.items() if code == 0]
    assert len(winners) == 1, outcomes
    loser = next(arch for arch in outcomes if arch not in winners)
    assert "already exists; pass another --name" in outcomes[loser][1]
    run_dir = tmp_path / "same"
    assert json.loads((run_dir / "config.json").read_text())["arch"] == winners[0]
    assert load_checkpoint(run_dir / "best.pt")["arch"] == winners[0]


@pytest.mark.parametrize(("args", "message"), [
    (["--data-dir", "{missing}"], "not found under"),
    (["--lr", "1e30", "--optimizer", "sgd"], "training diverged in epoch 1"),
], ids=["no-data", "diverged"])
def test_a_run_that_fails_before_its_first_epoch_leaves_its_name_free(tmp_path, mnist_dir, args, message):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    quick = ["train", "lenet", "--epochs", "1", "--limit-train", "1000", "--device", "cpu", "--runs-dir", tmp_path,
             "--name", "failed"]
    result = run_cli(*quick, *args)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "failed").exists()
    assert run_cli(*quick, "--data-dir", mnist_dir).returncode == 0  # the name is free again


def test_a_run_that_diverges_later_stays_resumable_from_its_last_good_epoch(tmp_path, mnist_dir):
    run_dir = tmp_path / "late"
    base = ["--limit-train", "1000", "--device", "cpu", "--data-dir", mnist_dir]
    assert run_cli("train", "lenet", "--epochs", "1", "--runs-dir", tmp_path, "--name", "late", *base).returncode == 0
    # A learning rate of 1e30 in the saved optimizer, no schedule to reset it: the second epoch diverges.
    last = torch.load(run_dir / "last.pt", weights_only=True)
    for group in last["optimizer_state"]["param_groups"]:
        group["lr"] = 1e30
    last["scheduler_state"] = {}
    last["config"]["scheduler"] = "none"
    torch.save(last, run_dir / "last.pt")
    result = run_cli("train", "lenet", "--resume", run_dir, "--epochs", "2", *base[2:])
    assert result.returncode == 1 and "training diverged in epoch 2" in result.stderr, result.stderr
    assert "last.pt holds epoch 1/2" in result.stderr and "--resume" in result.stderr
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1


def test_onnx_external_data_is_part_of_the_integrity_check(export_dir, tmp_path):
    import onnx

    from toolkit.runtime.predictor import Predictor

    target = tmp_path / "export"
    shutil.copytree(export_dir, target)
    model = onnx.load(str(target / "model.onnx"))
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=1024)
    relist(target, "model.onnx", "weights.bin")
    assert Predictor(target, provider="cpu").integrity.startswith("verified")
    weights = bytearray((target / "weights.bin").read_bytes())
    weights[100] ^= 0xFF
    (target / "weights.bin").write_bytes(bytes(weights))
    with pytest.raises(ToolkitError, match=r"weights\.bin does not match the sha256"):
        Predictor(target, provider="cpu")
    rewrite_manifest(target, lambda m: {**m, "artifacts": {k: v for k, v in m["artifacts"].items()
                                                           if k != "weights.bin"}})
    with pytest.raises(ToolkitError, match=r"does not list weights\.bin"):
        Predictor(target, provider="cpu")
    # A name with a backslash: onnxruntime opens it as written, which no manifest entry can name.
    model = onnx.load(str(export_dir / "model.onnx"))
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True, location="sub\\w.bin",
                    size_threshold=1024)
    relist(target, "model.onnx")
    with pytest.raises(ToolkitError, match="a name with a backslash"):
        Predictor(target, provider="cpu")


def test_a_bare_onnx_file_is_served_but_said_to_be_unverified(tmp_path, mnist_dir):
    model = foreign_onnx(tmp_path / "model.onnx", class_names=[str(d) for d in range(10)])
    digit = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    for extra in ([], ["--json"]):
        result = run_cli("predict", digit, "--model", model, *extra)
        assert result.returncode == 0, result.stderr
        assert "unverified: a bare .onnx file with no manifest" in result.stderr
    result = run_cli("evaluate", model, "--out", tmp_path / "report", "--data-dir", mnist_dir)
    assert result.returncode == 0 and "note: the model is unverified" in result.stderr, result.stderr
    assert json.loads((tmp_path / "report" / "evaluation.json").read_text())["integrity"].startswith("unverified")


def test_a_folder_that_cannot_be_read_whole_is_not_replaced(quick_export, quick_run, tmp_path):
    """os.walk skips a folder it cannot list; then the files in it would go unseen (and unlisted)."""
    target = tmp_path / "export"
    shutil.copytree(quick_export, target)
    (target / "mine").mkdir()
    (target / "mine" / "thesis.txt").write_text("precious")
    (target / "mine").chmod(0)
    # root reads any folder: drop the capabilities that let it, as an ordinary user has none.
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("needs setpriv (util-linux) to read as an ordinary user")
    try:
        result = subprocess.run([*drop, sys.executable, "-m", "toolkit", "export", quick_run / "best.pt", "--out",
                                 target, "--no-verify"], capture_output=True, text=True, timeout=300)
    finally:
        (target / "mine").chmod(0o755)
    assert result.returncode == 1 and "cannot read" in result.stderr, result.stderr
    assert (target / "mine" / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_predict_reads_only_regular_files(export_dir, tmp_path):
    fifo = tmp_path / "digit.png"
    os.mkfifo(fifo)
    result = run_cli("predict", fifo, "--model", export_dir, "--json", timeout=120)
    assert result.returncode == 1
    assert json.loads(result.stdout) == [{"file": str(fifo), "error": "cannot read this image: not a regular file"}]


def test_json_output_is_valid_json_even_when_the_model_answers_nan(tmp_path):
    model = foreign_onnx(tmp_path / "model.onnx", weight=float("nan"))
    digit = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    result = run_cli("predict", digit, "--model", model, "--json")

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    rows = json.loads(result.stdout, parse_constant=refuse)
    assert result.returncode == 1 and "not finite" in rows[0]["error"]
