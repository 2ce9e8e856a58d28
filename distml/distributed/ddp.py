"""Data-parallel training on Ray Train: the one DDP worker body, used by the fine-tune's TorchTrainer and by K-fold
folds of several workers each (each fold a Tune trial that runs its own TorchTrainer)."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import ray.train
from ray import tune

from distml import storage
from distml.checkpoints import STATE_FILE, Stamp
from distml.config import FinetuneConfig, KFoldConfig
from distml.distributed.cluster import Plan
from distml.distributed.tune import FeasibilityStopper, TrialProgress, fit_tuner, tune_loggers
from distml.distributed.worker import (
    epoch_report,
    error_line,
    final_report,
    fold_index,
    log_epochs,
    options_for_ray,
    restore_checkpoint,
    save_checkpoint,
    ship_model_code,
    tensors,
)
from distml.errors import DistmlError
from distml.folds import SplitData
from distml.recipe import ModelRecipe
from distml.rundir import FINETUNE_RUN

if TYPE_CHECKING:
    import torch

    from distml.train import EpochRecord, TrainState

log = logging.getLogger(__name__)

DIVERGENCE = "divergence_json"  # the key of the workers' last report when their training diverged


def ddp_worker(config: dict) -> None:
    """One Ray Train worker: DDP over this rank's share of every epoch, of a K-fold fold (config["fold"]) or of
    the fine-tune (its holdout's fold 1 validates)."""
    import ray.train.torch  # ray:
    import torch  # workers only: the driver schedules, and torch's import is seconds of its start-up

    from distml.resnet import finetune_state
    from distml.train import Diverged, fit, new_state

    context = ray.train.get_context()  # ray:
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # ray:
    data: SplitData = ray.get(config["data_ref"])  # ray: zero-copy on the same node
    images, labels = tensors(data, device)
    if "fold" in config:
        kfold = KFoldConfig.from_dict(config["kfold"])
        fold, settings, cluster = int(config["fold"]), kfold.train_settings, kfold.cluster
        train_index, val_index = fold_index(data, fold, device)
        recipe: ModelRecipe = config["recipe"]
        build = lambda: recipe.for_fold(images, train_index)  # noqa: E731
        state = new_state(settings, fold, device, build, recipe.optimizer, recipe.loss)
    else:
        finetune = FinetuneConfig.from_dict(config["finetune"])
        fold, settings, cluster = 1, finetune.train_settings, finetune.cluster
        train_index, val_index = fold_index(data, fold, device)
        state = finetune_state(finetune, ray.get(config["weights_ref"]), device)  # ray:
    torch.set_num_threads(max(1, int(cluster.cpus_per_worker)))
    stamp = config["stamp"]  # the run's: every checkpoint records it, and a restore checks it
    checkpoint = ray.train.get_checkpoint()  # ray: set when Ray Train restarts the workers, or resumes a run
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)
    state.model = ray.train.torch.prepare_model(state.model)  # ray: DDP; gloo on CPU, NCCL on GPU

    def report(state: TrainState, metrics: dict) -> None:
        # every rank reports; rank 0 attaches the checkpoint (one copy of the weights is enough)
        if rank != 0:
            ray.train.report(metrics)  # ray:
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))  # ray:

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        if "fold" in config:
            metrics = epoch_report(data, [fold], [record])
        else:
            metrics = {**asdict(record), "train_seconds": state.train_seconds}
        # the ranks that finished this epoch, each id sent by its own worker: what a result says trained it
        metrics.update(world_size=world_size, ranks=_ranks_present(rank, world_size, device))
        report(state, metrics)

    try:
        fit(state, settings, images, labels, train_index, val_index, report_epoch, rank, world_size)
    except Diverged as stop:
        # the run's end, not a failure to retry; every rank stops at the same epoch (DDP's all-reduce spreads a
        # non-finite gradient to every rank's weights). The checkpoint holds the epochs before.
        report(state, {DIVERGENCE: json.dumps(asdict(stop.divergence)), "world_size": world_size})


def _ranks_present(rank: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's id, gathered from the ranks themselves over the worker group's process group (a collective:
    each rank calls it at the same point)."""
    import torch  # workers only: see ddp_worker

    if world_size == 1 or not torch.distributed.is_initialized():
        return [rank]
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, torch.tensor([rank], dtype=torch.int64, device=device))
    return sorted(int(each.item()) for each in gathered)


def _trained_by(result) -> dict:
    """The world size and ranks the workers recorded with the last checkpoint (empty when no epoch was reported)."""
    metrics = result.metrics or {}
    return {key: metrics[key] for key in ("world_size", "ranks") if key in metrics}


def _failure_config(max_failures: int):
    """Every retry of a worker group bounded by --max-failures: a failed worker's; a worker group's that cannot start
    (a lost node, say), a controller failure that Train otherwise retries forever, a minute each; and a preempted
    node's, which Train otherwise retries without end too."""
    from ray.train import FailureConfig  # ray:

    return FailureConfig(  # ray:
        max_failures=max_failures, controller_failure_limit=max_failures, max_preemption_failures=max_failures
    )


def _scaling(workers: int, cpus_per_worker: float, gpus: float):
    from ray.train import ScalingConfig  # ray:

    return ScalingConfig(
        num_workers=workers,
        use_gpu=gpus > 0,
        resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus} if gpus else {})},
    )


def _divergence(result):
    """The Divergence the workers reported with their last checkpoint, if their training diverged; else None."""
    from distml.train import Divergence

    reported = (result.metrics or {}).get(DIVERGENCE)
    return None if reported is None else Divergence(**json.loads(reported))


def _load_final_state(result) -> dict:
    import torch  # the driver reads the last checkpoint once, after training

    if result.checkpoint is None:
        raise DistmlError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, weights_only=True, map_location="cpu")


# ---- K-fold folds of several DDP workers each: a Tune trial per fold ----


def ddp_fold_trial(config: dict, data_box: tuple, storage_box: tuple, stamp: Stamp | None) -> None:
    """One Tune trial that trains its fold on a TorchTrainer of `workers_per_fold` DDP workers, then validates."""
    import torch  # the trial's process: see ddp_worker
    from ray.train import RunConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:

    from distml.train import evaluate, new_state

    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["fold"])
    gpus = float(config["gpus_per_worker"])
    trainer = TorchTrainer(  # ray:
        ddp_worker,
        train_loop_config={**config, "data_ref": data_box[0], "stamp": stamp},
        scaling_config=_scaling(kfold.cluster.workers_per_fold, kfold.cluster.cpus_per_worker, gpus),
        run_config=RunConfig(
            name=f"fold-{fold}",
            storage_path=storage_box[0],
            failure_config=_failure_config(kfold.cluster.max_failures),
        ),
    )
    result = trainer.fit()  # ray:
    device = torch.device("cpu")
    data: SplitData = ray.get(data_box[0])  # ray:
    images, labels = tensors(data, device)
    train_index, val_index = fold_index(data, fold, device)
    recipe: ModelRecipe = config["recipe"]
    build = lambda: recipe.for_fold(images, train_index)  # noqa: E731
    state = new_state(kfold.train_settings, stream=fold, device=device, build=build)
    state.load_state_dict(_load_final_state(result))
    divergence = _divergence(result)
    val = divergence if divergence is not None else evaluate(state.model, images, labels, index=val_index)
    trained_by = _trained_by(result)
    world_size = trained_by.get("world_size", kfold.cluster.workers_per_fold)
    ddp_device = f"{world_size}x " + ("gpu" if gpus else "cpu") + " (DDP)"
    report = final_report(
        data,
        [fold],
        [state.model],
        [state.history],
        [val],
        [(train_index, val_index)],
        device,
        state.train_seconds,
        kfold.keep_fold_models,
        device_name=ddp_device,
    )
    results = [{**fold_result, **trained_by} for fold_result in json.loads(report["results_json"])]
    tune.report({**report, "results_json": json.dumps(results)})  # ray:


def run_folds(
    config: KFoldConfig,
    folds: list[int],
    data: SplitData,
    the_plan: Plan,
    storage_path: str,
    recipe: ModelRecipe,
    on_fold_done: Callable[[dict, str], None],
    stamp: Stamp | None,
) -> list[str]:
    """Run each fold as a Tune trial that trains it on a TorchTrainer of --workers-per-fold DDP workers, state under
    `storage_path`; `on_fold_done(result, outputs)` is called as each finishes. (One worker per fold: fold_actors.py.)

    Returns error messages of folds that failed for good (after their retries).
    """
    # ray: the data enters the object store once; the tuple keeps Tune from resolving the reference, so
    # DDP workers can be handed it too
    data_box = (ray.put(data),)
    ship_model_code(recipe.model, recipe.loss, recipe.optimizer)
    # the storage travels beside the config, not in it: Tune saves the config in the trial's params.json
    trainable = tune.with_parameters(
        ddp_fold_trial, data_box=data_box, storage_box=(storage.join(storage_path, "train"),), stamp=stamp
    )  # ray:
    # the TorchTrainer's workers ask for the real resources; the trial itself needs none, but Tune wants
    # a non-empty request: one byte of memory takes nothing from the workers
    resources = {"cpu": 0, "memory": 1}
    stopper = FeasibilityStopper(config.cluster, config.cluster.lost_node_grace_s)

    def on_result(trial, result: dict) -> None:
        if not result.get("fold_done"):
            log_epochs(result, config.epochs)

    def on_complete(trial) -> None:
        result = trial.last_result or {}
        if not result.get("fold_done"):
            return
        outputs = json.loads(result["outputs_json"])
        for done, output in zip(json.loads(result["results_json"]), outputs, strict=True):
            done["attempts"] = 1 + int(trial.run_metadata.num_failures)
            on_fold_done(done, output)

    progress = TrialProgress(lambda trial: f"folds [{trial.config.get('fold')}]", on_result, on_complete)
    # our callback reports trial failures in one line each; Tune's own logger would add full tracebacks
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    tuner = tune.Tuner(  # ray:
        tune.with_resources(trainable, resources),
        param_space={
            "fold": tune.grid_search(folds),
            "kfold": options_for_ray(config),
            "recipe": recipe,
            "gpus_per_worker": the_plan.gpus_per_worker,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=the_plan.concurrent_folds),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=config.cluster.max_failures),
            callbacks=[progress, *tune_loggers()],
            stop=stopper,
            verbose=0,
        ),
    )
    results = fit_tuner(tuner)
    errors = [f"folds [{r.config['fold']}]: {error_line(r.error)}" for r in results if r.error]
    return errors + ([stopper.reason] if stopper.reason else [])


# ---- the fine-tune: one TorchTrainer ----


class _EpochForwarder(ray.train.UserCallback):  # ray: runs in the Train controller, not in the driver
    """Hands rank 0's epoch reports, and failures of the worker group, to the driver through a Ray queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])

    def after_exception(self, run_context, worker_exceptions):
        # a killed worker shows here too: its health check fails
        errors = [error_line(error) for error in worker_exceptions.values()]
        self.queue.put({"failure": errors[0] if errors else "unknown error"})


def _fit_off_main_thread(trainer):
    """`trainer.fit()` in a thread of its own, waited on by the main thread.

    Called from the main thread, Train V2 replaces the SIGINT handler with its own, which ends the process with
    sys.exit: Ctrl-C would skip the CLI's resume line. From another thread it installs none, and a stop signal
    raises in the main thread while it waits here; the worker group goes with the driver (its actors are not
    detached). Raises what fit() raised."""
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()  # ray: raises when the workers fail more than max_failures times
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, name="distml-finetune-fit", daemon=True)
    fitting.start()
    while fitting.is_alive():
        fitting.join(timeout=0.5)  # a short wait: a signal's handler runs between waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_finetune(
    config: FinetuneConfig,
    gpus_per_worker: float,
    data: SplitData,
    weights: dict[str, torch.Tensor],
    storage_path: str,
    on_epoch: Callable[[EpochRecord], None],
    stamp: Stamp | None,
) -> dict:
    """Fine-tune on a TorchTrainer; returns the last checkpoint's state (model, history, train_seconds) and
    `attempts`, the worker group's starts (1 + the failures it was restarted after), and the `world_size` and
    `ranks` the workers recorded with that checkpoint.

    Train V2 keeps only the metrics attached to checkpoints, so the history comes from the checkpoint's saved
    state, which a restarted worker group also resumes from. A `storage_path` that holds an interrupted run's
    checkpoints resumes it: a new TorchTrainer of the same name and storage path loads Train's snapshot there
    and hands its last checkpoint to the workers.
    """
    from ray.train import CheckpointConfig, RunConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:
    from ray.util.queue import Empty, Queue  # ray:

    from distml.train import Diverged, EpochRecord

    epochs = Queue()  # ray: an actor the controller's callback writes to
    cluster = config.cluster
    trainer = TorchTrainer(  # ray:
        ddp_worker,
        train_loop_config={
            "finetune": options_for_ray(config),
            "data_ref": ray.put(data),  # ray: into the object store once, read zero-copy by every worker
            "weights_ref": ray.put(weights),  # ray:
            "stamp": stamp,
        },
        scaling_config=_scaling(cluster.workers, cluster.cpus_per_worker, gpus_per_worker),
        run_config=RunConfig(
            name=FINETUNE_RUN,
            storage_path=storage_path,
            failure_config=_failure_config(cluster.max_failures),
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
                retried = failures <= cluster.max_failures
                log.info(
                    f"fine-tune workers failed (failure {failures}, --max-failures {cluster.max_failures}): "
                    f"{metrics['failure']}" + ("; restarting them from the last epoch checkpoint" if retried else "")
                )
                continue
            if DIVERGENCE not in metrics:  # a divergence ends fit(), and is raised from there
                on_epoch(EpochRecord(**{k: metrics[k] for k in EpochRecord.__dataclass_fields__}))

    forwarder = threading.Thread(target=forward_epochs, daemon=True)
    forwarder.start()
    try:
        result = _fit_off_main_thread(trainer)
    except Exception as exc:
        raise DistmlError(f"fine-tuning failed (--max-failures {cluster.max_failures}): {error_line(exc)}") from None
    finally:
        finished.set()
        forwarder.join()
        epochs.shutdown()  # ray:
    divergence = _divergence(result)
    if divergence is not None:
        raise Diverged(divergence, config.name)
    return {**_load_final_state(result), "attempts": 1 + failures, **_trained_by(result)}
