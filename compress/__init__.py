"""raypress.compress: models in, smaller models out. Knows nothing of Ray."""

__version__ = "0.1.0"
