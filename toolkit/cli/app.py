"""The `toolkit` command: the Typer app, every command registered in the order `--help` lists
them, and `main`, which turns every user error into one line and an exit code."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.markup import escape

from toolkit.cli import bench, export, feedback, insight, run, train
from toolkit.cli.console import err_console
from toolkit.core.errors import ToolkitError

app = typer.Typer(
    name="toolkit",
    help="Train small vision models on MNIST-like data, export them with proven parity, serve them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_versions(requested: bool) -> None:
    if requested:
        from toolkit import library_versions

        versions = library_versions("torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "gradio")
        toolkit_version = versions.pop("toolkit")
        installed = ", ".join(f"{name} {v}" for name, v in versions.items() if v != "not installed")
        typer.echo(f"toolkit {toolkit_version} ({installed})")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_versions, is_eager=True,
        help="Print the versions of toolkit and the libraries it runs on, and exit.")] = False,
) -> None:
    """Train small vision models on MNIST-like data, export them with proven parity, serve them."""


app.command()(train.train)
app.command()(export.export)
app.command("verify")(export.verify_command)
app.command()(run.predict)
app.command()(run.demo)
app.command()(run.serve)
app.command()(insight.evaluate)
app.command("inspect")(insight.inspect_command)
app.command("compare")(insight.compare_command)
app.add_typer(bench.bench_app, name="bench")
app.add_typer(feedback.feedback_app, name="feedback")
app.command()(feedback.promote)
app.command()(insight.models)


def main() -> None:
    """Entry point: every user error becomes one line on stderr and a non-zero exit, never a traceback."""
    try:
        _run_app()
    except BrokenPipeError:  # `toolkit ... | head`: the reader has gone, so has anyone to tell
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush must not fail too
        sys.exit(1)


def _run_app() -> None:
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # bad usage: unknown option, missing argument, bad choice
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `toolkit` alone: the help is the answer
            typer.echo(message)
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        _fail(f"{message} (see `{ctx.command_path if ctx else 'toolkit'} --help`)", code=2)
    except ToolkitError as exc:
        _fail(exc.for_command_line(), code=exc.exit_code)
    except KeyboardInterrupt:  # before typer runs the command
        code = 130
    except Exception as exc:
        if not _caused_by_ctrl_c(exc):
            raise
        code = 130
    if code == 130:  # typer turns Ctrl-C inside a command into exit code 130, silently
        _fail("interrupted", code=130)
    sys.exit(code if isinstance(code, int) else 0)


def _caused_by_ctrl_c(exc: BaseException | None) -> bool:
    """Ctrl-C inside a library can surface as its own error: torch.onnx.export, interrupted while it
    imports torch._dynamo, raises TorchExportError from the AttributeError the half import left."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


MAX_MESSAGE_CHARS = 2000  # an error is one line a person reads, whatever a file or a server put in it


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True,
                      markup=True)
    sys.exit(code)


def one_line(text: str) -> str:
    """`text` as one printable line of at most MAX_MESSAGE_CHARS: messages quote what servers,
    files and models say, and none of that may move the cursor, clear the screen or scroll away
    the rest of the error."""
    printable = "".join(c if c.isprintable() else (" " if c in "\t\r\n" else repr(c)[1:-1]) for c in text)
    if len(printable) <= MAX_MESSAGE_CHARS:
        return printable
    return f"{printable[:MAX_MESSAGE_CHARS]}... ({len(printable) - MAX_MESSAGE_CHARS:,} more characters)"
