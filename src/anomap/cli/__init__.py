"""The ``anomap`` command line: methods | fit | predict | evaluate | report | export | serve | update | bench | demo.

:mod:`anomap.cli.parser` defines the arguments, :mod:`anomap.cli.commands` carries them out.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from anomap.cli.parser import build_parser
from anomap.errors import AnomapError

__all__ = ["build_parser", "main"]

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra:  # `predict MODEL DIR --backend onnx DIR2`: inputs after an option are inputs too
        if getattr(args, "cmd", None) == "predict" and not any(e.startswith("-") for e in extra):
            args.inputs += extra
        else:
            ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except AnomapError as e:
        if args.debug:
            raise
        print(f"anomap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anomap: interrupted (a resumable checkpoint is kept where training had one: use --resume)",
              file=sys.stderr)
        return 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """anomap's own warnings as one plain line (they already name the file and the fix); others as usual."""
    if category.__module__.split(".")[0] == "anomap" or Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        print(f"anomap: warning: {message}", file=file or sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=file or sys.stderr)
