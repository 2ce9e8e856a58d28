"""What runs inside a Ray worker: tensors from the object store, the one checkpoint format, the epoch and fold
reports a trainer sends to the driver, and a worker's error in one line."""

from __future__ import annotations

import base64
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

from distml import checkpoints, storage
from distml.folds import SplitData
from distml.progress import publish_epoch

if TYPE_CHECKING:
    import torch

    from distml.train import Divergence, EpochRecord, GroupState, Metrics, TrainState

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


def options_for_ray(config) -> dict:
    """`config.to_dict()` as trials and workers receive it: without --storage. Tune saves each trial's config beside
    its results (params.json) and a cloud URI may hold credentials; Ray hands trials and workers their storage."""
    return {**config.to_dict(), "storage": None}


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


def save_checkpoint(state: TrainState | GroupState, location: str, stamp: checkpoints.Stamp | None = None) -> None:
    """The one checkpoint format: the state's dict, torch-saved to one file at a local path or cloud URI (a local
    one is replaced atomically), with the `stamp` of the run that writes it when given."""
    import torch  # workers only: see above

    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    saved = buffer.getvalue()
    storage.write_bytes(location, saved if stamp is None else checkpoints.stamped(saved, stamp))


def restore_checkpoint(state: TrainState | GroupState, location: str, stamp: checkpoints.Stamp | None = None) -> bool:
    """Load the checkpoint at `location` into `state`; False when there is none. With the run's `stamp`, one that
    another run, or this run under other options, wrote is refused (checkpoints.check_stamp)."""
    import torch  # workers only: see above

    saved = storage.read_bytes(location)
    if saved is None:
        return False
    if stamp is not None:
        checkpoints.check_stamp(saved, stamp, location)
    state.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True, map_location="cpu"))
    return True


def fold_predictions(model, data: SplitData, val_index: torch.Tensor, device: torch.device) -> tuple:
    """A fold model's class probabilities for its validation examples, and for the run's test set with its Metrics
    there (None, None without one)."""
    import torch  # workers only: see above

    from distml.train import metrics_of, predict

    images = tensor(data.inputs, device)
    probabilities = torch.softmax(predict(model, images, index=val_index), dim=1)
    if data.test_inputs is None:
        return probabilities, None, None
    logits = predict(model, tensor(data.test_inputs, device))
    test = metrics_of(logits, tensor(data.test_labels, device), num_classes=logits.shape[1])
    return probabilities, torch.softmax(logits, dim=1), test


def fold_outputs(val_index, probabilities, test_probabilities, model=None) -> str:
    """A fold's predictions (and its model, when kept) as one .npz file's bytes, base64 for the JSON report: the
    driver writes it as folds/fold_N.npz without decoding it."""
    arrays = {
        "val_index": val_index.cpu().numpy().astype(np.int64),
        "probabilities": probabilities.float().cpu().numpy(),
    }
    if test_probabilities is not None:
        arrays["test_probabilities"] = test_probabilities.float().cpu().numpy()
    if model is not None:  # by value: the driver unpickles it without the factory's code on its path
        arrays["model"] = np.frombuffer(ray.cloudpickle.dumps(model.cpu()), dtype=np.uint8)  # ray:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fold_result(
    data: SplitData,
    split: int,
    history: list[EpochRecord],
    train_seconds: float,
    val: Metrics | Divergence,
    sizes: tuple[int, int],
    device: torch.device,
    test=None,
) -> dict:
    """Everything the report needs of one finished split (`test`: its Metrics on the run's test set, if any).

    A split whose training diverged (`val` its Divergence) has no scores: `diverged` is true, and `error` the line
    that names it, the epoch and the rate."""
    import torch  # workers only: see above

    from distml.train import Divergence

    repeat, fold = data.split(split)
    diverged = isinstance(val, Divergence)
    if diverged:
        scores = dict.fromkeys(("val_accuracy", "val_loss", "precision_macro", "recall_macro", "f1_macro"))
    else:
        scores = {
            "val_accuracy": val.accuracy,
            "val_loss": val.loss,
            "precision_macro": val.precision,
            "recall_macro": val.recall,
            "f1_macro": val.f1,
        }
    result = {
        "split": split,
        "repeat": repeat,
        "fold": fold,
        "train_size": sizes[0],
        "val_size": sizes[1],
        **scores,
        "epochs": len(history),
        "train_seconds": train_seconds,
        "node": ray.util.get_node_ip_address(),  # ray:
        "node_id": ray.get_runtime_context().get_node_id(),  # ray:
        "hostname": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "history_json": json.dumps([asdict(r) for r in history]),
        "confusion_json": None if diverged else json.dumps(val.confusion.tolist()),
        "test_accuracy": None if test is None else test.accuracy,
        "test_loss": None if test is None else test.loss,
    }
    if diverged:
        result.update(diverged=True, diverged_epoch=val.epoch, lr=val.lr, error=f"{data.name(split)}: {val}")
    return result


def epoch_report(data: SplitData, splits: list[int], records: list[EpochRecord]) -> dict:
    """What a trainer sends after every epoch of a group of splits."""
    return {
        "fold_done": False,
        "epoch": records[0].epoch,
        "records_json": json.dumps(
            [{"split": s, "name": data.name(s), **asdict(r)} for s, r in zip(splits, records, strict=True)]
        ),
    }


def final_report(
    data: SplitData,
    splits: list[int],
    models: list,
    histories: list[list[EpochRecord]],
    vals: list,
    indices: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    train_seconds: float,
    keep_models: bool,
    device_name: str | None = None,
) -> dict:
    """What a trainer sends once its splits are done: for each, its fold_result and its fold_outputs (predictions
    on its validation examples and the test set, made here, where the model is). A split whose training diverged
    (its `vals` entry a Divergence) has no predictions: its outputs are None."""
    from distml.train import Divergence

    results, outputs = [], []
    for split, model, history, val, (train_index, val_index) in zip(
        splits, models, histories, vals, indices, strict=True
    ):
        sizes = (len(train_index), len(val_index))
        if isinstance(val, Divergence):  # no model worth predicting with
            results.append(fold_result(data, split, history, train_seconds, val, sizes, device))
            outputs.append(None)
        else:
            probabilities, test_probabilities, test = fold_predictions(model, data, val_index, device)
            results.append(fold_result(data, split, history, train_seconds, val, sizes, device, test))
            kept = model if keep_models else None
            outputs.append(fold_outputs(val_index, probabilities, test_probabilities, kept))
        if device_name is not None:
            results[-1]["device"] = device_name
    return {"fold_done": True, "results_json": json.dumps(results), "outputs_json": json.dumps(outputs)}


def log_epochs(report: dict, epochs: int) -> None:
    """The driver's line for each fold of an epoch report."""
    for record in json.loads(report["records_json"]):
        publish_epoch(log, record["name"], int(record["split"]), record, epochs)


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
