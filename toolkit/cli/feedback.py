"""`toolkit feedback ...` and `toolkit promote`: corrections back into the model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from toolkit.cli import tables
from toolkit.cli.console import console, err_console
from toolkit.cli.options import (
    BENCH_DIR,
    DataDirOption,
)
from toolkit.core.errors import ToolkitError


class _ReviewByDefault(TyperGroup):
    """`toolkit feedback [DIR]` reviews DIR: an argument that names no command is review's."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["review", *args]
        return super().parse_args(ctx, args)


feedback_app = typer.Typer(cls=_ReviewByDefault, help="Review the corrections collected by the demo "
                           "(`toolkit feedback [DIR]`), drop some, export them to train on.")
FeedbackDirArgument = Annotated[Path, typer.Argument(help="The demo's --feedback-dir.")]


@feedback_app.callback(invoke_without_command=True)
def feedback_default(ctx: typer.Context) -> None:
    """With no command: review ./feedback; with a folder: review it."""
    if ctx.invoked_subcommand is None:
        feedback_review(Path("feedback"))


@feedback_app.command("review")
def feedback_review(
    folder: FeedbackDirArgument = Path("feedback"),
    out: Annotated[Path | None, typer.Option(help="Report dir (default: reports/feedback).")] = None,
) -> None:
    """Examples per class, how often the model was wrong and which confusions; feedback.png
    (the corrected drawings) and feedback.json."""
    from toolkit.feedback.store import FeedbackStore, write_review

    examples, problems = FeedbackStore(folder).examples()
    for problem in problems:
        err_console.print(problem, highlight=False)
    out = out or BENCH_DIR / "feedback"
    report = write_review(examples, problems, out)
    console.print(tables.feedback_table(report, folder))
    for confusion in report["confusions"][:10]:
        console.print(f"{confusion['label']} taken for {confusion['predicted']}: {confusion['count']}",
                      highlight=False)
    console.print(f"report directory: {out}")


@feedback_app.command("drop")
def feedback_drop(
    example_id: Annotated[str, typer.Argument(help="The example's id (its file name without .json).")],
    folder: Annotated[Path, typer.Option("--dir", help="The feedback folder.")] = Path("feedback"),
) -> None:
    """Remove an example that is wrong or unwanted."""
    from toolkit.feedback.store import FeedbackStore

    FeedbackStore(folder).drop(example_id)
    console.print(f"dropped {example_id} from {folder}")


@feedback_app.command("export")
def feedback_export(
    folder: FeedbackDirArgument,
    out: Annotated[Path, typer.Argument(help="New folder: OUT/train/<class>/*.png and OUT/heldout/<class>/*.png.")],
    heldout_percent: Annotated[int, typer.Option(help="Share of examples held out, chosen by content.")] = 50,
) -> None:
    """The drawings as drawn, as labelled images to train (`train --extra-data OUT/train`) and
    evaluate (`evaluate --images OUT/heldout`) on; the split is by content (the same drawing is
    always on the same side), stable as the folder grows, and a drawing saved again with the same
    label is exported once."""
    from toolkit.feedback.store import export_feedback

    counts = export_feedback(folder, out, heldout_percent,
                             on_problem=lambda problem: err_console.print(problem, highlight=False))
    console.print(f"{counts['train']} examples to {out / 'train'}, {counts['heldout']} to {out / 'heldout'}"
                  + (f"; {counts['duplicates']} saved again left out" if counts["duplicates"] else ""))


def promote(
    candidate: Annotated[Path | None, typer.Argument(help="The fine-tuned export to promote.")] = None,
    serving: Annotated[Path, typer.Option(help="The export being served (demo or serve).")] = Path("exports/lenet"),
    heldout: Annotated[Path | None, typer.Option(
        help="Held-out labelled images (e.g. OUT/heldout of `toolkit feedback export`).")] = None,
    max_acc_drop: Annotated[float, typer.Option(help="Test-accuracy points the candidate may lose.")] = 0.2,
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Where promotion.json and changed.png go.")] = BENCH_DIR / "promotion",
    rollback: Annotated[bool, typer.Option("--rollback", help="Bring back the export the last promotion "
                                           "replaced (and keep the current one in its place).")] = False,
) -> None:
    """Replace the served export with CANDIDATE only if its parity holds, it loses at most
    --max-acc-drop points on the test set and it is right more often on --heldout; otherwise
    nothing changes. The replaced export is kept as SERVING.previous.

    Example: toolkit promote exports/lenet-tuned --serving exports/lenet --heldout corrections/heldout
    """
    from toolkit.feedback.promote import promote as promote_export
    from toolkit.feedback.promote import rollback as roll_back

    if rollback:
        if candidate is not None or heldout is not None:
            raise ToolkitError("takes only `serving`", option="rollback")
        kept = roll_back(serving)
        console.print(f"rolled back: {serving} is the previous export again; the replaced one is kept as {kept}")
        return
    if candidate is None or heldout is None:
        raise ToolkitError("needs a CANDIDATE export and `heldout` images (or pass `rollback`)")
    with console.status("scoring the candidate and the served model..."):
        result = promote_export(candidate, serving, heldout, data_dir=data_dir, max_acc_drop=max_acc_drop,
                                report_dir=out)
    console.print(f"report: {out / 'promotion.json'}, {out / 'changed.png'}")
    if not result.promoted:
        raise ToolkitError(f"not promoted, {serving} unchanged: {result.reason}")
    console.print(f"{result.reason}; the replaced export is kept as {result.kept_as}")


