"""distml: Ray-distributed K-fold cross-validation for any PyTorch classifier on any in-memory dataset.

    import distml
    result = distml.cross_validate("mlp", (X, y), k=5)        # or a callable, or "mynets.py:build"
    result.summary                                             # mean, std and 95% interval of every score

The verbs mirror the CLI (`distml kfold`, `train`, `finetune`, `sweep`, `tune`, `predict`, `compare`); see distml.api.
"""

import sys
import types

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
    tune,
)
from distml.version import __version__


class _PublicFace(types.ModuleType):
    """`distml.train`, `.finetune`, `.sweep`, `.tune`, `.compare` and `.predict` are verbs here, and also modules below
    (the training loop and the workflows). Importing such a module must not replace the verb: Python would set the
    package's attribute to the module. The modules stay in sys.modules under their full names."""

    def __setattr__(self, name: str, value) -> None:
        if name in _VERBS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_VERBS = frozenset({"train", "finetune", "sweep", "tune", "compare", "predict"})
sys.modules[__name__].__class__ = _PublicFace

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
    "tune",
    "__version__",
]
