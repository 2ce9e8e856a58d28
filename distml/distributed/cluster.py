"""Ray's core, for every command: connecting, the cluster's nodes, and planning trainers onto them.

Nothing here imports Ray Tune, Ray Train or torch: a driver that only schedules starts seconds sooner without them.
The start-up speed measures for a local Ray all live here: `connect` (no idle workers started ahead) and `shutdown`
(the autoscaler monitor stopped first); the kfold workflow asks for its trainers right after `connect`, so their
processes start while the driver prepares the run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants  # ray: the loopback switch of a local start (_connect)

from distml import storage
from distml.config import ClusterConfig
from distml.errors import DistmlError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10
SHARED_CHECK_TIMEOUT_S = 60


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


_ON_CONNECT: list[Callable[[], None]] = []


def on_connect(hook: Callable[[], None]) -> Callable[[], None]:
    """Call `hook` in the main thread each time connect() has joined or started Ray, until the function returned is
    called: the CLI installs its signal handlers there for the length of a command, since ray.init replaces SIGTERM's
    (the library itself installs none)."""
    _ON_CONNECT.append(hook)
    return lambda: _ON_CONNECT.remove(hook) if hook in _ON_CONNECT else None


def connect(address: str | None = None, quiet: bool = True, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS, as inside `ray job submit`), else start a local Ray.

    Returns True when this call started a local Ray, which the caller then shuts down.
    """
    started = _connect(address, quiet, num_cpus)
    if threading.current_thread() is threading.main_thread():
        for hook in _ON_CONNECT:
            hook()
    return started


def _connect(address: str | None, quiet: bool, num_cpus: int | None) -> bool:
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
    # A local Ray listens on loopback only: Ray binds each server of a node (GCS, raylet, object manager, agents,
    # workers) to 127.0.0.1 when the node's address is loopback, else to all interfaces. On Linux a local start takes
    # the machine's network address, even from _node_ip_address="127.0.0.1"; the loopback address macOS and Windows
    # get comes from a flag Ray sets at import (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER), turned off here for this start
    # only. The raylet then hands 127.0.0.1 to every worker it starts.
    cluster_flag = ray_constants.ENABLE_RAY_CLUSTER  # ray:
    ray_constants.ENABLE_RAY_CLUSTER = False  # ray:
    try:
        ray.init(  # ray: a lean local start: no dashboard, quiet logs
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level=level,
            log_to_driver=not quiet,
            # no idle worker processes started ahead: distml asks for exactly the trainers it needs at once, and on a
            # small machine spare workers importing Ray compete with them for the CPU on the way to the first step
            _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_flag  # ray:
    return True


def shutdown() -> None:
    """Stop the local Ray this process started."""
    _stop_autoscaler_monitor()
    ray.shutdown()  # ray:


def _stop_autoscaler_monitor() -> None:
    """Ray's autoscaler monitor answers SIGTERM by reporting to the GCS, which ray.shutdown() has stopped before it,
    and waits about a second for that in vain, most of shutdown's time. A local Ray has nothing to
    autoscale, so the monitor, a child of this process, is stopped first. Linux only (/proc); elsewhere Ray's own
    order stands."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if b"autoscaler/_private/monitor.py" not in (entry / "cmdline").read_bytes():
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue


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


def plan_on_cluster(cluster: ClusterConfig) -> Plan:
    """`plan` against the live nodes of the connected cluster, logging each note (fewer trainers than asked)."""
    the_plan, notes = plan(cluster, cluster_nodes())
    for note in notes:
        log.info(f"note: {note}")
    return the_plan


def check_room(cluster: ClusterConfig) -> float:
    """Fail fast unless the cluster holds `cluster.workers` DDP workers at once (Ray Train would wait forever).

    Returns the GPUs per worker (automatic: one where the cluster has GPUs).
    """
    the_plan, _ = plan(cluster, cluster_nodes())
    workers = cluster.workers
    if the_plan.slots < workers:
        raise DistmlError(
            f"{workers} workers at {cluster.cpus_per_worker:g} CPU"
            + (f" and {the_plan.gpus_per_worker:g} GPU" if the_plan.gpus_per_worker else "")
            + f" each do not fit the cluster ({the_plan.cluster_cpus:g} CPU, {the_plan.cluster_gpus:g} GPU), "
            f"which holds {the_plan.slots}",
            option="--workers",
        )
    return the_plan.gpus_per_worker


class RoomWatch:
    """Ray waits forever for resources that no node has; a cluster that lost its nodes must end a run instead.

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

    def lost(self) -> bool:
        """True once the run must end (then `reason` says why); looks at the cluster at most every CHECK_EVERY_S."""
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


def await_task(ref: ray.ObjectRef, cluster: ClusterConfig, cpus: float, gpus: float, what: str) -> None:
    """Wait for a lone task that asks for `cpus` and `gpus` (its result stays in the object store), however long it
    runs, while some node has room for it: Ray would wait forever for one. Once none has had room for --lost-node-grace
    seconds, the task is cancelled and a one-line RuntimeError names `what` and the nodes lost."""
    alone = dataclasses.replace(cluster, workers=1, workers_per_fold=1, cpus_per_worker=cpus, gpus_per_worker=gpus)
    watch = RoomWatch(alone, cluster.lost_node_grace_s)
    while not ray.wait([ref], timeout=RoomWatch.CHECK_EVERY_S, fetch_local=False)[0]:  # ray:
        if watch.lost():
            ray.cancel(ref, force=True)  # ray:
            raise RuntimeError(f"{what}: {watch.reason}")


def _describe_nodes(nodes: dict[str, dict[str, float]]) -> str:
    """'2 node(s) (1a2b3c4d: 2 CPU, 0 GPU; ...)': each node's id prefix, CPUs and GPUs."""
    each = [f"{node[:8]}: {res.get('CPU', 0.0):g} CPU, {res.get('GPU', 0.0):g} GPU" for node, res in nodes.items()]
    return f"{len(nodes)} node(s) ({'; '.join(each)})"
