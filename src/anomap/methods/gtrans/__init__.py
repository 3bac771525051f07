"""gtrans: GTrans (arXiv 2305.14880), METHODS.md §4. See ``method`` for the details."""

from anomap.methods.gtrans.config import DISTANCES, MAP_HEADS, MAP_NORMS, MEMORY_MODES, GTransConfig
from anomap.methods.gtrans.method import GTrans

__all__ = ["DISTANCES", "MAP_HEADS", "MAP_NORMS", "MEMORY_MODES", "GTrans", "GTransConfig"]
