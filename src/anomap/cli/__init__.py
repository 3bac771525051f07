"""The ``anomap`` command line: methods | fit | predict | evaluate | report | export | serve | bench | demo.

:mod:`anomap.cli.parser` defines the arguments, :mod:`anomap.cli.commands` carries them out.
"""

from __future__ import annotations

import sys

from anomap.cli.parser import build_parser
from anomap.errors import AnomapError

__all__ = ["build_parser", "main"]


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

