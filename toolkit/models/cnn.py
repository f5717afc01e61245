"""The convolutional networks of the classic MNIST course notebooks."""

from torch import nn

from toolkit.models.registry import HALF, NOTEBOOK_SHIFT, UNIT, Recipe, register_model


@register_model(
    "convnet",
    description="two 5x5 conv+pool stages (32, 64 channels), fc 512",
    default=Recipe("adamw", 2e-3, 128, 6, scheduler="onecycle", weight_decay=5e-4),
    notebook=Recipe("sgd", 1e-2, 256, 10, momentum=0.9, normalization=HALF),
)
def convnet(num_classes: int = 10) -> nn.Module:
    """The CNN of TensorFlow's "Deep MNIST for experts" tutorial (conv 5x5 32 and 64 channels,
    fc 1024 there, 512 in the course notebook that ports it to PyTorch), without dropout.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512), nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )


@register_model(
    "cnn3x3",
    description="two 3x3 conv+pool stages (32, 64 channels), one Xavier-initialized fc",
    # Without a hidden layer this model overfits by epoch 6 (99.1%); distortions take it past 99.3%.
    default=Recipe("adamw", 3e-3, 128, 8, scheduler="onecycle", weight_decay=5e-4, augment=True),
    notebook=Recipe("adam", 1e-3, 100, 20, normalization=UNIT),
)
def cnn3x3(num_classes: int = 10) -> nn.Module:
    """The "CNN in PyTorch" course-notebook model: VGG-style 3x3 convolutions (Simonyan and
    Zisserman, 2014) on MNIST, with the classifier initialized by Xavier-uniform (Glorot and
    Bengio, 2010).
    """
    classifier = nn.Linear(64 * 7 * 7, num_classes)
    nn.init.xavier_uniform_(classifier.weight)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        classifier,
    )


@register_model(
    "widecnn",
    description="two 3x3 convs without pooling (32, 64 channels), fc 128",
    default=Recipe("adamw", 1e-3, 128, 4, scheduler="onecycle", weight_decay=5e-4),
    notebook=Recipe("adam", 1e-3, 256, 3, normalization=(0.1307, 0.3081)),
)
def widecnn(num_classes: int = 10) -> nn.Module:
    """The course notebook's "no pooling" CNN: full-resolution 3x3 feature maps feeding a
    large fully connected layer, to show what pooling saves (6.4M parameters).
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(64 * 28 * 28, 128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


@register_model(
    "tinycnn",
    description="one 3x3 conv (20 channels, sigmoid), one fc: the equal-budget CNN for mlp",
    # 1e-2: the fc layer's 13,520 inputs are all-positive sigmoid outputs; 3e-3 stopped at 97.46%.
    default=Recipe("adamw", 1e-2, 128, 6, scheduler="onecycle"),
    notebook=Recipe("sgd", 1e-2, 1024, 10, momentum=0.0, normalization=NOTEBOOK_SHIFT),
)
def tinycnn(num_classes: int = 10) -> nn.Module:
    """The course notebook's DNN-vs-CNN comparison: a single unpadded 3x3 convolution with
    sigmoid, sized (135,410 parameters) to match `mlp`'s 135,160.
    """
    return nn.Sequential(
        nn.Conv2d(1, 20, 3), nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(20 * 26 * 26, num_classes),
    )


@register_model(
    "stridecnn",
    description="3x3 conv then a 2x2 stride-2 conv instead of pooling (20 channels)",
    default=Recipe("adamw", 3e-3, 128, 6, scheduler="onecycle", weight_decay=5e-4),
    notebook=Recipe("adam", 1e-2, 1024, 10, normalization=NOTEBOOK_SHIFT),
)
def stridecnn(num_classes: int = 10) -> nn.Module:
    """The course notebook's strided CNN: downsampling by a learned 2x2 stride-2 convolution
    ("Striving for simplicity: the all convolutional net", Springenberg et al., 2014).
    """
    return nn.Sequential(
        nn.Conv2d(1, 20, 3), nn.ReLU(inplace=True),
        nn.Conv2d(20, 20, 2, stride=2), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(20 * 13 * 13, num_classes),
    )
