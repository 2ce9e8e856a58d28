"""Ray Tune trials: the learning-rate sweep (one trial per rate, scored on a holdout or by K-fold on the cached
features; ASHA stops poor ones early), the cross-fold scores every K-fold trial reports, and the progress callback
every Tune run of distml shares (DDP folds run as Tune trials too, see ddp.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray import tune

from distml import storage
from distml.checkpoints import STATE_FILE, Stamp
from distml.config import SweepConfig, TrainSettings
from distml.distributed.cluster import Plan, RoomWatch, await_task, cluster_nodes
from distml.distributed.worker import device_for, options_for_ray, restore_checkpoint, save_checkpoint, tensor
from distml.folds import SplitData
from distml.progress import EPOCH_SCORES, FOLDS_KEY, UnitEnded, publish, publish_epoch

if TYPE_CHECKING:
    import torch

    from distml.train import EpochRecord, TrainState

log = logging.getLogger(__name__)


class TrialProgress(tune.Callback):  # ray: runs in the driver, sees every trial's reports
    """Log lines for Tune trials: `on_result` and `on_complete` say what a trial's results mean; retries and
    failures are said here, one line each, the same for every kind of trial."""

    def __init__(
        self,
        name: Callable[[tune.experiment.Trial], str],
        on_result: Callable[[tune.experiment.Trial, dict], None],
        on_complete: Callable[[tune.experiment.Trial], None],
    ):
        self.name, self.on_result, self.on_complete = name, on_result, on_complete

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.on_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.on_complete(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        log.info(
            f"{self.name(trial)}: trainer failed (failure {trial.run_metadata.num_failures}, details in "
            f"{trial.error_file}); retrying from its last epoch checkpoint"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        log.info(
            f"{self.name(trial)}: failed for good after {trial.run_metadata.num_failures} failure(s); details in "
            f"{trial.error_file}"
        )


class FeasibilityStopper(RoomWatch, tune.Stopper):  # ray: ends a Tune run once the cluster has no room left
    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.lost()


def fit_tuner(tuner: tune.Tuner) -> tune.ResultGrid:
    """`tuner.fit()`, leaving SIGINT's handler as it found it, and raising KeyboardInterrupt when a Ctrl-C ended it.

    Called from the main thread, Tune installs a handler of its own for the fit: on Ctrl-C it ends the trials
    gracefully, saves its state for a resume, puts the handler it found back, and returns. It leaves its handler
    installed when no Ctrl-C came; this puts the one it found back either way, and turns the graceful end into the
    KeyboardInterrupt every run already handles (its state is saved by then, so `--resume` finishes the run)."""
    if threading.current_thread() is not threading.main_thread() or int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return tuner.fit()  # ray: Tune installs no handler
    found = signal.getsignal(signal.SIGINT)
    try:
        results = tuner.fit()  # ray:
    finally:
        ended_by_ctrl_c = signal.getsignal(signal.SIGINT) is found  # Tune's handler, once used, restores `found`
        signal.signal(signal.SIGINT, found)
    if ended_by_ctrl_c:
        raise KeyboardInterrupt
    return results


def trials_run_config(cluster, storage_path: str, progress: TrialProgress, stopper: FeasibilityStopper):
    """The RunConfig every search of trials shares (the sweep's, tune's): its state under `storage_path`/tune, failed
    trials retried --max-failures times, one checkpoint kept per trial, distml's own progress lines and loggers."""
    return tune.RunConfig(  # ray:
        name="tune",
        storage_path=storage_path,
        failure_config=tune.FailureConfig(max_failures=cluster.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[progress, *tune_loggers()],
        stop=stopper,
        verbose=0,
    )


def tune_loggers() -> list:
    """Tune's per-trial progress.csv and result.json, which ExperimentAnalysis reads back (its default loggers are
    off: see distml/distributed/__init__.py)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # ray:

    return [CSVLoggerCallback(), JsonLoggerCallback()]


# ---- a trial's folds: one checkpoint, one set of cross-fold scores ----

SCORES = ("val_accuracy", "val_loss")  # each reported as its cross-fold mean, std and corrected 95% interval
FOLD_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


class FoldStates:
    """The k plain states of a trial whose folds train one at a time, checkpointed as one."""

    def __init__(self, states: list):
        self.states = states

    @property
    def epochs_done(self) -> int:
        return min(state.epochs_done for state in self.states)

    @property
    def train_seconds(self) -> float:
        return sum(state.train_seconds for state in self.states)

    def state_dict(self) -> dict:
        return {"folds": [state.state_dict() for state in self.states]}

    def load_state_dict(self, saved: dict) -> None:
        for state, one in zip(self.states, saved["folds"], strict=True):
            state.load_state_dict(one)


def cross_fold(records: list, sizes: tuple[float, float]) -> dict:
    """An epoch's scores over the folds: the mean of each, and for SCORES the std and the corrected interval (`sizes`:
    the folds' mean training and validation sizes)."""
    from distml.stats import corrected_interval  # scipy: in the trial only

    summary = {key: float(np.mean([getattr(r, key) for r in records])) for key in FOLD_COLUMNS[1:]}
    for key in SCORES:
        values = [getattr(r, key) for r in records]
        _, low, high = corrected_interval(values, *sizes)
        summary.update({f"std_{key}": float(np.std(values, ddof=1)), f"ci_low_{key}": low, f"ci_high_{key}": high})
    return summary


# ---- the learning-rate sweep ----


def _threads_and_device(cpus: float, gpus: float) -> torch.device:
    import torch  # workers only: the driver schedules, and torch's import is seconds of its start-up

    torch.set_num_threads(max(1, int(cpus)))
    return device_for(gpus)


def _compute_features(data: SplitData, initial_state: dict, config: dict, cpus: float, gpus: float) -> SplitData:
    from distml.resnet import backbone_features  # torch: in the worker only

    device = _threads_and_device(cpus, gpus)
    sweep = SweepConfig.from_dict(config)
    features = backbone_features(initial_state, sweep.image_size, tensor(data.inputs, device))
    return SplitData(features.cpu().numpy(), data.labels, data.assignment)


def share_sweep_data(
    config: SweepConfig, data: SplitData, initial_state: dict, the_plan: Plan
) -> tuple[ray.ObjectRef, ray.ObjectRef]:
    """Put the trials' inputs and the initial weights in the object store, once.

    With cached features, one Ray task runs the frozen backbone over every image and its output, not the
    images, becomes the trials' input; a cluster that lost the room for that task ends the wait (cluster.await_task).
    """
    initial_state_ref = ray.put(initial_state)  # ray:
    if not config.cached_features:
        return ray.put(data), initial_state_ref  # ray:
    cpus, gpus = _one_job_resources(the_plan)
    started = time.perf_counter()
    task = ray.remote(_compute_features).options(  # ray: a task lost with its node runs again, --max-failures times
        num_cpus=cpus, num_gpus=gpus, max_retries=config.cluster.max_failures
    )
    features_ref = task.remote(data, initial_state_ref, options_for_ray(config), cpus, gpus)  # ray: stays in the store
    await_task(features_ref, config.cluster, cpus, gpus, "the backbone features task")
    log.info(
        f"backbone features of {len(data.labels):,} images at {config.image_size} px computed once "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return features_ref, initial_state_ref


def _one_job_resources(the_plan: Plan) -> tuple[float, float]:
    """A lone job (features, the final fit) may use what the concurrent trials would have, up to one node's CPUs."""
    largest_node_cpus = max(n.get("CPU", 0.0) for n in cluster_nodes())
    cpus = max(the_plan.cpus_per_worker, min(largest_node_cpus, the_plan.cpus_per_worker * the_plan.concurrent_folds))
    return cpus, min(the_plan.gpus_per_worker, 1.0)


def sweep_splits(sweep: SweepConfig, data: SplitData) -> list[int]:
    """The splits a trial trains a head on: fold 1 of the holdout, or with --cv every one of the K folds."""
    return list(range(data.k)) if sweep.cv is not None else [1]


def sweep_epoch(
    heads: list[TrainState], settings: TrainSettings, inputs, labels, splits: list[tuple], epoch: int
) -> dict:
    """Train each head on its (training, validation) split up to `epoch` and return the epoch's scores: the lone
    head's record, or over several heads their cross-fold means, stds and intervals with every fold's own row (as
    FOLDS_KEY's JSON). A head whose loss stops being finite raises Diverged, naming its fold when there are several."""
    from distml.train import Diverged, fit  # torch: in the trial only

    records = []
    for fold, (head, (train_index, val_index)) in enumerate(zip(heads, splits, strict=True)):
        try:
            fit(head, settings, inputs, labels, train_index, val_index, until=epoch)
        except Diverged as stop:
            raise Diverged(stop.divergence, f"fold {fold}" if len(heads) > 1 else None) from None
        records.append(head.history[-1])
    if len(records) == 1:
        return asdict(records[0])
    sizes = (float(np.mean([len(t) for t, _ in splits])), float(np.mean([len(v) for _, v in splits])))
    fold_rows = [{"fold": fold, **{key: getattr(r, key) for key in FOLD_COLUMNS}} for fold, r in enumerate(records)]
    return {"epoch": epoch, **cross_fold(records, sizes), FOLDS_KEY: json.dumps(fold_rows)}


def sweep_trial(config: dict, data_box: tuple, stamp: Stamp | None) -> None:
    """One Tune trial: train at learning rate config["lr"] (one head on the holdout, or with --cv one per fold, all
    from the same start), reporting (and checkpointing every head) after every epoch; a trial whose loss stops
    being finite, in any fold, reports that once, and ends."""
    from distml.resnet import sweep_state  # torch: in the trial only
    from distml.train import Diverged

    sweep = SweepConfig.from_dict(config["sweep"])
    lr = float(config["lr"])
    settings = sweep.train_settings(lr)
    device = _threads_and_device(sweep.cluster.cpus_per_worker, float(config["gpus_per_worker"]))
    data: SplitData = ray.get(data_box[0])  # ray: zero-copy on the same node
    # ray: the initial weights; a head on cached features needs none of them
    initial_state = None if sweep.cached_features else ray.get(data_box[1])
    folds = sweep_splits(sweep, data)
    heads = [sweep_state(sweep, lr, initial_state, device) for _ in folds]
    state = heads[0] if sweep.cv is None else FoldStates(heads)
    checkpoint = tune.get_checkpoint()  # ray: set when Tune retries this trial, or resumes an interrupted sweep
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)

    inputs, labels = tensor(data.inputs, device), tensor(data.labels, device)
    splits = [tuple(tensor(part, device) for part in data.indices(fold)) for fold in folds]
    for epoch in range(state.epochs_done + 1, settings.epochs + 1):
        try:
            scores = sweep_epoch(heads, settings, inputs, labels, splits, epoch)
        except Diverged as stop:
            # ray: Tune wants the metrics in every result; without an epoch, ASHA leaves this one out
            tune.report({"lr": lr, "diverged": str(stop), "val_accuracy": None, "val_loss": None})
            return
        metrics = {"lr": lr, **scores, "train_seconds": state.train_seconds}
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # ray:


def _final_fit(data: SplitData, initial_state: dict, config: dict, lr: float, cpus: float, gpus: float):
    from distml.resnet import sweep_state  # torch: in the worker only
    from distml.train import fit

    device = _threads_and_device(cpus, gpus)
    sweep = SweepConfig.from_dict(config)
    state = sweep_state(sweep, lr, initial_state, device)
    all_index = np.concatenate(data.indices(1))  # the training part, then the validation part
    fit(
        state,
        sweep.train_settings(lr),
        tensor(data.inputs, device),
        tensor(data.labels, device),
        tensor(all_index, device),
        tensor(data.indices(1)[1], device),
    )
    return state.model.cpu(), state.history


def final_fit(
    config: SweepConfig, lr: float, data_ref: ray.ObjectRef, initial_state_ref: ray.ObjectRef, the_plan: Plan
) -> tuple[torch.nn.Module, list[EpochRecord]]:
    """Train once more at `lr` on every training image (training and validation parts), as one Ray task, waited for
    as cluster.await_task does."""
    cpus, gpus = _one_job_resources(the_plan)
    task = ray.remote(_final_fit).options(  # ray: a task lost with its node runs again, --max-failures times
        num_cpus=cpus, num_gpus=gpus, max_retries=config.cluster.max_failures
    )
    result = task.remote(data_ref, initial_state_ref, config.to_dict(), lr, cpus, gpus)  # ray:
    await_task(result, config.cluster, cpus, gpus, "the final fit")
    return ray.get(result)  # ray: done: only the trained model's transfer is left


def trial_unit(trial) -> tuple[str, int]:
    """A trial's name and number for progress events ("trial 3", 3): Tune's count of the trials it made, which begins
    every trial's tag ("3_lr=0.01") whatever the search (a searcher's trial ids hold no number)."""
    number = int(str(trial.experiment_tag).split("_", 1)[0])
    return f"trial {number}", number


def _sweep_progress(epochs: int, cv: int | None) -> TrialProgress:
    scored_by = "" if cv is None else f" {cv}-fold mean"

    def on_result(trial, result: dict) -> None:
        unit, number = trial_unit(trial)
        if result.get("diverged"):  # the trial's last result
            ended = UnitEnded(unit, number, {"lr": result["lr"], "diverged": True})
            publish(log, f"trial {trial.trial_id}: {result['diverged']}", ended)
            return
        label = f"trial {trial.trial_id} lr={result['lr']:.3g}{scored_by}"
        publish_epoch(log, unit, number, result, epochs, label=label)

    def on_complete(trial) -> None:
        result = trial.last_result or {}
        if result.get("diverged"):  # said as it arrived
            return
        done = result.get("epoch", 0)
        how = "finished" if done >= epochs else f"stopped early by ASHA after {done} epoch(s)"
        unit, number = trial_unit(trial)
        scores = {
            key: value
            for key, value in result.items()
            if key in ("lr", "epoch", *EPOCH_SCORES) or key.startswith(("std_", "ci_"))
        }
        ended = UnitEnded(unit, number, {**scores, "stopped_early": done < epochs})
        publish(log, f"trial {trial.trial_id} lr={trial.config['lr']:.3g}: {how}", ended)

    return TrialProgress(lambda trial: f"trial {trial.trial_id}", on_result, on_complete)


@dataclass(frozen=True)
class TrialRecord:
    """One sweep trial as Tune left it: its rate, status and every epoch it reported."""

    trial_id: str
    lr: float
    status: str  # Tune's: TERMINATED (finished or stopped early), ERROR, or PENDING/PAUSED when interrupted
    attempts: int
    history: list[dict]
    error: str | None
    diverged: str | None = None  # the line that says where its loss stopped being finite, if it did
    folds: list[dict] = field(default_factory=list)  # with --cv: per fold and epoch, FOLD_COLUMNS


def run_sweep_trials(
    config: SweepConfig,
    data_ref: ray.ObjectRef,
    initial_state_ref: ray.ObjectRef,
    the_plan: Plan,
    storage_path: str,
    stamp: Stamp | None,
) -> list[TrialRecord]:
    """Run (or, when `storage_path` holds an interrupted sweep, resume) the trials; return every trial's record.

    A resumed sweep keeps its finished trials as they are and carries on its unfinished and failed ones from
    their last epoch checkpoints.
    """
    from ray.tune.schedulers import ASHAScheduler  # ray:
    from ray.tune.search import BasicVariantGenerator  # ray:

    # ray: the tuple keeps Tune from resolving the references; each trial fetches them itself
    trainable = tune.with_parameters(sweep_trial, data_box=(data_ref, initial_state_ref), stamp=stamp)  # ray:
    trainable = tune.with_resources(trainable, {"cpu": the_plan.cpus_per_worker, "gpu": the_plan.gpus_per_worker})
    experiment = storage.join(storage_path, "tune")
    stopper = FeasibilityStopper(config.cluster, config.cluster.lost_node_grace_s)  # a resumed sweep keeps its own
    if tune.Tuner.can_restore(experiment):  # ray:
        log.info(f"resuming the sweep in {experiment}: finished trials stay as they are")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)  # ray:
    else:
        tuner = tune.Tuner(  # ray:
            trainable,
            param_space={
                "lr": tune.loguniform(config.lr_min, config.lr_max),  # ray:
                "sweep": options_for_ray(config),
                "gpus_per_worker": the_plan.gpus_per_worker,
            },
            tune_config=tune.TuneConfig(
                num_samples=config.trials,
                # reruns draw the same rates; the concurrency limit goes here (Tune ignores max_concurrent_trials
                # when a search algorithm is given)
                search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=the_plan.concurrent_folds),
                scheduler=ASHAScheduler(
                    time_attr="epoch",  # our own counter: it survives retries and resumes unchanged
                    metric=config.metric,
                    mode=config.mode,
                    max_t=config.epochs,
                    grace_period=config.grace_period,
                    reduction_factor=config.reduction_factor,
                ),
                reuse_actors=True,
            ),
            run_config=trials_run_config(
                config.cluster, storage_path, _sweep_progress(config.epochs, config.cv), stopper
            ),
        )
    results = fit_tuner(tuner)
    if stopper.reason:
        raise RuntimeError(f"{stopper.reason}; finished trials are kept, resume with --resume")
    errors = {r.path: str(r.error).splitlines()[0] for r in results if r.error}
    analysis = tune.ExperimentAnalysis(results.experiment_path)  # ray: the trials' statuses, as saved
    records = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        history, folds = [], []
        if frame is not None and "epoch" in frame.columns:
            frame = frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
            columns = [*FOLD_COLUMNS, "train_seconds"]
            columns += [c for c in frame.columns if c.startswith(("std_", "ci_"))]  # with --cv
            history = frame[columns].to_dict("records")
            if FOLDS_KEY in frame.columns:
                folds = [row for text in frame[FOLDS_KEY] for row in json.loads(text)]
        records.append(
            TrialRecord(
                trial.trial_id,
                float(trial.config["lr"]),
                trial.status,
                1 + trial.run_metadata.num_failures,
                history,
                errors.get(trial.path),
                (trial.last_result or {}).get("diverged"),
                folds,
            )
        )
    return records
