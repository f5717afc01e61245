"""Where things are: the newest run and export (when a command is given neither) and the
example digits and their labels. No torch or gradio import: the CLI reads these before any work."""

from __future__ import annotations

from pathlib import Path

from toolkit.core.errors import ToolkitError
from toolkit.core.manifest import MANIFEST

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"  # package data: in wheels too


def example_label(path: Path) -> str:
    """The label an example digit's file name ends with: `mnist-test-0000-label-7.png` -> '7'."""
    return path.stem.rsplit("-", 1)[-1]

def newest_run_checkpoint(runs_dir: str | Path = "runs", name: str = "best.pt") -> Path:
    """`best.pt` of the most recently modified run under `runs_dir`."""
    runs_dir = Path(runs_dir)
    candidates = sorted(runs_dir.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ToolkitError(
            f"no checkpoint found under {runs_dir}/*/{name}; train one with `toolkit train lenet` "
            f"or pass a checkpoint path"
        )
    return candidates[-1]


def newest_export_dir(exports_dir: Path = Path("exports")) -> Path:
    """The most recently written export (a dir holding manifest.json)."""
    candidates = sorted(exports_dir.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ToolkitError(
            f"no export found under {exports_dir}/; make one with `toolkit export` "
            "(after `toolkit train lenet`) or pass an export dir"
        )
    return candidates[-1].parent
