"""The serving contract every exported model keeps, shared by the exporter, the runtime and the
server (no torch import): `image` [N, 1, 28, 28] float32 pixels in [0, 1] in, `logits` and
`probabilities` [N, classes] float32 out, under one model name."""

import os
import re
from pathlib import Path

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
IMAGE_SHAPE = (1, 28, 28)


def serving_name(export_dir: str | Path) -> str:
    """The name an export is served under (`toolkit serve`, its Triton repository): the export
    folder's name, with anything a URL path or a Triton model folder cannot hold made `_`."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(os.path.realpath(export_dir)).name).strip(".")  # no raise on loops
    return name or "model"


IMAGE_MODEL_SUFFIX = "-image"


def image_model_name(name: str) -> str:
    """The name the image model of the export served as `name` is served under."""
    return name + IMAGE_MODEL_SUFFIX
