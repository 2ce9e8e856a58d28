"""Experiment tracking: a run recorded in MLflow or TensorBoard from the progress events it logs (see progress.py).

Inside `tracked(kind)` a tracker handles the records of the `distml` logger: the driver already receives every epoch
of every fold, so nothing changes on the workers. The tracker works on a thread of its own, fed by a queue, so that a
slow tracking server holds up no fold; and an error of the tracker stops the tracking (one warning), never the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import logging.handlers
import math
import numbers
import os
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path

from distml.atomic import write_json
from distml.config import check_track
from distml.errors import DistmlError
from distml.progress import FOLDS_KEY, EpochEnded, RunEnded, RunStarted, UnitEnded, UnitRetried
from distml.progress import logger as distml_logger
from distml.rundir import CONFIG_FILE

log = logging.getLogger(__name__)

TRACKED_EVENTS = (RunStarted, EpochEnded, UnitEnded, UnitRetried, RunEnded)
MLFLOW_FILE = "mlflow.json"  # in the run folder: the MLflow runs it is recorded in, continued on --resume
TENSORBOARD_DIR = "tensorboard"  # in the run folder: one folder of event files per fold (or trial)
DEFAULT_EXPERIMENT = "distml"
# MLflow prints a link to stdout as it ends each run on a server, over a live display: the tracker logs one instead
QUIET_MLFLOW = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


@contextlib.contextmanager
def tracked(kind: str | None) -> Iterator[None]:
    """Record the runs made inside this block in `kind`'s tracker ("mlflow", "tensorboard"; None: none)."""
    if kind is None or any(isinstance(h, _Feed) and h.kind == kind for h in distml_logger.handlers):
        yield  # no tracker, or an enclosing block records these runs already
        return
    check_track(kind)
    if importlib.util.find_spec(kind) is None:  # only looked for: the tracker's thread imports it (a second or two)
        raise DistmlError(f"{kind} is not installed: pip install 'distml[{kind}]'", option="--track")
    tracker = {"mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}[kind]()
    quiet = QUIET_MLFLOW if kind == "mlflow" else {}
    settings = {name: value for name, value in quiet.items() if name not in os.environ}  # the user's own stand
    os.environ.update(settings)
    events = queue.SimpleQueue()
    feed = _Feed(events, kind)
    listener = logging.handlers.QueueListener(events, tracker)
    level = distml_logger.level
    if distml_logger.getEffectiveLevel() > logging.INFO:
        distml_logger.setLevel(logging.INFO)
    distml_logger.addHandler(feed)
    listener.start()
    ending = "finished"
    try:
        yield
    except KeyboardInterrupt:
        ending = "interrupted"
        raise
    except BaseException:
        ending = "failed"
        raise
    finally:
        distml_logger.removeHandler(feed)
        distml_logger.setLevel(level)
        listener.stop()  # after the events already queued are recorded
        tracker.end(ending)
        for name in settings:
            os.environ.pop(name, None)


class _Feed(logging.handlers.QueueHandler):
    """Queues the records that carry an event a tracker records."""

    def __init__(self, events: queue.SimpleQueue, kind: str):
        super().__init__(events)
        self.kind = kind
        self.addFilter(lambda record: isinstance(getattr(record, "event", None), TRACKED_EVENTS))


class Tracker(logging.Handler):
    """Turns the events of the records it handles into a tracker's calls. After an error of the tracker, one
    warning and nothing more: the run goes on untracked."""

    kind = "tracker"

    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if self.broken or not isinstance(event, TRACKED_EVENTS):
            return
        at = record.created  # when the event happened, not when this thread got to it
        try:
            if isinstance(event, RunStarted):
                self.run_started(event, at)
            elif isinstance(event, EpochEnded):
                self.epoch_ended(event, at)
            elif isinstance(event, UnitEnded):
                self.unit_ended(event, at)
            elif isinstance(event, UnitRetried):
                self.unit_retried(event, at)
            else:
                self.run_ended(event, at)
        except Exception as exc:
            self.fail(exc)

    def end(self, status: str) -> None:
        """The block is over: end what is still open as `status` ("finished", "failed", "interrupted")."""
        if self.broken:
            return
        try:
            self.close_open(status)
        except Exception as exc:
            self.fail(exc)

    def fail(self, exc: Exception) -> None:
        self.broken = True
        lines = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        log.warning(f"{self.kind} tracking stopped ({reason}); the run goes on untracked")
        with contextlib.suppress(Exception):
            self.free()

    def run_started(self, event: RunStarted, at: float) -> None: ...

    def epoch_ended(self, event: EpochEnded, at: float) -> None: ...

    def unit_ended(self, event: UnitEnded, at: float) -> None: ...

    def unit_retried(self, event: UnitRetried, at: float) -> None: ...

    def run_ended(self, event: RunEnded, at: float) -> None: ...

    def close_open(self, status: str) -> None: ...

    def free(self) -> None:
        """Free what the tracker holds (files, connections), after an error."""


# ---- MLflow ----

MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
EPOCH_METRICS = {"seconds": "epoch_seconds"}  # an epoch record's keys as metric names, where they differ
UNIT_PARAMS = ("split", "repeat", "fold", "train_size", "val_size", "epochs")  # numbers that are no score
FOLD_ROW_KEYS = ("fold", "epoch")  # a fold row's numbers that name it: its run and step, no metric
SUMMARY_COLUMNS = ("mean", "std", "ci95_low", "ci95_high", "corrected_ci95_low", "corrected_ci95_high")
# MLflow's limits (mlflow.utils.validation): a param's value, a tag's value, a key; entities per log_batch
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250
MAX_PARAMS_PER_BATCH, MAX_METRICS_PER_BATCH = 100, 1000


class MlflowTracker(Tracker):
    """One parent run per run folder (its options, dataset and summary, the report's files as artifacts) and one
    child run per fold or trial (its metrics per epoch, step = epoch), through MlflowClient's explicit run ids: a
    user's own active run (mlflow.start_run) is left alone. A trial that is a whole K-fold run (tune: its epoch
    records carry folds_json) also gets one grandchild run per fold under its child ("trial 3 fold 1"). The store is
    MLFLOW_TRACKING_URI's, the experiment MLFLOW_EXPERIMENT_NAME's ("distml" when unset). The run folder's
    mlflow.json names the runs (children: "3" for unit 3, "3/1" for its fold 1), so that a resumed run continues its
    parent, and an unfinished fold or trial its child (and its folds' grandchildren)."""

    kind = "mlflow"

    def __init__(self) -> None:
        super().__init__()
        self.client = None
        self.state: dict = {}  # what mlflow.json holds
        self.state_file: Path | None = None
        self.open: list[str] = []  # runs this session started or continued and has not ended, the newest first
        self.last_epoch: dict[int, tuple[int, dict]] = {}  # unit's index -> its last epoch logged, and its metrics

    def run_started(self, event: RunStarted, at: float) -> None:
        from mlflow.tracking import MlflowClient  # a slow optional import: see tracked()

        self.client = self.client or MlflowClient()
        run_dir = Path(event.run_dir)
        self.state_file = run_dir / MLFLOW_FILE
        saved = _read_json(self.state_file)
        self.last_epoch = {}
        if saved.get("tracking_uri") == self.client.tracking_uri and self._exists(saved.get("parent_run_id")):
            self.state = {**saved, "children": dict(saved.get("children", {}))}
            self._continue(saved["parent_run_id"])
            log.info(f"mlflow: continuing run {saved['parent_run_id']} ({run_dir.name}) in {self.client.tracking_uri}")
            return
        experiment_id = self._experiment()
        tags = {"distml.command": event.command, "distml.run_dir": str(run_dir)}
        parent = self.client.create_run(experiment_id, start_time=_ms(at), tags=tags, run_name=run_dir.name)
        parent_id = parent.info.run_id
        self.open.append(parent_id)
        self.state = {
            "tracking_uri": self.client.tracking_uri,
            "experiment_id": experiment_id,
            "parent_run_id": parent_id,
            "children": {},
        }
        write_json(self.state_file, self.state)
        params = {**flat_params(event.options), **flat_params(event.dataset, "dataset.")}
        assignment_hash = _read_json(run_dir / CONFIG_FILE).get("fold_assignment_hash")
        if assignment_hash is not None:
            params["fold_assignment_hash"] = str(assignment_hash)
        self._log(parent_id, at, params=params)
        log.info(f"mlflow: recording run {parent_id} ({run_dir.name}) in {self.client.tracking_uri}")

    def epoch_ended(self, event: EpochEnded, at: float) -> None:
        run_id = self._child(event.index, event.unit, at)
        metrics = {
            EPOCH_METRICS.get(key, key): float(value)
            for key, value in event.record.items()
            if key != FOLDS_KEY and _is_number(value)
        }
        self._log(run_id, at, metrics=metrics, step=event.epoch)
        self.last_epoch[event.index] = (event.epoch, metrics)
        for row in fold_rows(event.record):  # the trial's folds, each in its grandchild run
            fold_run = self._child(event.index, event.unit, at, fold=int(row["fold"]))
            fold_metrics = {
                EPOCH_METRICS.get(key, key): float(value)
                for key, value in row.items()
                if key not in FOLD_ROW_KEYS and _is_number(value)
            }
            self._log(fold_run, at, metrics=fold_metrics, step=_step(row, event.epoch))

    def unit_ended(self, event: UnitEnded, at: float) -> None:
        run_id = self._child(event.index, event.unit, at)
        result = event.result
        step = int(result.get("epochs", self.last_epoch.get(event.index, (0, {}))[0]))
        logged_step, logged = self.last_epoch.get(event.index, (None, {}))
        # the fold's scores; those its last epoch logged already, at the same step, are not logged twice
        metrics = {
            key: float(value)
            for key, value in result.items()
            if key not in UNIT_PARAMS and _is_number(value) and not (logged_step == step and logged.get(key) == value)
        }
        params = {key: str(result[key]) for key in UNIT_PARAMS if key in result}
        tags = {
            key: value for key, value in result.items() if isinstance(value, str) and not key.endswith("_json")
        }  # node, hostname, device
        self._log(run_id, at, metrics=metrics, params=params, tags=tags, step=step)
        status = "failed" if result.get("diverged") else "finished"
        for fold_run in self._folds_of(event.index):  # the trial's fold runs end with it, before it
            self._terminate(fold_run, status, at)
        self._terminate(run_id, status, at)

    def unit_retried(self, event: UnitRetried, at: float) -> None:
        for unit, index in zip(event.units, event.indices, strict=True):
            run_id = self._child(index, unit, at)  # it stays open: the retry continues it
            step = self.last_epoch.get(index, (0, {}))[0]
            self._log(
                run_id, at, metrics={"failures": float(event.attempt)}, tags={"last_error": event.error}, step=step
            )

    def run_ended(self, event: RunEnded, at: float) -> None:
        parent_id = self.state["parent_run_id"]
        metrics = {
            f"{row['metric']}_{column}": float(row[column])
            for row in event.summary
            for column in SUMMARY_COLUMNS
            if _is_number(row.get(column))
        }
        self._log(parent_id, at, metrics=metrics)
        for file in event.files:
            if Path(file).name != MLFLOW_FILE and Path(file).is_file():  # the tracker's own note is no report
                self.client.log_artifact(parent_id, file)
        self.close_open(event.status, at)

    def close_open(self, status: str, at: float | None = None) -> None:
        for run_id in list(self.open):  # newest first: the folds (trials' folds, then trials) that did not finish
            self._terminate(run_id, status, time.time() if at is None else at)

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise DistmlError(f"the MLflow experiment {name!r} is deleted: restore it, or set MLFLOW_EXPERIMENT_NAME")
        return experiment.experiment_id

    def _exists(self, run_id: str | None) -> bool:
        from mlflow.exceptions import MlflowException

        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _continue(self, run_id: str) -> None:
        if run_id not in self.open:
            self.client.update_run(run_id, status="RUNNING")
            self.open.insert(0, run_id)  # after its parent (continued or made before it): it ends before

    def _child(self, index: int, unit: str, at: float, fold: int | None = None) -> str:
        """The unit's child run, or with `fold` the grandchild run of that fold of the unit (a trial of tune): created
        on first need, continued if a session before (or a retry) started it."""
        if fold is None:
            key, name, parent_id = str(index), unit, self.state["parent_run_id"]
        else:
            key, name, parent_id = f"{index}/{fold}", f"{unit} fold {fold}", self._child(index, unit, at)
        run_id = self.state["children"].get(key)
        if run_id in self.open:
            return run_id
        if run_id is not None and self._exists(run_id):
            self._continue(run_id)
            return run_id
        tags = {"mlflow.parentRunId": parent_id, "distml.unit": name}
        run = self.client.create_run(self.state["experiment_id"], start_time=_ms(at), tags=tags, run_name=name)
        run_id = run.info.run_id
        self.open.insert(0, run_id)  # children end before their parent
        self.state["children"][key] = run_id
        write_json(self.state_file, self.state)
        return run_id

    def _folds_of(self, index: int) -> list[str]:
        """The grandchild runs of the unit's folds that are open, or that a session before left (continued, to end
        them with the unit)."""
        prefix = f"{index}/"
        runs = [run_id for key, run_id in self.state["children"].items() if key.startswith(prefix)]
        for run_id in runs:
            if run_id not in self.open and self._exists(run_id):
                self._continue(run_id)
        return [run_id for run_id in runs if run_id in self.open]

    def _terminate(self, run_id: str, status: str, at: float) -> None:
        self.client.set_terminated(run_id, MLFLOW_STATUS.get(status, "FINISHED"), end_time=_ms(at))
        self.open.remove(run_id)

    def _log(self, run_id: str, at: float, metrics=None, params=None, tags=None, step: int = 0) -> None:
        """log_batch within MLflow's limits: keys it accepts, values it keeps, entities per call."""
        from mlflow.entities import Metric, Param, RunTag

        stamp = _ms(at)
        metric_list = [Metric(_key(k), v, stamp, step) for k, v in (metrics or {}).items()]
        param_list = [Param(_key(k), v[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()]
        tag_list = [RunTag(_key(k), v[:MAX_TAG_LENGTH]) for k, v in (tags or {}).items()]
        for start in range(0, len(metric_list), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metric_list[start : start + MAX_METRICS_PER_BATCH])
        for start in range(0, max(len(param_list), len(tag_list)), MAX_PARAMS_PER_BATCH):
            chunk = slice(start, start + MAX_PARAMS_PER_BATCH)
            self.client.log_batch(run_id, params=param_list[chunk], tags=tag_list[chunk])


def fold_rows(record: dict) -> list[dict]:
    """An epoch record's rows per fold (tune's folds_json: [{"fold": 0, "epoch": 1, "val_loss": ...}, ...]); none
    where it has none, or they are unreadable."""
    try:
        rows = json.loads(record.get(FOLDS_KEY) or "[]")
    except (TypeError, ValueError):
        return []
    if not isinstance(rows, list):
        return []
    return [row for row in rows if isinstance(row, dict) and _is_number(row.get("fold"))]


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """{"cluster": {"workers": 2}} -> {"cluster.workers": "2"}: nested options as MLflow params (an empty dict
    stays one param, "{}")."""
    params = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)
    return params


def _key(name: str) -> str:
    """A metric, param or tag name as MLflow takes it: alphanumerics, _ - . : / and spaces."""
    return re.sub(r"[^\w\-.:/ ]", "_", name)[:MAX_KEY_LENGTH]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _step(row: dict, epoch: int) -> int:
    """A fold row's epoch, or the event's where the row has none."""
    return int(row["epoch"]) if _is_number(row.get("epoch")) else epoch


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _read_json(path: Path) -> dict:
    """A run folder's JSON file, or {} where it is missing or unreadable (the tracker then starts afresh)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- TensorBoard ----

TENSORBOARD_SCALARS = {
    "loss/train": "train_loss",
    "loss/val": "val_loss",
    "accuracy/train": "train_accuracy",
    "accuracy/val": "val_accuracy",
}


class TensorBoardTracker(Tracker):
    """Event files per fold (or trial) under the run folder's tensorboard/, one folder each ("fold 3" ->
    tensorboard/fold_3; a tune trial's folds in its own, "trial 3" fold 1 -> tensorboard/trial_3/fold_1): train and
    validation loss and accuracy per epoch, step = epoch. Written with TensorBoard's own writer, which needs no torch
    on the driver."""

    kind = "tensorboard"

    def __init__(self) -> None:
        super().__init__()
        self.folder: Path | None = None
        self.writers: dict[tuple[int, int | None], object] = {}  # (unit's index, fold or None) -> its EventFileWriter

    def run_started(self, event: RunStarted, at: float) -> None:
        self.free()
        self.folder = Path(event.run_dir) / TENSORBOARD_DIR
        log.info(f"tensorboard: event files in {self.folder} (tensorboard --logdir {self.folder})")

    def epoch_ended(self, event: EpochEnded, at: float) -> None:
        folder = self.folder / event.unit.replace(" ", "_")
        self._write((event.index, None), folder, event.record, event.epoch, at)
        for row in fold_rows(event.record):
            fold = int(row["fold"])
            self._write((event.index, fold), folder / f"fold_{fold}", row, _step(row, event.epoch), at)

    def unit_ended(self, event: UnitEnded, at: float) -> None:
        for key in [key for key in self.writers if key[0] == event.index]:
            self.writers.pop(key).close()

    def _write(self, key: tuple[int, int | None], folder: Path, record: dict, step: int, at: float) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        writer = self.writers.get(key)
        if writer is None:
            writer = EventFileWriter(str(folder))
            self.writers[key] = writer
        values = [
            Summary.Value(tag=tag, simple_value=float(record[name]))
            for tag, name in TENSORBOARD_SCALARS.items()
            if _is_number(record.get(name))
        ]
        writer.add_event(Event(wall_time=at, step=step, summary=Summary(value=values)))

    def run_ended(self, event: RunEnded, at: float) -> None:
        self.free()

    def close_open(self, status: str) -> None:
        self.free()

    def free(self) -> None:
        writers, self.writers = list(self.writers.values()), {}
        for writer in writers:
            writer.close()
