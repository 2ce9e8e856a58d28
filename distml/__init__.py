"""distml: Ray-distributed K-fold cross-validation for any PyTorch classifier on any in-memory dataset.

    import distml
    result = distml.cross_validate("mlp", (X, y), k=5)        # or a callable, or "mynets.py:build"
    result.summary                                             # mean, std and 95% interval of every score

The verbs mirror the CLI (`distml kfold`, `train`, `finetune`, `sweep`, `predict`, `compare`); see distml.api.
"""

from distml.api import (
    ClusterConfig,
    CVResult,
    DistmlError,
    compare,
    cross_validate,
    finetune,
    load_model,
    predict,
    sweep,
    train,
)
from distml.version import __version__

__all__ = [
    "CVResult",
    "ClusterConfig",
    "DistmlError",
    "compare",
    "cross_validate",
    "finetune",
    "load_model",
    "predict",
    "sweep",
    "train",
    "__version__",
]
