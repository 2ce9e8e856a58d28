"""distml pipeline through Typer's CliRunner, its stages replaced by stubs that record their calls and leave the files
a finished stage leaves: every stage's options are checked before stage 1 (the cluster's room once Ray is up), --limit
reaches every stage, and --resume skips the finished stages and resumes the unfinished one."""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import pandas as pd
import pytest
from typer.testing import CliRunner

from distml import pipeline
from distml.cli import app
from distml.finetune import run_finetune
from distml.holdout import run_train
from distml.kfold import run_kfold
from distml.rundir import CONFIG_FILE, FOLDS_FILE, RESULTS_FILE

runner = CliRunner()
ALLOWED = "allowed: --address, --workers, --cpus-per-worker, --gpus-per-worker, --max-failures, --quiet"


class Stages:
    """Stand-ins for the three stages and for Ray: each call is recorded as (name, config, resume, overrides)."""

    def __init__(self, nodes: list[dict]):
        self.calls: list[tuple] = []
        self.nodes = nodes
        self.interrupt: set[str] = set()  # stages that stop as Ctrl-C would, after writing their config.json

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]

    def _stage(self, name: str, config, resume=None, overrides=None, marker: str = RESULTS_FILE, rows: int = 1):
        self.calls.append((name, config, resume, overrides))
        config.out.mkdir(parents=True, exist_ok=True)
        (config.out / CONFIG_FILE).write_text(json.dumps({"command": name, "options": config.to_dict()}))
        if name in self.interrupt:
            raise KeyboardInterrupt
        (config.out / marker).write_text("fold,val_accuracy\n" + "0,0.9\n" * rows)

    def run_train(self, config, **options):
        inspect.signature(run_train).bind(config, **options)  # called as the real one can be
        self._stage("train", config)

    def run_kfold(self, config, **options):
        inspect.signature(run_kfold).bind(config, **options)
        self._stage("kfold", config, options.get("resume"), options.get("cluster_overrides"), FOLDS_FILE, config.k)
        return SimpleNamespace(complete=True, failures=[])

    def run_finetune(self, config, **options):
        inspect.signature(run_finetune).bind(config, **options)
        self._stage("finetune", config, options.get("resume"), options.get("cluster_overrides"))

    def connect(self, address=None, quiet=True):
        self.calls.append(("ray", address, None, None))
        return True

    def shutdown(self):
        self.calls.append(("ray shutdown", None, None, None))


@pytest.fixture
def stages(monkeypatch) -> Stages:
    stub = Stages(nodes=[{"CPU": 8.0}])
    for name in ("run_train", "run_kfold", "run_finetune"):
        monkeypatch.setattr(pipeline, name, getattr(stub, name))
    monkeypatch.setattr(pipeline.cluster, "connect", stub.connect)
    monkeypatch.setattr(pipeline.cluster, "shutdown", stub.shutdown)
    monkeypatch.setattr(pipeline.cluster, "cluster_nodes", lambda: stub.nodes)
    table = lambda dirs: pd.DataFrame({"model": [d.name for d in dirs], "run_dir": [str(d) for d in dirs]})  # noqa: E731
    monkeypatch.setattr(pipeline, "compare", table)
    monkeypatch.setattr(pipeline, "write_comparison", lambda comparison, out: None)
    monkeypatch.setattr(pipeline, "report_markdown", lambda *args: "# distml pipeline report\n")
    monkeypatch.setattr(pipeline.run_report, "build", lambda run_dir: None)
    monkeypatch.setattr(pipeline.plots, "sample_grid", lambda images, labels, path: path.write_bytes(b"png"))
    return stub


def _pipeline(sample_dir, out, *args: str):
    return runner.invoke(
        app, ["pipeline", "--data-dir", str(sample_dir), "--weights", "none", "--out", str(out), *args]
    )


def _one_line_error(result, start: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), result.stderr


@pytest.mark.parametrize(
    "args, error",
    [
        (["--k", "1"], "--k: must be at least 2, got 1"),
        (["--epochs", "0"], "--epochs: must be at least 1"),
        (["--finetune-epochs", "0"], "--finetune-epochs: must be at least 1"),
        (["--image-size", "16"], "--image-size: must be between 32 and 512"),
        (["--workers", "0"], "--workers: must be at least 1"),
        (["--batch-size", "2", "--workers", "3"], "--batch-size: 2 is smaller than --workers 3"),
        (["--seed", "-1"], "--seed: must be between 0"),
        (["--limit", "0"], "--limit: must be at least 1"),
        (["--limit", "10"], "--limit: must be at least 20 (two examples per class)"),
        # the K-fold stage's folds in the subset: about 4 images of a class for 5 folds
        (["--limit", "40", "--k", "5"], "--limit: 5 folds but the smallest class has only"),
        (["--limit", "60", "--k", "3"], "--batch-size: 64 is more than the smallest fold's"),
        # the holdout stages' validation share of 60 images has fewer images than there are classes
        (["--limit", "60", "--k", "3", "--batch-size", "8"], "--limit: cannot hold out 0.1 of 60 images"),
    ],
)
def test_every_stages_bad_option_is_refused_before_stage_1(stages, sample_dir, tmp_path, args, error):
    result = _pipeline(sample_dir, tmp_path / "run", *args)
    _one_line_error(result, error)
    assert stages.calls == []  # no stage ran, and Ray did not start
    assert not (tmp_path / "run").exists()


def test_a_bad_weights_file_is_refused_before_stage_1(stages, sample_dir, tmp_path):
    (tmp_path / "notes.pt").write_text("not a state dict")
    for weights, error in (("missing.pt", "is not a file"), ("notes.pt", "is not a PyTorch weights file")):
        result = _pipeline(sample_dir, tmp_path / "run", "--weights", str(tmp_path / weights))
        _one_line_error(result, f"--weights: {tmp_path / weights} {error}")
    assert stages.calls == []


@pytest.mark.parametrize(
    "args, error",
    [
        (["--cpus-per-worker", "16"], "--cpus-per-worker: one trainer needs 16 CPU, but the largest of 1 node(s)"),
        (["--workers", "9"], "--workers: 9 workers at 1 CPU each do not fit the cluster (8 CPU, 0 GPU)"),
    ],
)
def test_the_clusters_room_is_checked_once_ray_is_up_before_stage_1_trains(stages, sample_dir, tmp_path, args, error):
    result = _pipeline(sample_dir, tmp_path / "run", *args)
    _one_line_error(result, error)
    assert stages.names() == ["ray", "ray shutdown"]  # the local Ray it started is stopped again
    assert not (tmp_path / "run").exists()


def test_limit_reaches_every_stage_and_the_pipeline_runs_them_in_order(stages, sample_dir, tmp_path):
    result = _pipeline(sample_dir, tmp_path / "run", "--limit", "400", "--k", "2", "--batch-size", "32")
    assert result.exit_code == 0, result.output
    assert stages.names() == ["ray", "train", "kfold", "finetune", "ray shutdown"]
    configs = {name: config for name, config, _, _ in stages.calls if name in ("train", "kfold", "finetune")}
    assert configs["train"].limit == configs["kfold"].limit == configs["finetune"].limit == 400
    assert configs["kfold"].k == 2 and configs["kfold"].seed == configs["train"].seed == 0
    assert [call[2] for call in stages.calls if call[0] in ("kfold", "finetune")] == [None, None]  # new runs
    saved = json.loads((tmp_path / "run" / CONFIG_FILE).read_text())
    assert saved["command"] == "pipeline" and saved["options"]["limit"] == 400
    assert "pipeline done" in result.stdout


def test_resume_skips_finished_stages_and_resumes_the_unfinished_one(stages, sample_dir, tmp_path):
    run = tmp_path / "run"
    stages.interrupt = {"kfold"}
    first = _pipeline(sample_dir, run, "--limit", "400", "--k", "2", "--batch-size", "32", "--workers", "2")
    assert first.exit_code == 130, first.output
    assert first.stderr.strip().splitlines()[-1] == f"interrupted: resume with `distml pipeline --resume {run}`"
    assert stages.names() == ["ray", "train", "kfold", "ray shutdown"]

    stages.calls.clear()
    stages.interrupt = set()
    result = runner.invoke(app, ["pipeline", "--resume", str(run), "--workers", "3"])
    assert result.exit_code == 0, result.output
    assert stages.names() == ["ray", "kfold", "finetune", "ray shutdown"]  # the holdout training finished
    (_, kfold, kfold_resume, overrides), (_, finetune, finetune_resume, _) = stages.calls[1:3]
    assert kfold_resume == run / "kfold-mlp" and overrides == {"address": None, "workers": 3}
    assert finetune_resume is None and finetune.cluster.workers == 3  # never started: a new run, on the new cluster
    assert finetune.limit == kfold.limit == 400  # the saved options
    assert "stage 1/4: holdout training of the MLP: finished before, skipped" in result.stderr

    stages.calls.clear()
    again = runner.invoke(app, ["pipeline", "--resume", str(run)])
    assert again.exit_code == 0, again.output
    assert stages.calls == []  # every stage finished: no stage, no Ray; the comparison and report are written again


def test_resume_runs_an_unfinished_holdout_training_again_in_its_cleared_folder(stages, sample_dir, tmp_path):
    run = tmp_path / "run"
    stages.interrupt = {"train"}
    assert _pipeline(sample_dir, run, "--k", "2").exit_code == 130
    (run / "train-mlp" / "history.csv").write_text("epoch\n1\n")  # what the interrupted training left

    stages.calls.clear()
    stages.interrupt = set()
    result = runner.invoke(app, ["pipeline", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert stages.names() == ["ray", "train", "kfold", "finetune", "ray shutdown"]
    assert sorted(path.name for path in (run / "train-mlp").iterdir()) == [CONFIG_FILE, RESULTS_FILE]


@pytest.mark.parametrize(
    "args, options", [(["--k", "3"], "--k"), (["--limit", "500", "--epochs", "2"], "--epochs, --limit")]
)
def test_resume_refuses_every_option_that_is_the_runs_own(stages, tmp_path, args, options):
    result = runner.invoke(app, ["pipeline", "--resume", str(tmp_path), *args])
    _one_line_error(result, f"--resume: {options} cannot be changed when resuming: the run keeps its saved options")
    assert result.stderr.strip().endswith(ALLOWED)
    assert stages.calls == []


def test_resume_refuses_a_folder_of_another_command(stages, tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"command": "kfold", "options": {}}))
    result = runner.invoke(app, ["pipeline", "--resume", str(tmp_path)])
    _one_line_error(result, f"--resume: {tmp_path} holds a kfold run, not a pipeline run")
    assert stages.calls == []
