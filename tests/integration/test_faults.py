"""Faults done for real: a SIGKILLed fold trainer or fine-tune worker, a SIGKILLed kfold or finetune driver, Ctrl-C,
SIGTERM and SIGHUP, a closed pipe, two runs on one folder.

An epoch of the sample's folds takes 0.1-0.3 s, so each struck run has enough epochs left after the point it is
struck at (seconds, even on a loaded machine) that it cannot finish before the blow lands.

Each test drives `python -m distml.cli kfold` (or `finetune`) as its own process (with its own local Ray), reads
its progress lines as they come, and strikes at a known point.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pandas as pd
import psutil
import pytest
from typer.testing import CliRunner

from distml import checkpoints
from distml.cli import app
from distml.config import FinetuneConfig, SweepConfig, config_hash
from distml.rundir import FINETUNE_RUN

pytestmark = pytest.mark.integration
TIMEOUT_S = 240


class Driver:
    """A distml process whose output lines can be awaited."""

    def __init__(self, *args: str, command: str = "kfold"):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "distml.cli", command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: the driver gets
            # the default disposition back, so the Ctrl-C it is sent is a Ctrl-C wherever this suite runs
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"never saw {text!r}; output:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = TIMEOUT_S) -> int:
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)


def assert_all_ended(processes: list[psutil.Process], timeout: float = 30) -> None:
    """The Ray processes a driver started are gone (within `timeout` seconds from now)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    assert not alive, f"left running: {[p.name() for p in alive]}"


def stamp_of(checkpoint) -> dict:
    """The Stamp a checkpoint's archive holds."""
    with zipfile.ZipFile(checkpoint) as archive:
        (member,) = [name for name in archive.namelist() if name.endswith("/" + checkpoints.STAMP_FILE)]
        return json.loads(archive.read(member))


def run_stamp(out, config_type) -> dict:
    """The Stamp the run in `out` gives its checkpoints: its id and the digest of its saved options."""
    saved = json.loads((out / "config.json").read_text())
    return {"run_id": saved["run_id"], "config_hash": config_hash(config_type.from_dict(saved["options"]))}


def kfold_args(sample_dir, out, *extra: str) -> list[str]:
    """One trainer, one fold at a time (not the stacked default), so folds finish one by one."""
    one_by_one = ("--workers", "1", "--folds-per-trial", "1", "--seed", "3")
    return ["--data-dir", str(sample_dir), "--out", str(out), *one_by_one, *extra]


def test_a_killed_fold_trainer_is_retried_from_its_last_epoch(sample_dir, tmp_path):
    out = tmp_path / "run"
    driver = Driver(*kfold_args(sample_dir, out, "--k", "2", "--epochs", "20"))
    driver.wait_for("fold 0: epoch 2/20")
    trainers = [p for p in driver.descendants() if "FoldTrainer" in " ".join(p.cmdline())]
    assert trainers, "no fold trainer process found"
    os.kill(trainers[0].pid, signal.SIGKILL)
    assert driver.finish() == 0, driver.output
    assert "trainer failed (failure 1" in driver.output
    folds = pd.read_csv(out / "folds.csv")
    assert len(folds) == 2 and (folds["epochs"] == 20).all()
    retried = folds[folds["attempts"] == 2]
    assert len(retried) == 1, folds
    fold = int(retried["fold"].iloc[0])
    history = pd.read_csv(out / "history.csv")
    assert history[history["fold"] == fold]["epoch"].tolist() == list(range(1, 21))
    # it carried on from a checkpoint: after the failure no epoch 1 of that fold was trained again
    after = driver.output.split("trainer failed", 1)[1]
    assert f"fold {fold}: epoch 1/20" not in after
    assert (folds["val_accuracy"] > 0.8).all()


def test_a_killed_trainer_process_holding_two_worker_threads_is_replaced_for_both(sample_dir, tmp_path):
    """The default on one CPU node: two workers are two threads of one trainer process. Killing it fails both
    groups; each gets a trainer of its own and carries on from its last epoch checkpoint."""
    out = tmp_path / "run"
    args = ["--data-dir", str(sample_dir), "--out", str(out), "--workers", "2", "--k", "2", "--epochs", "20"]
    driver = Driver(*args)
    driver.wait_for("epoch 2/20")
    trainers = [p for p in driver.descendants() if "FoldTrainer" in " ".join(p.cmdline())]
    assert len(trainers) == 1, "the two workers should share one trainer process"
    os.kill(trainers[0].pid, signal.SIGKILL)
    assert driver.finish() == 0, driver.output
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1] and (folds["epochs"] == 20).all()
    assert (folds["attempts"] == 2).all(), folds  # one failure each, not a second one on the dead process
    history = pd.read_csv(out / "history.csv")
    for fold in (0, 1):
        assert history[history["fold"] == fold]["epoch"].tolist() == list(range(1, 21))
    after = driver.output.split("trainer failed", 1)[1]
    assert "epoch 1/20" not in after  # both carried on from a checkpoint
    assert (folds["val_accuracy"] > 0.8).all()


def test_a_killed_driver_resumes_only_the_unfinished_folds(sample_dir, tmp_path):
    out = tmp_path / "run"
    driver = Driver(*kfold_args(sample_dir, out, "--k", "3", "--epochs", "20"))
    driver.wait_for("fold 0: finished")
    os.kill(driver.process.pid, signal.SIGKILL)
    driver.finish()
    first = json.loads((out / "folds" / "fold_0.json").read_text())
    assert not (out / "folds.csv").exists()
    # a checkpoint write the kill cut short, as atomic.write_atomic leaves it beside the group's whole checkpoint
    group = out / "ray" / "folds" / "folds-0"
    (group / ".state.pt.cutshort.tmp").write_bytes((group / "state.pt").read_bytes()[:100])

    resumed = Driver("--resume", str(out))
    assert resumed.finish() == 0, resumed.output
    skipped = [line for line in resumed.lines if "skipped and removed" in line]
    assert len(skipped) == 1 and f"carrying on from {group / 'state.pt'}" in skipped[0], resumed.output
    assert not (group / ".state.pt.cutshort.tmp").exists()
    started = [line for line in resumed.lines if "running folds" in line]
    assert started and "0," not in started[0].split("running folds", 1)[1].split("of")[0]
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1, 2]
    assert folds.loc[0, "val_accuracy"] == pytest.approx(first["val_accuracy"])  # kept, not retrained
    assert json.loads((out / "config.json").read_text())["options"]["epochs"] == 20
    assert (folds["epochs"] == 20).all()


def test_ctrl_c_keeps_finished_folds_leaves_no_ray_behind_and_the_folder_is_refused_to_a_second_run(
    sample_dir, tmp_path
):
    out = tmp_path / "run"
    driver = Driver(*kfold_args(sample_dir, out, "--k", "3", "--epochs", "30"))
    driver.wait_for("running folds")
    # a second run on the same folder, while the first is writing to it, is refused before it starts a Ray (so
    # this process can try it)
    second = CliRunner().invoke(app, ["kfold", *kfold_args(sample_dir, out)])
    assert second.exit_code == 2
    assert "already holds a run" in second.stderr or "another distml run is writing" in second.stderr
    resume_now = CliRunner().invoke(app, ["kfold", "--resume", str(out)])
    assert resume_now.exit_code == 2 and "another distml run is writing" in resume_now.stderr

    driver.wait_for("fold 0: finished")
    ray_processes = driver.descendants()
    assert ray_processes
    driver.process.send_signal(signal.SIGINT)
    assert driver.finish() == 130, driver.output
    assert "interrupted: resume with" in driver.output
    folds = pd.read_csv(out / "folds.csv")
    assert 1 <= len(folds) < 3 and 0 in folds["fold"].tolist()
    assert_all_ended(ray_processes)

    resumed = Driver("--resume", str(out))
    assert resumed.finish() == 0, resumed.output
    assert pd.read_csv(out / "folds.csv")["fold"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does_and_it_resumes(sample_dir, tmp_path, stop, status):
    """`ray job stop` and Kubernetes send SIGTERM, a closed terminal SIGHUP: the trainers stop, the resume line is
    printed, finished folds are in the report, the status says which signal, and no Ray process is left."""
    out = tmp_path / "run"
    driver = Driver(*kfold_args(sample_dir, out, "--k", "3", "--epochs", "30"))
    driver.wait_for("fold 0: finished")
    ray_processes = driver.descendants()
    driver.process.send_signal(stop)
    assert driver.finish() == status, driver.output
    assert f"interrupted: resume with `distml kfold --resume {out}`" in driver.output
    assert "Traceback" not in driver.output
    folds = pd.read_csv(out / "folds.csv")
    assert 1 <= len(folds) < 3 and 0 in folds["fold"].tolist()
    assert_all_ended(ray_processes)
    if stop == signal.SIGTERM:  # one resume is enough to show the run carries on
        resumed = Driver("--resume", str(out))
        assert resumed.finish() == 0, resumed.output
        assert pd.read_csv(out / "folds.csv")["fold"].tolist() == [0, 1, 2]


def test_ctrl_c_before_any_fold_finishes_exits_130_with_the_resume_line(sample_dir, tmp_path):
    out = tmp_path / "run"
    driver = Driver(*kfold_args(sample_dir, out, "--k", "2", "--epochs", "30"))
    driver.wait_for("fold 0: epoch 2/30")
    ray_processes = driver.descendants()
    driver.process.send_signal(signal.SIGINT)
    assert driver.finish() == 130, driver.output
    assert f"interrupted: resume with `distml kfold --resume {out}`" in driver.output
    assert not (out / "folds.csv").exists() and (out / "config.json").is_file()
    assert_all_ended(ray_processes)
    resumed = Driver("--resume", str(out))
    assert resumed.finish() == 0, resumed.output
    assert pd.read_csv(out / "folds.csv")["fold"].tolist() == [0, 1]


def test_a_closed_pipe_never_stops_the_run(sample_dir, tmp_path):
    """`distml kfold 2>&1 | head -2`: the reader goes away after two lines; the run finishes and reports all."""
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "distml.cli", "kfold", *kfold_args(sample_dir, out, "--k", "2", "--epochs", "5")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for _ in range(2):
        assert process.stdout.readline()
    process.stdout.close()  # what `head` does once it has its lines
    assert process.wait(timeout=TIMEOUT_S) == 0
    folds = pd.read_csv(out / "folds.csv")
    assert folds["fold"].tolist() == [0, 1] and (folds["epochs"] == 5).all()
    assert (out / "report.md").is_file()


# ---- the fine-tune: one Ray Train TorchTrainer, checkpointed every epoch under RUN/ray/finetune ----


def finetune_args(sample_dir, out, *extra: str) -> list[str]:
    """A small fine-tune: 180 training images at 32 px from random weights, one DDP worker."""
    return [
        *("--data-dir", str(sample_dir), "--out", str(out), "--weights", "none", "--image-size", "32"),
        *("--limit", "200", "--batch-size", "32", "--workers", "1", *extra),
    ]


def last_checkpoint_history(out, timeout: float = 30) -> list[dict]:
    """The epochs recorded in the last checkpoint Ray Train registered for the fine-tune (what a resumed run carries
    on from), read through distml's own reader. Only registered checkpoints are read: a folder Ray is still copying
    is never registered. While the run is alive Ray may rewrite its snapshot, or delete the checkpoint just read
    from it, under the reader: such a read is tried again."""
    import torch

    deadline = time.monotonic() + timeout
    while True:
        try:
            registered = checkpoints.registered_train_checkpoints(out / "ray" / FINETUNE_RUN)
            if registered:
                state = torch.load(registered[-1] / checkpoints.STATE_FILE, weights_only=True, map_location="cpu")
                return state["history"]
            problem = "no checkpoint registered yet"
        except (ValueError, OSError, RuntimeError) as exc:  # raced a write: half a snapshot, a deleted checkpoint
            problem = f"{type(exc).__name__}: {exc}"
        assert time.monotonic() < deadline, f"no registered epoch checkpoint could be read ({problem})"
        time.sleep(0.2)


def plant_incomplete_checkpoint(experiment) -> None:
    """A checkpoint folder as a copy killed half-way leaves it: never registered, its state.pt cut short."""
    good = checkpoints.registered_train_checkpoints(experiment)[-1] / checkpoints.STATE_FILE
    planted = experiment / "checkpoint_2099-01-01_00-00-00.000000"
    planted.mkdir()
    (planted / checkpoints.STATE_FILE).write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def test_a_killed_finetune_driver_resumes_from_its_last_epoch_checkpoint(sample_dir, tmp_path):
    out = tmp_path / "run"
    driver = Driver(*finetune_args(sample_dir, out, "--epochs", "4"), command="finetune")
    driver.wait_for("1 DDP worker(s) on Ray Train")
    refused = CliRunner().invoke(app, ["finetune", "--resume", str(out)])  # while the run writes to the folder
    assert refused.exit_code == 2 and "another distml run is writing" in refused.stderr, refused.output
    driver.wait_for("resnet18-full: epoch 1/4")
    assert last_checkpoint_history(out)
    killed_ray = driver.descendants()
    os.kill(driver.process.pid, signal.SIGKILL)
    driver.finish()
    assert not (out / "results.json").exists()
    done_before = last_checkpoint_history(out)  # the last checkpoint written before the kill
    assert 1 <= len(done_before) < 4

    plant_incomplete_checkpoint(out / "ray" / FINETUNE_RUN)

    resumed = Driver("--resume", str(out), command="finetune")
    resumed.wait_for("1 DDP worker(s) on Ray Train")
    ray_processes = resumed.descendants()
    assert resumed.finish() == 0, resumed.output
    assert_all_ended(ray_processes)
    # the killed driver's local Ray went with it; its dashboard and runtime-env agents are the last to go: they
    # first try for 60 s to tell the dead GCS that their raylet died
    assert_all_ended(killed_ray, timeout=90)
    assert "with its saved options, from its last epoch checkpoint (checkpoint_" in resumed.output
    # the planted folder is skipped; so is any folder the kill itself cut short while Ray was copying it
    skipped = [line for line in resumed.lines if "skipped" in line]
    assert any("checkpoint_2099-01-01" in line for line in skipped), resumed.output
    assert all("never registered it); carrying on from checkpoint_" in line for line in skipped), skipped
    assert "epoch 1/4" not in resumed.output  # carried on from the checkpoint: epoch 1 was not trained again
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    for before in done_before:  # the epochs trained before the kill keep their numbers
        row = history[history["epoch"] == before["epoch"]].iloc[0]
        assert row["train_loss"] == pytest.approx(before["train_loss"])
        assert row["val_accuracy"] == pytest.approx(before["val_accuracy"])
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 4 and results["attempts"] == 1
    assert json.loads((out / "test_metrics.json").read_text())["test_images"] == 1000
    assert (out / "model" / "model.pt2").stat().st_size > 1000

    files = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    finished = CliRunner().invoke(app, ["finetune", "--resume", str(out)])
    assert finished.exit_code == 0, finished.output
    assert "already finished; nothing to do" in finished.stderr
    assert f"test accuracy {results['accuracy']:.4f}" in finished.stdout
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files


def test_a_killed_finetune_worker_is_restarted_from_its_last_epoch_checkpoint(sample_dir, tmp_path):
    out = tmp_path / "run"
    driver = Driver(*finetune_args(sample_dir, out, "--epochs", "3", "--max-failures", "1"), command="finetune")
    driver.wait_for("resnet18-full: epoch 1/3")
    workers = [p for p in driver.descendants() if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 1, [" ".join(p.cmdline()) for p in driver.descendants()]
    os.kill(workers[0].pid, signal.SIGKILL)
    assert driver.finish() == 0, driver.output
    assert "fine-tune workers failed (failure 1, --max-failures 1)" in driver.output
    after = driver.output.split("fine-tune workers failed", 1)[1]
    assert "epoch 1/3" not in after  # the new worker carried on from the checkpoint
    assert "epoch 3/3" in after
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    results = json.loads((out / "results.json").read_text())
    assert results["attempts"] == 2 and results["epochs"] == 3
    assert (out / "model" / "model.pt2").is_file()


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_ends_a_finetune_inside_ray_trains_fit_and_it_resumes(sample_dir, tmp_path, stop, status):
    """SIGTERM (`ray job stop`, Kubernetes) or Ctrl-C while the driver waits in Ray Train's fit() (which replaces
    SIGINT's handler when called from the main thread): the resume line at once, Ray shut down, 143 or 130; the
    resumed run carries on from the last epoch checkpoint."""
    out = tmp_path / "run"
    driver = Driver(*finetune_args(sample_dir, out, "--epochs", "5"), command="finetune")
    driver.wait_for("resnet18-full: epoch 1/5")
    ray_processes = driver.descendants()
    stopped = time.monotonic()
    driver.process.send_signal(stop)
    resume_line = driver.wait_for("interrupted: resume with")
    resume_line_after = time.monotonic() - stopped
    assert driver.finish() == status, driver.output
    print(f"after {stop.name}: resume line in {resume_line_after:.2f} s, exit in {time.monotonic() - stopped:.2f} s")
    assert f"interrupted: resume with `distml finetune --resume {out}`" in resume_line
    assert "Traceback" not in driver.output
    assert not (out / "results.json").exists()
    assert_all_ended(ray_processes)
    done_before = last_checkpoint_history(out)
    assert 1 <= len(done_before) < 5
    latest = checkpoints.registered_train_checkpoints(out / "ray" / FINETUNE_RUN)[-1] / checkpoints.STATE_FILE
    assert stamp_of(latest) == run_stamp(
        out, FinetuneConfig
    )  # Ray Train's checkpoints record the run, as distml's own do
    if stop == signal.SIGINT:  # one resume is enough to show the run carries on
        return

    resumed = Driver("--resume", str(out), command="finetune")
    assert resumed.finish() == 0, resumed.output
    assert "epoch 1/5" not in resumed.output  # carried on from the checkpoint
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert json.loads((out / "results.json").read_text())["epochs"] == 5


def test_sigterm_ends_a_sweep_through_tunes_graceful_stop_and_it_resumes(sample_dir, tmp_path):
    """SIGTERM while Ray Tune runs the trials: Tune ends them as on Ctrl-C, saving its state; the resume line, Ray
    shut down, exit 143; the resumed sweep finishes every trial."""
    out = tmp_path / "sweep"
    options = ["--trials", "2", "--epochs", "6", "--grace-period", "6", "--workers", "1", "--seed", "0"]
    data = ["--weights", "none", "--image-size", "32", "--train-images", "1000", "--data-dir", str(sample_dir)]
    driver = Driver(*options, *data, "--out", str(out), command="sweep")
    driver.wait_for(": epoch 2/6")
    ray_processes = driver.descendants()
    driver.process.send_signal(signal.SIGTERM)
    resume_line = driver.wait_for("interrupted: resume with")
    assert driver.finish() == 143, driver.output
    assert f"interrupted: resume with `distml sweep --resume {out}`" in resume_line
    assert "Traceback" not in driver.output
    assert not (out / "trials.csv").exists()
    assert_all_ended(ray_processes)
    saved = list((out / "ray" / "tune").glob("*/checkpoint_*/" + checkpoints.STATE_FILE))
    assert saved and all(
        stamp_of(path) == run_stamp(out, SweepConfig) for path in saved
    )  # as every checkpoint distml writes

    resumed = Driver("--resume", str(out), command="sweep")
    assert resumed.finish() == 0, resumed.output
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "done").all() and (trials["epochs"] == 6).all(), trials
