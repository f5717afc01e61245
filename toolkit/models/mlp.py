"""Fully connected networks."""

from torch import nn

from toolkit.models.registry import HALF, NOTEBOOK_SHIFT, Recipe, register_model


@register_model(
    "mlp",
    description="784-170-10 with sigmoid: the equal-budget DNN to compare with tinycnn",
    default=Recipe("adamw", 3e-3, 128, 8, scheduler="onecycle"),
    notebook=Recipe("sgd", 1e-2, 1024, 10, momentum=0.0, normalization=NOTEBOOK_SHIFT),
)
def mlp(num_classes: int = 10) -> nn.Module:
    """The course notebook's one-hidden-layer perceptron (135,160 parameters), the classic
    sigmoid MLP of LeCun et al. (1998)'s comparison table.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 170), nn.Sigmoid(),
        nn.Linear(170, num_classes),
    )


@register_model(
    "fcnet",
    description="784-1500-1000-500-10 with ReLU: a large fully connected net",
    default=Recipe("adamw", 1e-3, 128, 6, scheduler="onecycle", weight_decay=5e-4),
    notebook=Recipe("sgd", 1e-2, 256, 10, momentum=0.9, normalization=HALF),
)
def fcnet(num_classes: int = 10) -> nn.Module:
    """The course notebook's deep fully connected net (about 3.3M parameters), set against
    `convnet` to show what convolution buys at similar size.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 1500), nn.ReLU(inplace=True),
        nn.Linear(1500, 1000), nn.ReLU(inplace=True),
        nn.Linear(1000, 500), nn.ReLU(inplace=True),
        nn.Linear(500, num_classes),
    )
