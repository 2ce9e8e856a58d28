"""K-fold cross-validation from start to finish: data, folds, trials, report. Ray stays in distributed.py."""

from __future__ import annotations

import importlib
import json
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import __version__, checkpoints, storage
from distml.atomic import write_atomic, write_csv, write_json
from distml.config import KFoldConfig
from distml.data import MNIST, load_mnist, normalize
from distml.errors import DistmlError
from distml.folds import check_k, fold_assignment
from distml.rundir import RunDir

if TYPE_CHECKING:
    import pandas as pd

    from distml.cluster import Plan

# pandas, scipy and matplotlib (the report's) load in a thread while the folds train, not before Ray starts: they
# are a second of imports on the way to the first epoch
REPORT_MODULES = ("distml.report", "distml.plots")

CONFIG_FILE = "config.json"
ASSIGNMENT_FILE = "fold_assignment.csv"
FOLDS_FILE = "folds.csv"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.csv"


@dataclass(frozen=True)
class KFoldOutcome:
    run_dir: Path
    folds: pd.DataFrame
    history: pd.DataFrame
    summary: pd.DataFrame
    k: int
    complete: bool
    failures: list[str]
    wall_seconds: float
    uploaded_to: str | None = None  # the cloud URI the report was copied to, with a cloud --storage


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
    return root / out


def ray_storage(run: RunDir, storage_location: str | None) -> str:
    """Where Ray keeps this run's trial state: the cloud URI of a cloud --storage, else inside the run folder."""
    if storage_location is not None and storage.is_cloud(storage_location):
        return storage.join(storage_location, run.path.name)
    return str(run.storage)


def _fold_row(result: dict) -> tuple[dict, list[dict], list[list[int]]]:
    """Split a finished trial's last report into the fold row, its epoch history and its confusion matrix."""
    from distml import report

    row = {column: result.get(column) for column in report.FOLD_COLUMNS}
    history = [{"fold": result["fold"], **epoch} for epoch in json.loads(result["history_json"])]
    return row, history, json.loads(result["confusion_json"])


def write_report(run: RunDir, rows: list[dict], history_rows: list[dict]) -> tuple[pd.DataFrame, ...]:
    from distml import plots, report  # matplotlib only when there is something to draw

    folds = report.fold_table(rows)
    history = report.history_table(history_rows)
    summary = report.summary_table(folds)
    write_csv(run.path / FOLDS_FILE, folds)
    write_csv(run.path / HISTORY_FILE, history)
    write_csv(run.path / SUMMARY_FILE, summary)
    plots.fold_accuracy(folds, run.path / "fold_accuracy.png")
    plots.learning_curves(history, run.path / "learning_curves.png")
    return folds, history, summary


def _rows(done: dict[int, dict]) -> tuple[list[dict], list[dict]]:
    rows, history_rows = [], []
    for result in done.values():
        row, history, _ = _fold_row(result)
        rows.append(row)
        history_rows.extend(history)
    return rows, history_rows


def _write_run_header(run: RunDir, config: KFoldConfig, dataset: MNIST, assignment: np.ndarray, plan) -> None:
    """config.json and the fold of every image: enough to reproduce or resume any fold."""
    run.create()
    header = {
        "command": "kfold",
        "options": config.to_dict(),
        "dataset": dataset.summary(),
        "plan": plan.__dict__,
        "versions": library_versions(),
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    write_json(run.path / CONFIG_FILE, header)
    table = np.column_stack([np.arange(len(assignment)), dataset.train_labels, assignment])
    write_atomic(
        run.path / ASSIGNMENT_FILE,
        lambda tmp: np.savetxt(tmp, table, fmt="%d", delimiter=",", header="index,label,fold", comments=""),
    )


def _read_outcome(run: RunDir, config: KFoldConfig, started: float) -> KFoldOutcome:
    """The outcome of a finished run, read back from its files (nothing is rewritten)."""
    import pandas as pd

    folds = pd.read_csv(run.path / FOLDS_FILE)
    history = pd.read_csv(run.path / HISTORY_FILE)
    summary = pd.read_csv(run.path / SUMMARY_FILE)
    return KFoldOutcome(run.path, folds, history, summary, config.k, True, [], time.perf_counter() - started)


def _saved_assignment(run: RunDir) -> np.ndarray:
    import pandas as pd

    return pd.read_csv(run.path / ASSIGNMENT_FILE)["fold"].to_numpy()


def _read_json(path: Path) -> dict:
    """A JSON file of a run, or a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DistmlError(
            f"{path} is unreadable or corrupt ({type(exc).__name__}); delete it to redo that part", option="--resume"
        ) from None


def _load_done_folds(run: RunDir) -> dict[int, dict]:
    done = {}
    for path in sorted(run.folds_dir.glob("fold_*.json")):
        result = _read_json(path)
        if not {"fold", "val_accuracy", "history_json"} <= set(result):
            raise DistmlError(f"{path} is not a fold result; delete it to rerun that fold", option="--resume")
        done[int(result["fold"])] = result
    return done


def _check_checkpoints(run: RunDir, config: KFoldConfig) -> list[str]:
    """Check a resumed run's checkpoints before anything starts: incomplete ones are skipped (one line each), an
    unreadable one is a DistmlError naming it and the way out. A cloud --storage's are checked as they are read."""
    if config.storage is not None and storage.is_cloud(config.storage):
        return []
    groups = sorted((run.storage / "folds").glob("folds-*"))
    ddp_folds = sorted((run.storage / "train").glob("fold-*"))
    points = [checkpoints.fold_group_resume_point(g) for g in groups]
    points += [checkpoints.train_resume_point(f) for f in ddp_folds]
    return [note for point in points for note in point.skipped]


def _import_report_modules() -> None:
    for module in REPORT_MODULES:
        importlib.import_module(module)


def _todo(config: KFoldConfig, done: dict[int, dict]) -> list[int]:
    return [fold for fold in range(config.k) if fold not in done]


def _groups(config: KFoldConfig, todo: list[int], plan: Plan) -> list[list[int]]:
    """The folds each trainer is handed at a time (several MLP folds train as one stacked model)."""
    from distml.fold_trainers import fold_groups

    return fold_groups(todo, config.trial_size(len(todo), plan.concurrent_folds)) if todo else []


def _split_and_normalize(dataset: MNIST, config: KFoldConfig) -> tuple[np.ndarray, np.ndarray]:
    return fold_assignment(dataset.train_labels, config.k, config.seed), normalize(dataset.train_images)


def run_kfold(
    config: KFoldConfig,
    say: Callable[[str], None] = lambda message: None,
    resume: Path | None = None,
) -> KFoldOutcome:
    """Cross-validate `config.model` on MNIST's training set and write the report into the run folder.

    With `resume`, the options come from that folder's config.json and only unfinished folds run.
    """
    started = time.perf_counter()
    done: dict[int, dict] = {}
    if resume is not None:
        run, config, _ = RunDir.resumed(resume, "kfold", KFoldConfig)
        done = _load_done_folds(run)
        if len(done) == config.k and (run.path / FOLDS_FILE).is_file():
            say(f"{run.path}: all {config.k} folds already finished; nothing to do")
            return _read_outcome(run, config, started)
        run.check_free()  # a run still writing here is refused at once, not after Ray has started
        for note in _check_checkpoints(run, config):
            say(note)
    config.validate()
    if resume is None:
        run = RunDir.fresh(fresh_run_folder("kfold", config.out, config.storage), option="--out")
    cloud = config.storage is not None and storage.is_cloud(config.storage)
    if cloud:
        storage.probe_cloud(config.storage)

    dataset: MNIST = load_mnist(config.data_dir)
    check_k(dataset.train_labels, config.k)
    say(f"data: {dataset.description}")
    # ray is imported only when a run really starts, never for a refused one; Tune and Train only for DDP folds
    from distml import cluster, fold_trainers

    # Starting Ray is mostly waiting for its processes to come up: split and normalise meanwhile
    with ThreadPoolExecutor(max_workers=1) as pool:
        prepared = pool.submit(_split_and_normalize, dataset, config)
        started_ray = cluster.connect(config.cluster.address, quiet=True)
    try:
        plan = cluster.plan_on_cluster(config.cluster, say)
        one_worker_per_fold = config.cluster.workers_per_fold == 1
        if one_worker_per_fold:  # their processes start (and import torch) while we go on
            count = min(plan.concurrent_folds, len(_groups(config, _todo(config, done), plan)))
            trainers = fold_trainers.start_trainers(count, plan, config.model)
        assignment, images = prepared.result()
        with run.lock():
            if not cloud:  # on several nodes, a folder only the driver sees would scatter the checkpoints
                cluster.check_shared(run.path, option="--storage" if config.storage else "--out")
            if resume is None:
                RunDir.fresh(run.path)  # again under the lock: another run may have claimed the folder since
                _write_run_header(run, config, dataset, assignment, plan)
            elif not np.array_equal(_saved_assignment(run), assignment):
                raise DistmlError(f"{run.path}: the data or seed no longer give the saved folds", option="--resume")
            done = _load_done_folds(run)  # again under the lock: what was read before it may be stale
            todo = _todo(config, done)
            failures: list[str] = []
            if todo:
                say(
                    f"running folds {todo} of {config.k}: {plan.concurrent_folds} trainers at a time, "
                    f"{plan.cpus_per_worker:g} CPU"
                    + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
                    + f" each, on {plan.nodes} node(s) with {plan.cluster_cpus:g} CPU and {plan.cluster_gpus:g} GPU"
                )

                def on_fold_done(result: dict) -> None:
                    write_json(run.folds_dir / f"fold_{int(result['fold'])}.json", result)
                    done[int(result["fold"])] = result
                    say(
                        f"fold {result['fold']}: finished, val_acc={result['val_accuracy']:.4f} "
                        f"in {result['train_seconds']:.1f} s on {result['hostname']} ({result['device']})"
                        + (f", attempt {result['attempts']}" if result["attempts"] > 1 else "")
                    )

                shared = cluster.SharedData(images, dataset.train_labels, assignment)
                threading.Thread(target=_import_report_modules, daemon=True).start()
                storage_path = ray_storage(run, config.storage)
                if one_worker_per_fold:
                    groups = _groups(config, todo, plan)
                    failures = fold_trainers.run_groups(
                        config, groups, trainers, shared, plan, storage_path, say, on_fold_done
                    )
                else:
                    from distml import distributed

                    failures = distributed.run_folds(config, todo, shared, plan, storage_path, say, on_fold_done)
            if not done:
                raise DistmlError("no fold finished; nothing to report" + (f" ({failures[0]})" if failures else ""))
            rows, history_rows = _rows(done)
            if started_ray:  # stopping a local Ray is a second or two of waiting: the report is written meanwhile
                with ThreadPoolExecutor(max_workers=1) as pool:
                    written = pool.submit(write_report, run, rows, history_rows)
                    started_ray = False
                    cluster.shutdown()
                    folds, history, summary = written.result()
            else:
                folds, history, summary = write_report(run, rows, history_rows)
            uploaded_to = None
            if cloud:  # Ray wrote its trial state there already; the report joins it
                uploaded_to = storage.upload(run.path, ray_storage(run, config.storage), skip=(run.storage.name,))
                say(f"report uploaded to {uploaded_to}")
    finally:
        if started_ray:
            cluster.shutdown()
    return KFoldOutcome(
        run.path,
        folds,
        history,
        summary,
        config.k,
        len(rows) == config.k,
        failures,
        time.perf_counter() - started,
        uploaded_to,
    )


def dataset_line(run_dir: Path) -> str:
    data = json.loads((Path(run_dir) / CONFIG_FILE).read_text())["dataset"]
    return f"{data['source']} MNIST, {data['train_images']:,} training images ({data['location']})"
