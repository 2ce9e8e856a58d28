"""The run folder: where it goes, its file names, the one run-header writer (config.json), the run's id, and the
checks and lock that keep two runs out of one folder or one storage prefix."""

from __future__ import annotations

import json
import os
import platform
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Protocol, TypeVar

from filelock import FileLock, Timeout

from distml import storage
from distml.atomic import write_json
from distml.errors import DistmlError
from distml.version import __version__

LOCK_FILE = ".distml.lock"
CONFIG_FILE = "config.json"
ASSIGNMENT_FILE = "fold_assignment.csv"
FOLDS_FILE = "folds.csv"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.csv"
RESULTS_FILE = "results.json"  # a trained model's one row of `distml compare`; written last, so it means "finished"
TEST_METRICS_FILE = "test_metrics.json"
PER_CLASS_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.csv"
MODEL_DIR = "model"
FINETUNE_RUN = "finetune"  # Ray Train's run name for the fine-tune: its state is under RUN/ray/finetune


def outputs_file(folds_dir: Path, split: int) -> Path:
    """A finished fold's predictions (and model, when kept), written by the driver from its trainer's report."""
    return Path(folds_dir) / f"fold_{split}.npz"


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing torch and torchvision just for this is slow)."""
    packages = ["torch", "torchvision", "ray", "numpy", "pandas", "scikit-learn"]
    return {"distml": __version__, "python": platform.python_version(), **{p: version(p) for p in packages}}


def default_out(command: str, root: Path = Path("results")) -> Path:
    return root / f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def fresh_run_folder(command: str, out: Path | None, storage_location: str | None) -> Path:
    """The run folder of a new run: `--out`, else results/COMMAND-TIME; inside a local or mounted `--storage`."""
    if storage_location is None or storage.is_cloud(storage_location):
        return out or default_out(command)
    root = storage.local_path(storage_location)
    if out is None:
        return default_out(command, root)
    if out.is_absolute():
        raise DistmlError(
            f"{out} is absolute; with a local --storage, --out names the run folder inside {root}", option="--out"
        )
    folder = root / out
    if not folder.resolve().is_relative_to(root.resolve()):  # "../x" would put the run beside the storage, not in it
        raise DistmlError(f"{out} leads out of the --storage folder {root}", option="--out")
    return folder


class _SavedConfig(Protocol):
    @classmethod
    def from_dict(cls, data: dict): ...


Config = TypeVar("Config", bound=_SavedConfig)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_no_state(location: str, option: str) -> None:
    """Refuse a new run's Ray storage (a local folder or cloud prefix) that holds files: another run's checkpoints or
    Ray Train and Tune state, which the new run would mix with its own, or carry on from."""
    found = storage.files_under(location)
    if found:
        raise DistmlError(
            f"{storage.redacted(location)} already holds checkpoints or Ray state of another run ({len(found)} "
            f"file(s), such as {found[0]}); delete them or choose another --out",
            option=option,
        )


@dataclass(frozen=True)
class RunDir:
    """A run folder. A run has an id (config.json's run_id), and a name under a cloud --storage that no other run
    has: the folder's name when the run began and the id's first 8 digits. Runs from before ids have neither."""

    path: Path
    option: str = "--out"
    run_id: str | None = None
    storage_name: str | None = None

    @classmethod
    def fresh(cls, path: Path, option: str = "--out") -> RunDir:
        """A folder for a new run, with a new run id: it must not be a file, hold another run or another run's Ray
        state and checkpoints, or be unwritable."""
        path = Path(path).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise DistmlError(f"{path} is a file, not a folder", option=option)
        if (path / CONFIG_FILE).exists():
            raise DistmlError(
                f"{path} already holds a run; resume it with --resume {path} or choose another folder", option=option
            )
        run_id = uuid.uuid4().hex
        run = cls(path, option, run_id, f"{path.name}-{run_id[:8]}")
        _check_no_state(str(run.storage), option)
        anchor = _nearest_existing(path)
        if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
            raise DistmlError(f"{path} cannot be written ({anchor} is not a writable folder)", option=option)
        return run

    @classmethod
    def existing(cls, path: Path, option: str = "--resume") -> RunDir:
        path = Path(path).expanduser().absolute()
        if not (path / CONFIG_FILE).is_file():
            raise DistmlError(f"{path} holds no distml run (no {CONFIG_FILE})", option=option)
        if not os.access(path, os.W_OK | os.X_OK):
            raise DistmlError(f"{path} cannot be written", option=option)
        return cls(path, option)

    @classmethod
    def resumed(
        cls, path: Path, command: str, config_type: type[Config], storage_given: str | None = None
    ) -> tuple[RunDir, Config, dict]:
        """The folder of a `command` run to resume (with its run id), its options read back from its config.json, and
        that whole file.

        The options' out is the folder as it is named now, so a moved run resumes where it lies. Its storage is the
        saved one, or `storage_given` when that names the same place (storage.for_resume: config.json keeps no
        credentials).
        """
        run = cls.existing(path)
        file = run.path / CONFIG_FILE
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise DistmlError(f"{file} is unreadable or corrupt ({type(exc).__name__})", option=run.option) from None
        found = saved.get("command") if isinstance(saved, dict) else None
        if found != command:
            raise DistmlError(f"{run.path} holds a {found or 'unknown'} run, not a {command} run", option=run.option)
        try:
            config = config_type.from_dict({**saved["options"], "out": str(run.path)})
        except (KeyError, TypeError, ValueError) as exc:
            raise DistmlError(f"{file} is not a {command} run's config ({exc})", option=run.option) from None
        if getattr(config, "storage", None) is not None:
            config = replace(config, storage=storage.for_resume(config.storage, storage_given))
        run = replace(run, run_id=saved.get("run_id"), storage_name=saved.get("storage_name"))
        return run, config, saved

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_header(self, command: str, options: dict, dataset: dict, **extra) -> None:
        """Create the folder and write config.json: the command, the run's id, every option (a storage URI's
        credentials redacted), the dataset, library versions and anything else that reproduces or resumes the run
        (call under the run's lock)."""
        self.create()
        if options.get("storage") is not None:
            options = {**options, "storage": storage.redacted(options["storage"])}
        identity = {"run_id": self.run_id, "storage_name": self.storage_name}
        header = {"command": command, **identity, "options": options, "dataset": dataset, **extra}
        header.update(versions=library_versions(), created=datetime.now().isoformat(timespec="seconds"))
        write_json(self.path / CONFIG_FILE, header)

    def ray_storage(self, storage_location: str | None) -> str:
        """Where Ray keeps this run's trial state and checkpoints: under the cloud URI of a cloud --storage, at a name
        of this run's own, else inside the run folder."""
        if storage_location is not None and storage.is_cloud(storage_location):
            return storage.join(storage_location, self.storage_name or self.path.name)
        return str(self.storage)

    def check_storage(self, storage_location: str | None) -> None:
        """With a cloud --storage, before anything starts: write and delete a small file there, so missing
        credentials fail now and not after training, and refuse a new run's prefix that already holds files."""
        if storage_location is None or not storage.is_cloud(storage_location):
            return
        storage.probe_cloud(storage_location)
        if not (self.path / CONFIG_FILE).exists():
            _check_no_state(self.ray_storage(storage_location), storage.OPTION)

    @property
    def folds_dir(self) -> Path:
        return self.path / "folds"

    @property
    def storage(self) -> Path:
        """Where Ray keeps trial state and checkpoints for this run."""
        return self.path / "ray"

    def check_free(self) -> None:
        """Refuse now a folder that another run is writing, before any slow start-up; `lock` holds it later."""
        with self.lock():
            pass

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process; a second run on the same folder is refused, not interleaved."""
        made_here = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise DistmlError(
                f"another distml run is writing to {self.path}; wait for it or choose another folder",
                option=self.option,
            ) from None
        try:
            yield
        finally:
            lock.release()
            if made_here and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
                # the run stopped before it wrote anything: leave no empty folder behind
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()
