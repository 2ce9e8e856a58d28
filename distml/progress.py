"""Progress messages: every distml module logs to a child of the `distml` logger; the CLI installs the handler that
prints them (`distml.cli`), and a Python caller can attach its own. The epoch line is written here, once."""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger("distml")


def epoch_line(name: str, record, epochs: int) -> str:
    """'NAME: epoch 2/3 train_loss=0.1234 val_loss=0.2345 val_acc=0.9345 (1.2 s)' from an EpochRecord or its dict."""
    r = record if isinstance(record, dict) else dataclasses.asdict(record)
    return (
        f"{name}: epoch {r['epoch']}/{epochs} train_loss={r['train_loss']:.4f} val_loss={r['val_loss']:.4f} "
        f"val_acc={r['val_accuracy']:.4f} ({r['seconds']:.1f} s)"
    )
