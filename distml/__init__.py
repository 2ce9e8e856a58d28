"""distml: Ray-distributed K-fold cross-validation and fine-tuning for PyTorch."""

__version__ = "0.1.0"
