"""`distml kfold`: K-fold cross-validation from start to finish: prepare the run, train the folds on Ray, report."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import checkpoints, storage
from distml.atomic import write_atomic, write_csv, write_json
from distml.config import CALLABLE_PREFIX, KFoldConfig
from distml.datasets import Dataset, check_folds_possible
from distml.distributed import cluster, fold_actors
from distml.errors import DistmlError
from distml.folds import SplitData, fold_assignment, fold_groups
from distml.recipe import Given, ModelRecipe, Prepared, prepare
from distml.rundir import ASSIGNMENT_FILE, CONFIG_FILE, FOLDS_FILE, HISTORY_FILE, SUMMARY_FILE, RunDir, fresh_run_folder

if TYPE_CHECKING:
    import pandas as pd

    from distml.distributed.cluster import Plan

log = logging.getLogger(__name__)

# pandas, scipy and matplotlib (the report's) load in a thread while the folds train, not before Ray starts: they
# are a second of imports on the way to the first epoch
REPORT_MODULES = ("distml.report", "distml.plots")


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


def run_kfold(config: KFoldConfig, resume: Path | None = None, given: Given = Given()) -> KFoldOutcome:
    """Cross-validate `config.model` on `config.data` and write the report into the run folder.

    `given`: the objects the Python API was handed where config.json can only name them (arrays, a torch Dataset,
    callables). With `resume`, the options come from that folder's config.json and only unfinished folds run.
    """
    started = time.perf_counter()
    run, config, done = _prepare(config, resume, given)
    if resume is not None and len(done) == config.k and (run.path / FOLDS_FILE).is_file():
        log.info(f"{run.path}: all {config.k} folds already finished; nothing to do")
        return _read_outcome(run, config, started)
    loaded = _load(config, given)
    with ThreadPoolExecutor(max_workers=1) as pool:  # Ray's start is mostly waiting: split the data meanwhile
        prepared = pool.submit(_split, loaded.dataset, loaded.test, config)
        started_ray = cluster.connect(config.cluster.address, quiet=True)
    try:
        plan = cluster.plan_on_cluster(config.cluster)
        # their processes start (and import torch) while we go on
        trainers = _start_trainers(config, done, plan, loaded.recipe)
        shared, summary = prepared.result()
        with run.lock():
            done = _claim(run, config, loaded, summary, shared, plan, resume)
            failures = _train(config, run, shared, plan, trainers, loaded.recipe, done)
            if not done:
                raise DistmlError("no fold finished; nothing to report" + (f" ({failures[0]})" if failures else ""))
            folds, history, summary = _report(run, done, stop_ray=started_ray)
            started_ray = False
            uploaded_to = _upload(run, config)
    finally:
        if started_ray:
            cluster.shutdown()
    complete = len(folds) == config.k
    return KFoldOutcome(
        run.path, folds, history, summary, config.k, complete, failures, time.perf_counter() - started, uploaded_to
    )


# ---- prepare ----


def _prepare(config: KFoldConfig, resume: Path | None, given: Given) -> tuple[RunDir, KFoldConfig, dict[int, dict]]:
    """The run folder, its options and the folds it has finished, checked before Ray starts."""
    if resume is None:
        config.validate()
        run = RunDir.fresh(fresh_run_folder("kfold", config.out, config.storage), option="--out")
        return run, config, {}
    run, config, _ = RunDir.resumed(resume, "kfold", KFoldConfig)
    python_only = [
        what
        for what, label, passed in (
            ("model", config.model, given.model),
            ("loss", config.loss, given.loss),
            ("optimizer", config.optimizer, given.optimizer),
        )
        if label is not None and label.startswith(CALLABLE_PREFIX) and passed is None
    ]
    if python_only:
        raise DistmlError(
            f"{run.path}: its {' and '.join(python_only)} {'was' if len(python_only) == 1 else 'were'} given as a "
            "Python callable, which a run folder cannot rebuild; resume it from Python with the same "
            f"{' and '.join(python_only)}, or give a model as package.module:function",
            option="--resume",
        )
    if config.in_memory and given.data is None:
        raise DistmlError(
            f"{run.path}: its data were given as Python objects, which a run folder cannot reload; resume it from "
            "Python with the same data",
            option="--resume",
        )
    done = _load_done_folds(run)
    if len(done) == config.k and (run.path / FOLDS_FILE).is_file():
        return run, config, done
    run.check_free()  # a run still writing here is refused at once, not after Ray has started
    config.validate()
    for note in _check_checkpoints(run, config):
        log.info(note)
    if _is_cloud(config):
        storage.probe_cloud(config.storage)
    return run, config, done


def _is_cloud(config: KFoldConfig) -> bool:
    return config.storage is not None and storage.is_cloud(config.storage)


def _check_checkpoints(run: RunDir, config: KFoldConfig) -> list[str]:
    """Check a resumed run's checkpoints before anything starts: incomplete ones are skipped (one line each), an
    unreadable one is a DistmlError naming it and the way out. A cloud --storage's are checked as they are read."""
    if _is_cloud(config):
        return []
    groups = sorted((run.storage / "folds").glob("folds-*"))
    ddp_folds = sorted((run.storage / "train").glob("fold-*"))
    points = [checkpoints.fold_group_resume_point(g) for g in groups]
    points += [checkpoints.train_resume_point(f) for f in ddp_folds]
    return [note for point in points for note in point.skipped]


def _load(config: KFoldConfig, given: Given) -> Prepared:
    prepared = prepare(config, given)
    check_folds_possible(prepared.dataset, config.k)
    log.info(f"data: {prepared.dataset.description}")
    return prepared


def _split(dataset: Dataset, test: Dataset | None, config: KFoldConfig) -> tuple[SplitData, dict]:
    """The folds, and the dataset's summary for config.json (its digest reads every input once)."""
    assignment = fold_assignment(dataset.labels, config.k, config.seed)
    if test is None:
        return SplitData(dataset.inputs, dataset.labels, assignment), dataset.summary()
    return SplitData(dataset.inputs, dataset.labels, assignment, test.inputs, test.labels), dataset.summary()


def _groups(config: KFoldConfig, todo: list[int], plan: Plan, recipe: ModelRecipe) -> list[list[int]]:
    """The folds each trainer is handed at a time (several MLP folds train as one stacked model, on Adam and
    cross-entropy: with a user's loss or optimizer, a fold at a time)."""
    if not todo:
        return []
    return fold_groups(todo, 1 if recipe.custom_training else config.trial_size(len(todo), plan.concurrent_folds))


def _start_trainers(config: KFoldConfig, done: dict[int, dict], plan: Plan, recipe: ModelRecipe) -> list:
    """Fold trainers asked for as soon as Ray is up, as many as there are groups to train (none for DDP folds)."""
    if config.cluster.workers_per_fold > 1:
        return []
    count = min(plan.concurrent_folds, len(_groups(config, _todo(config, done), plan, recipe)))
    return fold_actors.start_trainers(count, plan, threads_share=config.model == "mlp")


def _claim(
    run: RunDir, config: KFoldConfig, loaded: Prepared, summary: dict, data: SplitData, plan: Plan, resume
) -> dict[int, dict]:
    """Under the run's lock: check that every node sees the folder, write the header of a new run (or check a
    resumed run's folds), and read the folds that finished (what was read before the lock may be stale)."""
    if not _is_cloud(config):  # on several nodes, a folder only the driver sees would scatter the checkpoints
        cluster.check_shared(run.path, option="--storage" if config.storage else "--out")
    if resume is None:
        RunDir.fresh(run.path)  # again under the lock: another run may have claimed the folder since
        extra = {"plan": plan.__dict__, "classes": list(loaded.dataset.classes), "parameters": loaded.parameters}
        python_only = [label for label in (config.model, config.loss, config.optimizer) if label is not None]
        extra["resumable"] = not (config.in_memory or any(x.startswith(CALLABLE_PREFIX) for x in python_only))
        run.write_header("kfold", config.to_dict(), summary, **extra)
        table = np.column_stack([np.arange(len(data.labels)), data.labels, data.assignment])
        write_atomic(
            run.path / ASSIGNMENT_FILE,
            lambda tmp: np.savetxt(tmp, table, fmt="%d", delimiter=",", header="index,label,fold", comments=""),
        )
    elif not np.array_equal(saved_assignment(run.path), data.assignment):
        raise DistmlError(f"{run.path}: the data or seed no longer give the saved folds", option="--resume")
    return _load_done_folds(run)


# ---- run ----


def _train(
    config: KFoldConfig, run: RunDir, data: SplitData, plan: Plan, trainers: list, recipe: ModelRecipe, done: dict
) -> list[str]:
    """Train the unfinished folds; each finished fold is written to folds/fold_N.json and added to `done` at once.
    Returns the errors of folds that failed for good."""
    todo = _todo(config, done)
    if not todo:
        return []
    log.info(
        f"running folds {todo} of {config.k}: {plan.concurrent_folds} trainers at a time, {plan.cpus_per_worker:g} CPU"
        + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
        + f" each, on {plan.nodes} node(s) with {plan.cluster_cpus:g} CPU and {plan.cluster_gpus:g} GPU"
    )

    def on_fold_done(result: dict) -> None:
        write_json(run.folds_dir / f"fold_{int(result['fold'])}.json", result)
        done[int(result["fold"])] = result
        log.info(
            f"fold {result['fold']}: finished, val_acc={result['val_accuracy']:.4f} "
            f"in {result['train_seconds']:.1f} s on {result['hostname']} ({result['device']})"
            + (f", attempt {result['attempts']}" if result["attempts"] > 1 else "")
        )

    threading.Thread(target=_import_report_modules, daemon=True).start()
    storage_path = run.ray_storage(config.storage)
    if trainers:
        groups = _groups(config, todo, plan, recipe)
        return fold_actors.run_groups(config, groups, trainers, data, plan, storage_path, recipe, on_fold_done)
    from distml.distributed import ddp  # Ray Tune and Train: seconds of imports only DDP folds need

    return ddp.run_folds(config, todo, data, plan, storage_path, recipe, on_fold_done)


def _todo(config: KFoldConfig, done: dict[int, dict]) -> list[int]:
    return [fold for fold in range(config.k) if fold not in done]


def _import_report_modules() -> None:
    for module in REPORT_MODULES:
        importlib.import_module(module)


# ---- report ----


def _report(run: RunDir, done: dict[int, dict], stop_ray: bool) -> tuple[pd.DataFrame, ...]:
    """Write the report; stopping a local Ray is a second or two of waiting, so it is written meanwhile."""
    if not stop_ray:
        return write_report(run, done)
    with ThreadPoolExecutor(max_workers=1) as pool:
        written = pool.submit(write_report, run, done)
        cluster.shutdown()
        return written.result()


def write_report(run: RunDir, done: dict[int, dict]) -> tuple[pd.DataFrame, ...]:
    """folds.csv, history.csv, summary.csv and the plots, from the finished folds' results."""
    from distml import plots, report  # pandas and matplotlib: see REPORT_MODULES

    rows = [{column: result.get(column) for column in report.FOLD_COLUMNS} for result in done.values()]
    history_rows = [
        {"fold": result["fold"], **epoch} for result in done.values() for epoch in json.loads(result["history_json"])
    ]
    folds = report.fold_table(rows)
    history = report.history_table(history_rows)
    summary = report.summary_table(folds)
    write_csv(run.path / FOLDS_FILE, folds)
    write_csv(run.path / HISTORY_FILE, history)
    write_csv(run.path / SUMMARY_FILE, summary)
    plots.fold_accuracy(folds, run.path / "fold_accuracy.png")
    plots.learning_curves(history, run.path / "learning_curves.png")
    return folds, history, summary


def _upload(run: RunDir, config: KFoldConfig) -> str | None:
    """With a cloud --storage, Ray wrote its trial state there already; the report joins it."""
    if not _is_cloud(config):
        return None
    uploaded_to = storage.upload(run.path, run.ray_storage(config.storage), skip=(run.storage.name,))
    log.info(f"report uploaded to {uploaded_to}")
    return uploaded_to


def _read_outcome(run: RunDir, config: KFoldConfig, started: float) -> KFoldOutcome:
    """The outcome of a finished run, read back from its files (nothing is rewritten)."""
    import pandas as pd  # see REPORT_MODULES

    folds = pd.read_csv(run.path / FOLDS_FILE)
    history = pd.read_csv(run.path / HISTORY_FILE)
    summary = pd.read_csv(run.path / SUMMARY_FILE)
    return KFoldOutcome(run.path, folds, history, summary, config.k, True, [], time.perf_counter() - started)


def saved_assignment(run_dir: Path) -> np.ndarray:
    """The validation fold of every example, as the run's fold_assignment.csv records it."""
    return np.loadtxt(run_dir / ASSIGNMENT_FILE, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)[:, 2]


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


def dataset_line(run_dir: Path) -> str:
    data = json.loads((Path(run_dir) / CONFIG_FILE).read_text())["dataset"]
    if "train_images" in data:  # MNIST says where its files came from
        return f"{data['source']} MNIST, {data['train_images']:,} training images ({data['location']})"
    return f"{data['source']} data, {data['examples']:,} examples ({data['location']})"
