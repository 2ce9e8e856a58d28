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
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import storage
from distml.config import ClusterConfig, KFoldConfig, SweepConfig
from distml.errors import DistmlError

if TYPE_CHECKING:
    import torch

    from distml.finetune import FinetuneConfig
    from distml.train import EpochRecord, GroupState, TrainState

# torch is imported inside the functions that run in trainers: the driver only schedules, and torch's import
# would add seconds to every run's start-up.

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home, never prompt
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, Tune then prints nothing of its own
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# Tune's default TensorBoard logger imports torch into the driver (3 to 4 s here); _tune_loggers() adds the
# CSV and JSON loggers back by hand
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
import ray  # noqa: E402
import ray.train  # noqa: E402
from ray import tune  # noqa: E402

STATE_FILE = "state.pt"
CONNECT_TIMEOUT_S = 10
SHARED_CHECK_TIMEOUT_S = 60


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
    if address:  # an explicit address is checked even when Ray is up, so a typo never passes silently
        _check_reachable(address)
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


def live_nodes() -> dict[str, dict[str, float]]:
    """The resources of every live node, by node id."""
    return {node["NodeID"]: node["Resources"] for node in ray.nodes() if node.get("Alive")}  # ray:


def cluster_nodes() -> list[dict[str, float]]:
    """The resources of every live node."""
    return list(live_nodes().values())


@ray.remote(num_cpus=0)  # ray: a look at one node's filesystem; takes no CPU from the folds
def _sees_file(path: str) -> bool:
    return os.path.exists(path)


def check_shared(folder: Path, option: str) -> None:
    """On a cluster of several nodes, refuse a folder that some node does not see, before any work starts.

    Fold trainers on every node write their checkpoints under `folder`, and the driver reads them back; a
    node-local folder would scatter them. The driver writes a marker file, and a task pinned to each other node
    looks for it: the one test that holds for NFS, EFS, FUSE mounts and bind mounts alike.
    """
    nodes = list(live_nodes())
    here = ray.get_runtime_context().get_node_id()  # ray:
    others = [node for node in nodes if node != here]
    if not others:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # ray:

    marker = Path(folder) / storage.marker_name()
    marker.write_text("written by the distml driver to check that every node sees this folder\n")
    try:
        checks = [
            _sees_file.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(  # ray:
                str(marker)
            )
            for node in others
        ]
        seen = ray.get(checks, timeout=SHARED_CHECK_TIMEOUT_S)  # ray:
    except ray.exceptions.GetTimeoutError:  # ray:
        raise DistmlError(
            f"could not check within {SHARED_CHECK_TIMEOUT_S} s that every node of the cluster sees {folder}",
            option=option,
        ) from None
    finally:
        marker.unlink(missing_ok=True)
    blind = [node[:8] for node, ok in zip(others, seen, strict=True) if not ok]
    if blind:
        raise DistmlError(
            f"{folder} is not shared: {len(blind)} of the cluster's {len(nodes)} nodes ({', '.join(blind)}) do not "
            "see it; give --storage a network filesystem mounted at the same path on every node, or an s3:// URI",
            option=option,
        )


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
            f"one trainer needs {need}, but the largest of {len(nodes)} node(s) has "
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


def plan_on_cluster(cluster: ClusterConfig, say: Callable[[str], None]) -> Plan:
    """`plan` against the live nodes of the connected cluster, saying each note (fewer trainers than asked)."""
    the_plan, notes = plan(cluster, cluster_nodes())
    for note in notes:
        say(f"note: {note}")
    return the_plan


def _device(gpus: float) -> torch.device:
    import torch

    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # the object store's arrays are read-only; training never writes them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


def _tensors(data: SharedData, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _tensor(data.images, device), _tensor(data.labels, device)


def _fold_index(data: SharedData, fold: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    is_val = data.assignment == fold
    return (torch.from_numpy(np.flatnonzero(~is_val)).to(device), torch.from_numpy(np.flatnonzero(is_val)).to(device))


def _save_state(state: TrainState | GroupState, folder: str) -> None:
    import torch

    torch.save(state.state_dict(), os.path.join(folder, STATE_FILE))


def _load_state(state: TrainState | GroupState, folder: str) -> None:
    import torch

    state.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu"))


def _fold_result(
    fold: int, history: list[EpochRecord], train_seconds: float, val, sizes: tuple[int, int], device: torch.device
) -> dict:
    """Everything the report needs of one finished fold."""
    import torch

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
    }


def _epoch_report(folds: list[int], records: list[EpochRecord]) -> dict:
    return {
        "fold_done": False,
        "epoch": records[0].epoch,
        "records_json": json.dumps([{"fold": f, **asdict(r)} for f, r in zip(folds, records, strict=True)]),
    }


def _final_report(results: list[dict]) -> dict:
    return {"fold_done": True, "results_json": json.dumps(results)}


def folds_trial(config: dict, data_box: tuple) -> None:
    """One Tune trial: train its folds in this process (workers_per_fold == 1).

    One fold trains with the plain loop; several MLP folds train at once as one stacked model.
    Every epoch ends with a checkpoint, so a retried trial carries on from its last epoch.
    """
    import torch

    from distml.train import fit, fit_group, new_group_state, new_state

    kfold = KFoldConfig.from_dict(config["kfold"])
    folds = [int(f) for f in config["folds"]]
    gpus = float(config["gpus_per_worker"])
    torch.set_num_threads(max(1, int(kfold.cluster.cpus_per_worker)))
    device = _device(gpus)
    data: SharedData = ray.get(data_box[0])  # ray: zero-copy on the same node
    images, labels = _tensors(data, device)
    train_indices, val_indices = zip(*(_fold_index(data, fold, device) for fold in folds), strict=True)
    settings = kfold.train_settings
    if len(folds) == 1:
        state = new_state(settings, stream=folds[0], device=device)
    else:
        state = new_group_state(settings, streams=folds, device=device)
    checkpoint = tune.get_checkpoint()  # ray: set when Tune retries this trial after a failure
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)

    def report_epoch(state: TrainState | GroupState, records: EpochRecord | list[EpochRecord]) -> None:
        records = records if isinstance(records, list) else [records]
        with tempfile.TemporaryDirectory() as folder:
            _save_state(state, folder)
            tune.report(_epoch_report(folds, records), checkpoint=tune.Checkpoint.from_directory(folder))  # ray:

    if len(folds) == 1:
        vals = [fit(state, settings, images, labels, train_indices[0], val_indices[0], on_epoch=report_epoch)]
        histories = [state.history]
    else:
        vals = fit_group(state, settings, images, labels, list(train_indices), list(val_indices), report_epoch)
        histories = state.histories
    results = [
        _fold_result(fold, history, state.train_seconds, val, (len(tr), len(va)), device)
        for fold, history, val, tr, va in zip(folds, histories, vals, train_indices, val_indices, strict=True)
    ]
    tune.report(_final_report(results))  # ray:


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
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, fold, device)
    state = new_state(kfold.train_settings, stream=fold, device=device)
    checkpoint = ray.train.get_checkpoint()  # ray:
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _load_state(state, folder)
    state.model = ray.train.torch.prepare_model(state.model)  # ray: DDP; gloo on CPU, NCCL on GPU

    def report_epoch(state: TrainState, record: EpochRecord) -> None:
        _report_ddp_epoch(state, _epoch_report([fold], [record]), rank)

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
    images, labels = _tensors(data, device)
    train_index, val_index = _fold_index(data, fold, device)
    val = evaluate(state.model, images, labels, index=val_index)
    result = _fold_result(fold, state.history, state.train_seconds, val, (len(train_index), len(val_index)), device)
    result["device"] = f"{kfold.cluster.workers_per_fold}x " + ("gpu" if gpus else "cpu") + " (DDP)"
    tune.report(_final_report([result]))  # ray:


class _Progress(tune.Callback):  # ray: runs in the driver, sees every trial's reports
    def __init__(self, epochs: int, say: Callable[[str], None], on_fold_done: Callable[[dict], None]):
        self.epochs, self.say, self.on_fold_done = epochs, say, on_fold_done

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("fold_done"):
            return
        for r in json.loads(result["records_json"]):
            self.say(
                f"fold {r['fold']}: epoch {r['epoch']}/{self.epochs} train_loss={r['train_loss']:.4f} "
                f"val_loss={r['val_loss']:.4f} val_acc={r['val_accuracy']:.4f} ({r['seconds']:.1f} s)"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if not result.get("fold_done"):
            return
        for fold_result in json.loads(result["results_json"]):
            fold_result["attempts"] = 1 + int(trial.run_metadata.num_failures)
            self.on_fold_done(fold_result)

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


class _FeasibilityStopper(tune.Stopper):  # ray: ends the run if the cluster can no longer hold a trainer
    """Tune waits forever for resources that no node has; a cluster that lost its nodes must end instead.

    Every CHECK_EVERY_S the live nodes are planned on again; once they have had no room for a trainer for
    `grace_s` seconds, `reason` says which nodes were lost and what one trainer needs, and the run ends.
    """

    CHECK_EVERY_S = 2.0  # a look at the GCS's node table: cheap

    def __init__(
        self,
        cluster: ClusterConfig,
        grace_s: float,
        nodes: Callable[[], dict[str, dict[str, float]]] = live_nodes,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cluster, self.grace_s, self.nodes, self.clock = cluster, grace_s, nodes, clock
        self.seen = dict(nodes())  # every node alive at some check, to name the lost ones
        self.last_check: float | None = None
        self.unfit_since: float | None = None
        self.reason: str | None = None

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        now = self.clock()
        if self.last_check is not None and now - self.last_check < self.CHECK_EVERY_S:
            return self.reason is not None
        self.last_check = now
        alive = self.nodes()
        self.seen.update(alive)
        try:
            plan(self.cluster, list(alive.values()))
            self.unfit_since = None
        except DistmlError as exc:
            self.unfit_since = now if self.unfit_since is None else self.unfit_since
            if now - self.unfit_since >= self.grace_s:
                lost = {node: resources for node, resources in self.seen.items() if node not in alive}
                self.reason = (
                    f"the cluster {f'lost {_describe_nodes(lost)} and ' if lost else ''}has had no room for a "
                    f"trainer for {now - self.unfit_since:.0f} s (--lost-node-grace {self.grace_s:g}), so the run "
                    f"ends: {exc.message}"
                )
        return self.reason is not None


def _describe_nodes(nodes: dict[str, dict[str, float]]) -> str:
    """'2 node(s) (1a2b3c4d: 2 CPU, 0 GPU; ...)': each node's id prefix, CPUs and GPUs."""
    each = [f"{node[:8]}: {res.get('CPU', 0.0):g} CPU, {res.get('GPU', 0.0):g} GPU" for node, res in nodes.items()]
    return f"{len(nodes)} node(s) ({'; '.join(each)})"


def _tune_loggers() -> list:
    """Tune's per-trial progress.csv and result.json, which ExperimentAnalysis reads back."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback  # ray:

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def fold_groups(folds: list[int], folds_per_trial: int) -> list[list[int]]:
    """Split the folds into trials of at most `folds_per_trial`, as evenly as possible."""
    count = math.ceil(len(folds) / folds_per_trial)
    return [[int(f) for f in part] for part in np.array_split(np.array(folds), count)]


def run_folds(
    config: KFoldConfig,
    folds: list[int],
    data: SharedData,
    the_plan: Plan,
    storage_path: str,
    say: Callable[[str], None],
    on_fold_done: Callable[[dict], None],
    folds_per_trial: int = 1,
) -> list[str]:
    """Run the given folds as Tune trials, their state under `storage_path`; `on_fold_done(row)` is called as each
    finishes.

    Returns error messages of folds that failed for good (after their retries).
    """
    # ray: the data enters the object store once; the tuple keeps Tune from resolving the reference, so
    # DDP workers can be handed it too
    data_box = (ray.put(data),)
    per_fold = config.cluster.workers_per_fold
    if per_fold == 1:
        trainable = tune.with_parameters(folds_trial, data_box=data_box)  # ray:
        resources = {"cpu": the_plan.cpus_per_worker, "gpu": the_plan.gpus_per_worker}
    else:
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
            "folds": tune.grid_search(fold_groups(folds, folds_per_trial)),
            "kfold": config.to_dict(),
            "gpus_per_worker": the_plan.gpus_per_worker,
            "storage_path": storage.join(storage_path, "train"),
        },
        # A reused trainer skips a process start on one node. On several, Tune hands a pending fold to the first
        # trainer that frees up and drops the one already starting for it elsewhere, so a fast node takes folds
        # from the others: there each fold keeps the trainer it was placed with.
        tune_config=tune.TuneConfig(max_concurrent_trials=the_plan.concurrent_folds, reuse_actors=the_plan.nodes == 1),
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
    import torch

    from distml.finetune import FinetuneConfig, finetune_state
    from distml.train import fit

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
            name="finetune",
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
    return _device(gpus)


def _compute_features(data: SweepData, initial_state: dict, config: dict, cpus: float, gpus: float) -> SweepData:
    from distml import sweep

    device = _sweep_threads_and_device(cpus, gpus)
    sweep_config = SweepConfig.from_dict(config)
    features = sweep.backbone_features(sweep_config, initial_state, _tensor(data.inputs, device))
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

    inputs, labels = _tensor(data.inputs, device), _tensor(data.labels, device)
    train_index, val_index = _tensor(data.train_index, device), _tensor(data.val_index, device)
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
        _tensor(data.inputs, device),
        _tensor(data.labels, device),
        _tensor(all_index, device),
        _tensor(data.val_index, device),
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
