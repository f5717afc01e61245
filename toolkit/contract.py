"""The serving contract every exported model keeps, shared by the exporter and the runtime
(no torch import): `image` [N, 1, 28, 28] float32 pixels in [0, 1] in, `logits` and
`probabilities` [N, classes] float32 out."""

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
IMAGE_SHAPE = (1, 28, 28)
