"""MLflow tracking against a real `mlflow server` on loopback, started by this test: a run's events go over HTTP (its
report files through the server's artifact proxy) and are read back with MlflowClient. No Ray: the events are
synthetic, as the driver would publish them."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distml.progress import EpochEnded, RunEnded, RunStarted, UnitEnded, publish
from distml.tracking import tracked

pytestmark = pytest.mark.integration

OPTIONS = {"model": "mlp", "k": 2, "epochs": 2, "cluster": {"workers": 2}}
DATASET = {"source": "sample", "examples": 600}
SUMMARY = [
    {
        "metric": "val_accuracy",
        "mean": 0.875,
        "std": 0.025,
        "ci95_low": 0.65,
        "ci95_high": 1.0,
        "corrected_ci95_low": 0.6,
        "corrected_ci95_high": 1.0,
    }
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """A real MLflow tracking server with a SQLite store and proxied artifacts, in a process group of its own (the
    server's workers included), which is all this fixture stops."""
    port = free_port()
    server_log = tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "artifacts"),
    ]
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # GenAI jobs: seconds of start-up
    with open(server_log, "wb") as output:
        server = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        # never through a proxy: urlopen's own opener keeps the proxies of its first call in this process, and a
        # test may have set some then
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 180  # a loaded 2-core CI machine: MLflow's imports alone take tens of seconds
        while True:
            assert server.poll() is None, f"mlflow server exited:\n{server_log.read_text()}"
            assert time.monotonic() < deadline, f"mlflow server not up in 180 s:\n{server_log.read_text()}"
            try:
                # a generous timeout: the first request loads the server's routes, and a retried one would queue
                with direct.open(f"{url}/health", timeout=30) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a broken server fails the test, not hangs it
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        yield MlflowClient(url)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group start_new_session made: the server and its workers
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def record(index: int, epoch: int) -> dict:
    return {
        "train_loss": 0.8 / epoch + index,
        "train_accuracy": 0.6 + 0.1 * epoch,
        "val_loss": 0.9 / epoch + index,
        "val_accuracy": 0.55 + 0.1 * epoch + 0.05 * index,
        "seconds": 1.5,
    }


def test_a_run_is_recorded_on_a_real_mlflow_server(mlflow_server, tmp_path, capfd):
    client = mlflow_server
    run_dir = tmp_path / "kfold-1"
    run_dir.mkdir()
    header = {"options": OPTIONS, "dataset": DATASET, "fold_assignment_hash": "9f8e7d"}
    (run_dir / "config.json").write_text(json.dumps(header))
    (run_dir / "summary.csv").write_text("metric,mean\nval_accuracy,0.875\n")
    log = logging.getLogger("distml.kfold")
    with tracked("mlflow"):
        publish(log, "running", RunStarted("kfold", str(run_dir), ["fold 0", "fold 1"], 2, 2, OPTIONS, DATASET, False))
        for index in range(2):
            for epoch in (1, 2):
                publish(log, "epoch", EpochEnded(f"fold {index}", index, epoch, 2, record(index, epoch)))
            result = {"fold": index, "epochs": 2, "val_accuracy": record(index, 2)["val_accuracy"], "attempts": 1}
            publish(log, "done", UnitEnded(f"fold {index}", index, {**result, "node": "127.0.0.1", "device": "cpu"}))
        files = [str(run_dir / "summary.csv")]
        publish(log, "finished", RunEnded("kfold", str(run_dir), "finished", SUMMARY, files))

    assert "View run" not in capfd.readouterr().out  # MLflow's links would cut through a live display
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ
    experiment = client.get_experiment_by_name("distml")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parents) == 1 and sorted(children) == ["fold 0", "fold 1"]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "kfold-1"
    assert parent.data.params["cluster.workers"] == "2" and parent.data.params["fold_assignment_hash"] == "9f8e7d"
    assert parent.data.metrics["val_accuracy_mean"] == 0.875
    assert parent.data.metrics["val_accuracy_corrected_ci95_low"] == 0.6
    downloaded = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path / "downloaded"))
    assert Path(downloaded).read_text() == "metric,mean\nval_accuracy,0.875\n"
    for index in range(2):
        child = children[f"fold {index}"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED" and child.data.tags["device"] == "cpu"
        val_accuracy = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_accuracy"))
        assert val_accuracy == [(1, record(index, 1)["val_accuracy"]), (2, record(index, 2)["val_accuracy"])]
        assert child.data.metrics["attempts"] == 1
