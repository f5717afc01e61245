"""Writers that turn a checkpoint into deployable artifacts, and the manifest that lists them.

`export_checkpoint` writes into a folder; `toolkit.export.publish.export_verified` runs it in a staging
folder beside the target and swaps the result in only once it is complete and verified.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import library_versions
from toolkit.core.contract import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_DELAY_MS,
    IMAGE_SHAPE,
    INPUT_NAME,
    OUTPUT_NAMES,
    serving_name,
)
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.fileio import atomic_path, sha256_file, write_atomic, write_bytes
from toolkit.core.formats import FORMATS, Format, resolve_formats
from toolkit.imaging.framing import Framing
from toolkit.models.checkpoint import (
    build_deployable,
    checkpoint_file,
    load_checkpoint,
    save_checkpoint,
)

MIN_OPSET, MAX_OPSET = 18, 23
CALIBRATION_IMAGES = 500
TRITON_MAX_BATCH_SIZE = 1024  # the most images one request to Triton may carry
TRITON_LABELS = "labels.txt"


@dataclass
class ExportOptions:
    """What to export: format names from `toolkit.core.formats.FORMATS` ('all' for its ALL), plus the
    int8 and fp16 variants of the ONNX model as flags."""

    formats: tuple[str, ...] = ("onnx",)
    opset: int | None = None
    quantize: str | None = None  # "int8"
    fp16: bool = False
    data_dir: str | Path | None = None
    triton_name: str | None = None  # the export folder's serving name
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.chosen_formats()
        if self.opset is not None and not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ToolkitError(
                f"unsupported `opset` {self.opset}; the exporter supports {MIN_OPSET}..{MAX_OPSET}"
            )
        if self.quantize not in (None, "int8"):
            raise ToolkitError(f"unsupported `quantize` {self.quantize!r}; only int8")

    def chosen_formats(self) -> tuple[Format, ...]:
        variants = ("onnx-int8",) * (self.quantize == "int8") + ("onnx-fp16",) * self.fp16
        return resolve_formats((*self.formats, *variants))


@dataclass
class ExportJob:
    """What every writer needs: the model to trace, where to write, what to record."""

    model: torch.nn.Module
    out_dir: Path
    metadata: dict[str, Any]
    checkpoint: dict[str, Any]
    options: ExportOptions
    opset: int | None = None  # set by the ONNX writer


def _path(job: ExportJob, name: str) -> Path:
    return job.out_dir / FORMATS[name].artifact


def write_onnx(job: ExportJob) -> None:
    job.opset = export_onnx(job.model, _path(job, "onnx"), job.metadata, job.options.opset)


def write_torchscript(job: ExportJob) -> None:
    export_torchscript(job.model, _path(job, "torchscript"), job.metadata)


def write_torch_export(job: ExportJob) -> None:
    export_program(job.model, _path(job, "torch-export"), job.metadata)


def write_onnx_int8(job: ExportJob) -> None:
    quantize_int8(_path(job, "onnx"), _path(job, "onnx-int8"),
                  calibration_images(job.checkpoint, job.options.data_dir))


def write_onnx_fp16(job: ExportJob) -> None:
    convert_fp16(_path(job, "onnx"), _path(job, "onnx-fp16"))


def write_triton(job: ExportJob) -> None:
    write_triton_repository(_path(job, "onnx"), _path(job, "triton"),
                            job.options.triton_name or serving_name(job.out_dir), job.checkpoint["class_names"])


def model_metadata(checkpoint: dict[str, Any], checkpoint_sha256: str) -> dict[str, Any]:
    """What every artifact carries about itself (ONNX metadata_props, TorchScript extra files)."""
    metrics = checkpoint.get("metrics") or {}
    return {
        "arch": checkpoint["arch"],
        "dataset": checkpoint["dataset"],
        "class_names": list(checkpoint["class_names"]),
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "shape": ["N", 1, 28, 28],
            "range": [0.0, 1.0], "polarity": "white digit on black, as MNIST",
        },
        "outputs": {"logits": ["N", len(checkpoint["class_names"])],
                    "probabilities": ["N", len(checkpoint["class_names"])]},
        "normalization_baked_in": dict(checkpoint["normalization"]),
        "framing": Framing.from_dict(checkpoint.get("framing")).to_dict(),
        "source_checkpoint_sha256": checkpoint_sha256,
        "test_accuracy": metrics.get("test_acc"),
        "epoch": checkpoint.get("epoch"),
        "versions": library_versions("onnx", "onnxruntime-gpu", "onnxruntime"),
    }


def _example_batch() -> torch.Tensor:
    # Batch 2, not 1: the exporter specializes a batch of 1 into a static dimension.
    return torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {INPUT_NAME: {0: torch.export.Dim("batch", min=1, max=1 << 20)}}


def export_onnx(model: torch.nn.Module, path: Path, metadata: dict[str, Any], opset: int | None) -> int:
    """ONNX via the dynamo exporter, checked (full_check) and shape-inferred; returns the opset."""
    import onnx

    kwargs = {"opset_version": opset} if opset is not None else {}
    with _quiet():
        program = torch.onnx.export(
            model, (_example_batch(),), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_shapes=_batch_dim(), dynamo=True, verbose=False, **kwargs,
        )
    proto = program.model_proto
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))


def export_torchscript(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """TorchScript by tracing. torch.jit is deprecated upstream but still what LibTorch and
    Triton's PyTorch backend load, so it stays, with its deprecation warnings silenced."""
    with _quiet():
        traced = torch.jit.trace(model, _example_batch(), check_trace=True)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"metadata.json": json.dumps(metadata)})
    write_bytes(path, buffer.getvalue())


def export_program(model: torch.nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """The forward-looking `torch.export` program (.pt2), dynamic in the batch axis."""
    with _quiet():
        program = torch.export.export(model, (_example_batch(),), dynamic_shapes=_batch_dim())
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files={"metadata.json": json.dumps(metadata)})
    write_bytes(path, buffer.getvalue())


def quantize_int8(fp32_path: Path, path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 with onnxruntime, calibrated on real training images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 50)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as work, _quiet():
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with atomic_path(path) as tmp:
            quantize_static(
                str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
            )


def convert_fp16(fp32_path: Path, path: Path) -> None:
    """fp16 weights and compute, float32 input and outputs (onnxruntime's own converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    with atomic_path(path) as tmp:
        onnx.save_model(half, str(tmp))


def write_triton_repository(onnx_path: Path, repo: Path, name: str, class_names: list[str]) -> None:
    """A Triton Inference Server model repository serving the ONNX model under the contract's
    names, batched as `toolkit serve` batches, with the class names as the probabilities'
    label file (Triton's classification extension)."""
    classes = len(class_names)
    delay_us = round(DEFAULT_MAX_DELAY_MS * 1000)
    config = f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {TRITON_MAX_BATCH_SIZE}
input [
  {{ name: "{INPUT_NAME}", data_type: TYPE_FP32, dims: [ {", ".join(map(str, IMAGE_SHAPE))} ] }}
]
output [
  {{ name: "{OUTPUT_NAMES[0]}", data_type: TYPE_FP32, dims: [ {classes} ] }},
  {{ name: "{OUTPUT_NAMES[1]}", data_type: TYPE_FP32, dims: [ {classes} ], label_filename: "{TRITON_LABELS}" }}
]
instance_group [ {{ count: 1, kind: KIND_AUTO }} ]
dynamic_batching {{
  preferred_batch_size: [ {DEFAULT_MAX_BATCH_SIZE} ]
  max_queue_delay_microseconds: {delay_us}
}}
"""
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    write_atomic(repo / name / "config.pbtxt", lambda tmp: tmp.write_text(config))
    write_atomic(repo / name / TRITON_LABELS, lambda tmp: tmp.write_text("".join(f"{c}\n" for c in class_names)))
    shutil.copyfile(onnx_path, repo / name / "1" / "model.onnx")


def calibration_images(checkpoint: dict[str, Any], data_dir: str | Path | None) -> np.ndarray:
    from toolkit.data.datasets import load_split

    split = load_split(checkpoint["dataset"], data_dir, train=True)
    chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:CALIBRATION_IMAGES]
    return split.pixels()[chosen].numpy()


def export_checkpoint(
    checkpoint_path: str | Path, out_dir: str | Path, options: ExportOptions
) -> dict[str, Any]:
    """Write every requested artifact and `manifest.json` into `out_dir`; return the manifest."""
    options.validate()
    export = Export(out_dir)
    checkpoint_path = checkpoint_file(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint_sha = sha256_file(checkpoint_path)
    model = build_deployable(checkpoint)
    with torch.no_grad():
        logits, _ = model(_example_batch())
    if logits.shape[1:] != (len(checkpoint["class_names"]),):
        raise ToolkitError(f"{checkpoint_path}: the model answers {logits.shape[1]} classes but the checkpoint names "
                           f"{len(checkpoint['class_names'])}")
    if not torch.isfinite(logits).all():
        raise ToolkitError(f"{checkpoint_path}: the model's output is not finite (NaN or infinity): it is broken")
    metadata = model_metadata(checkpoint, checkpoint_sha)
    # The export dir is self-contained: the reference weights travel with the artifacts.
    save_checkpoint(export.reference, {k: v for k, v in checkpoint.items()
                                          if k not in ("format", "format_version", "optimizer_state",
                                                       "scheduler_state")})
    job = ExportJob(model, export.path, metadata, checkpoint, options)
    for fmt in options.chosen_formats():
        globals()[fmt.writer](job)  # write_<name>, defined above for each format of the table
    return export.create_manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=options.command,
        source_checkpoint=str(Path(checkpoint_path).resolve()), onnx_opset=job.opset, metadata=metadata)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter and deprecation warnings; our own report says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
