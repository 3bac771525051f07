"""``python -m anomap`` (and ``torchrun ... -m anomap``): the command line of :mod:`anomap.cli`."""

import sys

from anomap.cli import main

if __name__ == "__main__":
    sys.exit(main())
