"""The one table of export formats: the artifact each writes, what kind of model it is, what it
is built from, and how it runs. Export, verify and the CLI's choices read it; adding a format is
one entry here and its writer (`toolkit.export.writers.write_<name>`). No torch import: the CLI builds
its `--format` choices from it before any work."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.errors import ToolkitError

KINDS = ("fp32", "int8", "fp16", "repository")


@dataclass(frozen=True)
class Format:
    """One export format. `backend` names it in parity reports (`{provider}` is filled in for
    onnxruntime); `runtime` is what verify runs it on (None: not a model to run)."""

    name: str
    artifact: str
    kind: str
    runtime: str | None
    backend: str
    description: str
    requires: tuple[str, ...] = ()  # formats written first, which this one is made from

    @property
    def writer(self) -> str:
        return "write_" + self.name.replace("-", "_")

    def backend_name(self, provider: str = "cpu") -> str:
        return self.backend.format(provider=provider)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("onnx", "model.onnx", "fp32", "onnxruntime", "onnxruntime-{provider}",
           "ONNX through the dynamo exporter, checked and shape-inferred: the model that is served"),
    Format("torchscript", "model.ts", "fp32", "torch", "torchscript",
           "TorchScript by tracing, for LibTorch and Triton's PyTorch backend"),
    Format("torch-export", "model.pt2", "fp32", "torch", "torch-export",
           "a torch.export program, dynamic in the batch axis"),
    Format("onnx-int8", "model.int8.onnx", "int8", "onnxruntime", "onnxruntime-{provider}-int8",
           "onnxruntime's static QDQ int8, calibrated on training images", requires=("onnx",)),
    Format("onnx-fp16", "model.fp16.onnx", "fp16", "onnxruntime", "onnxruntime-{provider}-fp16",
           "fp16 weights and compute, float32 input and outputs", requires=("onnx",)),
    Format("triton", "triton", "repository", None, "",
           "a Triton Inference Server model repository serving the ONNX model", requires=("onnx",)),
)}
ALL = ("onnx", "torchscript", "torch-export", "triton")  # what `--format all` writes


def resolve_formats(names: tuple[str, ...]) -> tuple[Format, ...]:
    """The formats `names` ask for ('all' standing for ALL), with what they are made from first,
    in table order."""
    wanted = {name for requested in names for name in (ALL if requested == "all" else (requested,))}
    unknown = sorted(wanted - set(FORMATS))
    if unknown:
        raise ToolkitError(f"unknown format {unknown[0]!r}; choose from {', '.join([*FORMATS, 'all'])}")
    wanted |= {required for name in wanted for required in FORMATS[name].requires}
    return tuple(f for f in FORMATS.values() if f.name in wanted)
