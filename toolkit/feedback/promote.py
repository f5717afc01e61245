"""`toolkit promote`: a fine-tuned export replaces the served one only when it is better.

The candidate is first copied beside the served export (its snapshot); every gate judges that
copy, and that copy is what is swapped in. The gates, in order, each a one-line refusal: the
candidate is a proven export (its files match its manifest, and its parity.json, hashed in the
manifest, proves a passed check of exactly those files); on the dataset's test set it loses at
most `max_acc_drop` points against the served model; on the held-out labelled images (e.g. the
held-out part of `toolkit feedback export`) it is right more often than the served model. Only
then is it swapped in as `toolkit export` swaps, the served export kept beside it as
`NAME.previous` (`rollback` swaps them back). A running `toolkit demo` notices the new export
and switches to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from toolkit.core.errors import ToolkitError
from toolkit.core.export_dir import Export
from toolkit.core.fileio import files_together, write_json
from toolkit.core.manifest import PARITY
from toolkit.data.datasets import load_split
from toolkit.data.imagefolder import read_image_folder
from toolkit.export.publish import replacing, staging_beside, swap_in
from toolkit.insight.evaluate import ScoringModel, load_scoring_model, model_logits

DEFAULT_MAX_ACC_DROP = 0.2  # points of test accuracy a candidate may lose
CHANGED_SHOWN = 32


@dataclass
class Promotion:
    """What `promote` measured and decided."""

    promoted: bool
    reason: str
    candidate: str
    serving: str
    kept_as: str | None
    test_acc: dict[str, float]
    heldout_acc: dict[str, float]
    heldout_images: int
    max_acc_drop: float
    time: str


def previous_of(serving: Path) -> Path:
    """Where the export a promotion replaced is kept."""
    return serving.with_name(serving.name + ".previous")


def _accuracy(model: ScoringModel, pixels: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    predicted = model_logits(model, pixels).argmax(1)
    return float((predicted == labels).mean()), predicted


def _refusal(snapshot: Export, shown_as: Path, role: str = "candidate") -> str | None:
    """Why `snapshot` (of the export at `shown_as`, the `role`) is not a proven export, or None."""
    manifest = snapshot.manifest()
    problems = snapshot.integrity(manifest).problems
    if problems:
        name, problem = next(iter(problems.items()))
        problem = problem.replace(str(snapshot), str(shown_as))
        return f"the {role}'s files do not match its manifest ({name}: {problem})"
    problem = snapshot.parity_problem(manifest)
    if problem is not None:
        return f"the {role}'s parity {problem} (export it with verification, or run `toolkit verify`)"
    return None


def promote(candidate: str | Path, serving: str | Path, heldout: str | Path, *,
            data_dir: str | Path | None = None, max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
            report_dir: str | Path = Path("reports") / "promotion") -> Promotion:
    """Replace `serving` with `candidate` if it passes every gate; write promotion.json and
    changed.png (the held-out images whose answer changed, before and after) either way.

    The candidate is copied first into a staging dir beside `serving` (its snapshot): that copy
    is what is checked, scored and swapped in, whatever the candidate's path holds meanwhile.
    `serving` is locked throughout, the candidate while it is copied (`publish.replacing`)."""
    candidate, serving = Path(candidate).resolve(), Path(serving).resolve()
    if not 0 <= max_acc_drop <= 100:
        raise ToolkitError(f"must be between 0 and 100 points, got {max_acc_drop}", option="max_acc_drop")
    if candidate == serving:
        raise ToolkitError(f"{candidate} is the served export itself")
    for role, path in (("candidate", candidate), ("served", serving)):
        if not path.is_dir():
            raise ToolkitError(f"no {role} export at {path}")
    kept = previous_of(serving)
    with (replacing(serving, wait=False),
          staging_beside(serving, keep_previous=kept, named_by="serving") as (_, staged),
          _standing_for(staged, candidate)):
        snapshot = Export(staged)
        with replacing(candidate, wait=False, required=False):
            _copy_export(Export(candidate), snapshot)
        return _promote(candidate, snapshot, serving, Path(heldout), data_dir, max_acc_drop, Path(report_dir))


def _copy_export(candidate: Export, snapshot: Export) -> None:
    """Copy the candidate's manifest, then parity.json and every file that manifest lists, into
    `snapshot`. Only regular files are copied: a missing file, a link or a FIFO is left for the
    integrity check to name."""
    _copy_regular_file(candidate.manifest_path, snapshot.manifest_path)
    for name in [*snapshot.manifest()["artifacts"], PARITY]:
        _copy_regular_file(candidate.path / name, snapshot.path / name)


def _copy_regular_file(source: Path, target: Path) -> None:
    try:
        if not stat.S_ISREG(os.lstat(source).st_mode):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ToolkitError(f"cannot copy {source}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _standing_for(snapshot: Path, candidate: Path) -> Iterator[None]:
    """Errors about the snapshot name the candidate it was copied from."""
    try:
        yield
    except ToolkitError as exc:
        if str(snapshot) not in str(exc.args[0]):
            raise
        raise ToolkitError(str(exc.args[0]).replace(str(snapshot), str(candidate)), option=exc.option) from None


def _promote(candidate: Path, snapshot: Export, serving: Path, heldout: Path, data_dir: str | Path | None,
             max_acc_drop: float, report_dir: Path) -> Promotion:
    """Score the served export and the candidate's snapshot; swap the snapshot in if it passes."""
    models = {"serving": load_scoring_model(serving, "cpu"), "candidate": load_scoring_model(snapshot, "cpu")}
    if models["serving"].class_names != models["candidate"].class_names:
        raise ToolkitError("the candidate and the served model name different classes")
    if models["serving"].dataset != models["candidate"].dataset:
        raise ToolkitError(f"the candidate was trained on {models['candidate'].dataset}, the served model on "
                           f"{models['serving'].dataset}")
    test = load_split(models["serving"].dataset, data_dir, train=False)
    test_pixels, test_labels = test.pixels().numpy(), test.labels.numpy()
    test_acc, heldout_acc, answers = {}, {}, {}
    images = {}
    for role, model in models.items():
        test_acc[role] = _accuracy(model, test_pixels, test_labels)[0]
        # Each model sees the held-out drawings framed as it frames its own inputs.
        images[role] = read_image_folder(heldout, model.class_names, model.framing)
        heldout_acc[role], answers[role] = _accuracy(model, images[role].unit_float(), images[role].labels)
    drop = 100 * (test_acc["serving"] - test_acc["candidate"])
    reason = _refusal(snapshot, candidate)
    if reason is None and drop > max_acc_drop:
        reason = (f"the candidate loses {drop:.2f} points of test accuracy ({test_acc['serving']:.2%} -> "
                  f"{test_acc['candidate']:.2%}; allowed {max_acc_drop:g})")
    if reason is None and heldout_acc["candidate"] <= heldout_acc["serving"]:
        reason = (f"the candidate is not better on the held-out images ({heldout_acc['candidate']:.2%} against "
                  f"{heldout_acc['serving']:.2%} for the served model)")
    kept = None
    if reason is None:
        kept = previous_of(serving)
        swap_in(snapshot.path, serving, keep_previous=kept, named_by="serving")
        reason = (f"promoted: held-out {heldout_acc['serving']:.2%} -> {heldout_acc['candidate']:.2%}, test "
                  f"{test_acc['serving']:.2%} -> {test_acc['candidate']:.2%}")
    result = Promotion(promoted=kept is not None, reason=reason, candidate=str(candidate), serving=str(serving),
                       kept_as=str(kept) if kept else None, test_acc=test_acc, heldout_acc=heldout_acc,
                       heldout_images=len(images["serving"]), max_acc_drop=max_acc_drop,
                       time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    _write_report(result, images["serving"].pixels, images["serving"].labels, answers, models["serving"].class_names,
                  report_dir)
    return result


def _write_report(result: Promotion, pixels: np.ndarray, labels: np.ndarray, answers: dict[str, np.ndarray],
                  class_names: list[str], out: Path) -> None:
    from toolkit.core.plots import plot_digit_grid

    changed = np.flatnonzero(answers["serving"] != answers["candidate"])[:CHANGED_SHOWN]
    captions = [f"{class_names[labels[i]]}: {class_names[answers['serving'][i]]} -> "
                f"{class_names[answers['candidate'][i]]}" for i in changed]
    with files_together(out) as stage:
        plot_digit_grid(pixels[changed] / 255, captions, stage("changed.png"),
                        f"held-out images whose answer changed (given: served -> candidate), "
                        f"{int((answers['serving'] != answers['candidate']).sum())} in all")
        write_json(stage("promotion.json"), asdict(result))


def rollback(serving: str | Path) -> Path:
    """Swap the served export and the one the last promotion kept; returns the kept one's path."""
    serving = Path(serving).resolve()
    with replacing(serving, wait=False):
        return _swap_back(serving)


def _swap_back(serving: Path) -> Path:
    previous = previous_of(serving)
    if not Export(previous).manifest_path.is_file():
        raise ToolkitError(f"nothing to roll back to: no previous export at {previous}")
    problem = _refusal(Export(previous), previous, "previous export")  # what was kept may have changed since
    if problem is not None:
        raise ToolkitError(f"not rolled back, {serving} unchanged: {problem}")
    swap = serving.with_name(f".{serving.name}.rollback-{os.getpid()}")
    try:
        os.replace(serving, swap)
        os.replace(previous, serving)
        os.replace(swap, previous)
    except OSError as exc:
        raise ToolkitError(f"cannot roll back {serving}: {exc.strerror or exc}") from exc
    return previous
