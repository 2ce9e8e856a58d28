"""What runs inside a Ray worker: tensors from the object store, the one checkpoint format, the epoch and fold
reports a trainer sends to the driver, and a worker's error in one line."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import ray

from distml import storage
from distml.folds import SplitData
from distml.progress import epoch_line

if TYPE_CHECKING:
    import torch

    from distml.train import EpochRecord, GroupState, TrainState

log = logging.getLogger(__name__)

# torch is imported inside the functions that run in workers: the driver only schedules, and torch's import would
# add seconds to every run's start-up


def ship_model_code(*factories) -> None:
    """Factories given as callables (model, loss, optimizer) travel to the trainers with their module's code, not a
    reference to the module: the script, notebook or test that defined them need not be importable on the workers."""
    for factory in factories:
        if factory is None or isinstance(factory, str):
            continue
        name = getattr(factory, "__module__", None) or type(factory).__module__
        module = sys.modules.get(name)
        if module is not None and name != "__main__" and name.split(".")[0] not in ("distml", "torch", "builtins"):
            ray.cloudpickle.register_pickle_by_value(module)  # ray: __main__ is pickled by value already


def device_for(gpus: float) -> torch.device:
    import torch  # workers only: see above

    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch  # workers only: see above

    with warnings.catch_warnings():  # the object store's arrays are read-only; training never writes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


def tensors(data: SplitData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tensor(data.inputs, device), tensor(data.labels, device)


def fold_index(data: SplitData, fold: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) indices of `fold` on `device`."""
    return tuple(tensor(part, device) for part in data.indices(fold))


def save_checkpoint(state: TrainState | GroupState, location: str) -> None:
    """The one checkpoint format: the state's dict, torch-saved to one file at a local path or cloud URI (a local
    one is replaced atomically)."""
    import torch  # workers only: see above

    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    storage.write_bytes(location, buffer.getvalue())


def restore_checkpoint(state: TrainState | GroupState, location: str) -> bool:
    """Load the checkpoint at `location` into `state`; False when there is none."""
    import torch  # workers only: see above

    saved = storage.read_bytes(location)
    if saved is None:
        return False
    state.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True, map_location="cpu"))
    return True


def test_metrics(models: list, data: SplitData, device: torch.device) -> list:
    """Each fold model's Metrics on the run's test set (None each without one)."""
    if data.test_inputs is None:
        return [None] * len(models)
    from distml.train import evaluate  # torch: workers only, see above

    inputs, labels = tensor(data.test_inputs, device), tensor(data.test_labels, device)
    return [evaluate(model, inputs, labels) for model in models]


def fold_result(
    fold: int,
    history: list[EpochRecord],
    train_seconds: float,
    val,
    sizes: tuple[int, int],
    device: torch.device,
    test=None,
) -> dict:
    """Everything the report needs of one finished fold (`test`: its Metrics on the run's test set, if any)."""
    import torch  # workers only: see above

    return {
        "fold": fold,
        "train_size": sizes[0],
        "val_size": sizes[1],
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "precision_macro": val.precision,
        "recall_macro": val.recall,
        "f1_macro": val.f1,
        "epochs": len(history),
        "train_seconds": train_seconds,
        "node": ray.util.get_node_ip_address(),  # ray:
        "node_id": ray.get_runtime_context().get_node_id(),  # ray:
        "hostname": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "history_json": json.dumps([asdict(r) for r in history]),
        "confusion_json": json.dumps(val.confusion.tolist()),
        "test_accuracy": None if test is None else test.accuracy,
        "test_loss": None if test is None else test.loss,
    }


def epoch_report(folds: list[int], records: list[EpochRecord]) -> dict:
    """What a trainer sends after every epoch of a group of folds."""
    return {
        "fold_done": False,
        "epoch": records[0].epoch,
        "records_json": json.dumps([{"fold": f, **asdict(r)} for f, r in zip(folds, records, strict=True)]),
    }


def final_report(results: list[dict]) -> dict:
    """What a trainer sends once its folds are done: one fold_result each."""
    return {"fold_done": True, "results_json": json.dumps(results)}


def log_epochs(report: dict, epochs: int) -> None:
    """The driver's line for each fold of an epoch report."""
    for record in json.loads(report["records_json"]):
        log.info(epoch_line(f"fold {record['fold']}", record, epochs))


def error_line(error: BaseException) -> str:
    """A worker's error in one line: the exception a Ray task raised (its `cause`), or a traceback's last line, or
    else the first line that says something after the headings Ray Train puts before it ('Training failed due to
    worker errors:')."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and cause is not error:
        text = str(cause).strip().splitlines()
        return f"{type(cause).__name__}: {text[0]}" if text else type(cause).__name__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if any(line.startswith(("Traceback (most recent call last)", "ray::")) for line in lines):
        return lines[-1]
    said = next((i for i, line in enumerate(lines) if not line.endswith(":")), len(lines) - 1)
    return " ".join(lines[: said + 1])
