"""Cluster mode for real: a two-node Ray cluster on loopback with token authentication, started and stopped here.

The head (1 CPU) and a second node (1 CPU and a custom `node2` resource) are started with `ray start`, each in its
own session, temp dir and ports, so the tests never touch another Ray on this machine; teardown kills exactly the
processes of those sessions (never `ray stop`, which would stop everyone's Ray). Where `unshare -m` is allowed,
the second node gets its own tmpfs over one folder, which then is a storage path that not every node sees.
The last test adds a third node (2 CPUs) and SIGKILLs it mid-run, as a lost machine.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import psutil
import pytest

from distml import checkpoints
from distml.data import SAMPLE_DIR
from distml.rundir import FINETUNE_RUN

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else shutil.which("ray")
DISTML = str(BIN / "distml") if (BIN / "distml").exists() else shutil.which("distml")
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Cluster:
    gcs: str  # 127.0.0.1:PORT, for `ray start --address` and `distml kfold --address`
    dashboard: str  # http://127.0.0.1:PORT, for `ray job`
    env: dict[str, str]  # token authentication on, this worktree's distml first on the path
    storage: Path  # a folder every node sees
    node_local: Path | None  # a folder the second node does not see (None where unshare -m is not allowed)
    head_id: str
    node2_id: str
    root: Path  # the temp dirs and logs of every node
    spare_ports: int  # the first of NODE_PORTS ports kept free for one more node


WORKER_PORTS = 100  # per node; a job, its Tune trials and the shared-storage checks need a few dozen at most
NODE_PORTS = 6 + WORKER_PORTS


def _node_ports(first: int) -> list[str]:
    """`ray start` options for a node's own ports: six from `first`, then WORKER_PORTS for its workers."""
    names = ["--object-manager-port", "--node-manager-port", "--metrics-export-port"]
    names += ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    ports = [part for offset, name in enumerate(names) for part in (name, str(first + offset))]
    return ports + ["--min-worker-port", str(first + 6), "--max-worker-port", str(first + NODE_PORTS - 1)]


def _join_args(cluster_gcs: str, cpus: int, resource: str, temp_dir: Path, first_port: int) -> list[str]:
    """`ray start` for a worker node on loopback with `cpus` CPUs and a custom resource that names it."""
    return (
        [RAY, "start", "--address", cluster_gcs, "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus)]
        + ["--num-gpus", "0", "--resources", json.dumps({resource: 1}), "--temp-dir", str(temp_dir)]
        + ["--disable-usage-stats", *_node_ports(first_port)]
    )


def _free_port_block(count: int) -> int:
    """The first of `count` consecutive ports that are free now, between Ray's default worker ports (10002-19999,
    which other Ray clusters here use) and the kernel's ephemeral range (outgoing connections)."""
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(50):
        first = random.randrange(20000, ephemeral - count)
        try:
            for port in range(first, first + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports between 20000 and {ephemeral}")


def _session_processes(sessions: set[int]) -> set[int]:
    """Live processes in the given sessions, and their descendants (a job's driver runs in a session of its own)."""
    parent_of, session_of = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent_of[int(entry.name)], session_of[int(entry.name)] = int(fields[1]), int(fields[3])
    found = {pid for pid, session in session_of.items() if session in sessions}
    while True:
        children = {pid for pid, parent in parent_of.items() if parent in found} - found
        if not children:
            return found - {os.getpid()}
        found |= children


def _kill_sessions(sessions: set[int]) -> None:
    """SIGKILL every process of the sessions, as a machine that is lost, and wait up to 5 s for them to end.

    No graceful stop is needed: each cluster here is thrown away with its temp dir."""
    deadline = time.monotonic() + 5
    while (pids := _session_processes(sessions)) and time.monotonic() < deadline:
        for pid in pids:  # again each round: a process may have started one more before it was killed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _start_node(args: list[str], env: dict[str, str], log: Path, sessions: set[int]) -> None:
    with open(log, "w") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    sessions.add(process.pid)  # ray start leaves its daemons in this session when it exits
    if process.wait(timeout=START_TIMEOUT_S) != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{log.read_text()[-3000:]}")


def _unshare_allowed() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    return subprocess.run([unshare, "-m", "--propagation", "private", "true"], capture_output=True).returncode == 0


def _nodes(cluster_env: dict[str, str], dashboard: str) -> list[dict]:
    result = subprocess.run(
        [RAY, "list", "nodes", "--address", dashboard, "--format", "json", "--detail"],
        env=cluster_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [node for node in json.loads(result.stdout) if node["state"] == "ALIVE"]


@pytest.fixture(scope="module")
def cluster():
    if RAY is None or DISTML is None:
        pytest.skip("the `ray` and `distml` commands are not installed")
    # short: Ray's unix socket paths live under it, and those are limited to 107 characters
    root = Path(tempfile.mkdtemp(prefix="dml-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),  # never ~/.ray/auth_token: that one belongs to whoever else runs Ray here
        RAY_USAGE_STATS_ENABLED="0",
        DISTML_OFFLINE="1",
    )
    # the head's three, then each node's: the head, the second node and one more (test_losing_a_node...)
    first = _free_port_block(3 + 3 * NODE_PORTS)
    gcs, dashboard, client = first, first + 1, first + 2
    storage, node_local = root / "shared", root / "node-local"
    storage.mkdir()
    node_local.mkdir()
    env["DISTML_STORAGE"] = str(storage)  # as cluster.yaml does: every job's driver inherits it from its node
    sessions: set[int] = set()
    try:
        _start_node(
            [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs)]
            + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--ray-client-server-port"]
            + [str(client), "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(root / "head")]
            + ["--disable-usage-stats", *_node_ports(first + 3)],
            env,
            root / "head.log",
            sessions,
        )
        private = _unshare_allowed()
        # the second node's own tmpfs over node-local/: a folder the driver writes and this node cannot see
        isolate = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
        isolate += [f'mount -t tmpfs distml-test "{node_local}" && exec "$@"', "sh"]
        _start_node(
            (isolate if private else [])
            + _join_args(f"127.0.0.1:{gcs}", 1, "node2", root / "node2", first + 3 + NODE_PORTS),
            env,
            root / "node2.log",
            sessions,
        )
        nodes = _nodes(env, f"http://127.0.0.1:{dashboard}")
        assert len(nodes) == 2, nodes
        node2_id = next(n["node_id"] for n in nodes if "node2" in n["resources_total"])
        head_id = next(n["node_id"] for n in nodes if n["is_head_node"])
        yield Cluster(
            f"127.0.0.1:{gcs}",
            f"http://127.0.0.1:{dashboard}",
            env,
            storage,
            node_local if private else None,
            head_id,
            node2_id,
            root,
            first + 3 + 2 * NODE_PORTS,
        )
    finally:
        _kill_sessions(sessions)
        shutil.rmtree(root, ignore_errors=True)


def _check_report(run: Path, cluster: Cluster) -> pd.DataFrame:
    folds = pd.read_csv(run / "folds.csv")
    assert folds["fold"].tolist() == [0, 1]
    assert folds["val_size"].sum() == 6000
    assert (folds["val_accuracy"] > 0.5).all(), folds  # chance is 0.10; one epoch on 3,000 images gives ~0.85
    # every fold ran on a node of this cluster: the driver joined it rather than starting a Ray of its own
    assert set(folds["node_id"]) <= {cluster.head_id, cluster.node2_id}
    return folds


def _ray_job(cluster: Cluster, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`ray job COMMAND ARGS` against the cluster's dashboard, with its token, from this checkout."""
    return subprocess.run(
        [RAY, "job", command, "--address", cluster.dashboard, *args],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _submit(
    cluster: Cluster, submission: str, *options: str, wait: bool = True, job: str = "jobs/kfold.py"
) -> subprocess.CompletedProcess:
    """`ray job submit` of `job` (jobs/kfold.py) with `options`, this checkout as its working dir; `wait`: follow the
    job to its end (else return once it is submitted). --storage is DISTML_STORAGE, set on the nodes."""
    submit = _ray_job(
        cluster,
        "submit",
        "--submission-id",
        submission,
        *("--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", *([] if wait else ["--no-wait"]), "--"),
        *("python", job, *options),
        timeout=RUN_TIMEOUT_S,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    return submit


def test_ray_job_submit_runs_kfold_on_the_cluster(cluster):
    submission = f"distml-test-{uuid.uuid4().hex[:8]}"
    options = ["--k", "2", "--epochs", "1", "--workers", "2", "--data-dir", "distml/sample", "--out", "job-run"]
    submit = _submit(cluster, submission, *options)
    # the job's driver joins the cluster it runs in: both nodes, no Ray of its own
    assert "RAY_ADDRESS=" in submit.stdout and "no RAY_ADDRESS" not in submit.stdout
    assert "on 2 node(s) with 2 CPU" in submit.stdout
    # `ray job submit` follows the job to its end, then reads its status from the job server
    assert f"Job '{submission}' succeeded" in submit.stdout, submit.stdout[-4000:]
    folds = _check_report(cluster.storage / "job-run", cluster)
    assert folds["node_id"].nunique() == 2  # one fold trainer per node: each has room for one
    # each group of folds checkpointed its epochs under --storage too
    assert list((cluster.storage / "job-run" / "ray" / "folds").glob("folds-*/state.pt"))


def test_ray_job_submit_runs_finetune_and_sweep_on_the_cluster_with_storage(cluster):
    """jobs/finetune.py and jobs/sweep.py on both nodes, their checkpoints and results under the nodes' --storage
    (DISTML_STORAGE), as cluster.yaml sets it."""
    small = ["--weights", "none", "--image-size", "32", "--data-dir", "distml/sample"]
    options = ["--epochs", "1", "--limit", "200", "--batch-size", "32", "--workers", "2", "--out", "job-finetune"]
    submit = _submit(cluster, f"distml-test-{uuid.uuid4().hex[:8]}", *options, *small, job="jobs/finetune.py")
    assert "succeeded" in submit.stdout, submit.stdout[-4000:]
    run = cluster.storage / "job-finetune"
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["ranks"] == [0, 1], results  # a DDP worker on each node
    assert checkpoints.registered_train_checkpoints(run / "ray" / FINETUNE_RUN)
    assert (run / "model" / "model.pt2").is_file()

    options = ["--trials", "2", "--epochs", "1", "--train-images", "300", "--workers", "2", "--out", "job-sweep"]
    submit = _submit(cluster, f"distml-test-{uuid.uuid4().hex[:8]}", *options, *small, job="jobs/sweep.py")
    assert "succeeded" in submit.stdout, submit.stdout[-4000:]
    run = cluster.storage / "job-sweep"
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "done").all(), trials
    assert len(list((run / "ray" / "tune").glob("*/checkpoint_*/state.pt"))) == 2  # each trial's, in --storage


@pytest.fixture(scope="module")
def driver_run(cluster):
    """`distml kfold --address` from a driver process of its own, outside any job."""
    return subprocess.run(
        [DISTML, "kfold", "--address", cluster.gcs, "--k", "2", "--epochs", "1", "--workers", "2"]
        + ["--data-dir", str(SAMPLE_DIR), "--storage", str(cluster.storage), "--out", "driver-run"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def test_distml_kfold_with_address_joins_the_cluster(driver_run, cluster):
    assert driver_run.returncode == 0, driver_run.stdout[-3000:] + driver_run.stderr[-3000:]
    _check_report(cluster.storage / "driver-run", cluster)
    assert "on 2 node(s) with 2 CPU" in driver_run.stderr
    assert f"report in {cluster.storage / 'driver-run'}" in driver_run.stdout


def test_folds_run_on_both_nodes(driver_run, cluster):
    folds = pd.read_csv(cluster.storage / "driver-run" / "folds.csv")
    # both nodes run on this machine and report the same IP address: the Ray node id tells them apart
    assert set(folds["node_id"]) == {cluster.head_id, cluster.node2_id}


def test_storage_not_seen_by_every_node_is_refused_before_any_work(cluster):
    if cluster.node_local is None:
        pytest.skip("unshare -m is not allowed here, so every folder is seen by both nodes")
    result = subprocess.run(
        [DISTML, "kfold", "--address", cluster.gcs, "--k", "2", "--epochs", "1"]
        + ["--data-dir", str(SAMPLE_DIR), "--storage", str(cluster.node_local)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not shared" in errors[0] and cluster.node2_id[:8] in errors[0], result.stderr
    assert "running folds" not in result.stderr
    assert list(cluster.node_local.iterdir()) == []  # no run folder, no marker left behind


def test_jobs_api_refuses_a_caller_without_the_token(cluster, tmp_path):
    env = {key: value for key, value in cluster.env.items() if not key.startswith("RAY_AUTH")}
    env.update(RAY_AUTH_MODE="disabled", HOME=str(tmp_path))  # as a shell without RAY_AUTH_MODE=token would
    result = subprocess.run(
        [RAY, "job", "list", "--address", cluster.dashboard], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "Unauthorized" in result.stdout + result.stderr


STOP_WAIT_S = 3  # Ray's default RAY_JOB_STOP_WAIT_TIME_S: `ray job stop` SIGKILLs a job still running after it


def _job(cluster: Cluster, submission: str) -> dict:
    """The job's details as the state API has them (status, driver_exit_code, ...)."""
    result = subprocess.run(
        [RAY, "list", "jobs", "--address", cluster.dashboard, "--format", "json", "--detail"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return next(job for job in json.loads(result.stdout) if job["submission_id"] == submission)


def _live_actors(cluster: Cluster, job_id: str) -> list[str]:
    """The class names of the job's actors that are alive."""
    result = subprocess.run(
        [RAY, "list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail"]
        + ["--filter", "state=ALIVE", "--filter", f"job_id={job_id}"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("No resource"):  # what it prints for an empty list
        return []
    return [actor["class_name"] for actor in json.loads(result.stdout)]


def _wait_for_job_line(cluster: Cluster, submission: str, text: str) -> None:
    """Follow the job with `ray job logs --follow` until a line holds `text`; fail if the job ends first."""
    follow = subprocess.Popen(
        [RAY, "job", "logs", "--address", cluster.dashboard, "--follow", submission],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watchdog = threading.Timer(RUN_TIMEOUT_S, follow.kill)
    watchdog.start()
    lines = []
    try:
        for line in follow.stdout:
            lines.append(line)
            if text in line:
                return
    finally:
        watchdog.cancel()
        follow.kill()
        follow.wait()
    raise AssertionError(f"never saw {text!r}:\n{''.join(lines[-40:])}")


def _head_log(cluster: Cluster, name: str) -> Path:
    """A file under the head's session logs: the job's driver and its supervisor run on the head."""
    (found,) = cluster.root.glob(f"head/session_latest/logs/{name}")
    return found


def test_ray_job_stop_prints_the_resume_line_within_its_grace_and_the_run_resumes(cluster):
    """`ray job stop` sends SIGTERM and SIGKILLs what is left 3 s later (Ray's default, which this cluster keeps):
    within that the trainers stop and the resume line is printed; a resubmitted `--resume` finishes every fold."""
    assert "RAY_JOB_STOP_WAIT_TIME_S" not in cluster.env  # the job supervisor uses the default
    name = f"stopped-{uuid.uuid4().hex[:8]}"
    run, submission = cluster.storage / name, f"distml-test-{name}"
    options = ["--k", "3", "--epochs", "60", "--workers", "1", "--folds-per-trial", "1", "--seed", "3"]
    _submit(cluster, submission, *options, "--data-dir", "distml/sample", "--out", name, wait=False)
    _wait_for_job_line(cluster, submission, "fold 0: finished")  # two folds of 60 epochs are still to come
    first = json.loads((run / "folds" / "fold_0.json").read_text())
    drivers = [  # `python jobs/kfold.py ...`, and the shell that may run it
        process
        for process in psutil.process_iter(["cmdline"])
        if "jobs/kfold.py" in " ".join(process.info["cmdline"] or []) and name in " ".join(process.info["cmdline"])
    ]
    assert drivers
    driver_log = _head_log(cluster, f"job-driver-{submission}.log")

    job_id = _job(cluster, submission)["job_id"]  # its driver's: the fold trainers are this job's actors
    assert "FoldTrainer" in _live_actors(cluster, job_id)
    stop = subprocess.Popen(  # waits for the job to end, then says how
        [RAY, "job", "stop", "--address", cluster.dashboard, submission],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    resume_line_at = None  # wall-clock times, to set against the job supervisor's log
    while stop.poll() is None:
        if resume_line_at is None and "interrupted: resume with" in driver_log.read_text():
            resume_line_at = time.time()
        time.sleep(0.02)
    stopped = stop.stdout.read()
    _, alive = psutil.wait_procs(drivers, timeout=5)

    assert stop.returncode == 0 and f"Job '{submission}' was stopped" in stopped, stopped
    assert _job(cluster, submission)["status"] == "STOPPED"
    assert not alive, f"left running: {[process.pid for process in alive]}"
    deadline = time.monotonic() + 30  # Ray ends the actors of a driver that is gone
    while trainers := _live_actors(cluster, job_id):
        assert time.monotonic() < deadline, f"still alive: {trainers}"
        time.sleep(0.5)
    # the driver printed it before it ended, and the supervisor SIGKILLs it 3 s after the SIGTERM at the latest
    logs = _ray_job(cluster, "logs", submission).stdout
    assert f"interrupted: resume with `distml kfold --resume {run}`" in logs, logs[-3000:]
    assert "Traceback" not in logs and resume_line_at is not None
    supervisor = _head_log(cluster, f"jobs/supervisor-{submission}.log").read_text().splitlines()
    (ended,) = [line for line in supervisor if "terminated gracefully" in line or "force-killed" in line]
    ended_at = datetime.strptime(ended[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    if "force-killed" in ended:  # logged as the grace ran out: the SIGTERM went STOP_WAIT_S before
        print(f"`ray job stop`: resume line {resume_line_at - ended_at + STOP_WAIT_S:.2f} s after the SIGTERM")
    else:
        print(f"`ray job stop`: resume line, then the driver's exit {ended_at - resume_line_at:.2f} s later")

    # the cluster options may change on resume: two trainers finish the two remaining folds side by side
    resumed = _submit(cluster, f"{submission}-resumed", "--resume", str(run), "--workers", "2")
    assert f"Job '{submission}-resumed' succeeded" in resumed.stdout, resumed.stdout[-4000:]
    folds = pd.read_csv(run / "folds.csv")
    assert folds["fold"].tolist() == [0, 1, 2] and (folds["epochs"] == 60).all()
    assert folds.loc[0, "val_accuracy"] == pytest.approx(first["val_accuracy"])  # kept, not trained again
    assert (folds["val_accuracy"] > 0.8).all()


# ---- last in this module: it leaves the cluster with a dead node ----

LOST_NODE_GRACE_S = 5  # --lost-node-grace: the default, 60 s, would make this test a minute longer
# from the kill to the driver's exit: Ray declares a killed node dead after about 15 s (5 failed health checks, 3 s
# apart), distml looks at the cluster every 2 s, then writes the report; the rest is slack for a loaded machine
LOST_NODE_BOUND_S = LOST_NODE_GRACE_S + 45


@pytest.fixture
def node3(cluster):
    """A third node, with 2 CPUs the only one with room for a trainer of 1.5 CPU; yields its processes' session."""
    sessions: set[int] = set()
    try:
        _start_node(
            _join_args(cluster.gcs, 2, "node3", cluster.root / "node3", cluster.spare_ports),
            cluster.env,
            cluster.root / "node3.log",
            sessions,
        )
        yield sessions
    finally:
        _kill_sessions(sessions)


def _wait_for(text: str, log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"never saw {text!r}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def test_losing_the_only_node_with_room_for_a_trainer_ends_the_run_in_bounded_time(cluster, node3):
    run, log = cluster.storage / "lost-node-run", cluster.root / "lost-node-driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [DISTML, "kfold", "--address", cluster.gcs, "--k", "2", "--epochs", "10", "--workers", "1"]
            + ["--folds-per-trial", "1"]
            + ["--cpus-per-worker", "1.5", "--lost-node-grace", str(LOST_NODE_GRACE_S)]
            + ["--data-dir", str(SAMPLE_DIR), "--storage", str(cluster.storage), "--out", run.name],
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for("fold 1: epoch 1/10", log, driver)  # fold 0 finished, fold 1 is training on node3
        killed = time.monotonic()
        _kill_sessions(node3)  # the node is lost: nothing of it shuts down cleanly
        code = driver.wait(timeout=LOST_NODE_BOUND_S + 60)
        ended_after = time.monotonic() - killed
    finally:
        driver.kill()
    output = log.read_text()
    print(f"the driver ended {ended_after:.1f} s after node3 was killed")  # shown with -s
    assert code == 1, output
    # the fold finished before the loss is kept, in the run folder and its report; it ran on node3, the only node
    # with room for its trainer
    folds = pd.read_csv(run / "folds.csv")
    assert folds["fold"].tolist() == [0], folds
    node3_id = folds.loc[0, "node_id"]
    assert node3_id not in (cluster.head_id, cluster.node2_id)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert f"the cluster lost 1 node(s) ({node3_id[:8]}: 2 CPU, 0 GPU)" in errors[0]
    assert "one trainer needs 1.5 CPU, but the largest of 2 node(s) has 1 CPU and 0 GPU" in errors[0]
    assert ended_after < LOST_NODE_BOUND_S, output
    assert json.loads((run / "folds" / "fold_0.json").read_text())["epochs"] == 10
    assert "1/2 folds" in output
