"""The spectral engine: eigenvalues, power-law alpha, fit quality, traps and rank collapse.

Pure math on numpy arrays or torch tensors (numpy on a CPU, torch on CUDA); no files, no
database, no logging configuration.
"""

from alphawatch.workers.spectral.analysis import (
    analyze_many,
    analyze_matrix,
    as_matrices,
    resolve_device,
)
from alphawatch.workers.spectral.plfit import FIT_METHODS, fit_power_law
from alphawatch.workers.spectral.stream import analysis_workers, analyze_stream
from alphawatch.workers.spectral.types import FitStatus, LayerResult, PowerLawFit, Thresholds

__all__ = [
    "FIT_METHODS",
    "FitStatus",
    "LayerResult",
    "PowerLawFit",
    "Thresholds",
    "analysis_workers",
    "analyze_many",
    "analyze_matrix",
    "analyze_stream",
    "as_matrices",
    "fit_power_law",
    "resolve_device",
]
