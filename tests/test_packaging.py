"""A wheel, not only the editable checkout, carries everything the commands read at run time."""

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import REPO, run_cli
from toolkit import __version__
from toolkit.core.locate import EXAMPLES_DIR


def test_the_wheel_ships_the_demo_examples_and_the_command(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools leaves a build/ folder beside pyproject.toml
    shutil.copytree(REPO / "toolkit", source / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("toolkit-*.whl")
    assert wheel.name.startswith(f"toolkit-{__version__}-")  # the version has one source: the package
    names = set(zipfile.ZipFile(wheel).namelist())
    examples = sorted(p.name for p in EXAMPLES_DIR.glob("*.png"))
    assert len(examples) == 10  # one MNIST test digit of each class: the demo's examples, bench's inputs
    assert {f"toolkit/examples/{name}" for name in examples} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "toolkit = toolkit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_version_names_toolkit_and_the_libraries_it_runs_on():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"toolkit {__version__} (torch ")
    assert "onnx " in result.stdout and "gradio " in result.stdout
