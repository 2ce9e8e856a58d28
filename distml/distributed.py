"""Everything that touches Ray: connecting, checking resources, and running folds as Tune trials.

Each Ray call is marked `# ray:` so it is easy to find. The training itself is `distml.train`'s plain loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from distml.config import ClusterConfig, KFoldConfig
from distml.errors import DistmlError
from distml.train import EpochRecord, TrainState, fit, new_state

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home, never prompt
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune then prints nothing of its own
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402

if TYPE_CHECKING:
    from distml.finetune import FinetuneConfig

STATE_FILE = "state.pt"
CONNECT_TIMEOUT_S = 10


@dataclass(frozen=True)
class SharedData:
    """What every fold trainer reads: normalised images, labels and the fold of each image.

    Put in the object store once; trainers on the same node read the arrays zero-copy.
    """

    images: np.ndarray  # float32 (N, 1, 28, 28)
    labels: np.ndarray  # int64 (N,)
    assignment: np.ndarray  # int64 (N,), the validation fold of each image


@dataclass(frozen=True)
class Plan:
    """How the folds are laid onto the cluster."""

    cpus_per_worker: float
    gpus_per_worker: float
    concurrent_folds: int
    slots: int  # fold trainers (or DDP workers, with workers_per_fold > 1) the cluster holds at once
    cluster_cpus: float
    cluster_gpus: float
    nodes: int


def _check_reachable(address: str) -> None:
    """ray.init retries an unreachable address for minutes; fail within CONNECT_TIMEOUT_S instead."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise DistmlError(f"{address!r} is not HOST:PORT", option="--address")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise DistmlError(
            f"cannot reach a Ray cluster at {address} within {CONNECT_TIMEOUT_S} s ({exc})", option="--address"
        ) from None


def connect(address: str | None = None, quiet: bool = True, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS, as inside `ray job submit`), else start a local Ray.

    Returns True when this call started a local Ray, which the caller then shuts down.
    """
    if ray.is_initialized():  # ray:
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.ERROR if quiet else logging.WARNING
    if address:
        _check_reachable(address)
        ray.init(address=address, logging_level=level, log_to_driver=not quiet)  # ray:
        return False
    ray.init(  # ray: a lean local start: no dashboard, quiet logs
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=level,
        log_to_driver=not quiet,
    )
    return True


def shutdown() -> None:
    ray.shutdown()  # ray:


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every live node."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]  # ray:


def plan(cluster: ClusterConfig, nodes: list[dict[str, float]]) -> tuple[Plan, list[str]]:
    """Check that one fold trainer fits on some node and how many fit at once; fail fast otherwise.

    Returns the plan and the warnings a user should see (fewer trainers at once than asked, say).
    Ray Tune would wait forever for resources no node has, so this runs before anything is submitted.
    """
    cluster_cpus = sum(n.get("CPU", 0.0) for n in nodes)
    cluster_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    gpus = cluster.gpus_per_worker
    if gpus is None:  # automatic: one GPU per trainer where the cluster has GPUs
        gpus = 1.0 if cluster_gpus >= 1 else 0.0
    cpus = cluster.cpus_per_worker

    def per_node(node: dict[str, float]) -> int:
        fit_cpu = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)
        fit_gpu = math.floor(node.get("GPU", 0.0) / gpus + 1e-9) if gpus > 0 else fit_cpu
        return min(fit_cpu, fit_gpu)

    slots = sum(per_node(n) for n in nodes)
    largest_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    largest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    if slots == 0:
        raise DistmlError(
            f"one fold trainer needs {need}, but the largest of {len(nodes)} node(s) has "
            f"{largest_cpu:g} CPU and {largest_gpu:g} GPU",
            option="--gpus-per-worker" if gpus > largest_gpu else "--cpus-per-worker",
        )
    per_fold = cluster.workers_per_fold
    if slots < per_fold:
        raise DistmlError(
            f"{per_fold} workers per fold at {need} each need room for {per_fold} trainers, but the cluster "
            f"({cluster_cpus:g} CPU, {cluster_gpus:g} GPU) holds {slots}",
            option="--workers-per-fold",
        )
    fits = slots // per_fold
    notes = []
    concurrent = cluster.workers
    if concurrent > fits:
        notes.append(
            f"--workers {concurrent} asks for more than the cluster holds at once ({cluster_cpus:g} CPU, "
            f"{cluster_gpus:g} GPU, {need} per trainer): running {fits} at a time"
        )
        concurrent = fits
    return Plan(cpus, gpus, concurrent, slots, cluster_cpus, cluster_gpus, len(nodes)), notes


def _device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _tensors(data: SharedData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():  # the object store's arrays are read-only; training never writes them
        warnings.simplefilter("ignore", UserWarning)
        images = torch.from_numpy(data.images)
        labels = torch.from_numpy(data.labels)
    return images.to(device), labels.to(device)


def _fold_index(data: SharedData, fold: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    is_val = data.assignment == fold
    return (torch.from_numpy(np.flatnonzero(~is_val)).to(device), torch.from_numpy(np.flatnonzero(is_val)).to(device))


def _save_state(state: TrainState, folder: str) -> None:
    torch.save(state.state_dict(), os.path.join(folder, STATE_FILE))


def _load_state(state: TrainState, folder: str) -> None:
    state.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu"))


def _final_metrics(fold: int, state: TrainState, val, sizes: tuple[int, int], device: torch.device) -> dict:
    return {
        "fold": fold,
        "fold_done": True,
        "train_size": sizes[0],
        "val_size": sizes[1],
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
        "precision_macro": val.precision,
        "recall_macro": val.recall,
        "f1_macro": val.f1,
        "epochs": state.epochs_done,
        "train_seconds": state.train_seconds,
        "node": ray.util.get_node_ip_address(),  # ray:
        "hostname": socket.gethostname(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "history_json": json.dumps([asdict(r) for r in state.history]),
        "confusion_json": json.dumps(val.confusion.tolist()),
    }


def _epoch_metrics(fold: int, record: EpochRecord) -> dict:
    return {"fold": fold, "fold_done": False, **asdict(record)}


def fold_trial(config: dict, data_box: tuple) -> None:
    """One Tune trial: train one fold in this process (workers_per_fold == 1)."""
    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["fold"])
    gpus = float(config["gpus_per_worker"])
    torch.set_num_threads(max(1, int(kfold.cluster.cpus_per_worker)))
    device = _device(gpus)
    data: SharedData = ray.get(data_box[0])  # ray: zero-copy on the same node
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, fold, device)
    state = new_state(kfold.train_settings, stream=fold, device=device)
    checkpoint = tune.get_checkpoint()  # ray: set when Tune retries this trial after a failure
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        with tempfile.TemporaryDirectory() as folder:
            _save_state(state, folder)
            tune.report(_epoch_metrics(fold, record), checkpoint=tune.Checkpoint.from_directory(folder))  # ray:

    val = fit(state, kfold.train_settings, images, labels, train_index, val_index, on_epoch=report_epoch)
    tune.report(_final_metrics(fold, state, val, (len(train_index), len(val_index)), device))  # ray:


def ddp_fold_worker(config: dict) -> None:
    """One Ray Train worker of a fold trained with DistributedDataParallel (workers_per_fold > 1)."""
    import ray.train  # ray:
    import ray.train.torch  # ray:

    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["fold"])
    torch.set_num_threads(max(1, int(kfold.cluster.cpus_per_worker)))
    context = ray.train.get_context()  # ray:
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # ray:
    data: SharedData = ray.get(config["data_ref"])  # ray:
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, fold, device)
    state = new_state(kfold.train_settings, stream=fold, device=device)
    checkpoint = ray.train.get_checkpoint()  # ray:
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)
    state.model = ray.train.torch.prepare_model(state.model)  # ray: DDP; gloo on CPU, NCCL on GPU

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        _report_ddp_epoch(state, _epoch_metrics(fold, record), rank)

    fit(state, kfold.train_settings, images, labels, train_index, val_index, report_epoch, rank, world_size)


def _report_ddp_epoch(state: TrainState, metrics: dict, rank: int) -> None:
    """Every DDP worker reports; rank 0 attaches the checkpoint (one copy of the weights is enough)."""
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            plain = state.model.module if hasattr(state.model, "module") else state.model
            torch.save({**state.state_dict(), "model": plain.state_dict()}, os.path.join(folder, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))  # ray:
    else:
        ray.train.report(metrics)  # ray:


def ddp_fold_trial(config: dict, data_box: tuple) -> None:
    """One Tune trial that trains its fold on a TorchTrainer of `workers_per_fold` DDP workers."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:

    kfold = KFoldConfig.from_dict(config["kfold"])
    fold = int(config["fold"])
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
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, fold, device)
    from distml.train import evaluate

    val = evaluate(state.model, images.index_select(0, val_index), labels.index_select(0, val_index))
    metrics = _final_metrics(fold, state, val, (len(train_index), len(val_index)), device)
    metrics["device"] = f"{kfold.cluster.workers_per_fold}x " + ("gpu" if gpus else "cpu") + " (DDP)"
    tune.report(metrics)  # ray:


class _Progress(tune.Callback):  # ray: runs in the driver, sees every trial's reports
    def __init__(self, k: int, epochs: int, say: Callable[[str], None], on_fold_done: Callable[[dict], None]):
        self.k, self.epochs, self.say, self.on_fold_done = k, epochs, say, on_fold_done

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("fold_done"):
            self.say(
                f"fold {result['fold']}: epoch {result['epoch']}/{self.epochs} "
                f"train_loss={result['train_loss']:.4f} val_loss={result['val_loss']:.4f} "
                f"val_acc={result['val_accuracy']:.4f} ({result['seconds']:.1f} s)"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if not result.get("fold_done"):
            return
        row = dict(result)
        row["attempts"] = 1 + int(getattr(trial.run_metadata, "num_failures", 0))
        self.on_fold_done(row)

    def on_trial_recover(self, iteration, trials, trial, **info):
        fold = trial.config.get("fold")
        failures = getattr(trial.run_metadata, "num_failures", 0)
        self.say(f"fold {fold}: trainer failed (failure {failures}); retrying from its last epoch checkpoint")

    def on_trial_error(self, iteration, trials, trial, **info):
        fold = trial.config.get("fold")
        self.say(f"fold {fold}: failed for good after {getattr(trial.run_metadata, 'num_failures', 0)} failure(s)")


def run_folds(
    config: KFoldConfig,
    folds: list[int],
    data: SharedData,
    the_plan: Plan,
    storage: Path,
    say: Callable[[str], None],
    on_fold_done: Callable[[dict], None],
) -> list[str]:
    """Run the given folds as Tune trials; `on_fold_done(row)` is called as each finishes.

    Returns error messages of folds that failed for good (after their retries).
    """
    # ray: the data enters the object store once; the tuple keeps Tune from resolving the reference, so
    # DDP workers can be handed it too
    data_box = (ray.put(data),)
    per_fold = config.cluster.workers_per_fold
    if per_fold == 1:
        trainable = tune.with_parameters(fold_trial, data_box=data_box)  # ray:
        resources = {"cpu": the_plan.cpus_per_worker, "gpu": the_plan.gpus_per_worker}
    else:
        trainable = tune.with_parameters(ddp_fold_trial, data_box=data_box)  # ray:
        resources = {"cpu": 0}  # the TorchTrainer's workers ask for the real resources
    tuner = tune.Tuner(  # ray:
        tune.with_resources(trainable, resources),
        param_space={
            "fold": tune.grid_search(folds),
            "kfold": config.to_dict(),
            "gpus_per_worker": the_plan.gpus_per_worker,
            "storage_path": str(storage / "train"),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=the_plan.concurrent_folds, reuse_actors=True),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=config.cluster.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[_Progress(config.k, config.epochs, say, on_fold_done)],
            verbose=0,
        ),
    )
    results = tuner.fit()  # ray:
    return [f"fold {r.config['fold']}: {str(r.error).splitlines()[0]}" for r in results if r.error]


def check_room(workers: int, cpus_per_worker: float, gpus_per_worker: float | None) -> float:
    """Fail fast unless the cluster holds `workers` DDP workers at once (Ray Train would wait forever).

    Returns the GPUs per worker (automatic: one where the cluster has GPUs).
    """
    cluster = ClusterConfig(cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)
    the_plan, _ = plan(cluster, cluster_nodes())
    if the_plan.slots < workers:
        raise DistmlError(
            f"{workers} workers at {cpus_per_worker:g} CPU"
            + (f" and {the_plan.gpus_per_worker:g} GPU" if the_plan.gpus_per_worker else "")
            + f" each do not fit the cluster ({the_plan.cluster_cpus:g} CPU, {the_plan.cluster_gpus:g} GPU), "
            f"which holds {the_plan.slots}",
            option="--workers",
        )
    return the_plan.gpus_per_worker


def finetune_worker(config: dict) -> None:
    """One Ray Train worker of the ResNet18 fine-tune: DDP over this rank's share of every epoch."""
    import ray.train  # ray:
    import ray.train.torch  # ray:

    from distml.finetune import FinetuneConfig, finetune_state

    finetune = FinetuneConfig.from_dict(config["finetune"])
    torch.set_num_threads(max(1, int(finetune.cpus_per_worker)))
    context = ray.train.get_context()  # ray:
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # ray:
    data: SharedData = ray.get(config["data_ref"])  # ray: zero-copy on the same node
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, 1, device)  # the holdout's fold 1 validates
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
    """Hands rank 0's epoch reports to the driver through a Ray queue, for its progress lines."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(metrics[0])


def run_finetune(
    config: FinetuneConfig,
    gpus_per_worker: float,
    data: SharedData,
    weights: dict[str, torch.Tensor],
    storage: Path,
    on_epoch: Callable[[EpochRecord], None],
) -> dict:
    """Fine-tune on a TorchTrainer; returns the last checkpoint's state (model, history, train_seconds).

    Train V2 keeps only the metrics attached to checkpoints, so the history comes from the checkpoint's saved
    state, which a restarted worker group also resumes from.
    """
    import threading

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # ray:
    from ray.train.torch import TorchTrainer  # ray:
    from ray.util.queue import Empty, Queue  # ray:

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
            name="finetune",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[_EpochForwarder(epochs)],
        ),
    )
    finished = threading.Event()

    def forward_epochs() -> None:
        while not finished.is_set() or not epochs.empty():
            try:
                metrics = epochs.get(timeout=0.5)
            except Empty:
                continue
            on_epoch(EpochRecord(**{k: metrics[k] for k in EpochRecord.__dataclass_fields__}))

    forwarder = threading.Thread(target=forward_epochs, daemon=True)
    forwarder.start()
    try:
        result = trainer.fit()  # ray: raises when the workers fail more than max_failures times
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistmlError(f"fine-tuning failed (--max-failures {config.max_failures}): {first_line}") from None
    finally:
        finished.set()
        forwarder.join()
        epochs.shutdown()  # ray:
    if result.checkpoint is None:
        raise DistmlError("fine-tuning finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu")
