"""The one protocol every backend is run through: a `Runner` takes float32 pixels [N, 1, 28, 28]
in [0, 1] and answers (logits, probabilities) [N, classes] as numpy arrays. verify compares
runners (one per backend, from `runtime.backends`), evaluate scores one; `runtime.Predictor.run`
is the served one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.core.contract import INPUT_NAME
from toolkit.runtime.predictor import create_session

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def torch_runner(module: Callable[[torch.Tensor], Any]) -> Runner:
    """A torch module keeping the serving contract (a DeployableModel, or one loaded from an
    export) as a Runner."""
    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            logits, probs = module(torch.from_numpy(batch))
        return logits.numpy(), probs.numpy()
    return run


def onnx_runner(path: Path, provider: str) -> Runner:
    """An ONNX model in a bare onnxruntime session (no integrity or contract checks: what verify
    compares, byte for byte what was exported) as a Runner."""
    session = create_session(path, provider)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = session.run(None, {INPUT_NAME: batch})
        return np.asarray(logits, dtype=np.float32), np.asarray(probs, dtype=np.float32)
    return run
