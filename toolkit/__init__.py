"""Train small MNIST-like vision models, export them with proven parity, and serve them."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def library_versions(*packages: str) -> dict[str, str]:
    """Versions of toolkit, torch and `packages`, read from package metadata (importing costs seconds)."""
    versions = {"toolkit": __version__}
    for package in ("torch", *packages):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
