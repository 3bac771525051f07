"""``python -m anomap.cli``: the same command line as ``anomap`` and ``python -m anomap``."""

import sys

from anomap.cli import main

if __name__ == "__main__":
    sys.exit(main())
