"""Shared fixtures for the three tiers: unit (tiny tensors), cli (Typer's CliRunner), integration (a real Ray)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distml.data import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Tests never download and never touch the user's cache."""
    monkeypatch.setenv("DISTML_OFFLINE", "1")
    monkeypatch.setenv("DISTML_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("DISTML_DATA_DIR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("DISTML_STORAGE", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests' tensors are tiny: intra-op threads gain nothing on them, and on a busy 2-core machine the threads'
    hand-offs made a 30 ms fit of a small MLP take 3 s. Ray's trainers set their own thread counts."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real MNIST sample shipped with distml (6,000 training and 1,000 test images)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def full_mnist_dir() -> Path:
    if not SHARED_MNIST.is_dir():
        pytest.skip("../shared/data/mnist is not here")
    return SHARED_MNIST


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray with 2 CPUs for the whole session, as ray's own tests do."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _trial_result_lines(run: Path) -> dict[str, int]:
    """How many epoch results each Tune trial of the run in `run` has written, by trial id (its folder is
    <trainable>_trial_<id>_<number>_...; sweep_trial or cv_trial)."""
    return {
        "_".join(path.parent.name.split("_")[2:4]): len(path.read_text().splitlines())
        for path in (run / "ray" / "tune").glob("*/result.json")
    }


@pytest.fixture()
def trial_result_lines():
    """_trial_result_lines, for the tests that check a resumed search trained no finished trial again."""
    return _trial_result_lines
