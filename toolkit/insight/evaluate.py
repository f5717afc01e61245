"""`toolkit evaluate`: accuracy, per-class metrics, confusion matrix and the digits it gets wrong,
on a dataset's test set or on a folder of labelled images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import NOT_CHECKED, ONNX, VERIFIED, Export
from toolkit.core.fileio import files_together, write_json
from toolkit.core.plots import plot_confusion, plot_digit_grid
from toolkit.data.datasets import get_dataset, load_split
from toolkit.data.imagefolder import read_image_folder
from toolkit.imaging.framing import Framing
from toolkit.models.checkpoint import build_deployable, checkpoint_file, load_checkpoint
from toolkit.runtime.runners import Runner, torch_runner

MISTAKES_SHOWN = 32
BATCH = 1000


@dataclass
class ScoringModel:
    """A model to score, whatever it was loaded from, behind the one Runner protocol."""

    name: str  # used for the default report dir
    source: str
    backend: str
    dataset: str
    class_names: list[str]
    run: Runner
    integrity: str  # whether the file run was proven to be the one its export's manifest lists
    framing: Framing  # how the model's training images were framed: how to frame others for it


def load_scoring_model(path: str | Path | Export, provider: str = "auto", *,
                       check_integrity: bool = True) -> ScoringModel:
    """A checkpoint (.pt) or run dir, an export (its model.onnx) or an .onnx file."""
    path = Path(path)
    if path.suffix == ".onnx" or (path.is_dir() and Export(path).onnx.is_file()):
        from toolkit.runtime.predictor import Predictor

        predictor = Predictor(path, provider=provider, check_integrity=check_integrity)
        meta = predictor.metadata
        if not isinstance(meta.get("dataset"), str):
            raise ToolkitError(f"{predictor.path} has no toolkit metadata (dataset, class names)")
        name = predictor.path.parent.name if path.is_dir() or path.name == ONNX else path.stem
        return ScoringModel(name, str(predictor.path), f"onnxruntime-{predictor.provider}", meta["dataset"],
                            predictor.class_names, predictor.run, predictor.integrity, predictor.framing)
    path = checkpoint_file(path)
    integrity = _checkpoint_integrity(path, check_integrity)
    checkpoint = load_checkpoint(path)
    return ScoringModel(path.resolve().parent.name, str(path), "pytorch", checkpoint["dataset"],
                        list(checkpoint["class_names"]), torch_runner(build_deployable(checkpoint)), integrity,
                        Framing.from_dict(checkpoint.get("framing")))


def _checkpoint_integrity(path: Path, check: bool) -> str:
    """A checkpoint inside an export (beside a manifest.json) must be the one the manifest lists."""
    export = Export.holding(path)
    if export is None:
        return "a training checkpoint, not part of an export"
    if not check:
        return NOT_CHECKED
    export.prove(path.name, "evaluate")
    return VERIFIED


def model_logits(model: ScoringModel, pixels: np.ndarray) -> np.ndarray:
    """The model's logits for float32 images [N, 1, 28, 28] in [0, 1], in batches; broken
    (not finite) output is an error."""
    logits = np.concatenate([model.run(chunk)[0] for chunk in np.array_split(pixels, -(-len(pixels) // BATCH))])
    if not np.isfinite(logits).all():
        raise ToolkitError(f"{model.source}: the model's output is not finite (NaN or infinity): it is broken")
    return logits


def per_class_metrics(matrix: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float]]:
    true_positive = np.diag(matrix).astype(float)
    predicted = matrix.sum(0).astype(float)
    actual = matrix.sum(1).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(actual[i])}
        for i, name in enumerate(class_names)
    }


def evaluate(
    model_path: str | Path,
    report_dir: str | Path | None = None,
    *,
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    provider: str = "auto",
    check_integrity: bool = True,
    images: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Score the whole test set (or, with `images`, a folder of labelled images in the
    ImageFolder layout, framed as the demo frames them) and write evaluation.json,
    confusion.png and mistakes.png."""
    model = load_scoring_model(model_path, provider, check_integrity=check_integrity)
    problems: list[str] = []
    if images is not None:
        if dataset is not None:
            raise ToolkitError("evaluates the test set of a dataset; `images` a folder: pass one of them",
                               option="dataset")
        folder = read_image_folder(images, model.class_names, model.framing)
        pixels, labels, problems, dataset = folder.unit_float(), folder.labels, folder.problems, str(images)
    else:
        dataset = dataset or model.dataset
        spec = get_dataset(dataset)
        if len(spec.class_names) != len(model.class_names):
            raise ToolkitError(f"{dataset} has {len(spec.class_names)} classes but the model predicts "
                               f"{len(model.class_names)}")
        test = load_split(dataset, data_dir, train=False)
        pixels, labels = test.pixels().numpy(), test.labels.numpy()
    logits = model_logits(model, pixels)
    predicted = logits.argmax(1)
    n = len(model.class_names)
    matrix = np.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    probabilities = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:MISTAKES_SHOWN]

    report_dir = Path(report_dir or Path("reports") / (model.name if images is None
                                                       else f"{model.name}-on-{Path(images).resolve().name}"))
    accuracy = float((predicted == labels).mean())
    report = {
        "model": model.source,
        "backend": model.backend,
        "dataset": dataset,
        "samples": len(labels),
        "accuracy": accuracy,
        "integrity": model.integrity,
        "problems": problems,  # images or folders left out of `images`, one line each
        "class_names": model.class_names,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class_metrics(matrix, model.class_names),
        "most_confident_mistakes": [
            {"index": int(i), "true": model.class_names[labels[i]], "predicted": model.class_names[predicted[i]],
             "probability": float(probabilities[i, predicted[i]]), **({"file": str(folder.files[i])} if images else {})}
            for i in wrong
        ],
    }
    title = f"{model.name} on {dataset}: accuracy {accuracy:.2%}"
    with files_together(report_dir) as stage:
        plot_confusion(matrix, model.class_names, stage("confusion.png"), title)
        plot_digit_grid(
            pixels[wrong, 0],
            # Two lines: Fashion-MNIST's "T-shirt/top → Ankle boot (0.94)" is wider than its cell.
            [f"{model.class_names[labels[i]]}\n→ {model.class_names[predicted[i]]} "
             f"({probabilities[i, predicted[i]]:.2f})" for i in wrong],
            stage("mistakes.png"),
            f"most confident mistakes ({len(np.flatnonzero(predicted != labels))} in all)",
        )
        write_json(stage("evaluation.json"), report)
    return report_dir, report
