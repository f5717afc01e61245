"""Preprocessing plus the Predictor: what the demo, `toolkit predict` and the tests call."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.errors import ToolkitError
from toolkit.imaging.decode import image_files
from toolkit.imaging.preprocess import preprocess
from toolkit.runtime.predictor import Predictor


@dataclass
class Classification:
    """The answer for one image; `label` is None when there was nothing to classify."""

    label: str | None
    probability: float | None
    top_k: list[dict[str, Any]]
    digit: np.ndarray | None  # the 28x28 input the model saw
    milliseconds: float  # preprocessing + inference, server side

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "probability": self.probability, "top_k": self.top_k}


def classify(predictor: Predictor, image: Any, top_k: int = 3) -> Classification:
    """Preprocess any drawing or image and rank the classes; raises ToolkitError if unreadable."""
    started = time.perf_counter()
    digit = preprocess(image, predictor.framing)
    if digit is None:
        return Classification(None, None, [], None, 1000 * (time.perf_counter() - started))
    prediction = predictor.predict(digit)
    return Classification(
        label=prediction.label,
        probability=prediction.probability,
        top_k=prediction.top_k(top_k),
        digit=digit,
        milliseconds=1000 * (time.perf_counter() - started),
    )


def classify_files(predictor: Predictor, paths: Iterable[str | Path], top_k: int = 3) -> list[dict[str, Any]]:
    """One result per image file, in order (folders expanded by `image_files`); an unreadable
    file gets `error` and does not stop the rest."""
    results = []
    for path in image_files(paths):
        try:
            if path.is_dir():
                raise ToolkitError("no image files in this folder")
            results.append({"file": str(path), **classify(predictor, path, top_k).to_json()})
        except ToolkitError as exc:
            results.append({"file": str(path), "error": str(exc)})
    return results
