"""The resume rule on real files: torch checkpoints cut short beside good ones, and Ray Train's own snapshot format."""

from __future__ import annotations

import pytest
import torch

from distml import checkpoints
from distml.errors import DistmlError


def save_state(path, epochs: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.randn(64, 64)}, "history": [{"epoch": e} for e in range(1, epochs + 1)]}, path)


def cut_short(path, into) -> None:
    into.parent.mkdir(parents=True, exist_ok=True)
    into.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def write_ray_snapshot(experiment, registered: list[str]) -> None:
    """checkpoint_manager_snapshot.json as Ray Train 2.60 itself serialises it (its own pydantic models)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"epoch": i}) for i, n in enumerate(registered)]
    state = _CheckpointManagerState(
        checkpoint_results=results,
        checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1] if results else None,
        pending_training_results=[],
        pending_validation_specs=[],
        current_report_index=len(results),
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    )
    (experiment / checkpoints.TRAIN_SNAPSHOT_FILE).write_text(state.model_dump_json())


def test_a_whole_torch_checkpoint_is_readable_and_one_cut_short_is_not(tmp_path):
    good = tmp_path / "state.pt"
    save_state(good)
    assert checkpoints.unreadable(good) is None
    cut_short(good, tmp_path / "short.pt")
    assert "BadZipFile" in checkpoints.unreadable(tmp_path / "short.pt")
    flipped = bytearray(good.read_bytes())
    flipped[200] ^= 0xFF  # inside the first member's data: the archive's directory is whole, its CRC is not
    (tmp_path / "flipped.pt").write_bytes(bytes(flipped))
    assert "CRC" in checkpoints.unreadable(tmp_path / "flipped.pt")


def test_a_train_resume_skips_the_folder_ray_never_registered_and_names_the_one_used(tmp_path):
    experiment = tmp_path / "finetune"
    save_state(experiment / "checkpoint_2026-12-01_10-00-00.000001" / "state.pt", epochs=2)
    cut_short(
        experiment / "checkpoint_2026-12-01_10-00-00.000001" / "state.pt",
        experiment / "checkpoint_2026-12-01_10-00-09.000002" / "state.pt",  # newer, but never registered
    )
    write_ray_snapshot(experiment, ["checkpoint_2026-12-01_10-00-00.000001"])

    point = checkpoints.train_resume_point(experiment)
    assert point.checkpoint == experiment / "checkpoint_2026-12-01_10-00-00.000001"
    assert point.skipped == [
        f"skipped {experiment / 'checkpoint_2026-12-01_10-00-09.000002'}: an incomplete checkpoint (Ray Train never "
        "registered it); carrying on from checkpoint_2026-12-01_10-00-00.000001"
    ]


def test_a_registered_train_checkpoint_that_cannot_be_read_is_named_with_the_way_out(tmp_path):
    experiment = tmp_path / "finetune"
    whole = tmp_path / "whole.pt"
    save_state(whole)
    cut_short(whole, experiment / "checkpoint_a" / "state.pt")
    write_ray_snapshot(experiment, ["checkpoint_a"])
    with pytest.raises(DistmlError) as error:
        checkpoints.train_resume_point(experiment)
    message = str(error.value)
    assert message.startswith("--resume: ") and str(experiment / "checkpoint_a" / "state.pt") in message
    assert "the last checkpoint Ray Train registered, cannot be read (BadZipFile" in message
    assert f"delete {experiment} to train again from the first epoch" in message


def test_a_half_written_train_snapshot_is_named_and_a_run_without_one_starts_from_the_first_epoch(tmp_path):
    experiment = tmp_path / "finetune"
    experiment.mkdir()
    assert checkpoints.train_resume_point(experiment) == checkpoints.ResumePoint(None, [])
    write_ray_snapshot(experiment, ["checkpoint_a"])
    text = (experiment / checkpoints.TRAIN_SNAPSHOT_FILE).read_text()
    (experiment / checkpoints.TRAIN_SNAPSHOT_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ValueError):  # what a reader racing a live run sees, and retries
        checkpoints.registered_train_checkpoints(experiment)
    with pytest.raises(DistmlError, match="Ray Train's record of its checkpoints, is corrupt"):
        checkpoints.train_resume_point(experiment)


def test_a_fold_group_skips_and_removes_a_half_written_temporary_beside_its_whole_checkpoint(tmp_path):
    group = tmp_path / "folds-0-1"
    save_state(group / "state.pt")
    cut_short(group / "state.pt", group / ".state.pt.x1y2z3.tmp")  # as atomic.write_atomic names its temporaries

    point = checkpoints.fold_group_resume_point(group)
    assert point.checkpoint == group / "state.pt"
    assert point.skipped == [
        f"skipped and removed {group / '.state.pt.x1y2z3.tmp'}: an incomplete checkpoint (its writer died); "
        f"carrying on from {group / 'state.pt'}"
    ]
    assert not (group / ".state.pt.x1y2z3.tmp").exists() and (group / "state.pt").is_file()


def test_a_fold_group_checkpoint_that_cannot_be_read_is_named_with_the_way_out(tmp_path):
    whole = tmp_path / "whole.pt"
    save_state(whole)
    cut_short(whole, tmp_path / "folds-2-3" / "state.pt")
    with pytest.raises(DistmlError) as error:
        checkpoints.fold_group_resume_point(tmp_path / "folds-2-3")
    assert str(error.value) == (
        f"--resume: {tmp_path / 'folds-2-3' / 'state.pt'} cannot be read (BadZipFile: File is not a zip file); "
        "delete it to train folds 2, 3 again from the first epoch"
    )
