"""Parity: run every exported backend over the whole test set and edge inputs against PyTorch.

Modelled on Optimum's export validation (per-output shapes, max diff against atol, a verdict),
but over every test image rather than one dummy batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.contract import OUTPUT_NAMES
from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.manifest import PARITY_VERSION, IntegrityError
from toolkit.data.datasets import load_split
from toolkit.models.checkpoint import build_deployable, load_checkpoint
from toolkit.runtime.backends import export_backends
from toolkit.runtime.runners import Runner, torch_runner

DEFAULT_ATOL, DEFAULT_RTOL, DEFAULT_MAX_ACC_DROP = 1e-5, 1e-4, 0.3
EVAL_BATCH = 500


@dataclass
class BackendResult:
    """One backend's agreement with the PyTorch reference."""

    artifact: str
    kind: str  # "fp32" (tolerance verdict), or "int8" / "fp16" (accuracy-drop verdict)
    accuracy: float
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    shapes_ok: bool
    worst_sample: int  # index into the checked inputs (test set first, then edge cases)
    worst_sample_diff: float
    passed: bool
    reason: str = ""
    failure: str = ""  # what failed: "shape", "tolerance" (fp32) or "accuracy" (int8/fp16)


@dataclass
class ParityReport:
    passed: bool
    atol: float
    rtol: float
    max_acc_drop: float
    dataset: str
    samples: int
    edge_cases: list[str]
    reference_accuracy: float
    backends: dict[str, BackendResult] = field(default_factory=dict)
    integrity: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> sha256 of every file checked

    def failures(self) -> list[str]:
        lines = [f"{name}: {r.reason}" for name, r in self.backends.items() if not r.passed]
        lines += [f"{name}: {problem}" for name, problem in self.integrity.items()]
        return lines

    def to_json(self) -> dict[str, Any]:
        data = {"parity_version": PARITY_VERSION, **asdict(self)}
        data["backends"] = {name: asdict(r) for name, r in self.backends.items()}
        return data

    def summary(self) -> dict[str, Any]:
        """What the manifest records of this report (beside parity.json's sha256)."""
        return {"passed": self.passed, "atol": self.atol, "rtol": self.rtol,
                "reference_accuracy": self.reference_accuracy,
                "backends": {name: {"accuracy": r.accuracy, "max_abs_diff": r.max_abs_diff,
                                    "top1_agreement": r.top1_agreement, "passed": r.passed}
                             for name, r in self.backends.items()}}

    def raise_for_failure(self, prefix: str = "parity check failed") -> None:
        """Raise the ParityError subclass for the first kind of failure (integrity, shape,
        tolerance, accuracy drop), carrying this report; do nothing when the check passed."""
        if self.passed:
            return
        failed = {r.failure for r in self.backends.values() if not r.passed}
        error: type[ParityError] = (
            ArtifactIntegrityError if self.integrity else ShapeError if "shape" in failed
            else ToleranceError if "tolerance" in failed else AccuracyDropError)
        raise error(f"{prefix}: " + "; ".join(self.failures()), self)


class ParityError(ToolkitError):
    """A parity check failed; `report` holds every backend's figures."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


class ShapeError(ParityError):
    """A backend's outputs are not [N, classes]."""


class ToleranceError(ParityError):
    """An fp32 backend's outputs differ from PyTorch's beyond atol + rtol x |reference| or are not
    finite, or its top-1 differs."""


class AccuracyDropError(ParityError):
    """An int8 or fp16 backend loses more test accuracy than allowed."""


class ArtifactIntegrityError(ParityError, IntegrityError):
    """Export files are missing, changed since export, or not listed in the manifest."""


def edge_inputs() -> tuple[list[str], list[np.ndarray]]:
    """Batches that stress shapes and value ranges: sizes 1, 7 and 256, blank, saturated, noise."""
    gen = np.random.default_rng(0)
    cases = {
        "batch-1-noise": gen.random((1, 1, 28, 28)),
        "batch-7-noise": gen.random((7, 1, 28, 28)),
        "batch-256-noise": gen.random((256, 1, 28, 28)),
        "all-zero": np.zeros((4, 1, 28, 28)),
        "all-one": np.ones((4, 1, 28, 28)),
    }
    return list(cases), [c.astype(np.float32) for c in cases.values()]




def run_all(
    runner: Runner, batches: list[np.ndarray], num_classes: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """A runner's outputs over `batches`, concatenated, and whether every batch had the right shapes."""
    logits, probs, shapes_ok = [], [], True
    for batch in batches:
        lg, pr = runner(batch)
        shapes_ok &= lg.shape == pr.shape == (len(batch), num_classes)
        logits.append(lg)
        probs.append(pr)
    return np.concatenate(logits), np.concatenate(probs), bool(shapes_ok)


@dataclass
class Reference:
    """What every backend is compared with: the export's PyTorch model over the test set (in
    batches of EVAL_BATCH) and the edge batches."""

    checkpoint: dict[str, Any]
    labels: np.ndarray  # of the test set, which the batches start with
    batches: list[np.ndarray]
    logits: np.ndarray
    probabilities: np.ndarray
    edge_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.checkpoint["class_names"])

    def report(self, atol: float, rtol: float, max_acc_drop: float) -> ParityReport:
        """An empty report (no backends yet) for checks against this reference."""
        accuracy = float((self.logits[:len(self.labels)].argmax(1) == self.labels).mean())
        return ParityReport(passed=True, atol=atol, rtol=rtol, max_acc_drop=max_acc_drop,
                            dataset=self.checkpoint["dataset"], samples=len(self.logits),
                            edge_cases=self.edge_names, reference_accuracy=accuracy)

    def compare(self, artifact: str, kind: str, runner: Runner, report: ParityReport) -> BackendResult:
        """`runner` over every batch against this reference, both outputs under `report`'s tolerances."""
        logits, probabilities, shapes_ok = run_all(runner, self.batches, self.num_classes)
        outputs = dict(zip(OUTPUT_NAMES, ((logits, self.logits), (probabilities, self.probabilities)), strict=True))
        return compare_each(artifact, kind, outputs, self.labels, shapes_ok, report)


def check_tolerances(atol: float, rtol: float, max_acc_drop: float) -> None:
    for name, value in (("atol", atol), ("rtol", rtol), ("max_acc_drop", max_acc_drop)):
        if not (math.isfinite(value) and value >= 0):
            raise ToolkitError(f"must be a finite number >= 0, got {value}", option=name)


def reference_outputs(export: Export, data_dir: str | Path | None = None) -> Reference:
    """The PyTorch reference of `export` (its model.pt) on its test set."""
    checkpoint = load_checkpoint(export.reference)
    test = load_split(checkpoint["dataset"], data_dir, train=False)
    edge_names, edge_batches = edge_inputs()
    batches = np.array_split(test.pixels().numpy(), -(-len(test) // EVAL_BATCH)) + edge_batches
    logits, probabilities, _ = run_all(torch_runner(build_deployable(checkpoint)), batches,
                                       len(checkpoint["class_names"]))
    return Reference(checkpoint, test.labels.numpy(), batches, logits, probabilities, edge_names)


def verify_export(
    export: str | Path | Export,
    *,
    data_dir: str | Path | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
    progress: Callable[[str], None] | None = None,
) -> ParityReport:
    """Compare every backend in `export` with its PyTorch checkpoint; write `parity.json` and, in
    step with it, the manifest's parity summary (pass or fail)."""
    export = Export(export)
    check_tolerances(atol, rtol, max_acc_drop)
    if not export.path.is_dir():
        raise ToolkitError(f"export dir not found: {export}")
    manifest = export.manifest()
    reference = reference_outputs(export, data_dir)
    report = reference.report(atol, rtol, max_acc_drop)
    report.integrity = export.integrity(manifest).problems
    report.artifacts = {name: entry["sha256"] for name, entry in manifest["artifacts"].items()}
    for backend in export_backends(export.path):
        if progress:
            progress(backend.name)
        report.backends[backend.name] = reference.compare(backend.format.artifact, backend.format.kind,
                                                          backend.runner(), report)
    if not report.backends:
        raise ToolkitError(f"{export} holds no exported model to verify (model.onnx, model.ts, ...)")
    report.passed = all(r.passed for r in report.backends.values()) and not report.integrity
    export.record_parity(report.to_json(), report.summary())
    return report


def compare_each(
    artifact: str, kind: str, outputs: dict[str, tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
    shapes_ok: bool, report: ParityReport,
) -> BackendResult:
    """Every output (name -> (answer, reference)) under `compare_outputs`' rules: the result of
    the first that fails, its reason naming it, or else the first output's."""
    results = {name: compare_outputs(artifact, kind, answer, ref, labels, shapes_ok, report.atol, report.rtol,
                                     report.max_acc_drop)
               for name, (answer, ref) in outputs.items()}
    for name, result in results.items():
        if not result.passed:
            result.reason = f"{name}: {result.reason}"
            return result
    return next(iter(results.values()))


def compare_outputs(
    artifact: str, kind: str, logits: np.ndarray, ref: np.ndarray, labels: np.ndarray, shapes_ok: bool,
    atol: float, rtol: float, max_acc_drop: float,
) -> BackendResult:
    """One backend's outputs against the reference's, under the rules of its kind: fp32 within
    atol + rtol x |reference| and the same top-1 everywhere; int8/fp16 by accuracy drop. A NaN
    or infinite value fails either kind."""
    n_test = len(labels)
    finite = np.isfinite(logits)
    # A non-finite value counts as float32's largest: a difference no backend reaches, and plain JSON.
    logits = np.where(finite, logits.astype(np.float64), np.finfo(np.float32).max)
    diff = np.abs(logits - ref.astype(np.float64))
    excess = diff - (atol + rtol * np.abs(ref))
    worst = int(excess.max(axis=1).argmax())
    significant = np.abs(ref) > atol  # relative error of a near-zero logit says nothing
    max_rel = float((diff[significant] / np.abs(ref[significant])).max()) if significant.any() else 0.0
    accuracy = float((logits[:n_test].argmax(1) == labels).mean())
    agreement = float((logits.argmax(1) == ref.argmax(1)).mean())
    ref_acc = float((ref[:n_test].argmax(1) == labels).mean())
    if not shapes_ok:
        passed, failure, reason = False, "shape", "output shapes differ from [N, classes]"
    elif not finite.all():
        first = int(np.argwhere(~finite)[0][0])
        passed, failure = False, "tolerance" if kind == "fp32" else "accuracy"
        reason = f"{int((~finite).sum())} values are NaN or infinite (the first in sample {first})"
    elif kind == "fp32":
        passed, failure = bool((excess <= 0).all()) and agreement == 1.0, "tolerance"
        reason = "" if passed else (
            f"sample {worst} differs by {diff[worst].max():.3g} "
            f"(allowed {atol:g} + {rtol:g} x |reference|), top-1 agreement {agreement:.2%}")
    else:
        drop = 100 * (ref_acc - accuracy)
        passed, failure = drop <= max_acc_drop, "accuracy"
        reason = "" if passed else (
            f"accuracy drops {drop:.2f} points (allowed {max_acc_drop}); worst sample {worst} "
            f"differs by {diff[worst].max():.3g}")
    return BackendResult(
        artifact=artifact, kind=kind, accuracy=accuracy, max_abs_diff=float(diff.max()),
        max_rel_diff=max_rel, top1_agreement=agreement, shapes_ok=shapes_ok, worst_sample=worst,
        worst_sample_diff=float(diff[worst].max()), passed=passed, reason=reason, failure="" if passed else failure,
    )
