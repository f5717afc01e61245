"""The Gradio sketchpad demo: `python demo/app.py [EXPORT_DIR]` (same as `toolkit demo`)."""

from __future__ import annotations

import sys

from toolkit.demo.app import build_demo  # noqa: F401  (re-exported)


def main() -> None:
    from toolkit.cli import main as cli_main

    sys.argv = [sys.argv[0], "demo", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
