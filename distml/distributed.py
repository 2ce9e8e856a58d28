"""Everything that touches Ray: connecting, checking resources, and running folds as Tune trials.

Each Ray call is marked `# ray:` so it is easy to find. The training itself is `distml.train`'s plain loop.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import storage
from distml.checkpoints import STATE_FILE
from distml.cluster import (  # noqa: F401  (connect, shutdown, plan_on_cluster...: what the commands call here)
    Plan,
    RoomWatch,
    SharedData,
    check_room,
    check_shared,
    cluster_nodes,
    connect,
    live_nodes,
    plan,
    plan_on_cluster,
    shutdown,
)
from distml.config import KFoldConfig, SweepConfig
from distml.errors import DistmlError
from distml.fold_trainers import (
    device_for,
    epoch_report,
    final_report,
    fold_index,
    fold_result,
    say_epochs,
    tensor,
    tensors,
)
from distml.rundir import FINETUNE_RUN

if TYPE_CHECKING:
    import torch

    from distml.finetune import FinetuneConfig
    from distml.train import EpochRecord, GroupState, TrainState

# torch is imported inside the functions that run in trainers: the driver only schedules, and torch's import
# would add seconds to every run's start-up.

os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune then prints nothing of its own
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's default TensorBoard logger imports torch into the driver (3 to 4 s here); _tune_loggers() adds the
# CSV and JSON loggers back by hand
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402


def _save_state(state: TrainState | GroupState, folder: str) -> None:
    import torch

    torch.save(state.state_dict(), os.path.join(folder, STATE_FILE))


def _load_state(state: TrainState | GroupState, folder: str) -> None:
    import torch

    state.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu"))


def ddp_fold_worker(config: dict) -> None:
    """One Ray Train worker of a fold trained with DistributedDataParallel (workers_per_fold > 1)."""
    import ray.train  # ray:
    import ray.train.torch  # ray:
    import torch

    from distml.train import fit, new_state

    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["folds"][0])
    torch.set_num_threads(max(1, int(kfold.cluster.cpus_per_worker)))
    context = ray.train.get_context()  # ray:
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # ray:
    data: SharedData = ray.get(config["data_ref"])  # ray:
    images, labels = tensors(data, device)
    train_index, val_index = fold_index(data, fold, device)
    state = new_state(kfold.train_settings, stream=fold, device=device)
    checkpoint = ray.train.get_checkpoint()  # ray:
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)
    state.model = ray.train.torch.prepare_model(state.model)  # ray: DDP; gloo on CPU, NCCL on GPU

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        _report_ddp_epoch(state, epoch_report([fold], [record]), rank)

    fit(state, kfold.train_settings, images, labels, train_index, val_index, report_epoch, rank, world_size)


def _report_ddp_epoch(state: TrainState, metrics: dict, rank: int) -> None:
    """Every DDP worker reports; rank 0 attaches the checkpoint (one copy of the weights is enough)."""
    import torch

    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            plain = state.model.module if hasattr(state.model, "module") else state.model
            torch.save({**state.state_dict(), "model": plain.state_dict()}, os.path.join(folder, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))  # ray:
    else:
        ray.train.report(metrics)  # ray:


def ddp_fold_trial(config: dict, data_box: tuple) -> None:
    """One Tune trial that trains its fold on a TorchTrainer of `workers_per_fold` DDP workers."""
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:

    from distml.train import evaluate, new_state

    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["folds"][0])
    gpus = float(config["gpus_per_worker"])
    trainer = TorchTrainer(  # ray:
        ddp_fold_worker,
        train_loop_config={**config, "data_ref": data_box[0]},
        scaling_config=ScalingConfig(
            num_workers=kfold.cluster.workers_per_fold,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": kfold.cluster.cpus_per_worker, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=f"fold-{fold}",
            storage_path=config["storage_path"],
            failure_config=FailureConfig(max_failures=kfold.cluster.max_failures),
        ),
    )
    result = trainer.fit()  # ray:
    device = torch.device("cpu")
    state = new_state(kfold.train_settings, stream=fold, device=device)
    with result.checkpoint.as_directory() as folder:
        _load_state(state, folder)
    data: SharedData = ray.get(data_box[0])  # ray:
    images, labels = tensors(data, device)
    train_index, val_index = fold_index(data, fold, device)
    val = evaluate(state.model, images, labels, index=val_index)
    result = fold_result(fold, state.history, state.train_seconds, val, (len(train_index), len(val_index)), device)
    result["device"] = f"{kfold.cluster.workers_per_fold}x " + ("gpu" if gpus else "cpu") + " (DDP)"
    tune.report(final_report([result]))  # ray:


class _Progress(tune.Callback):  # ray: runs in the driver, sees every trial's reports
    def __init__(self, epochs: int, say: Callable[[str], None], on_fold_done: Callable[[dict], None]):
        self.epochs, self.say, self.on_fold_done = epochs, say, on_fold_done

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("fold_done"):
            say_epochs(result, self.epochs, self.say)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if not result.get("fold_done"):
            return
        for done in json.loads(result["results_json"]):
            done["attempts"] = 1 + int(trial.run_metadata.num_failures)
            self.on_fold_done(done)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.say(
            f"folds {trial.config.get('folds')}: trainer failed (failure {trial.run_metadata.num_failures}, "
            f"details in {trial.error_file}); retrying from its last epoch checkpoint"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(
            f"folds {trial.config.get('folds')}: failed for good after {trial.run_metadata.num_failures} "
            f"failure(s); details in {trial.error_file}"
        )


class _FeasibilityStopper(RoomWatch, tune.Stopper):  # ray: ends a Tune run once the cluster has no room left
    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.lost()


def _tune_loggers() -> list:
    """Tune's per-trial progress.csv and result.json, which ExperimentAnalysis reads back."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # ray:

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def run_folds(
    config: KFoldConfig,
    folds: list[int],
    data: SharedData,
    the_plan: Plan,
    storage_path: str,
    say: Callable[[str], None],
    on_fold_done: Callable[[dict], None],
) -> list[str]:
    """Run each fold as a Tune trial that trains it on a TorchTrainer of --workers-per-fold DDP workers, state under
    `storage_path`; `on_fold_done(row)` is called as each finishes. (One worker per fold: fold_trainers.py.)

    Returns error messages of folds that failed for good (after their retries).
    """
    # ray: the data enters the object store once; the tuple keeps Tune from resolving the reference, so
    # DDP workers can be handed it too
    data_box = (ray.put(data),)
    trainable = tune.with_parameters(ddp_fold_trial, data_box=data_box)  # ray:
    # the TorchTrainer's workers ask for the real resources; the trial itself needs none, but Tune wants
    # a non-empty request: one byte of memory takes nothing from the workers
    resources = {"cpu": 0, "memory": 1}
    stopper = _FeasibilityStopper(config.cluster, config.cluster.lost_node_grace_s)
    # our callback reports trial failures in one line each; Tune's own logger would add full tracebacks
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    tuner = tune.Tuner(  # ray:
        tune.with_resources(trainable, resources),
        param_space={
            "folds": tune.grid_search([[fold] for fold in folds]),
            "kfold": config.to_dict(),
            "gpus_per_worker": the_plan.gpus_per_worker,
            "storage_path": storage.join(storage_path, "train"),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=the_plan.concurrent_folds),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=config.cluster.max_failures),
            callbacks=[_Progress(config.epochs, say, on_fold_done), *_tune_loggers()],
            stop=stopper,
            verbose=0,
        ),
    )
    results = tuner.fit()  # ray:
    errors = [f"folds {r.config['folds']}: {str(r.error).splitlines()[0]}" for r in results if r.error]
    return errors + ([stopper.reason] if stopper.reason else [])


def finetune_worker(config: dict) -> None:
    """One Ray Train worker of the ResNet18 fine-tune: DDP over this rank's share of every epoch."""
    import ray.train  # ray:
    import ray.train.torch  # ray:
    import torch

    from distml.finetune import FinetuneConfig, finetune_state
    from distml.train import fit

    finetune = FinetuneConfig.from_dict(config["finetune"])
    torch.set_num_threads(max(1, int(finetune.cpus_per_worker)))
    context = ray.train.get_context()  # ray:
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # ray:
    data: SharedData = ray.get(config["data_ref"])  # ray: zero-copy on the same node
    images, labels = tensors(data, device)
    train_index, val_index = fold_index(data, 1, device)  # the holdout's fold 1 validates
    state = finetune_state(finetune, ray.get(config["weights_ref"]), device)  # ray:
    checkpoint = ray.train.get_checkpoint()  # ray: set when Ray Train restarts the workers after a failure
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)
    state.model = ray.train.torch.prepare_model(state.model)  # ray: DDP; gloo on CPU, NCCL on GPU

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        _report_ddp_epoch(state, {**asdict(record), "train_seconds": state.train_seconds}, rank)

    fit(state, finetune.train_settings, images, labels, train_index, val_index, report_epoch, rank, world_size)


class _EpochForwarder(ray.train.UserCallback):  # ray: runs in the Train controller, not in the driver
    """Hands rank 0's epoch reports, and failures of the worker group, to the driver through a Ray queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])

    def after_exception(self, run_context, worker_exceptions):
        # a killed worker shows here too: its health check fails
        errors = [_error_summary(error) for error in worker_exceptions.values()]
        self.queue.put({"failure": errors[0] if errors else "unknown error"})


def _error_summary(error: BaseException) -> str:
    """An error in one line: its first line that says something, after the headings Train puts before it
    ('Training failed due to worker errors:', '[Rank 0 Error Snippet]:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = next((i for i, line in enumerate(lines) if not line.endswith(":")), len(lines) - 1)
    return " ".join(lines[: said + 1]) or type(error).__name__


def run_finetune(
    config: FinetuneConfig,
    gpus_per_worker: float,
    data: SharedData,
    weights: dict[str, torch.Tensor],
    storage: Path,
    on_epoch: Callable[[EpochRecord], None],
    say: Callable[[str], None],
) -> dict:
    """Fine-tune on a TorchTrainer; returns the last checkpoint's state (model, history, train_seconds) and
    `attempts`, the worker group's starts (1 + the failures it was restarted after).

    Train V2 keeps only the metrics attached to checkpoints, so the history comes from the checkpoint's saved
    state, which a restarted worker group also resumes from. A `storage` that holds an interrupted run's
    checkpoints resumes it: a new TorchTrainer of the same name and storage path loads Train's snapshot there
    and hands its last checkpoint to the workers.
    """
    import threading

    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:
    from ray.util.queue import Empty, Queue  # ray:

    from distml.train import EpochRecord

    epochs = Queue()  # ray: an actor the controller's callback writes to
    trainer = TorchTrainer(  # ray:
        finetune_worker,
        train_loop_config={
            "finetune": config.to_dict(),
            "data_ref": ray.put(data),  # ray: into the object store once, read zero-copy by every worker
            "weights_ref": ray.put(weights),  # ray:
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker={
                "CPU": config.cpus_per_worker,
                **({"GPU": gpus_per_worker} if gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=FINETUNE_RUN,
            storage_path=str(storage),
            # a worker group that cannot start (a lost node, say) counts as a controller failure, which Train
            # otherwise retries forever, a minute each: bound it by the same retries
            failure_config=FailureConfig(
                max_failures=config.max_failures, controller_failure_limit=config.max_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[_EpochForwarder(epochs)],
        ),
    )
    finished = threading.Event()
    failures = 0

    def forward_epochs() -> None:
        nonlocal failures
        while not finished.is_set() or not epochs.empty():
            try:
                metrics = epochs.get(timeout=0.5)
            except Empty:
                continue
            if "failure" in metrics:
                failures += 1
                retried = failures <= config.max_failures
                say(
                    f"fine-tune workers failed (failure {failures}, --max-failures {config.max_failures}): "
                    f"{metrics['failure']}" + ("; restarting them from the last epoch checkpoint" if retried else "")
                )
                continue
            on_epoch(EpochRecord(**{k: metrics[k] for k in EpochRecord.__dataclass_fields__}))

    forwarder = threading.Thread(target=forward_epochs, daemon=True)
    forwarder.start()
    try:
        result = trainer.fit()  # ray: raises when the workers fail more than max_failures times
    except Exception as exc:
        raise DistmlError(f"fine-tuning failed (--max-failures {config.max_failures}): {_error_summary(exc)}") from None
    finally:
        finished.set()
        forwarder.join()
        epochs.shutdown()  # ray:
    if result.checkpoint is None:
        raise DistmlError("fine-tuning finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        final = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu")
    return {**final, "attempts": 1 + failures}


# ---- the learning-rate sweep (issue 4): one Tune trial per learning rate, ASHA stops poor ones early ----


@dataclass(frozen=True)
class SweepData:
    """What every sweep trial reads: its inputs (normalised images, or their backbone features) and the split.

    Put in the object store once; with cached features it is the backbone's output, computed by one Ray task.
    """

    inputs: np.ndarray  # float32: (N, 1, 28, 28) images, or (N, 512) backbone features
    labels: np.ndarray  # int64 (N,)
    train_index: np.ndarray  # int64, the training part of the holdout split
    val_index: np.ndarray  # int64, the validation part


def _sweep_threads_and_device(cpus: float, gpus: float) -> torch.device:
    import torch

    torch.set_num_threads(max(1, int(cpus)))
    return device_for(gpus)


def _compute_features(data: SweepData, initial_state: dict, config: dict, cpus: float, gpus: float) -> SweepData:
    from distml import sweep

    device = _sweep_threads_and_device(cpus, gpus)
    sweep_config = SweepConfig.from_dict(config)
    features = sweep.backbone_features(sweep_config, initial_state, tensor(data.inputs, device))
    return SweepData(features.cpu().numpy(), data.labels, data.train_index, data.val_index)


def share_sweep_data(
    config: SweepConfig, data: SweepData, initial_state: dict, the_plan: Plan, say: Callable[[str], None]
) -> tuple[ray.ObjectRef, ray.ObjectRef]:
    """Put the trials' inputs and the initial weights in the object store, once.

    With cached features, one Ray task runs the frozen backbone over every image and its output, not the
    images, becomes the trials' input.
    """
    initial_state_ref = ray.put(initial_state)  # ray:
    if not config.cached_features:
        return ray.put(data), initial_state_ref  # ray:
    cpus, gpus = _one_job_resources(the_plan)
    started = time.perf_counter()
    task = ray.remote(_compute_features).options(num_cpus=cpus, num_gpus=gpus)  # ray:
    features_ref = task.remote(data, initial_state_ref, config.to_dict(), cpus, gpus)  # ray: stays in the store
    ray.wait([features_ref], fetch_local=False)  # ray:
    say(
        f"backbone features of {len(data.labels):,} images at {config.image_size} px computed once "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return features_ref, initial_state_ref


def _one_job_resources(the_plan: Plan) -> tuple[float, float]:
    """A lone job (features, the final fit) may use what the concurrent trials would have, up to one node's CPUs."""
    largest_node_cpus = max(n.get("CPU", 0.0) for n in cluster_nodes())
    cpus = max(the_plan.cpus_per_worker, min(largest_node_cpus, the_plan.cpus_per_worker * the_plan.concurrent_folds))
    return cpus, min(the_plan.gpus_per_worker, 1.0)


def sweep_trial(config: dict, data_box: tuple) -> None:
    """One Tune trial: train at learning rate config["lr"], reporting (and checkpointing) every epoch."""
    from distml import sweep
    from distml.train import fit

    sweep_config = SweepConfig.from_dict(config["sweep"])
    lr = float(config["lr"])
    device = _sweep_threads_and_device(sweep_config.cluster.cpus_per_worker, float(config["gpus_per_worker"]))
    data: SweepData = ray.get(data_box[0])  # ray: zero-copy on the same node
    # ray: the initial weights; a head on cached features needs none of them
    initial_state = None if sweep_config.cached_features else ray.get(data_box[1])
    state = sweep.trial_state(sweep_config, lr, initial_state, device)
    checkpoint = tune.get_checkpoint()  # ray: set when Tune retries this trial, or resumes an interrupted sweep
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        metrics = {"lr": lr, **asdict(record), "train_seconds": state.train_seconds}
        with tempfile.TemporaryDirectory() as folder:
            _save_state(state, folder)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # ray:

    inputs, labels = tensor(data.inputs, device), tensor(data.labels, device)
    train_index, val_index = tensor(data.train_index, device), tensor(data.val_index, device)
    fit(state, sweep_config.train_settings(lr), inputs, labels, train_index, val_index, on_epoch=report_epoch)


def _final_fit(data: SweepData, initial_state: dict, config: dict, lr: float, cpus: float, gpus: float):
    from distml import sweep
    from distml.train import fit

    device = _sweep_threads_and_device(cpus, gpus)
    sweep_config = SweepConfig.from_dict(config)
    state = sweep.trial_state(sweep_config, lr, initial_state, device)
    all_index = np.concatenate([data.train_index, data.val_index])
    fit(
        state,
        sweep_config.train_settings(lr),
        tensor(data.inputs, device),
        tensor(data.labels, device),
        tensor(all_index, device),
        tensor(data.val_index, device),
    )
    return state.model.cpu(), state.history


def final_fit(
    config: SweepConfig, lr: float, data_ref: ray.ObjectRef, initial_state_ref: ray.ObjectRef, the_plan: Plan
) -> tuple[torch.nn.Module, list[EpochRecord]]:
    """Train once more at `lr` on every training image (training and validation parts), as one Ray task."""
    cpus, gpus = _one_job_resources(the_plan)
    task = ray.remote(_final_fit).options(num_cpus=cpus, num_gpus=gpus)  # ray:
    return ray.get(task.remote(data_ref, initial_state_ref, config.to_dict(), lr, cpus, gpus))  # ray:


class _SweepProgress(tune.Callback):  # ray: runs in the driver, sees every trial's reports
    def __init__(self, epochs: int, say: Callable[[str], None]):
        self.epochs, self.say = epochs, say

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.say(
            f"trial {trial.trial_id} lr={result['lr']:.3g}: epoch {result['epoch']}/{self.epochs} "
            f"val_loss={result['val_loss']:.4f} val_acc={result['val_accuracy']:.4f} ({result['seconds']:.1f} s)"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("epoch", 0)
        how = "finished" if epochs >= self.epochs else f"stopped early by ASHA after {epochs} epoch(s)"
        self.say(f"trial {trial.trial_id} lr={trial.config['lr']:.3g}: {how}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.say(
            f"trial {trial.trial_id}: failed (failure {trial.run_metadata.num_failures}); "
            "retrying from its last epoch checkpoint"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(f"trial {trial.trial_id}: failed for good after {trial.run_metadata.num_failures} failure(s)")


@dataclass(frozen=True)
class TrialRecord:
    """One sweep trial as Tune left it: its rate, status and every epoch it reported."""

    trial_id: str
    lr: float
    status: str  # Tune's: TERMINATED (finished or stopped early), ERROR, or PENDING/PAUSED when interrupted
    attempts: int
    history: list[dict]
    error: str | None


def run_sweep_trials(
    config: SweepConfig,
    data_ref: ray.ObjectRef,
    initial_state_ref: ray.ObjectRef,
    the_plan: Plan,
    storage: Path,
    say: Callable[[str], None],
) -> list[TrialRecord]:
    """Run (or, when `storage` holds an interrupted sweep, resume) the trials; return every trial's record.

    A resumed sweep keeps its finished trials as they are and carries on its unfinished and failed ones from
    their last epoch checkpoints.
    """
    from ray.tune.schedulers import ASHAScheduler  # ray:
    from ray.tune.search import BasicVariantGenerator  # ray:

    # ray: the tuple keeps Tune from resolving the references; each trial fetches them itself
    trainable = tune.with_parameters(sweep_trial, data_box=(data_ref, initial_state_ref))  # ray:
    trainable = tune.with_resources(trainable, {"cpu": the_plan.cpus_per_worker, "gpu": the_plan.gpus_per_worker})
    experiment = storage / "tune"
    stopper = _FeasibilityStopper(config.cluster, config.cluster.lost_node_grace_s)  # a resumed sweep keeps its own
    if tune.Tuner.can_restore(str(experiment)):  # ray:
        say(f"resuming the sweep in {experiment}: finished trials stay as they are")
        tuner = tune.Tuner.restore(  # ray:
            str(experiment), trainable, resume_unfinished=True, resume_errored=True
        )
    else:
        tuner = tune.Tuner(  # ray:
            trainable,
            param_space={
                "lr": tune.loguniform(config.lr_min, config.lr_max),  # ray:
                "sweep": config.to_dict(),
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
            run_config=tune.RunConfig(
                name=experiment.name,
                storage_path=str(storage),
                failure_config=tune.FailureConfig(max_failures=config.cluster.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_SweepProgress(config.epochs, say), *_tune_loggers()],
                stop=stopper,
                verbose=0,
            ),
        )
    results = tuner.fit()  # ray:
    if stopper.reason:
        raise RuntimeError(f"{stopper.reason}; finished trials are kept, resume with --resume")
    errors = {r.path: str(r.error).splitlines()[0] for r in results if r.error}
    analysis = tune.ExperimentAnalysis(results.experiment_path)  # ray: the trials' statuses, as saved
    records = []
    for trial in analysis.trials:
        frame = analysis.trial_dataframes.get(trial.trial_id)
        history = []
        if frame is not None and "epoch" in frame.columns:
            frame = frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
            columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "train_seconds"]
            history = frame[columns].to_dict("records")
        records.append(
            TrialRecord(
                trial.trial_id,
                float(trial.config["lr"]),
                trial.status,
                1 + trial.run_metadata.num_failures,
                history,
                errors.get(trial.path),
            )
        )
    return records
