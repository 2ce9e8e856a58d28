"""jobs/: the `ray job submit` entry points are `distml COMMAND` with the same options."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kfold_job_takes_distml_kfolds_options():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "jobs/kfold.py", "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for option in ("--k", "--workers", "--storage", "--address", "--gpus-per-worker", "--workers-per-fold"):
        assert option in result.stdout
    assert "no RAY_ADDRESS" in result.stderr  # the job log's first line says where the driver runs


def test_every_workload_has_a_job_and_the_runtime_env_leaves_out_local_clutter():
    import yaml

    assert sorted(path.name for path in (REPO / "jobs").glob("*.py")) == [
        "finetune.py",
        "kfold.py",
        "pipeline.py",
        "sweep.py",
    ]
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert {".venv", "results", ".git"} <= set(runtime_env["excludes"])
    assert "pip" not in runtime_env and "working_dir" not in runtime_env  # nodes have the dependencies already
