"""anomap: unsupervised visual anomaly detection. Train on good parts, score and localise defects.

>>> import anomap
>>> det = anomap.create()  # gtrans_memory; anomap.list_methods() names the others
>>> det.fit("data/bottle")
>>> res = det.predict("photo.png")
"""

from anomap import methods as _methods  # noqa: F401  (methods register themselves)
from anomap._version import __version__
from anomap.detector import Detector, create, load
from anomap.metrics.evaluate import evaluate
from anomap.registry import list_methods
from anomap.types import AnomalyResult, EvalResult

__all__ = ["AnomalyResult", "Detector", "EvalResult", "__version__", "create", "evaluate", "list_methods", "load"]
