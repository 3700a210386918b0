"""Robust model-level statistics, as the API documents them (implemented in ``service.robust``).

The functions live outside ``service.api`` so the storage layer can keep pre-computed
statistics without importing the web framework; this module keeps the documented import path.
"""

from service.robust import (
    ALPHA_METRICS,
    FILTERS,
    STATS,
    TRIM,
    Selection,
    Stat,
    describe,
    select,
    statistic,
    summarize,
    trimmed_mean,
    untrusted_reason,
)

__all__ = [
    "ALPHA_METRICS", "FILTERS", "STATS", "TRIM", "Selection", "Stat", "describe", "select",
    "statistic", "summarize", "trimmed_mean", "untrusted_reason",
]
