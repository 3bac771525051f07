"""gtrans: GTrans (arXiv 2305.14880), METHODS.md §4. See ``method`` for the details; ``with_memory`` for
gtrans_memory (its teacher as a memory of normal patches, without the student)."""

from anomap.methods.gtrans.config import DISTANCES, MAP_HEADS, MAP_NORMS, MEMORY_MODES, GTransConfig
from anomap.methods.gtrans.method import GTrans
from anomap.methods.gtrans.with_memory import GTransMemoryConfig, GTransWithMemory

__all__ = ["DISTANCES", "MAP_HEADS", "MAP_NORMS", "MEMORY_MODES", "GTrans", "GTransConfig", "GTransMemoryConfig",
           "GTransWithMemory"]
