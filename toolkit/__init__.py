"""Train small MNIST-like vision models, export them with proven parity, and serve them."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__version__ = "0.1.0"

# The few names a Python user calls, each from the module that owns it: train, export, verify,
# serve predictions. Imported when first used, so `import toolkit` (and the CLI) stays cheap.
_API = {
    "make_config": "toolkit.training.config", "train": "toolkit.training.train",
    "ExportOptions": "toolkit.export.writers", "export_verified": "toolkit.export.publish",
    "verify_export": "toolkit.export.verify", "Export": "toolkit.core.export_dir",
    "Predictor": "toolkit.runtime.predictor", "classify": "toolkit.runtime.inference",
    "create_model": "toolkit.models", "list_models": "toolkit.models", "ToolkitError": "toolkit.core.errors",
}
__all__ = ["__version__", "library_versions", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
    return getattr(import_module(_API[name]), name)


def library_versions(*packages: str) -> dict[str, str]:
    """Versions of toolkit, torch and `packages`, read from package metadata (importing costs seconds)."""
    versions = {"toolkit": __version__}
    for package in ("torch", *packages):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
