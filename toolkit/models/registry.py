"""A timm-style model registry: `register_model`, `create_model`, `list_models`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from toolkit.core.errors import ToolkitError


@dataclass(frozen=True)
class Recipe:
    """How to train a model: optimizer, schedule, batch size, epochs and input normalization.

    `normalization` is `(mean, std)` applied to pixels in [0, 1], or None for the dataset's own
    constants; `augment` turns on batched random affine + elastic distortion.
    """

    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    scheduler: str = "none"
    momentum: float = 0.9
    weight_decay: float = 0.0
    normalization: tuple[float, float] | None = None
    augment: bool = False


# The course notebooks scale raw bytes as x/256 - 0.5; on [0, 1] pixels that is (x - m) / s:
NOTEBOOK_SHIFT = (0.5 * 256 / 255, 256 / 255)
HALF = (0.5, 0.5)
UNIT = (0.0, 1.0)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    default_recipe: Recipe
    notebook_recipe: Recipe
    source: str = field(default="")


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, description: str, default: Recipe, notebook: Recipe
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds a model builder to the zoo under `name`."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        source = inspect.getdoc(builder) or ""
        _REGISTRY[name] = ModelEntry(name, builder, description, default, notebook, source)
        return builder

    return decorator


def list_models() -> list[str]:
    """Names of every model in the zoo, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`, or a ToolkitError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ToolkitError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a freshly initialized model from the zoo: `create_model("lenet")`."""
    entry = get_entry(name)
    try:
        return entry.builder(**kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:  # what nn layers raise for odd sizes
        raise ToolkitError(f"bad arguments for model {name!r}: {str(exc).splitlines()[0]}") from exc


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
