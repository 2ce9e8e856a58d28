"""`distml kfold`: K-fold cross-validation from start to finish: prepare the run, train the folds on Ray, report."""

from __future__ import annotations

import base64
import importlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml import checkpoints, storage, tracking
from distml.atomic import write_atomic, write_json
from distml.config import CALLABLE_PREFIX, IN_MEMORY, KFoldConfig, check_track
from distml.datasets import Dataset, check_folds_possible
from distml.distributed import cluster, fold_actors
from distml.errors import DistmlError, Interrupted
from distml.folds import (
    SplitData,
    assignment_hash,
    fold_groups,
    given_fold_assignment,
    group_fold_assignment,
    read_assignment,
    read_groups,
    repeated_fold_assignment,
    stratified_subset,
    write_assignment,
)
from distml.progress import RunEnded, RunStarted, UnitEnded, publish, run_files
from distml.recipe import Given, ModelRecipe, Prepared, prepare
from distml.rundir import ASSIGNMENT_FILE, CONFIG_FILE, FOLDS_FILE, RunDir, fresh_run_folder, outputs_file

if TYPE_CHECKING:
    import pandas as pd

    from distml.distributed.cluster import Plan

log = logging.getLogger(__name__)

# pandas, scipy and matplotlib (the report's) load in a thread while the folds train, not before Ray starts: they
# are a second of imports on the way to the first epoch
REPORT_MODULES = ("distml.kfold_report", "pyarrow.csv")


class NoFoldFinished(RuntimeError):
    """Every fold the run trained failed or diverged: there is nothing to report (not bad input: exit status 1)."""

    def __init__(self, failures: list[str]):
        super().__init__("no fold finished; nothing to report" + (f" ({failures[0]})" if failures else ""))


@dataclass(frozen=True)
class KFoldOutcome:
    run_dir: Path
    folds: pd.DataFrame
    history: pd.DataFrame
    summary: pd.DataFrame
    splits: int  # folds over all repeats
    complete: bool
    failures: list[str]
    wall_seconds: float
    oof: pd.DataFrame  # every example's out-of-fold prediction, per repeat
    oof_scores: pd.DataFrame  # metric, value: over all out-of-fold predictions
    ensemble_scores: pd.DataFrame | None  # metric, value: the fold models' ensemble on the test set, if any
    uploaded_to: str | None = None  # the cloud URI the report was copied to (credentials redacted), if any


def run_kfold(
    config: KFoldConfig, resume: Path | None = None, given: Given = Given(), cluster_overrides: dict | None = None
) -> KFoldOutcome:
    """Cross-validate `config.model` on `config.data` and write the report into the run folder.

    `given`: the objects the Python API was handed where config.json can only name them (arrays, a torch Dataset,
    callables). With `resume`, the options come from that folder's config.json and only unfinished folds run; the
    `cluster_overrides` (ClusterConfig fields) replace the saved ones, and the address is only ever the override's.
    `config.track` records the run in an experiment tracker (this call's choice, with `resume` too).
    """
    check_track(config.track)
    with tracking.tracked(config.track):
        return _run_kfold(config, resume, given, cluster_overrides or {})


def _run_kfold(config: KFoldConfig, resume: Path | None, given: Given, cluster_overrides: dict) -> KFoldOutcome:
    started = time.perf_counter()
    run, config, done = _prepare(config, resume, given, cluster_overrides)
    if resume is not None and len(done) == config.splits and not _finished(done):
        raise NoFoldFinished(_divergences(done))  # every fold diverged, and none is trained again
    if resume is not None and len(done) == config.splits and (run.path / FOLDS_FILE).is_file():
        log.info(f"{run.path}: all {config.splits} folds already finished; nothing to do")
        return _read_outcome(run, config, started, done)
    loaded = _load(config, given)
    assignment, groups = _assign(config, loaded.dataset, given)
    _check_batch_size(config, assignment)
    log.info(f"data: {loaded.dataset.description}")
    with ThreadPoolExecutor(max_workers=1) as pool:  # Ray's start is mostly waiting: digest the data meanwhile
        summary = pool.submit(loaded.dataset.summary)
        started_ray = cluster.connect(config.cluster.address, quiet=True)
    shared = _split(loaded, assignment)
    try:
        plan = cluster.plan_on_cluster(config.cluster)
        # their processes start (and import torch) while we go on
        trainers = _start_trainers(config, done, plan, loaded.recipe)
        with run.lock():
            done = _claim(run, config, loaded, summary.result(), shared, groups, plan, resume)
            try:
                errors = _train(config, run, shared, plan, trainers, loaded.recipe, done)
                failures = _divergences(done) + errors
            except KeyboardInterrupt as stop:  # Ctrl-C, or a stop signal the CLI raises as one
                interrupted = Interrupted.of(stop, f"distml kfold --resume {run.path}", log)
                if not _finished(done):
                    raise interrupted from None
                failures = []
            if not _finished(done):
                raise NoFoldFinished(failures)
            report = _report(run, config, loaded, _finished(done), stop_ray=started_ray)
            started_ray = False
            uploaded_to = _upload(run, config)
    finally:
        if started_ray:
            cluster.shutdown()
    outcome = _outcome(run, config, report, failures, time.perf_counter() - started, uploaded_to)
    status = "failed" if failures else "finished" if outcome.complete else "interrupted"
    ended = RunEnded("kfold", str(run.path), status, outcome.summary.to_dict("records"), run_files(run.path))
    publish(log, f"{run.path}: {status}, {len(outcome.folds)} of {config.splits} folds", ended)
    return outcome


# ---- prepare ----


def _prepare(
    config: KFoldConfig, resume: Path | None, given: Given, cluster_overrides: dict
) -> tuple[RunDir, KFoldConfig, dict[int, dict]]:
    """The run folder, its options and the folds it has finished, checked before Ray starts."""
    if resume is None:
        config.validate()
        run = RunDir.fresh(fresh_run_folder("kfold", config.out, config.storage), option="--out")
        run.check_storage(config.storage)
        return run, config, {}
    run, saved, _ = RunDir.resumed(resume, "kfold", KFoldConfig, storage_given=config.storage)
    config = replace(saved, cluster=saved.cluster.with_overrides(**cluster_overrides))
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
    for what, label, passed in (("groups", config.groups, given.groups), ("folds", config.fold_file, given.folds)):
        if label == IN_MEMORY and passed is None:
            raise DistmlError(
                f"{run.path}: its {what} were given as a Python array; resume it from Python with the same {what}",
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
    run.check_storage(config.storage)
    for note in _check_checkpoints(run, config):
        log.info(note)
    return run, config, done


def _is_cloud(config: KFoldConfig) -> bool:
    return config.storage is not None and storage.is_cloud(config.storage)


def _check_checkpoints(run: RunDir, config: KFoldConfig) -> list[str]:
    """Check a resumed run's checkpoints before anything starts: incomplete ones are skipped (one line each), an
    unreadable one, or a fold group's that another run (or this one under other options) wrote, is a DistmlError
    naming it and the way out. A cloud --storage holds no incomplete ones, and Ray Train checks its own."""
    if _is_cloud(config):
        checkpoints.check_fold_groups(run.ray_storage(config.storage), checkpoints.run_stamp(run.run_id, config))
        return []
    groups = sorted((run.storage / "folds").glob("folds-*"))
    ddp_folds = sorted((run.storage / "train").glob("fold-*"))
    points = [checkpoints.fold_group_resume_point(g, checkpoints.run_stamp(run.run_id, config)) for g in groups]
    points += [checkpoints.train_resume_point(f) for f in ddp_folds]
    return [note for point in points for note in point.skipped]


def _load(config: KFoldConfig, given: Given) -> Prepared:
    # a --groups column of the data's CSV is no feature
    group_column = config.groups is not None and config.groups != IN_MEMORY and not Path(config.groups).is_file()
    prepared = prepare(config, given, ignore=(config.groups,) if group_column else ())
    limited = config.limit is not None and config.limit < prepared.dataset.size
    if limited:  # `train --limit`'s subset of the same seed; a resume draws it again, and its folds are checked
        keep = stratified_subset(prepared.dataset.labels, config.limit, config.seed)
        prepared = replace(prepared, dataset=prepared.dataset.subset(keep))
    try:
        check_folds_possible(prepared.dataset, config.k)
    except DistmlError as exc:
        if not limited:
            raise
        raise DistmlError(
            f"{exc.message} in a subset of {config.limit}; raise it or lower --k", option="--limit"
        ) from None
    return prepared


def check_data(config: KFoldConfig) -> None:
    """Load and check the data as run_kfold does before Ray starts (the subset, the folds, the batch size): for a
    caller that must know before other work starts, as the pipeline does before its first stage."""
    loaded = _load(config, Given())
    _check_batch_size(config, _assign(config, loaded.dataset, Given())[0])


def _assign(config: KFoldConfig, dataset: Dataset, given: Given) -> tuple[np.ndarray, np.ndarray | None]:
    """The (repeats, N) validation fold of every example, and the group of every example with groups; checked
    before Ray starts. `given` holds the Python API's arrays of folds or groups, where config.json names them."""
    if given.folds is not None:
        return given_fold_assignment(np.asarray(given.folds), dataset.labels, config.k, dataset.classes), None
    if config.fold_file is not None:
        return given_fold_assignment(Path(config.fold_file), dataset.labels, config.k, dataset.classes), None
    if given.groups is not None:
        groups = np.asarray(given.groups).astype(str)
    elif config.groups is not None:
        groups = _read_group_labels(config, dataset)
    else:
        return repeated_fold_assignment(dataset.labels, config.k, config.repeats, config.seed), None
    return group_fold_assignment(dataset.labels, groups, config.k, config.repeats, config.seed, dataset.classes), groups


def _check_batch_size(config: KFoldConfig, assignment: np.ndarray) -> None:
    """A batch larger than a fold's training part is a mistake (and stacked folds would allocate for it)."""
    largest_fold = max(int(np.bincount(row).max()) for row in assignment)
    smallest_training = assignment.shape[1] - largest_fold
    if config.batch_size > smallest_training:
        raise DistmlError(
            f"{config.batch_size} is more than the smallest fold's {smallest_training} training examples",
            option="--batch-size",
        )


def _read_group_labels(config: KFoldConfig, dataset: Dataset) -> np.ndarray:
    """--groups: a file of one label per example, or a column of the CSV the data come from."""
    path = Path(config.groups)
    if path.is_file():
        return read_groups(path, dataset.size)
    if not config.data.startswith("csv:") or dataset.rows is None:
        raise DistmlError(f"no file {path}, and the data are not a CSV file with such a column", option="--groups")
    import csv  # only a CSV's group column needs it

    with open(config.data[len("csv:") :], newline="") as f:
        reader = csv.DictReader(f)
        if config.groups not in (reader.fieldnames or []):
            raise DistmlError(
                f"no file {path}, and {config.data[len('csv:') :]} has no column {config.groups!r}", option="--groups"
            )
        column = [row[config.groups] for row in reader]
    return np.asarray(column, dtype=object)[list(dataset.rows)].astype(str)


def _split(loaded: Prepared, assignment: np.ndarray) -> SplitData:
    """What every trainer reads: the data, their folds and the test set."""
    dataset, test = loaded.dataset, loaded.test
    if test is None:
        return SplitData(dataset.inputs, dataset.labels, assignment)
    return SplitData(dataset.inputs, dataset.labels, assignment, test.inputs, test.labels)


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
    run: RunDir,
    config: KFoldConfig,
    loaded: Prepared,
    summary: dict,
    data: SplitData,
    groups: np.ndarray | None,
    plan: Plan,
    resume,
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
        extra["fold_assignment_hash"] = assignment_hash(data.assignment)
        run.write_header("kfold", config.to_dict(), summary, **extra)
        write_assignment(run.path / ASSIGNMENT_FILE, data.labels, data.assignment, groups)
    elif not (run.path / ASSIGNMENT_FILE).is_file():  # the first session ended before writing it
        write_assignment(run.path / ASSIGNMENT_FILE, data.labels, data.assignment, groups)
    elif not np.array_equal(read_assignment(run.path / ASSIGNMENT_FILE), data.assignment):
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
    header = json.loads((run.path / CONFIG_FILE).read_text())
    started = RunStarted(
        "kfold",
        str(run.path),
        [data.name(s) for s in todo],
        config.splits,
        config.epochs,
        header["options"],
        header["dataset"],
        resumed=bool(done),
    )
    publish(
        log,
        f"running folds {todo} of {config.splits}: {plan.concurrent_folds} trainers at a time, "
        f"{plan.cpus_per_worker:g} CPU"
        + (f" + {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else "")
        + f" each, on {plan.nodes} node(s) with {plan.cluster_cpus:g} CPU and {plan.cluster_gpus:g} GPU",
        started,
    )

    def on_fold_done(result: dict, outputs: str | None) -> None:
        split = int(result["split"])
        if outputs is not None:  # a fold that diverged has no predictions
            write_atomic(outputs_file(run.folds_dir, split), lambda tmp: tmp.write_bytes(base64.b64decode(outputs)))
        write_json(run.folds_dir / f"fold_{split}.json", result)  # last: the fold counts as done once it is there
        done[split] = result
        if result.get("diverged"):  # its bar leaves the live display; a tracker closes its run as failed
            publish(log, result["error"], UnitEnded(data.name(split), split, result))
            return
        publish(
            log,
            f"{data.name(split)}: finished, val_acc={result['val_accuracy']:.4f} "
            f"in {result['train_seconds']:.1f} s on {result['hostname']} ({result['device']})"
            + (f", attempt {result['attempts']}" if result["attempts"] > 1 else ""),
            UnitEnded(data.name(split), split, result),
        )

    threading.Thread(target=_import_report_modules, daemon=True).start()
    storage_path = run.ray_storage(config.storage)
    stamp = checkpoints.run_stamp(run.run_id, config)
    if trainers:
        groups = _groups(config, todo, plan, recipe)
        return fold_actors.run_groups(config, groups, trainers, data, plan, storage_path, recipe, on_fold_done, stamp)
    from distml.distributed import ddp  # Ray Tune and Train: seconds of imports only DDP folds need

    return ddp.run_folds(config, todo, data, plan, storage_path, recipe, on_fold_done, stamp)


def _todo(config: KFoldConfig, done: dict[int, dict]) -> list[int]:
    return [split for split in range(config.splits) if split not in done]


def _finished(done: dict[int, dict]) -> dict[int, dict]:
    """The folds done that the report is made of: all but those whose training diverged (done, but never retrained)."""
    return {split: result for split, result in done.items() if not result.get("diverged")}


def _divergences(done: dict[int, dict]) -> list[str]:
    """A line for each fold whose training diverged: the run's failures, on every resume too."""
    return [done[split]["error"] for split in sorted(done) if done[split].get("diverged")]


def _import_report_modules() -> None:
    for module in REPORT_MODULES:
        importlib.import_module(module)


# ---- report ----


def _report(run: RunDir, config: KFoldConfig, loaded: Prepared, done: dict[int, dict], stop_ray: bool):
    """Write the report; stopping a local Ray is a second or two of waiting, so it is written meanwhile."""
    from distml.kfold_report import write_report  # pandas and matplotlib: see REPORT_MODULES

    arguments = (run.path, config, loaded.dataset, loaded.test, loaded.recipe, done)
    if not stop_ray:
        return write_report(*arguments)
    with ThreadPoolExecutor(max_workers=1) as pool:
        written = pool.submit(write_report, *arguments)
        cluster.shutdown()
        return written.result()


def _upload(run: RunDir, config: KFoldConfig) -> str | None:
    """With a cloud --storage, Ray wrote its trial state there already; the report joins it."""
    if not _is_cloud(config):
        return None
    uploaded_to = storage.redacted(storage.upload(run.path, run.ray_storage(config.storage), skip=(run.storage.name,)))
    log.info(f"report uploaded to {uploaded_to}")
    return uploaded_to


def _read_outcome(run: RunDir, config: KFoldConfig, started: float, done: dict[int, dict]) -> KFoldOutcome:
    """The outcome of a finished run, read back from its files (nothing is rewritten)."""
    from distml.kfold_report import read_report  # see REPORT_MODULES

    return _outcome(run, config, read_report(run.path, config), _divergences(done), time.perf_counter() - started)


def _outcome(run: RunDir, config: KFoldConfig, report, failures: list[str], wall: float, uploaded_to=None):
    complete = len(report.folds) == config.splits
    return KFoldOutcome(
        run.path,
        report.folds,
        report.history,
        report.summary,
        config.splits,
        complete,
        failures,
        wall,
        report.oof,
        report.oof_scores,
        report.ensemble_scores,
        uploaded_to,
    )


def saved_assignment(run_dir: Path) -> np.ndarray:
    """The validation fold of every example, as the run's fold_assignment.csv records it: (N,) for one repeat,
    (R, N) for R repeats."""
    assignment = read_assignment(Path(run_dir) / ASSIGNMENT_FILE)
    return assignment[0] if len(assignment) == 1 else assignment


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
        done[int(result.get("split", result["fold"]))] = result  # a run from before repeats: split = fold
    return done


def dataset_line(run_dir: Path) -> str:
    data = json.loads((Path(run_dir) / CONFIG_FILE).read_text())["dataset"]
    if "train_images" in data:  # MNIST says where its files came from
        return f"{data['source']} MNIST, {data['train_images']:,} training images ({data['location']})"
    return f"{data['source']} data, {data['examples']:,} examples ({data['location']})"
