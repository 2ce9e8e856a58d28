"""A local Ray, started as distml starts it, listens on loopback only.

`connect()` runs in a separate Python process (so this session's own Ray plays no part), starts a task and a
trainer-like actor so that worker processes are among those checked, and waits. Every listening TCP socket of
that process and all its descendants (GCS, raylet, object manager, agents, driver, workers) must be bound to a
loopback address: 127.0.0.1, ::1, or ::ffff:127.0.0.1 (gRPC's IPv6 socket for 127.0.0.1). The sockets are read
with psutil and, where `ss` is installed, with `ss -ltnp` too. Teardown stops only that process tree.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180
SETTLE_S = 6  # the agents open their ports a few seconds after ray.init returns
POLL_S = 0.5

SCRIPT = """
import json, os, sys
import ray
from distml.distributed import cluster

cluster.connect()

@ray.remote(num_cpus=0)
def task_pid():
    return os.getpid()

@ray.remote(num_cpus=0)
class Trainer:
    def pid(self):
        return os.getpid()

trainer = Trainer.remote()
pids = {"driver": os.getpid(), "task": ray.get(task_pid.remote()), "trainer": ray.get(trainer.pid.remote())}
print(json.dumps(pids), flush=True)
sys.stdin.read()  # until the test closes stdin
cluster.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:  # "*", ss's name for every interface
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _psutil_listeners(pids: set[int]) -> set[tuple[str, int, int]]:
    """(ip, port, pid) of every listening TCP socket of `pids`."""
    return {
        (conn.laddr.ip, conn.laddr.port, conn.pid)
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids
    }


def _ss_listeners(pids: set[int]) -> set[tuple[str, int, int]]:
    """The same, from `ss -ltnpH`: 'LISTEN 0 4096 [::ffff:127.0.0.1]:41481 *:* users:(("raylet",pid=7,fd=41))'."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        ip, _, port = fields[3].rpartition(":")
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.add((ip, int(port), pid))
    return found


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "gone"


def _describe(sockets: set[tuple[str, int, int]]) -> str:
    return ", ".join(f"{ip}:{port} ({_name(pid)}, pid {pid})" for ip, port, pid in sorted(sockets))


def _wait_for_line(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
    pytest.fail(f"the local Ray did not come up within {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_local_ray_listens_on_loopback_only(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    log = tmp_path / "ray.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    root = psutil.Process(proc.pid)
    started: dict[int, psutil.Process] = {proc.pid: root}  # every process of the tree ever seen, for teardown
    try:
        pids = json.loads(_wait_for_line(proc, log))
        by_psutil: set[tuple[str, int, int]] = set()
        by_ss: set[tuple[str, int, int]] = set()
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            started.update((p.pid, p) for p in _tree(root))
            tree = set(started)
            by_psutil |= _psutil_listeners(tree)
            if shutil.which("ss"):
                by_ss |= _ss_listeners(tree)
            time.sleep(POLL_S)

        listening = {pid for _, _, pid in by_psutil}
        names = {_name(pid) for pid in listening}
        # not a vacuous pass: Ray's core servers, the driver and a worker were all seen listening
        assert {"gcs_server", "raylet"} <= names, f"expected Ray's servers among {_describe(by_psutil)}"
        assert pids["driver"] in listening and pids["trainer"] in listening, _describe(by_psutil)

        exposed = {s for s in by_psutil | by_ss if not _is_loopback(s[0])}
        assert not exposed, f"a local Ray listens beyond loopback: {_describe(exposed)}"
        if shutil.which("ss"):
            assert by_ss, "ss saw none of the sockets psutil saw"
    finally:
        proc.stdin.close()  # the script shuts its Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for process in started.values():  # leftovers of this tree only, by the pid and start time psutil noted
            try:
                if process.is_running():
                    process.kill()
            except psutil.Error:
                pass


@pytest.mark.parametrize(
    "ip, loopback",
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("[::ffff:127.0.0.1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("*", False),
        ("[::]", False),
        ("192.0.2.2", False),
    ],
)
def test_is_loopback(ip, loopback):
    assert _is_loopback(ip) is loopback
