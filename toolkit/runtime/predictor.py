"""Serving with onnxruntime: provider choice that reports the truth, and the `Predictor`."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.classes import DIGITS
from toolkit.core.contract import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAMES
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import NOT_CHECKED, VERIFIED, Export
from toolkit.imaging.framing import Framing

log = logging.getLogger("toolkit.runtime.predictor")
PROVIDERS = ("auto", "cuda", "cpu")
_ORT_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
# Images per onnxruntime run on the CPU. A zoo model's activations for 128 images take a few MB
# and stay in cache; for 1024 they do not (LeNet's first layer alone writes 25 MB), and one run
# over 1024 images was 10-34% slower than eight over 128 (docs/benchmarks.md).
CPU_CHUNK = 128


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # CUDA fallback warnings are reported by us, once
    return ort


def cuda_provider_usable() -> bool:
    """True when onnxruntime can really run on a GPU here (not merely has the provider built in)."""
    ort = _ort()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    _preload_cuda_libraries(ort)
    try:
        import torch

        if not torch.cuda.is_available():
            return False
    except ImportError:
        pass
    return True


def _preload_cuda_libraries(ort: Any) -> None:
    # onnxruntime-gpu finds the CUDA/cuDNN libraries that ship with torch's wheels this way.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.suppress(Exception):  # a failed preload only means no CUDA
            preload()


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads: int | None) -> None:
    """More threads than cores only makes each of them wait (1,000 threads: a minute an image)."""
    if threads is not None and not 1 <= threads <= usable_cores():
        raise ToolkitError(f"threads must be between 1 and {usable_cores()} (the cores here), got {threads}")


def create_session(path: str | Path, provider: str = "auto", threads: int | None = None) -> Any:
    """An InferenceSession on `provider`; `cuda` that cannot really load is an error, not a fallback."""
    if provider not in PROVIDERS:
        raise ToolkitError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    check_threads(threads)
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Threads sleep between runs instead of spinning: a spinning pool takes the CPU a server's
    # requests (and a demo's browser) need; it halved `toolkit serve`'s throughput on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    wants_cuda = provider != "cpu" and cuda_provider_usable()
    if provider == "cuda" and not wants_cuda:
        raise ToolkitError("cuda was asked for but CUDA is not usable here; use `provider` cpu", option="provider")
    providers = [_ORT_NAMES["cuda"], _ORT_NAMES["cpu"]] if wants_cuda else [_ORT_NAMES["cpu"]]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
        raise ToolkitError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc
    if provider == "cuda" and session.get_providers()[0] != _ORT_NAMES["cuda"]:
        raise ToolkitError("cuda was asked for but onnxruntime fell back to CPU", option="provider")
    return session


def session_provider(session: Any) -> str:
    """'cuda' or 'cpu': what the session really runs on."""
    return "cuda" if session.get_providers()[0] == _ORT_NAMES["cuda"] else "cpu"


def read_onnx_metadata(session: Any) -> dict[str, Any]:
    """The toolkit metadata stored in the model's metadata_props, JSON values decoded."""
    props = session.get_modelmeta().custom_metadata_map
    decoded: dict[str, Any] = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


def resolve_onnx_path(model: str | Path | Export) -> Path:
    """An export dir (its model.onnx) or a .onnx file."""
    path = Path(model)
    if path.is_dir():
        path = Export(path).onnx
    if not path.is_file():
        raise ToolkitError(f"no ONNX model at {path}; run `toolkit export` first or pass a .onnx file")
    if zipfile.is_zipfile(path):  # what torch.save and torch.jit.save write
        raise ToolkitError(f"{path} is a PyTorch file, not an ONNX model; export it (`toolkit export {path}`) "
                           "and pass the export dir")
    return path


def check_onnx_file(path: Path) -> None:
    """Refuse a file that fails the ONNX checker, with one line saying why."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        raise ToolkitError(f"{path} is not a valid ONNX model: {str(exc).strip().splitlines()[0]}") from exc
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ToolkitError(f"{path} is not a valid ONNX model ({type(exc).__name__})") from exc


def check_signature(session: Any, num_classes: int) -> None:
    """The model keeps the serving contract: one float32 `image` input [N, 1, 28, 28] and float32
    `logits` and `probabilities` outputs [N, num_classes]."""
    inputs, outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    names = [i.name for i in inputs]
    if names != [INPUT_NAME]:
        raise ToolkitError(f"the model takes inputs {names}, not one input {INPUT_NAME!r}: it is not a toolkit export")
    image = inputs[0]
    if image.type != "tensor(float)":
        raise ToolkitError(f"the model's {INPUT_NAME!r} input is {image.type}, expected tensor(float) (float32)")
    fixed = [d if isinstance(d, int) else None for d in image.shape[1:]]
    if len(image.shape) != 4 or any(d not in (None, want) for d, want in zip(fixed, IMAGE_SHAPE, strict=True)):
        raise ToolkitError(f"the model's {INPUT_NAME!r} input has shape {image.shape}, expected [N, 1, 28, 28]")
    for name in OUTPUT_NAMES:
        output = outputs.get(name)
        if output is None:
            raise ToolkitError(f"the model has outputs {list(outputs)}, not {' and '.join(OUTPUT_NAMES)}")
        if output.type != "tensor(float)" or len(output.shape) != 2:
            raise ToolkitError(f"the model's {name!r} output is {output.type} {output.shape}, expected float32 "
                               "[N, classes]")
        if isinstance(output.shape[1], int) and output.shape[1] != num_classes:
            raise ToolkitError(f"the model's {name!r} output has {output.shape[1]} classes but its metadata names "
                               f"{num_classes}")


def _class_names(metadata: dict[str, Any]) -> list[str]:
    """Class names from the model's metadata (the ten digits when absent)."""
    names = metadata.get("class_names", list(DIGITS))
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ToolkitError(f"the model's metadata has unreadable class names: {str(names)[:80]}")
    return names


@dataclass
class Prediction:
    """Class probabilities for one image, best first."""

    labels: list[str]
    probabilities: list[float]
    logits: list[float] = field(repr=False)

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def probability(self) -> float:
        return self.probabilities[0]

    def top_k(self, k: int) -> list[dict[str, Any]]:
        ranked = zip(self.labels[:k], self.probabilities[:k], strict=True)
        return [{"label": label, "probability": p} for label, p in ranked]


class Predictor:
    """An exported ONNX model behind onnxruntime: 28x28 [0, 1] images in, ranked classes out.

    `model` is an export (or its folder), or an .onnx file: one beside a manifest.json must
    match it (the model and its external data), a bare one with no manifest beside it is served
    as unverified. `export` is the folder the model is in, whichever it was."""

    def __init__(
        self, model: str | Path | Export, provider: str = "auto", threads: int | None = None, *,
        check_integrity: bool = True,
    ) -> None:
        self.path = resolve_onnx_path(model)
        self.export = Export(self.path.parent)
        if not check_integrity:
            self.manifest, self.integrity = self.export.manifest_if_readable(), NOT_CHECKED
        elif Path(model).is_dir() or Export.holding(self.path):
            self.manifest, self.integrity = self.export.prove(self.path.name, "serve"), VERIFIED
        else:
            self.manifest, self.integrity = {}, "unverified: a bare .onnx file with no manifest"
        self.parity = Export.parity_label(self.manifest)  # what the model card says of parity
        check_onnx_file(self.path)
        self.session = create_session(self.path, provider, threads)
        self.provider = session_provider(self.session)
        self.metadata = read_onnx_metadata(self.session)
        try:
            self.class_names = _class_names(self.metadata)
            check_signature(self.session, len(self.class_names))
            self.framing = Framing.from_dict(self.metadata.get("framing"))
        except ToolkitError as exc:
            raise ToolkitError(f"cannot serve {self.path}: {exc}") from None

    @functools.cached_property
    def model_sha256(self) -> str:
        """The served ONNX file's sha256 (what feedback records a correction was made against)."""
        from toolkit.core.fileio import sha256_file

        return sha256_file(self.path)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) for float32 images [N, 1, 28, 28] (or [N, 28, 28]) in [0, 1].

        On the CPU, big batches run CPU_CHUNK images at a time, which keeps activations in cache.
        """
        batch = np.asarray(images, dtype=np.float32)
        if batch.ndim == 3:
            batch = batch[:, None]
        if batch.ndim != 4 or batch.shape[1:] != (1, 28, 28):
            raise ToolkitError(f"expected images of shape [N, 1, 28, 28], got {list(batch.shape)}")
        if not np.isfinite(batch).all():
            raise ToolkitError("images contain NaN or infinite values")
        batch = np.ascontiguousarray(batch)
        step = len(batch) if self.provider != "cpu" else CPU_CHUNK
        chunks = [self._run_checked(batch[i : i + step]) for i in range(0, len(batch), step)]
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

    def _run_checked(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One onnxruntime run whose outputs keep the contract: [N, classes], finite."""
        logits, probabilities = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        expected = (len(batch), len(self.class_names))
        if logits.shape != expected or probabilities.shape != expected:
            raise ToolkitError(f"the model answered shapes {list(logits.shape)} and {list(probabilities.shape)} "
                               f"for {len(batch)} images, expected {list(expected)}")
        if not (np.isfinite(logits).all() and np.isfinite(probabilities).all()):
            raise ToolkitError("the model's output is not finite (NaN or infinity): the model is broken")
        return logits, probabilities

    def predict(self, image: np.ndarray) -> Prediction:
        """Ranked classes for one 28x28 image."""
        logits, probabilities = self.run(np.asarray(image, dtype=np.float32).reshape(1, 1, 28, 28))
        order = np.argsort(-probabilities[0])
        return Prediction(
            labels=[self.class_names[i] for i in order],
            probabilities=[float(probabilities[0, i]) for i in order],
            logits=logits[0].tolist(),
        )

    def describe(self) -> dict[str, Any]:
        """The model card: what this model is and how well it did."""
        return {
            "model": str(self.path),
            "arch": self.metadata.get("arch"),
            "dataset": self.metadata.get("dataset"),
            "test_accuracy": self.metadata.get("test_accuracy"),
            "parity": self.parity,
            "integrity": self.integrity,
            "provider": self.provider,
        }


class ReloadingPredictor:
    """The Predictor of whatever export is at a path now: when the export there changes (`toolkit
    promote` swaps a new one in, or `toolkit export` replaces it), the next `current` loads it.
    Callers take `current` once per request, so a request in flight finishes on the model it
    started with. A new export that fails to load (or its checks) is logged once, and the old
    model keeps serving; it is tried again at every check until it loads, since a copy still in
    progress (a manifest copied before its model) completes a moment later."""

    CHECK_EVERY_S = 1.0

    def __init__(self, model: str | Path | Export, **predictor_options: Any) -> None:
        self.model, self.options = Path(model), predictor_options
        self._predictor = Predictor(model, **predictor_options)
        self._stamp, self._checked = self._changes(), time.monotonic()
        self._failed: tuple[int, int, int] | None = None  # the change whose load failed, logged once
        self._lock = threading.Lock()

    def _changes(self) -> tuple[int, int, int] | None:
        """What changes when the export at the path is replaced: its manifest's (or the bare
        model's) inode, size and modification time."""
        watched = Export(self.model).manifest_path if self.model.is_dir() else self.model
        try:
            stat = watched.stat()
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    @property
    def current(self) -> Predictor:
        now = time.monotonic()
        if now - self._checked < self.CHECK_EVERY_S or not self._lock.acquire(blocking=False):
            return self._predictor
        try:
            self._checked = now
            stamp = self._changes()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._predictor = Predictor(self.model, **self.options)
                except (ToolkitError, OSError) as exc:  # OSError: a file removed while it was read
                    if stamp != self._failed:
                        log.error("kept serving the previous model: the export now at %s does not load (tried "
                                  "again every %g s): %s", self.model, self.CHECK_EVERY_S, exc)
                    self._failed = stamp
                else:
                    self._stamp = stamp
                    log.info("switched to the export now at %s", self.model)
        finally:
            self._lock.release()
        return self._predictor
