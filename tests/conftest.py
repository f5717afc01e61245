"""Shared fixtures: real MNIST from ../shared/mnist, one LeNet trained by the toolkit, a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = Path(os.environ.get("TOOLKIT_TEST_MNIST", REPO.parent / "shared" / "mnist")).resolve()
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# Tests never download: point the toolkit at the local copy and forbid the network.
os.environ["TOOLKIT_DATA_DIR"] = str(MNIST_DIR)
os.environ["TOOLKIT_OFFLINE"] = "1"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            columns: str | None = "200") -> subprocess.CompletedProcess:
    """Run `python -m toolkit ARGS` as a user would, capturing output; columns=None: no $COLUMNS, as in a log."""
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    return subprocess.run(
        [sys.executable, "-m", "toolkit", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )


def _built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """`build(folder)` run once per test session, even with pytest-xdist's workers: the first
    worker builds under a lock in the session's shared temp dir, the others wait and reuse it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent / name  # the session's, above every worker's
    with FileLock(f"{shared}.lock"):
        if not (shared / ".built").exists():
            shutil.rmtree(shared, ignore_errors=True)  # a worker that failed before left a part
            shared.mkdir()
            build(shared)
            (shared / ".built").touch()
    return shared


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs the real 3-epoch LeNet or its full export is `slow`: building them
    takes minutes on two cores."""
    for item in items:
        if {"trained_run", "export_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.fail(f"MNIST not found at {MNIST_DIR}; set TOOLKIT_TEST_MNIST")
    return MNIST_DIR


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A LeNet trained with the default recipe through the CLI: the run dir."""
    def build(runs: Path) -> None:
        result = run_cli("train", "lenet", "--runs-dir", runs, "--name", "lenet-default",
                         "--data-dir", mnist_dir, "--device", "cpu")
        assert result.returncode == 0, result.stderr

    return _built_once(tmp_path_factory, "runs", build) / "lenet-default"


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, mnist_dir: Path) -> Path:
    """The trained LeNet exported in every format, int8 and fp16 included, and verified."""
    def build(exports: Path) -> None:
        result = run_cli("export", trained_run / "best.pt", "--format", "all", "--quantize", "int8",
                         "--fp16", "--out", exports / "lenet", "--data-dir", mnist_dir)
        assert result.returncode == 0, result.stderr

    return _built_once(tmp_path_factory, "exports", build) / "lenet"


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A LeNet trained for one epoch on 3,000 images (seconds): for tests that need a run,
    not a good model."""
    def build(runs: Path) -> None:
        result = run_cli("train", "lenet", "--epochs", "1", "--limit-train", "3000", "--runs-dir", runs,
                         "--name", "lenet-quick", "--data-dir", mnist_dir, "--device", "cpu")
        assert result.returncode == 0, result.stderr

    return _built_once(tmp_path_factory, "quick-runs", build) / "lenet-quick"


@pytest.fixture(scope="session")
def quick_export(tmp_path_factory: pytest.TempPathFactory, quick_run: Path, mnist_dir: Path) -> Path:
    """`quick_run` in every format with int8, not verified: every kind of file an export holds."""
    def build(exports: Path) -> None:
        result = run_cli("export", quick_run / "best.pt", "--format", "all", "--quantize", "int8",
                         "--out", exports / "lenet", "--data-dir", mnist_dir, "--no-verify")
        assert result.returncode == 0, result.stderr

    return _built_once(tmp_path_factory, "quick-exports", build) / "lenet"
