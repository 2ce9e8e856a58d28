"""cluster.yaml: valid for Ray's cluster launcher, and right where it matters (Ray version, GPUs, auth, storage)."""

import sys
from pathlib import Path

import pytest
import ray

yaml = pytest.importorskip("yaml")  # PyYAML, in the dev extra

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_up_would_accept_it(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # the launcher's own schema check, as `ray up` runs it


def test_images_carry_the_installed_ray_and_python(cluster):
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert cluster["docker"]["image"] == f"rayproject/ray:{ray.__version__}-{python}-gpu"
    assert cluster["docker"]["head_image"] == f"rayproject/ray:{ray.__version__}-{python}-cpu"


def test_a_cpu_head_and_gpu_workers_with_min_and_max(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    (worker,) = (node for name, node in types.items() if name != cluster["head_node_type"])
    assert worker["resources"]["GPU"] >= 1 and worker["resources"]["CPU"] >= 1
    assert 1 <= worker["min_workers"] <= worker["max_workers"] <= cluster["max_workers"]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))  # AWS GPU instance families


def test_setup_installs_distml_from_the_checkout(cluster):
    assert cluster["file_mounts"]["/home/ray/distml"] == "."
    assert any("pip install" in command and "/home/ray/distml" in command for command in cluster["setup_commands"])


def test_dashboard_stays_on_the_head_loopback(cluster):
    (start,) = (command for command in cluster["head_start_ray_commands"] if "ray start" in command)
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start


def test_token_authentication_on_every_node(cluster):
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        (start,) = (command for command in commands if "ray start" in command)
        assert "RAY_AUTH_MODE=token" in start.split("ray start")[0]
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_shared_storage_is_mounted_on_every_node(cluster):
    assert any(
        "mount -t nfs4" in command and "/mnt/distml" in command for command in cluster["initialization_commands"]
    )
    assert "-v /mnt/distml:/mnt/distml" in cluster["docker"]["run_options"]
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        (start,) = (command for command in commands if "ray start" in command)
        assert "DISTML_STORAGE=/mnt/distml" in start.split("ray start")[0]  # jobs' drivers inherit it
