import pytest

from distml.config import ClusterConfig
from distml.distributed.cluster import plan
from distml.distributed.tune import FeasibilityStopper
from distml.errors import DistmlError

LAPTOP = [{"CPU": 2.0}]
GPU_CLUSTER = [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]


def test_workers_that_fit_run_as_asked():
    the_plan, notes = plan(ClusterConfig(workers=2), LAPTOP)
    assert (the_plan.concurrent_folds, the_plan.gpus_per_worker, notes) == (2, 0.0, [])


def test_more_workers_than_fit_runs_at_the_concurrency_that_fits_and_says_so():
    the_plan, notes = plan(ClusterConfig(workers=4), LAPTOP)
    assert the_plan.concurrent_folds == 2
    assert "running 2 at a time" in notes[0]


def test_a_trainer_that_fits_on_no_node_fails_fast_naming_the_numbers():
    with pytest.raises(DistmlError, match="trainer needs 4 CPU, but the largest of 1 node.* has 2 CPU"):
        plan(ClusterConfig(cpus_per_worker=4), LAPTOP)
    with pytest.raises(DistmlError, match="--gpus-per-worker: .*needs 1 CPU and 1 GPU"):
        plan(ClusterConfig(gpus_per_worker=1), LAPTOP)


def test_gpus_are_used_automatically_one_per_trainer():
    the_plan, _ = plan(ClusterConfig(workers=8), GPU_CLUSTER)
    assert the_plan.gpus_per_worker == 1.0
    assert the_plan.concurrent_folds == 4  # four GPUs, one trainer each
    cpu_only, _ = plan(ClusterConfig(workers=8, gpus_per_worker=0), GPU_CLUSTER)
    assert cpu_only.concurrent_folds == 8


def test_workers_per_fold_must_fit_the_cluster():
    the_plan, _ = plan(ClusterConfig(workers=2, workers_per_fold=2, gpus_per_worker=0), [{"CPU": 4.0}])
    assert the_plan.concurrent_folds == 2
    with pytest.raises(DistmlError, match="--workers-per-fold: 3 workers per fold"):
        plan(ClusterConfig(workers_per_fold=3), LAPTOP)


def test_a_cluster_that_lost_the_room_for_a_trainer_ends_after_the_grace_naming_the_lost_nodes():
    nodes = {"head0000-rest": {"CPU": 1.0}, "big00000-rest": {"CPU": 2.0}}
    now = [0.0]
    stopper = FeasibilityStopper(
        ClusterConfig(cpus_per_worker=2), grace_s=10, nodes=lambda: dict(nodes), clock=lambda: now[0]
    )
    assert not stopper.stop_all()
    big = nodes.pop("big00000-rest")
    for now[0] in (5, 6, 12):  # unfit since 5 (6 is between checks), 7 s of grace gone at 12
        assert not stopper.stop_all()
    nodes["big00000-rest"] = big  # back within the grace: the clock starts again
    now[0] = 17
    assert not stopper.stop_all()
    del nodes["big00000-rest"]
    for now[0] in (22, 27):
        assert not stopper.stop_all()
    now[0] = 32
    assert stopper.stop_all() and stopper.stop_all()
    assert stopper.reason == (
        "the cluster lost 1 node(s) (big00000: 2 CPU, 0 GPU) and has had no room for a trainer for 10 s "
        "(--lost-node-grace 10), so the run ends: one trainer needs 2 CPU, but the largest of 1 node(s) has 1 CPU "
        "and 0 GPU"
    )
