"""The model zoo. Importing this package registers every model."""

from toolkit.models import cnn, lenet, mlp  # noqa: F401  (registration side effects)
from toolkit.models.registry import (
    ModelEntry,
    Recipe,
    count_parameters,
    create_model,
    get_entry,
    list_models,
    register_model,
)

__all__ = [
    "ModelEntry",
    "Recipe",
    "count_parameters",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
]
