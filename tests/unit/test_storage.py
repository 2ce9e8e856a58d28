"""--storage: what it accepts, where the run folder goes, and the pyarrow copy of a report (on file:// here)."""

from pathlib import Path

import pytest

from distml import storage
from distml.errors import DistmlError
from distml.rundir import RunDir, fresh_run_folder


@pytest.mark.parametrize(
    "location, cloud",
    [("s3://bucket/runs", True), ("gs://bucket", True), ("/mnt/efs/distml", False), ("file:///mnt/efs", False)],
)
def test_cloud_or_local(location, cloud):
    assert storage.is_cloud(location) is cloud
    storage.check(location)


def test_unknown_scheme_and_a_file_are_refused(tmp_path):
    with pytest.raises(DistmlError, match=r"--storage: .*http:// is not storage Ray can write to"):
        storage.check("http://example.com/runs")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DistmlError, match="is a file, not a folder"):
        storage.check(str(tmp_path / "a-file"))


def test_local_path_handles_file_uris_and_home():
    assert storage.local_path("file:///mnt/efs/x") == Path("/mnt/efs/x")
    assert storage.local_path("~/runs") == Path.home() / "runs"


def test_run_folder_goes_inside_a_local_storage(tmp_path):
    assert fresh_run_folder("kfold", Path("exp1"), str(tmp_path)) == tmp_path / "exp1"
    assert fresh_run_folder("kfold", None, str(tmp_path)).parent == tmp_path
    assert fresh_run_folder("kfold", None, str(tmp_path)).name.startswith("kfold-")
    with pytest.raises(DistmlError, match="--out: .* is absolute"):
        fresh_run_folder("kfold", tmp_path / "elsewhere", str(tmp_path))


def test_with_a_cloud_storage_the_report_stays_under_out_and_ray_writes_to_the_uri(tmp_path):
    assert fresh_run_folder("kfold", tmp_path / "run", "s3://bucket/runs") == tmp_path / "run"
    run = RunDir(tmp_path / "run")
    assert run.ray_storage("s3://bucket/runs/") == "s3://bucket/runs/run"
    assert run.ray_storage(None) == str(tmp_path / "run" / "ray")
    assert run.ray_storage(str(tmp_path)) == str(tmp_path / "run" / "ray")


def test_upload_copies_the_report_but_not_what_it_skips(tmp_path):
    run = tmp_path / "run"
    (run / "folds").mkdir(parents=True)
    (run / "folds.csv").write_text("fold\n0\n")
    (run / "folds" / "fold_0.json").write_text("{}")
    (run / "ray").mkdir()
    (run / "ray" / "state").write_text("x")
    (run / ".distml.lock").write_text("")
    target = tmp_path / "bucket" / "run"
    assert storage.upload(run, f"file://{target}", skip=("ray",)) == f"file://{target}"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "folds",
        "folds.csv",
        "folds/fold_0.json",
    ]


def test_probe_writes_and_removes_a_marker_and_names_what_fails(tmp_path):
    storage.probe_cloud(f"file://{tmp_path}")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DistmlError, match=r"--storage: cannot write to file://.*a-file/sub"):
        storage.probe_cloud(f"file://{tmp_path}/a-file/sub")


def test_write_bytes_replaces_a_file_whole_and_read_bytes_gives_none_for_a_missing_one(tmp_path):
    location = str(tmp_path / "folds" / "folds-0-1" / "state.pt")
    assert storage.read_bytes(location) is None
    storage.write_bytes(location, b"first")
    storage.write_bytes(location, b"second")
    assert storage.read_bytes(location) == b"second"
    assert storage.read_bytes("file://" + location) == b"second"
    assert [p.name for p in (tmp_path / "folds" / "folds-0-1").iterdir()] == ["state.pt"]  # no temporary left
