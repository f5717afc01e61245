"""Faults and untrusted input: killed processes, unwritable outputs, fuzzed images."""

import contextlib
import io
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from tests.conftest import run_cli
from toolkit.bench import free_port
from toolkit.checkpoint import load_checkpoint
from toolkit.cli import _caused_by_ctrl_c
from toolkit.preprocess import ImageReadError, load_image, preprocess

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
# as -2 (seen once in CI, after the one-line message had been printed; cause not found yet).
INTERRUPTED = (130, -signal.SIGINT)


def _wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
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


def test_ctrl_c_before_the_first_epoch_leaves_no_run_dir(tmp_path, mnist_dir):
    run_dir = tmp_path / "early"
    # All 60,000 images: the first epoch takes seconds, so Ctrl-C lands inside it.
    process = _start("train", "lenet", "--device", "cpu", "--runs-dir", tmp_path, "--name", "early",
                     "--data-dir", mnist_dir)
    _wait_for(run_dir / "config.json", process)  # written once the data is loaded
    code, stderr = _ctrl_c(process)
    assert code in INTERRUPTED, stderr
    assert "training interrupted before its first epoch finished; nothing was kept" in stderr
    assert not run_dir.exists()  # so the same --name can be used again


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_a_killed_export_keeps_the_previous_export(export_dir, trained_run, tmp_path, mnist_dir, signum):
    target = tmp_path / "exports" / "lenet"
    shutil.copytree(export_dir, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    process = _start("export", trained_run / "best.pt", "--format", "all", "--quantize", "int8",
                     "--out", target, "--data-dir", mnist_dir)
    time.sleep(random.Random(3).uniform(4.0, 9.0))
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

    from toolkit.app import launch

    demo = launch(export_dir, port=free_port(), provider="cpu", block=False)
    try:
        assert demo.server_name == "127.0.0.1" and not demo.share
        for path in ("gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=../../etc/passwd"):
            response = httpx.get(f"{demo.local_url}{path}")
            assert response.status_code in (403, 404), path
            assert "root:" not in response.text
    finally:
        demo.close()

