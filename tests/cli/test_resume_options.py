"""--resume takes the run's saved options: only where it runs (the cluster options), -q and --track may be given, the
address is never the saved one, and any other option is refused in one line before anything loads or Ray starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from distml import api
from distml.atomic import write_json
from distml.cli import app
from distml.config import ClusterConfig, FinetuneConfig, KFoldConfig, SweepConfig
from distml.errors import DistmlError

runner = CliRunner()
SAVED_CLUSTER = ClusterConfig(
    address="10.0.0.1:6379", workers=2, cpus_per_worker=2.0, gpus_per_worker=0.0, max_failures=1, lost_node_grace_s=30.0
)
ALLOWED = "allowed: --address, --workers, --cpus-per-worker, --gpus-per-worker, --max-failures, "
CONFIGS = {"kfold": KFoldConfig, "finetune": FinetuneConfig, "sweep": SweepConfig}


def _saved_run(folder, command: str):
    """A run folder as a first run on another cluster (a job on a head that is gone) left it."""
    config = CONFIGS[command](cluster=SAVED_CLUSTER, out=folder, seed=7)
    write_json(folder / "config.json", {"command": command, "options": config.to_dict(), "dataset": {}})
    return folder


@pytest.fixture
def received(monkeypatch) -> list:
    """The options a resumed run goes on with: its config's validate() records them and ends the run in one line."""
    configs = []

    def record(config) -> None:
        configs.append(config)
        raise DistmlError("stopped by the test")

    for config_type in CONFIGS.values():
        monkeypatch.setattr(config_type, "validate", record)
    return configs


def _refused(command: str, run, args: list[str], options: str, allowed: str = "--track, --quiet") -> None:
    """Refused in one line, exit status 2, before the folder is even opened (no lock, nothing loaded)."""
    result = runner.invoke(app, [*command.split(), "--resume", str(run), *args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: --resume: {options} cannot be changed when resuming: the run keeps its saved options; "
        + ALLOWED
        + allowed
    )
    assert [path.name for path in run.iterdir()] == ["config.json"]


def _resumed(result, received: list):
    assert result.exit_code == 2 and result.stderr.strip() == "error: stopped by the test", result.output
    (config,) = received
    return config


@pytest.mark.parametrize(
    "args, options",
    [
        (["--k", "7"], "--k"),
        (["--k", "5"], "--k"),  # the default's value, given: refused all the same
        (["--epochs", "2"], "--epochs"),
        (["--epochs", "2", "--lr", "0.1"], "--epochs, --lr"),
        (["--workers-per-fold", "2"], "--workers-per-fold"),  # how the folds train and checkpoint: the run's own
        (["--data-dir", "elsewhere"], "--data-dir"),
        (["--storage", "s3://bucket/runs"], "--storage"),
    ],
)
def test_kfold_resume_refuses_every_option_that_is_the_runs_own(tmp_path, args, options):
    run = _saved_run(tmp_path, "kfold")
    _refused("kfold", run, args, options, "--lost-node-grace, --track, --quiet")


def test_kfold_resume_takes_the_calls_cluster_options_and_never_the_saved_address(tmp_path, received):
    run = _saved_run(tmp_path, "kfold")
    config = _resumed(runner.invoke(app, ["kfold", "--resume", str(run), "--workers", "3", "-q"]), received)
    assert config.cluster == ClusterConfig(
        address=None, workers=3, cpus_per_worker=2.0, gpus_per_worker=0.0, max_failures=1, lost_node_grace_s=30.0
    )
    assert config.seed == 7 and config.out == run  # the rest as saved


def test_kfold_resume_joins_the_cluster_of_this_call(tmp_path, received, monkeypatch):
    run = _saved_run(tmp_path, "kfold")
    args = ["kfold", "--resume", str(run), "--address", "10.0.0.2:6379", "--track", "tensorboard"]
    args += ["--cpus-per-worker", "4", "--gpus-per-worker", "1", "--max-failures", "0", "--lost-node-grace", "5"]
    config = _resumed(runner.invoke(app, args), received)
    assert config.cluster == ClusterConfig("10.0.0.2:6379", 2, 4.0, 1.0, 1, 0, 5.0)

    received.clear()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.3:6379")  # as `ray job submit` sets it inside a job
    monkeypatch.setenv("DISTML_LOST_NODE_GRACE_S", "90")
    config = _resumed(runner.invoke(app, ["kfold", "--resume", str(run)]), received)
    assert config.cluster.address == "10.0.0.3:6379" and config.cluster.lost_node_grace_s == 90.0


def test_an_environment_variable_of_an_option_that_is_the_runs_own_leaves_the_saved_value(
    tmp_path, received, monkeypatch
):
    """cluster.yaml sets DISTML_STORAGE on every node: a job resuming a run there is not refused for it."""
    run = _saved_run(tmp_path, "kfold")
    monkeypatch.setenv("DISTML_STORAGE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("DISTML_DATA_DIR", str(tmp_path / "data"))
    config = _resumed(runner.invoke(app, ["kfold", "--resume", str(run)]), received)
    assert config.storage is None and config.data_dir is None


def test_finetune_resume_refuses_the_runs_own_options_and_takes_the_cluster_ones(tmp_path, received):
    finetune, sweep = _saved_run(tmp_path / "f", "finetune"), _saved_run(tmp_path / "s", "sweep")
    _refused("finetune", finetune, ["--epochs", "2"], "--epochs", "--track, --quiet, --sweep")
    _refused("finetune --sweep", sweep, ["--trials", "4"], "--trials", "--track, --quiet, --sweep")

    config = _resumed(runner.invoke(app, ["finetune", "--resume", str(finetune), "--workers", "4"]), received)
    assert isinstance(config, FinetuneConfig)
    assert config.cluster == ClusterConfig(None, 4, 2.0, 0.0, 1, 1, 30.0)

    received.clear()
    config = _resumed(runner.invoke(app, ["finetune", "--sweep", "--resume", str(sweep), "--workers", "4"]), received)
    assert isinstance(config, SweepConfig) and config.cluster.workers == 4 and config.cluster.address is None


def test_sweep_resume_refuses_the_runs_own_options_and_takes_the_cluster_ones(tmp_path, received):
    run = _saved_run(tmp_path, "sweep")
    _refused("sweep", run, ["--lr-min", "0.01", "--uncached"], "--lr-min, --uncached")  # a hidden option too
    _refused("sweep", run, ["--no-freeze-backbone"], "--freeze-backbone")

    config = _resumed(runner.invoke(app, ["sweep", "--resume", str(run), "--max-failures", "5", "-q"]), received)
    assert config.cluster == ClusterConfig(None, 2, 2.0, 0.0, 1, 5, 30.0)
    assert config.seed == 7


def test_the_python_apis_resume_takes_the_given_cluster_or_none_of_the_saved_address(tmp_path, received):
    run = _saved_run(tmp_path, "kfold")
    with pytest.raises(DistmlError, match="stopped by the test"):
        api.cross_validate("mlp", "mnist", resume=run)
    assert received[-1].cluster == ClusterConfig(None, 2, 2.0, 0.0, 1, 1, 30.0)
    given = ClusterConfig(address="10.0.0.2:6379", workers=6, workers_per_fold=3)
    with pytest.raises(DistmlError, match="stopped by the test"):
        api.cross_validate("mlp", "mnist", resume=run, cluster=given)
    assert received[-1].cluster == ClusterConfig("10.0.0.2:6379", 6, 1.0, None, 1, 2, 60.0)  # its folds' shape kept


def test_cluster_overrides_replace_only_the_given_options_and_never_keep_the_address():
    assert SAVED_CLUSTER.with_overrides() == ClusterConfig(None, 2, 2.0, 0.0, 1, 1, 30.0)
    assert SAVED_CLUSTER.with_overrides(workers=8, address="auto") == ClusterConfig("auto", 8, 2.0, 0.0, 1, 1, 30.0)
    assert SAVED_CLUSTER.with_overrides(gpus_per_worker=None).gpus_per_worker is None
    with pytest.raises(DistmlError, match="--resume: workers_per_fold cannot be changed when resuming"):
        SAVED_CLUSTER.with_overrides(workers_per_fold=2)
