"""Waits that end: a fold trainer that hangs is killed after --stall-timeout and retried like a failed one, a lone
task no node has room for ends its wait after --lost-node-grace, and Ray Train's retries are all bounded by
--max-failures. The runs share the session's local Ray (2 CPUs) and the MNIST sample shipped with distml."""

from __future__ import annotations

import textwrap
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from distml.cli import app
from distml.config import ClusterConfig
from distml.distributed.fold_actors import stall_reason, stalled
from distml.errors import DistmlError

# A model whose training hangs while a flag file exists (the driver's check of 4 examples passes); with `once`, the
# first trainer to see the flag removes it and hangs, and every later one trains.
HANGING_MODEL = """
import os
import time

from torch import nn

FLAG = {flag!r}
ONCE = {once!r}


class Hangs(nn.Module):
    def __init__(self, features, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))

    def forward(self, x):
        if x.shape[0] > 4 and os.path.exists(FLAG):
            try:
                if ONCE:
                    os.remove(FLAG)
                time.sleep(3600)
            except FileNotFoundError:  # another trainer took the one hang
                pass
        return self.net(x)


def build(num_classes, input_shape):
    features = 1
    for side in input_shape:
        features *= side
    return Hangs(features, num_classes)
"""


def hanging_model(folder, once: bool) -> str:
    flag = folder / "hang"
    flag.touch()
    path = folder / "hangs.py"
    path.write_text(textwrap.dedent(HANGING_MODEL.format(flag=str(flag), once=once)))
    return f"{path}:build"


def kfold(model: str, sample_dir, out, *options: str):
    args = ["kfold", "--model", model, "--data-dir", str(sample_dir), "--k", "2", "--epochs", "1", "--out", str(out)]
    return CliRunner().invoke(app, [*args, *options])


# ---- the plain parts ----


def test_stalled_are_the_streams_silent_for_longer_than_the_timeout():
    heard = {"a": 100.0, "b": 104.0, "c": 96.5}
    assert stalled(heard, now=105.0, timeout_s=5.0) == ["c"]
    assert stalled(heard, now=108.0, timeout_s=5.0) == ["a", "c"]
    assert stalled(heard, now=1e9, timeout_s=None) == []  # no --stall-timeout: never
    assert stall_reason(121.4, 120.0) == "no epoch reported for 121 s (--stall-timeout 120)"


@pytest.mark.parametrize("seconds", [0.0, -3.0, float("inf"), float("nan")])
def test_a_stall_timeout_is_positive_and_finite(seconds):
    with pytest.raises(DistmlError, match="--stall-timeout: must be positive"):
        ClusterConfig(stall_timeout_s=seconds).validate()


def test_a_stall_timeout_is_refused_for_ddp_folds():
    ClusterConfig(stall_timeout_s=30.0).validate()
    with pytest.raises(DistmlError, match="--stall-timeout: watches trainers of one worker per fold"):
        ClusterConfig(stall_timeout_s=30.0, workers_per_fold=2).validate()


def test_every_retry_of_a_worker_group_is_bounded_by_max_failures():
    from distml.distributed.ddp import _failure_config

    bounds = _failure_config(3)
    assert (bounds.max_failures, bounds.controller_failure_limit, bounds.max_preemption_failures) == (3, 3, 3)


# ---- on Ray ----


@pytest.mark.integration
def test_a_hung_trainer_past_its_retries_fails_the_run_within_a_bound(local_ray, sample_dir, tmp_path):
    model = hanging_model(tmp_path, once=False)
    started = time.monotonic()
    result = kfold(model, sample_dir, tmp_path / "run", "--stall-timeout", "3", "--max-failures", "0")
    elapsed = time.monotonic() - started
    assert result.exit_code == 1, result.output
    assert elapsed < 40, f"{elapsed:.0f} s"
    assert "no epoch reported for" in result.output and "(--stall-timeout 3)" in result.output
    assert "failed for good after 1 failure(s)" in result.output


@pytest.mark.integration
def test_a_hung_trainer_is_killed_and_its_folds_finish_on_a_new_one(local_ray, sample_dir, tmp_path):
    model = hanging_model(tmp_path, once=True)
    out = tmp_path / "run"
    # a trainer's start does not count: this is long enough for a healthy first epoch on a busy machine
    result = kfold(model, sample_dir, out, "--stall-timeout", "6", "--max-failures", "1")
    assert result.exit_code == 0, result.output
    retried = [line for line in result.output.splitlines() if "no epoch reported for" in line]
    assert len(retried) == 1 and "retrying from its last epoch checkpoint" in retried[0], result.output
    folds = pd.read_csv(out / "folds.csv")
    assert sorted(folds["attempts"]) == [1, 2]
    assert (folds["val_accuracy"] > 0.5).all()  # chance is 0.1


@pytest.mark.integration
def test_a_task_no_node_has_room_for_ends_its_wait_after_the_grace(local_ray):
    import ray

    from distml.distributed.cluster import await_task

    @ray.remote
    def never_scheduled():
        return 1

    ref = never_scheduled.options(num_cpus=64).remote()
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the final fit: the cluster has had no room for a trainer .* 64 CPU"):
        await_task(ref, ClusterConfig(lost_node_grace_s=0.0), cpus=64.0, gpus=0.0, what="the final fit")
    assert time.monotonic() - started < 10
