"""The serving contract every exported model keeps, shared by the exporter, the runtime and the
server (no torch import): `image` [N, 1, 28, 28] float32 pixels in [0, 1] in, `logits` and
`probabilities` [N, classes] float32 out, under one model name, batched dynamically by default."""

import os
import re
from pathlib import Path

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
IMAGE_SHAPE = (1, 28, 28)

# Dynamic batching defaults of `toolkit serve` and the exported Triton repository. No delay:
# requests that arrive while a run computes queue up and share the next run, so batches grow with
# load by themselves, and a lone request never waits for company (with LeNet a 2 ms delay halved
# 1-client throughput, docs/benchmarks.md). A delay pays only where one run costs much more than
# a request's overhead.
DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS = 64, 0.0


def serving_name(export_dir: str | Path) -> str:
    """The name an export is served under (`toolkit serve`, its Triton repository): the export
    folder's name, with anything a URL path or a Triton model folder cannot hold made `_`."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(os.path.realpath(export_dir)).name).strip(".")  # no raise on loops
    return name or "model"


IMAGE_MODEL_SUFFIX = "-image"


def image_model_name(name: str) -> str:
    """The name the image model of the export served as `name` is served under."""
    return name + IMAGE_MODEL_SUFFIX
