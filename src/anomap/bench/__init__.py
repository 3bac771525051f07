"""``anomap bench``: train + evaluate (dataset, method) pairs, the dev-suite means with bootstrap intervals,
and the paired comparison of two benches that decides a method default.

* :mod:`anomap.bench.runner`: one subprocess per pair, a Markdown row each, ``bench.json`` and
  ``summaries.npz`` in its run folder;
* :mod:`anomap.bench.suite`: the suite mean of each metric over datasets with a 95% interval;
* :mod:`anomap.bench.compare`: B - A per dataset and for the suite, paired intervals, the verdict.
"""

from anomap.bench.runner import HEADER, SEP, _append, machine, row, run_bench, run_one

__all__ = ["HEADER", "SEP", "_append", "machine", "row", "run_bench", "run_one"]
