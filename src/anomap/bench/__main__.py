"""``python -m anomap.bench``: one benchmark pair, run by ``anomap bench`` in a fresh subprocess."""

from anomap.bench.runner import _main

_main()
