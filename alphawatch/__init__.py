"""alphawatch: heavy-tailed spectral health of a model, checkpoint after checkpoint."""

__version__ = "0.1.0"
