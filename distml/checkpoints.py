"""Which checkpoint a run carries on from: only complete ones. The one rule every `--resume` follows.

Two kinds of checkpoint live under a run's Ray storage:
- Ray Train's (the fine-tune, DDP folds): a `checkpoint_*` folder is copied into storage first, and only then
  registered in the run's checkpoint manager snapshot (`checkpoint_manager_snapshot.json`), which is written before
  older folders are deleted. A folder the snapshot does not name may be half-copied; Ray Train restores only the
  snapshot's latest one.
- distml's own fold-group checkpoints (`folds-0-1/state.pt`): written to a temporary name beside the file and
  renamed over it, so a leftover temporary file is one that was still being written when its process died.

`torch.save` writes a zip archive: a file is checked whole (its central directory and every member's CRC) with
`zipfile`, so the driver checks checkpoints without importing torch.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from distml.errors import DistmlError

STATE_FILE = "state.pt"  # the one file in every checkpoint distml writes
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints
TRAIN_CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run carries on from (None: from the first epoch), and one line per checkpoint skipped."""

    checkpoint: Path | None
    skipped: list[str] = field(default_factory=list)


def unreadable(path: Path) -> str | None:
    """Why the torch checkpoint file at `path` cannot be read whole, or None when it can."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"member {broken} fails its CRC check" if broken is not None else None


def registered_train_checkpoints(experiment: Path) -> list[Path]:
    """The checkpoint folders Ray Train registered as complete in `experiment` (a run's storage folder, e.g.
    RUN/ray/finetune), oldest first; [] when it registered none.

    Raises ValueError when the snapshot cannot be parsed: Ray rewrites it in place, so a reader racing a live run
    can see half of it, and a run killed while writing it leaves half of it.
    """
    snapshot = Path(experiment) / TRAIN_SNAPSHOT_FILE
    try:
        text = snapshot.read_text()
    except FileNotFoundError:
        return []
    state = json.loads(text)  # ValueError when partial
    names = [entry["checkpoint_dir_name"] for entry in state.get("checkpoint_results", [])]
    latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if latest is not None and latest not in names:
        names.append(latest)
    return [Path(experiment) / name for name in names]


def train_resume_point(experiment: Path) -> ResumePoint:
    """The checkpoint a resumed Ray Train run in `experiment` restores (the latest registered one), checked whole.

    Folders Ray never registered are skipped, each with a line naming the one used instead. A registered checkpoint
    that cannot be read, or a snapshot that cannot be parsed, is a DistmlError naming it and the way out.
    """
    experiment = Path(experiment)
    way_out = f"delete {experiment} to train again from the first epoch"
    try:
        registered = registered_train_checkpoints(experiment)
    except (ValueError, KeyError, TypeError) as exc:
        raise DistmlError(
            f"{experiment / TRAIN_SNAPSHOT_FILE}, Ray Train's record of its checkpoints, is corrupt "
            f"({type(exc).__name__}); {way_out}",
            option="--resume",
        ) from None
    latest = registered[-1] if registered else None
    if latest is not None:
        reason = unreadable(latest / STATE_FILE)
        if reason is not None:
            raise DistmlError(
                f"{latest / STATE_FILE}, the last checkpoint Ray Train registered, cannot be read ({reason}); "
                f"{way_out}",
                option="--resume",
            )
    used = latest.name if latest is not None else "none: training starts from the first epoch"
    folders = sorted(experiment.glob(f"{TRAIN_CHECKPOINT_PREFIX}*")) if experiment.is_dir() else []
    skipped = [
        f"skipped {folder}: an incomplete checkpoint (Ray Train never registered it); carrying on from {used}"
        for folder in folders
        if folder.is_dir() and folder not in registered
    ]
    return ResumePoint(latest, skipped)


def fold_group_resume_point(folder: Path) -> ResumePoint:
    """The checkpoint a fold group in `folder` (e.g. RUN/ray/folds/folds-0-1) carries on from, checked whole.

    Temporary files left by a process killed while writing are removed, each with a line naming the file used
    instead; a checkpoint that cannot be read is a DistmlError naming it and the way out.
    """
    folder = Path(folder)
    checkpoint = folder / STATE_FILE
    exists = checkpoint.is_file()
    if exists:
        reason = unreadable(checkpoint)
        if reason is not None:
            raise DistmlError(
                f"{checkpoint} cannot be read ({reason}); delete it to train folds "
                f"{', '.join(folder.name.split('-')[1:])} again from the first epoch",
                option="--resume",
            )
    used = str(checkpoint) if exists else "none: those folds start from the first epoch"
    partial = sorted(folder.glob(f".{STATE_FILE}.*.tmp")) if folder.is_dir() else []
    skipped = []
    for tmp in partial:
        tmp.unlink(missing_ok=True)
        skipped.append(
            f"skipped and removed {tmp}: an incomplete checkpoint (its writer died); carrying on from {used}"
        )
    return ResumePoint(checkpoint if exists else None, skipped)
