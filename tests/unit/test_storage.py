"""--storage: what it accepts, where the run folder goes, the pyarrow copy of a report (on file:// here), and what
keeps runs apart: a run id and a storage prefix of each run's own, credentials kept out of config.json, and
checkpoints stamped with the run that wrote them (S3 itself: tests/integration/test_storage_s3.py)."""

import json
from pathlib import Path

import pytest
import torch

from distml import checkpoints, storage
from distml.config import ClusterConfig, KFoldConfig, SweepConfig, config_hash
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
    with pytest.raises(DistmlError, match=r"--storage: ftp:/x: ftp:// is not storage"):
        storage.check("ftp:/x")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DistmlError, match="is a file, not a folder"):
        storage.check(str(tmp_path / "a-file"))


@pytest.mark.parametrize(
    "location, message",
    [
        ("s3:/bucket/runs", "s3:/bucket/runs is not a URI: write s3://BUCKET/PREFIX"),
        ("s3:bucket", "s3:bucket is not a URI: write s3://BUCKET/PREFIX"),
        ("gs:///runs", "gs:///runs names no bucket: write gs://BUCKET/PREFIX"),
        ("s3://bucket:port/runs", "s3://bucket:port/runs is not a URI (Port could not be cast"),
        ("file://host/runs", "file://host/runs: file:// takes an absolute path, as in file:///ABSOLUTE/PATH"),
    ],
)
def test_broken_uris_are_refused_in_one_line(location, message):
    with pytest.raises(DistmlError) as error:
        storage.check(location)
    assert str(error.value).startswith(f"--storage: {message}")
    assert storage.scheme("runs:2024") is None and storage.scheme("S3://b/x") == "s3"  # a colon alone makes no URI


def test_local_path_handles_file_uris_and_home():
    assert storage.local_path("file:///mnt/efs/x") == Path("/mnt/efs/x")
    assert storage.local_path("file:///mnt/my%20runs") == Path("/mnt/my runs")
    assert storage.local_path("~/runs") == Path.home() / "runs"


@pytest.mark.parametrize(
    "location, joined",
    [
        ("s3://bucket/runs", "s3://bucket/runs/r1/folds"),
        ("s3://bucket", "s3://bucket/r1/folds"),
        (
            "s3://bucket/runs/?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://bucket/runs/r1/folds?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
        ("s3://KEY:SECRET@bucket/runs?region=eu-west-1", "s3://KEY:SECRET@bucket/runs/r1/folds?region=eu-west-1"),
        ("file:///mnt/efs", "file:///mnt/efs/r1/folds"),
        ("/mnt/what?ever", "/mnt/what?ever/r1/folds"),  # a plain path has no query
    ],
)
def test_join_adds_a_name_to_the_path_and_keeps_the_query_at_the_end(location, joined):
    assert storage.join(location, "r1/folds") == joined


@pytest.mark.parametrize(
    "location, shown",
    [
        ("s3://AKIA123:s3cr3t@bucket/runs", "s3://***@bucket/runs"),
        ("s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http", None),  # nothing secret: as it is
        ("abfs://container:p4ss@account/runs", "abfs://container:***@account/runs"),  # the container is no secret
        (
            "abfs://container@account/runs?account_key=k3y&sv=2024&sig=s1g",
            "abfs://container@account/runs?account_key=***&sv=2024&sig=***",
        ),
        ("hdfs://alice@namenode:8020/runs", None),
        ("/mnt/efs/distml", None),
    ],
)
def test_redacted_hides_the_credentials_of_a_uri_and_nothing_else(location, shown):
    shown = shown or location
    assert storage.redacted(location) == shown
    assert storage.redacted(shown) == shown
    assert storage.same_place(location, shown)
    assert storage.holds_redacted(shown) is (shown != location)
    assert not storage.holds_redacted(location)


def test_a_resumed_run_takes_its_saved_storage_or_the_same_place_given_with_credentials():
    saved = "s3://bucket/runs?scheme=http"
    assert storage.for_resume(saved, None) == saved
    assert storage.for_resume(saved, "/mnt/elsewhere") == saved  # cluster.yaml's DISTML_STORAGE, say: not this run's
    assert storage.for_resume(saved, "s3://KEY:SECRET@bucket/runs?scheme=http") == (
        "s3://KEY:SECRET@bucket/runs?scheme=http"
    )
    held_back = "s3://***@bucket/runs"
    with pytest.raises(DistmlError, match=r"^--resume: s3://\*\*\*@bucket/runs: its credentials are not kept"):
        storage.for_resume(held_back, None)
    with pytest.raises(DistmlError, match="its credentials are not kept"):
        storage.for_resume(held_back, held_back)  # the redacted form itself is no credential
    assert storage.for_resume(held_back, "s3://KEY:SECRET@bucket/runs") == "s3://KEY:SECRET@bucket/runs"
    assert storage.for_resume(held_back, "s3://bucket/runs") == "s3://bucket/runs"  # the environment's credentials
    assert storage.for_resume(None, "s3://bucket/runs") is None


def test_run_folder_goes_inside_a_local_storage(tmp_path):
    assert fresh_run_folder("kfold", Path("exp1"), str(tmp_path)) == tmp_path / "exp1"
    assert fresh_run_folder("kfold", None, str(tmp_path)).parent == tmp_path
    assert fresh_run_folder("kfold", None, str(tmp_path)).name.startswith("kfold-")
    with pytest.raises(DistmlError, match="--out: .* is absolute"):
        fresh_run_folder("kfold", tmp_path / "elsewhere", str(tmp_path))


def test_with_a_cloud_storage_the_report_stays_under_out_and_ray_writes_to_the_uri(tmp_path):
    assert fresh_run_folder("kfold", tmp_path / "run", "s3://bucket/runs") == tmp_path / "run"
    run = RunDir(tmp_path / "run")  # a run from before run ids: its prefix is its folder's name
    assert run.ray_storage("s3://bucket/runs/") == "s3://bucket/runs/run"
    assert run.ray_storage(None) == str(tmp_path / "run" / "ray")
    assert run.ray_storage(str(tmp_path)) == str(tmp_path / "run" / "ray")


def test_each_new_run_has_an_id_and_a_cloud_prefix_of_its_own(tmp_path):
    first, second = RunDir.fresh(tmp_path / "a" / "run"), RunDir.fresh(tmp_path / "b" / "run")
    assert len(first.run_id) == 32 and int(first.run_id, 16) and first.run_id != second.run_id
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert first.ray_storage(uri) == (
        f"s3://bucket/runs/run-{first.run_id[:8]}?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert first.ray_storage(uri) != second.ray_storage(uri)
    assert first.ray_storage(None) == str(tmp_path / "a" / "run" / "ray")  # a local run's is inside its folder


def test_config_json_holds_the_run_id_and_no_credentials_and_a_resume_reads_the_prefix_back(tmp_path):
    uri = "s3://AKIA123:s3cr3t@bucket/runs?scheme=http"
    config = KFoldConfig(k=3, storage=uri)
    run = RunDir.fresh(tmp_path / "run")
    run.write_header("kfold", config.to_dict(), {"examples": 10})
    text = (tmp_path / "run" / "config.json").read_text()
    assert "AKIA123" not in text and "s3cr3t" not in text
    header = json.loads(text)
    assert header["run_id"] == run.run_id and header["storage_name"] == f"run-{run.run_id[:8]}"
    assert header["options"]["storage"] == "s3://***@bucket/runs?scheme=http"

    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)  # a moved run keeps its prefix
    with pytest.raises(DistmlError, match="its credentials are not kept in config.json"):
        RunDir.resumed(moved, "kfold", KFoldConfig)
    resumed, resumed_config, _ = RunDir.resumed(moved, "kfold", KFoldConfig, storage_given=uri)
    assert resumed.run_id == run.run_id and resumed_config.storage == uri
    assert resumed.ray_storage(resumed_config.storage) == run.ray_storage(uri)


def test_a_new_run_refuses_a_folder_that_holds_another_runs_checkpoints_or_ray_state(tmp_path):
    (tmp_path / "run" / "ray" / "folds" / "folds-0-1").mkdir(parents=True)
    (tmp_path / "run" / "ray" / "folds" / "folds-0-1" / "state.pt").write_bytes(b"x")
    with pytest.raises(DistmlError) as error:
        RunDir.fresh(tmp_path / "run")
    assert str(error.value) == (
        f"--out: {tmp_path / 'run' / 'ray'} already holds checkpoints or Ray state of another run (1 file(s), such "
        "as folds/folds-0-1/state.pt); delete them or choose another --out"
    )
    (tmp_path / "other" / "ray").mkdir(parents=True)  # an empty folder is no state
    RunDir.fresh(tmp_path / "other")


def test_files_under_lists_a_folder_or_nothing(tmp_path):
    assert storage.files_under(str(tmp_path / "none")) == []
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.txt").write_text("")
    (tmp_path / "a" / "d.txt").write_text("")
    assert storage.files_under(str(tmp_path / "a")) == ["b/c.txt", "d.txt"]


def test_the_config_hash_follows_what_trains_not_where_it_runs_or_is_kept():
    base = KFoldConfig(k=3, epochs=2)
    elsewhere = KFoldConfig(
        k=3, epochs=2, out=Path("x"), storage="s3://b/x", track="mlflow", cluster=ClusterConfig(workers=8)
    )
    assert config_hash(base) == config_hash(elsewhere)
    assert config_hash(base) != config_hash(KFoldConfig(k=3, epochs=3))
    assert config_hash(base) == config_hash(KFoldConfig.from_dict(json.loads(json.dumps(base.to_dict()))))
    assert config_hash(KFoldConfig(epochs=3)) == config_hash(KFoldConfig())  # the default: as if not given
    assert len(config_hash(SweepConfig(trials=3))) == 16


def test_a_checkpoint_records_the_run_that_wrote_it_and_another_runs_is_refused(tmp_path):
    from distml.config import TrainSettings
    from distml.distributed.worker import restore_checkpoint, save_checkpoint
    from distml.train import new_state

    def state():
        return new_state(TrainSettings(epochs=1), 0, "cpu", lambda: torch.nn.Linear(4, 2))

    ours, theirs = checkpoints.Stamp("a" * 32, "1234"), checkpoints.Stamp("b" * 32, "1234")
    location = str(tmp_path / "folds" / "folds-0" / "state.pt")
    written = state()
    written.train_seconds = 4.5
    save_checkpoint(written, location, ours)
    assert checkpoints.unreadable(Path(location)) is None  # the stamp is one more member of a whole archive
    restored = state()
    assert restore_checkpoint(restored, location, ours) and restored.train_seconds == 4.5
    with pytest.raises(DistmlError) as error:
        restore_checkpoint(state(), location, theirs)
    assert str(error.value) == (
        f"--resume: {location} was written by run {'a' * 32}, not by this one ({'b' * 32}); delete it or choose "
        "another --out"
    )
    with pytest.raises(DistmlError, match="was written by this run under other options"):
        restore_checkpoint(state(), location, checkpoints.Stamp("a" * 32, "5678"))
    with pytest.raises(DistmlError, match="was written by run a+, not by this one"):  # the driver's check, too
        checkpoints.fold_group_resume_point(tmp_path / "folds" / "folds-0", theirs)
    with pytest.raises(DistmlError, match="was written by run a+, not by this one"):
        checkpoints.check_fold_groups(str(tmp_path), theirs)
    checkpoints.check_fold_groups(str(tmp_path), ours)

    save_checkpoint(written, location)  # a checkpoint from before stamps is accepted
    assert restore_checkpoint(state(), location, theirs)


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
