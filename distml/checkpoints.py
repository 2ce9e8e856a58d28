"""Which checkpoint a run carries on from: only complete ones. The one rule every `--resume` follows.

Two kinds of checkpoint live under a run's Ray storage:
- Ray Train's (the fine-tune, DDP folds): a `checkpoint_*` folder is copied into storage first, and only then
  registered in the run's checkpoint manager snapshot (`checkpoint_manager_snapshot.json`), which is written before
  older folders are deleted. A folder the snapshot does not name may be half-copied; Ray Train restores only the
  snapshot's latest one.
- distml's own fold-group checkpoints (`folds-0-1/state.pt`): written to a temporary name beside the file and
  renamed over it, so a leftover temporary file is one that was still being written when its process died.

`torch.save` writes a zip archive: a file is checked whole (its central directory and every member's CRC) with
`zipfile`, so the driver checks checkpoints without importing torch. Every checkpoint distml writes (fold groups,
DDP folds, the fine-tune, sweep trials) also holds, as one more member of that archive (torch.load reads the archive
as before), the Stamp of the run that wrote it: a restore refuses one another run, or the same run under other
options, wrote.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from distml import storage
from distml.config import Serialized, config_hash
from distml.errors import DistmlError

STATE_FILE = "state.pt"  # the one file in every checkpoint distml writes
STAMP_FILE = "distml-stamp.json"  # the member of a checkpoint's archive that holds its Stamp
TRAIN_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints
TRAIN_CHECKPOINT_PREFIX = "checkpoint_"


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run carries on from (None: from the first epoch), and one line per checkpoint skipped."""

    checkpoint: Path | None
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Stamp:
    """What a checkpoint records of the run that wrote it: the run's id and the digest of the options that decide
    what it trains (config.config_hash)."""

    run_id: str
    config_hash: str


def run_stamp(run_id: str | None, config: Serialized) -> Stamp | None:
    """The Stamp every checkpoint of a run records (a run from before run ids has none, and its checkpoints none)."""
    return None if run_id is None else Stamp(run_id, config_hash(config))


def stamped(checkpoint: bytes, stamp: Stamp) -> bytes:
    """A torch-saved checkpoint's bytes with `stamp` added to its archive."""
    buffer = io.BytesIO(checkpoint)
    with zipfile.ZipFile(buffer, "a") as archive:
        folder = archive.namelist()[0].split("/")[0]  # torch keeps its members in one folder, and refuses others
        archive.writestr(f"{folder}/{STAMP_FILE}", json.dumps(asdict(stamp)))
    return buffer.getvalue()


def check_stamp(checkpoint: bytes, stamp: Stamp, location: str) -> None:
    """Refuse, in one line naming it, the checkpoint at `location` when another run, or this run under other options,
    wrote it; one without a stamp is older than stamps, and accepted."""
    with zipfile.ZipFile(io.BytesIO(checkpoint)) as archive:
        members = [name for name in archive.namelist() if name.endswith(f"/{STAMP_FILE}")]
        found = json.loads(archive.read(members[0])) if members else None
    if found is None or found == asdict(stamp):
        return
    if found.get("run_id") != stamp.run_id:
        why = f"was written by run {found.get('run_id')}, not by this one ({stamp.run_id})"
    else:
        why = "was written by this run under other options (was its config.json edited?)"
    raise DistmlError(f"{storage.redacted(location)} {why}; delete it or choose another --out", option="--resume")


def unreadable(checkpoint: Path | bytes) -> str | None:
    """Why a torch checkpoint (a file, or its bytes) cannot be read whole, or None when it can."""
    try:
        with zipfile.ZipFile(io.BytesIO(checkpoint) if isinstance(checkpoint, bytes) else checkpoint) as archive:
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


def fold_group_resume_point(folder: Path, stamp: Stamp | None = None) -> ResumePoint:
    """The checkpoint a fold group in `folder` (e.g. RUN/ray/folds/folds-0-1) carries on from, checked whole and,
    with the run's `stamp`, checked to be the run's own.

    Temporary files left by a process killed while writing are removed, each with a line naming the file used
    instead; a checkpoint that cannot be read, or is another run's, is a DistmlError naming it and the way out.
    """
    folder = Path(folder)
    checkpoint = folder / STATE_FILE
    exists = checkpoint.is_file()
    if exists:
        _check_fold_group(checkpoint.read_bytes(), str(checkpoint), folder.name, stamp)
    used = str(checkpoint) if exists else "none: those folds start from the first epoch"
    partial = sorted(folder.glob(f".{STATE_FILE}.*.tmp")) if folder.is_dir() else []
    skipped = []
    for tmp in partial:
        tmp.unlink(missing_ok=True)
        skipped.append(
            f"skipped and removed {tmp}: an incomplete checkpoint (its writer died); carrying on from {used}"
        )
    return ResumePoint(checkpoint if exists else None, skipped)


def check_fold_groups(storage_path: str, stamp: Stamp | None) -> None:
    """Check every fold-group checkpoint under a run's Ray storage (a cloud URI's too, where no temporary files are
    left: an object is written whole) before anything starts: each must read whole and, with a `stamp`, be the run's."""
    folds = storage.join(storage_path, "folds")
    for name in storage.files_under(folds):
        group, _, file = name.partition("/")
        location = storage.join(folds, name)
        checkpoint = storage.read_bytes(location) if file == STATE_FILE else None
        if checkpoint is not None:
            _check_fold_group(checkpoint, location, group, stamp)


def _check_fold_group(checkpoint: bytes, location: str, group: str, stamp: Stamp | None) -> None:
    """Refuse the checkpoint of a fold group (`group`: its folder's name, folds-0-1) that cannot be read, or with a
    `stamp` is another run's."""
    reason = unreadable(checkpoint)
    if reason is not None:
        raise DistmlError(
            f"{storage.redacted(location)} cannot be read ({reason}); delete it to train folds "
            f"{', '.join(group.split('-')[1:])} again from the first epoch",
            option="--resume",
        )
    if stamp is not None:
        check_stamp(checkpoint, stamp, location)
