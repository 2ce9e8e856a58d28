"""`distml kfold --storage s3://...` for real: against moto's S3 server, started on loopback by this module, from this
session's local Ray, through pyarrow's S3 filesystem (`endpoint_override`), not file://.

Two runs named alike each get a prefix of their own; a resume restores its fold checkpoints from S3; another run's
checkpoint is refused; the credentials in the URI reach neither config.json nor the output. They are in the URI,
not the environment, because the session's Ray workers started before this module could set any.
"""

import json
import socket
import subprocess
import sys
import time
import zipfile
from io import BytesIO

import pytest
from typer.testing import CliRunner

from distml import checkpoints, storage
from distml.cli import app
from distml.errors import DistmlError
from distml.rundir import RunDir

pytestmark = pytest.mark.integration

KEY, SECRET = "moto-access-key", "moto-secret-key"  # moto takes any
BUCKET = "distml-runs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def s3(endpoint: str):
    """pyarrow's S3 filesystem on the test's server, to look at what the runs wrote."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        access_key=KEY, secret_key=SECRET, endpoint_override=endpoint, scheme="http", allow_bucket_creation=True
    )


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on 127.0.0.1 with one empty bucket; only that process is stopped after the module."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("moto's S3 server did not start")
                time.sleep(0.2)
        s3(f"127.0.0.1:{port}").create_dir(BUCKET)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def uri(endpoint) -> str:
    return f"s3://{KEY}:{SECRET}@{BUCKET}/runs?endpoint_override={endpoint}&scheme=http"


def kfold(sample_dir, *options: str):
    return CliRunner().invoke(app, ["kfold", "--k", "2", "--epochs", "2", "--data-dir", str(sample_dir), *options])


def resume(out, storage_given: str | None = None):
    """`distml kfold --resume OUT`, given the storage URI (with its credentials) in DISTML_STORAGE."""
    env = {"DISTML_STORAGE": storage_given} if storage_given else None
    return CliRunner().invoke(app, ["kfold", "--resume", str(out)], env=env)


@pytest.fixture(scope="module")
def two_runs(local_ray, sample_dir, uri, tmp_path_factory):
    """Two runs whose run folders have the same name, r1, in different places (their --out's last part)."""
    root = tmp_path_factory.mktemp("s3-runs")
    outs = [root / "first" / "r1", root / "second" / "r1"]
    results = [kfold(sample_dir, "--storage", uri, "--out", str(out)) for out in outs]
    for result in results:
        assert result.exit_code == 0, result.output
    headers = [json.loads((out / "config.json").read_text()) for out in outs]
    return outs, results, headers


def keys(endpoint: str, under: str = f"{BUCKET}/runs") -> list[str]:
    import pyarrow.fs

    found = s3(endpoint).get_file_info(pyarrow.fs.FileSelector(under, recursive=True, allow_not_found=True))
    return sorted(info.path[len(under) + 1 :] for info in found if info.type == pyarrow.fs.FileType.File)


def test_each_run_has_an_id_and_its_report_and_checkpoints_under_a_prefix_of_its_own(two_runs, endpoint):
    _, _, headers = two_runs
    ids = [header["run_id"] for header in headers]
    assert all(len(run_id) == 32 for run_id in ids) and ids[0] != ids[1]
    prefixes = [f"r1-{run_id[:8]}" for run_id in ids]
    assert [header["storage_name"] for header in headers] == prefixes
    stored = keys(endpoint)
    assert sorted({key.split("/")[0] for key in stored}) == sorted(prefixes)  # nothing shared, no plain "r1"
    for prefix, run_id in zip(prefixes, ids, strict=True):
        assert {"config.json", "folds.csv", "summary.csv", "folds/folds-0/state.pt", "folds/folds-1/state.pt"} <= {
            key[len(prefix) + 1 :] for key in stored if key.startswith(prefix + "/")
        }
        with s3(endpoint).open_input_file(f"{BUCKET}/runs/{prefix}/folds/folds-1/state.pt") as stream:
            archive = zipfile.ZipFile(BytesIO(stream.read()))
        stamp = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith(checkpoints.STAMP_FILE))))
        assert stamp["run_id"] == run_id


def test_the_credentials_in_the_uri_are_neither_saved_nor_printed(two_runs, uri, endpoint):
    outs, results, headers = two_runs
    assert headers[0]["options"]["storage"] == storage.redacted(uri)
    assert headers[0]["options"]["storage"].startswith(f"s3://***@{BUCKET}/runs?endpoint_override=")
    for out, result in zip(outs, results, strict=True):
        assert KEY not in result.output and SECRET not in result.output
        assert f"s3://***@{BUCKET}/runs/r1-" in result.output  # where the report went, as it is shown
        for file in out.rglob("*"):
            assert not file.is_file() or SECRET.encode() not in file.read_bytes(), file
    with s3(endpoint).open_input_file(f"{BUCKET}/runs/{headers[0]['storage_name']}/config.json") as stream:
        assert SECRET.encode() not in stream.read()


def test_a_resume_restores_the_fold_checkpoints_from_s3(two_runs, uri):
    outs, _, _ = two_runs
    out = outs[0]
    finished = json.loads((out / "folds" / "fold_1.json").read_text())
    for name in ("folds/fold_1.json", "folds/fold_1.npz", "folds.csv"):  # as if stopped before fold 1 was reported
        (out / name).unlink()

    refused = resume(out)  # config.json holds no credentials
    assert refused.exit_code == 2 and "its credentials are not kept in config.json" in refused.output

    result = resume(out, uri)
    assert result.exit_code == 0, result.output
    resumed = json.loads((out / "folds" / "fold_1.json").read_text())
    # every epoch came from the checkpoint in S3: none trained again, the same model validated
    assert resumed["epochs"] == 2 and resumed["train_seconds"] == finished["train_seconds"]
    assert resumed["val_accuracy"] == finished["val_accuracy"] > 0.75


def test_another_runs_checkpoint_is_refused_before_anything_trains(two_runs, uri, endpoint):
    outs, _, headers = two_runs
    ours, theirs = headers[0], headers[1]
    s3(endpoint).copy_file(
        f"{BUCKET}/runs/{theirs['storage_name']}/folds/folds-1/state.pt",
        f"{BUCKET}/runs/{ours['storage_name']}/folds/folds-1/state.pt",
    )
    (outs[0] / "folds" / "fold_1.json").unlink(missing_ok=True)
    result = resume(outs[0], uri)
    assert result.exit_code == 2
    location = storage.redacted(storage.join(uri, f"{ours['storage_name']}/folds/folds-1/state.pt"))
    assert result.output.strip().splitlines() == [
        f"error: --resume: {location} was written by run {theirs['run_id']}, not by this one ({ours['run_id']}); "
        "delete it or choose another --out"
    ]


def test_a_new_run_refuses_a_prefix_that_already_holds_ray_state(uri, tmp_path):
    run = RunDir.fresh(tmp_path / "r2")
    run.check_storage(uri)  # probes the bucket: an empty prefix is fine
    storage.write_bytes(storage.join(run.ray_storage(uri), "tune/experiment_state-x.json"), b"{}")
    with pytest.raises(DistmlError) as error:
        run.check_storage(uri)
    assert str(error.value) == (
        f"--storage: {storage.redacted(run.ray_storage(uri))} already holds checkpoints or Ray state of another run "
        "(1 file(s), such as tune/experiment_state-x.json); delete them or choose another --out"
    )
