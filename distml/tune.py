"""`distml tune`: a hyperparameter search whose every trial is a whole K-fold run, from start to finish: data, folds,
the model check, trials on Ray Tune (distml.distributed.cv_tune), tables, plot, best configuration, final model."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from distml import checkpoints, run_report, storage, tracking
from distml.atomic import write_csv, write_json
from distml.config import CALLABLE_PREFIX, HoldoutConfig, TuneConfig, check_track
from distml.datasets import check_folds_possible
from distml.distributed import cluster, cv_tune
from distml.distributed import tune as tune_trials
from distml.errors import DistmlError, Interrupted
from distml.folds import SplitData, assignment_hash, fold_assignment, stratified_subset
from distml.progress import RunEnded, RunStarted, publish, run_files, score_rows
from distml.recipe import Given, Prepared, prepare
from distml.rundir import CONFIG_FILE, RunDir, fresh_run_folder
from distml.search_space import OPTION, adam_with_weight_decay, model_params, space_params, trial_training

log = logging.getLogger(__name__)

TRIALS_FILE, BEST_FILE, PLOT_FILE = run_report.SWEEP_TRIALS_FILE, run_report.SWEEP_BEST_FILE, run_report.TUNE_PLOT
TRIAL_FOLDS_FILE = "trial_folds.csv"
OUTER_FILE = run_report.OUTER_FILE  # nested runs: one row per outer fold
OUTER_SUMMARY_FILE = run_report.OUTER_SUMMARY_FILE  # nested runs: the outer estimate and the stability of the choices
FINAL_DIR = "final"  # --then-train's run folder, as `distml train` writes one
SCORES = tune_trials.SCORES
FOLD_COLUMNS = ["trial", "fold", *tune_trials.FOLD_COLUMNS]


@dataclass(frozen=True)
class TuneOutcome:
    run_dir: Path
    trials: pd.DataFrame  # one row per trial, best first
    trial_folds: pd.DataFrame  # trial x fold x epoch
    best: dict | None
    complete: bool
    failures: list[str]
    wall_seconds: float
    model_dir: Path | None = None
    outer: pd.DataFrame | None = None  # nested runs: one row per outer fold
    estimate: dict | None = None  # nested runs: outer.json


# ---- tables ----


def _trial_row(record, config: TuneConfig) -> dict:
    last = record.history[-1] if record.history else {}
    planned = int(record.params.get("epochs", config.epochs))
    finished = record.status == "TERMINATED"
    diverged = record.diverged is not None
    status = "diverged" if diverged else {"TERMINATED": "done", "ERROR": "failed"}.get(record.status, "unfinished")
    scores = {}
    for score in SCORES:
        scores[f"mean_{score}"] = last.get(score, math.nan)
        scores[f"std_{score}"] = last.get(f"std_{score}", math.nan)
        scores[f"corrected_ci95_low_{score}"] = last.get(f"ci_low_{score}", math.nan)
        scores[f"corrected_ci95_high_{score}"] = last.get(f"ci_high_{score}", math.nan)
    return {
        "trial": record.trial_id,
        **record.params,
        **scores,
        "epochs_run": len(record.history),  # those before a divergence
        "stopped_early": finished and not diverged and len(record.history) < planned,
        "diverged": diverged,
        "seconds": last.get("train_seconds", 0.0),
        "attempts": record.attempts,
        "status": status,
        "stacked": record.stacked,
        "error": record.error or record.diverged or "",
    }


def trial_table(records: list, config: TuneConfig) -> pd.DataFrame:
    """One row per trial, ranked: by the cross-fold mean of the metric at its last epoch, best first; trials that
    diverged, or reported no epoch, last."""
    frame = pd.DataFrame([_trial_row(r, config) for r in records])
    if frame.empty:
        return frame
    key = f"mean_{config.metric}"
    frame["_unscored"] = frame["diverged"] | frame[key].isna()
    ranked = frame.sort_values(["_unscored", key], ascending=[True, config.mode == "min"], kind="stable")
    return ranked.drop(columns="_unscored").reset_index(drop=True)


def folds_table(records: list) -> pd.DataFrame:
    rows = [{"trial": r.trial_id, **row} for r in records for row in r.folds]
    return pd.DataFrame(rows, columns=FOLD_COLUMNS).sort_values(["trial", "fold", "epoch"]).reset_index(drop=True)


def best_configuration(trials: pd.DataFrame, config: TuneConfig) -> dict | None:
    """best.json: the first trial of the ranked table that reported an epoch and did not diverge (None if none)."""
    scored = trials[(trials["epochs_run"] > 0) & ~trials["diverged"]] if not trials.empty else trials
    if scored.empty:
        return None
    row = scored.iloc[0]
    metric = config.metric
    return {
        "trial": row["trial"],
        "params": {name: _plain(row[name]) for name in config.params},
        "metric": metric,
        "value": float(row[f"mean_{metric}"]),
        "std": float(row[f"std_{metric}"]),
        "corrected_ci95_low": float(row[f"corrected_ci95_low_{metric}"]),
        "corrected_ci95_high": float(row[f"corrected_ci95_high_{metric}"]),
        "epochs": int(row["epochs_run"]),
        "k": config.k,
        "trials_done": int((trials["status"] == "done").sum()),
        "trials": config.trials,
    }


def _plain(value):
    """A table cell as JSON writes it: numpy scalars as Python numbers."""
    return value.item() if hasattr(value, "item") else value


def _write_results(folder: Path, config: TuneConfig, records: list) -> tuple[pd.DataFrame, dict | None, bool, list]:
    """trials.csv, trial_folds.csv, the plot and best.json; returns (trials, best, complete, failures)."""
    trials = trial_table(records, config)
    write_csv(folder / TRIALS_FILE, trials)
    write_csv(folder / TRIAL_FOLDS_FILE, folds_table(records))
    best = best_configuration(trials, config)
    # an interrupted search may not have created all its trials yet
    complete = len(trials) == config.trials and bool((trials["status"] != "unfinished").all())
    failures = [f"trial {t.trial}: {t.error}" for t in trials.itertuples() if t.status == "failed"]
    if best is not None:
        from distml import plots  # matplotlib's import is slow: only once there is something to draw

        scored = trials[(trials["epochs_run"] > 0) & ~trials["diverged"]]
        plots.metric_vs_params(scored, space_params(config.params), config.metric, config.k, folder / PLOT_FILE)
        write_json(folder / BEST_FILE, {**best, "complete": complete})
    return trials, best, complete, failures


# ---- the whole run ----


def space_specs(space: dict) -> dict[str, str]:
    """A Python caller's {name: Tune distribution or "DIST:ARGS"} as the {name: "DIST:ARGS"} a config keeps, each
    checked as `--param` is."""
    if not isinstance(space, dict):
        raise DistmlError(f"must be a dict of name: distribution, got {type(space).__name__}", option=OPTION)
    try:
        specs = {str(name): cv_tune.spec_of(value) for name, value in space.items()}
    except TypeError as exc:
        raise DistmlError(str(exc), option=OPTION) from None
    space_params(specs)
    return specs


def run_tune(
    config: TuneConfig, resume: Path | None = None, given: Given = Given(), cluster_overrides: dict | None = None
) -> TuneOutcome:
    """Search `config.params` with a K-fold run per trial and write trials.csv, trial_folds.csv, the plot and
    best.json (and, with `then_train`, the best configuration trained and exported under final/).

    `given`: the objects the Python API was handed (see recipe.Given). With `resume`, the options come from that
    folder's config.json, the `cluster_overrides` replacing the saved ones; finished trials are kept, the others carry
    on from their last epoch checkpoint. `config.track` records the run in an experiment tracker.
    """
    check_track(config.track)
    with tracking.tracked(config.track):
        return _run_tune(config, resume, given, cluster_overrides or {})


def _load(config: TuneConfig, given: Given) -> tuple[Prepared, SplitData]:
    """The data, the recipe (one model built and run, with every searched model keyword) and the folds, before Ray
    starts."""
    prepared = prepare(config, given)
    if config.limit is not None and config.limit < prepared.dataset.size:
        keep = stratified_subset(prepared.dataset.labels, config.limit, config.seed)
        prepared = replace(prepared, dataset=prepared.dataset.subset(keep))
    dataset = prepared.dataset
    check_folds_possible(dataset, config.k)
    keywords = {name: param.example() for name, param in model_params(space_params(config.params)).items()}
    if keywords:
        recipe = replace(prepared.recipe, model_kwargs={**prepared.recipe.model_kwargs, **keywords})
        try:
            recipe.check(dataset.inputs)
        except DistmlError as exc:
            raise DistmlError(exc.message, option=OPTION) from None
    outer_k = config.outer_k or config.k  # a plain search's folds are its trials' folds
    check_folds_possible(dataset, outer_k)
    assignment = fold_assignment(dataset.labels, outer_k, config.seed)
    data = SplitData(dataset.inputs, dataset.labels, assignment)  # trials score no test set: --then-train's model does
    trial_data = [data] if config.outer_k is None else [inner_split(data, o, config) for o in range(outer_k)]
    smallest_training = min(len(part.labels) - int(np.bincount(part.assignment).max()) for part in trial_data)
    searched = space_params(config.params).get("batch_size")
    largest_batch = config.batch_size if searched is None else max(searched.candidates())
    if largest_batch > smallest_training:
        raise DistmlError(
            f"{largest_batch} is more than the smallest fold's {smallest_training} training examples",
            option="--param" if "batch_size" in config.params else "--batch-size",
        )
    return prepared, data


def inner_split(data: SplitData, outer_fold: int, config: TuneConfig) -> SplitData:
    """The training part of an outer fold, with its inner folds: StratifiedKFold(k, shuffle=True, random_state=seed)'s
    on that part, in index order."""
    rows = data.indices(outer_fold)[0]
    labels = data.labels[rows]
    try:
        inner = fold_assignment(labels, config.k, config.seed)
    except DistmlError as exc:
        raise DistmlError(f"{exc.message} in the training part of outer fold {outer_fold}", option="--k") from None
    return SplitData(np.ascontiguousarray(data.inputs[rows]), labels, inner)


def _check_resumable(run: RunDir, config: TuneConfig, given: Given) -> None:
    if config.in_memory and given.data is None:
        raise DistmlError(
            f"{run.path}: its data were given as Python objects, which a run folder cannot reload; resume it from "
            "Python with the same data",
            option="--resume",
        )
    if config.model.startswith(CALLABLE_PREFIX) and given.model is None:
        raise DistmlError(
            f"{run.path}: its model was given as a Python callable, which a run folder cannot rebuild; resume it from "
            "Python with the same model",
            option="--resume",
        )


def _run_tune(config: TuneConfig, resume: Path | None, given: Given, overrides: dict) -> TuneOutcome:
    started = time.perf_counter()
    saved = None
    if resume is not None:
        run, config, saved = RunDir.resumed(resume, "tune", TuneConfig, storage_given=config.storage)
        config = replace(config, cluster=config.cluster.with_overrides(**overrides))
        _check_resumable(run, config, given)
        run.check_free()
    config.validate()
    if resume is None:
        run = RunDir.fresh(fresh_run_folder("tune", config.out, config.storage), option="--out")
    cloud = config.storage is not None and storage.is_cloud(config.storage)
    run.check_storage(config.storage)
    prepared, data = _load(config, given)
    log.info(f"data: {prepared.dataset.description}")
    started_ray = cluster.connect(config.cluster.address, quiet=True)
    try:
        plan = cluster.plan_on_cluster(config.cluster)
        with run.lock():
            if not cloud:
                cluster.check_shared(run.path, option="--storage" if config.storage else "--out")
            digest = assignment_hash(data.assignment)
            if saved is None:
                RunDir.fresh(run.path)  # again under the lock: another run may have claimed the folder since
                resumable = not (config.in_memory or config.model.startswith(CALLABLE_PREFIX))
                summary = prepared.dataset.summary()
                extra = {"classes": list(prepared.dataset.classes), "fold_assignment_hash": digest}
                run.write_header("tune", config.to_dict(), summary, plan=plan.__dict__, resumable=resumable, **extra)
            elif saved.get("fold_assignment_hash") != digest:
                raise DistmlError(f"{run.path}: the data or seed no longer give the saved folds", option="--resume")
            _announce(run, config, plan, resumed=saved is not None)
            if config.outer_k is None:
                outcome = _search(run, config, prepared, data, plan, given)
            else:
                outcome = _nested_search(run, config, prepared, data, plan)
            run_report.build(run.path)
            if cloud:
                uploaded_to = storage.upload(run.path, run.ray_storage(config.storage), skip=(run.storage.name,))
                log.info(f"results uploaded to {storage.redacted(uploaded_to)}")
    except KeyboardInterrupt as stop:  # Ctrl-C (Tune ends the trials and saves its state), or a stop signal
        resume_with = f"distml tune --resume {run.path}" if (run.path / CONFIG_FILE).is_file() else None
        raise Interrupted.of(stop, resume_with, log) from None
    finally:
        if started_ray:
            cluster.shutdown()
    status = "finished" if outcome.complete else "failed" if outcome.failures else "interrupted"
    if outcome.estimate is not None:
        scores = {f"outer_{config.metric}": outcome.estimate["mean"]}
    else:
        scores = {} if outcome.best is None else {f"best_{config.metric}": outcome.best["value"]}
    publish(
        log, f"{run.path}: {status}", RunEnded("tune", str(run.path), status, score_rows(scores), run_files(run.path))
    )
    return replace(outcome, wall_seconds=time.perf_counter() - started)


def _search(run: RunDir, config: TuneConfig, prepared: Prepared, data: SplitData, plan, given: Given) -> TuneOutcome:
    """The search on all the data, its tables, and with --then-train the final model."""
    stamp = checkpoints.run_stamp(run.run_id, config)
    records = cv_tune.run_trials(config, data, prepared.recipe, plan, run.ray_storage(config.storage), stamp)
    trials, best, complete, failures = _write_results(run.path, config, records)
    model_dir = None
    if config.then_train and complete and best is not None:
        model_dir = _then_train(run, config, best, given)
        write_json(run.path / BEST_FILE, {**best, "complete": complete, "model": str(model_dir)})
    return TuneOutcome(run.path, trials, folds_table(records), best, complete, failures, 0.0, model_dir)


def _nested_search(run: RunDir, config: TuneConfig, prepared: Prepared, data: SplitData, plan) -> TuneOutcome:
    """Nested cross-validation: the whole search on the training part of each outer fold (its tables in outer_N/),
    the configuration it chose retrained on that part for the epochs its trial ran and scored on the outer fold;
    outer.csv (a row per outer fold) and outer.json (the outer estimate and the stability of the choices)."""
    rows, all_trials, all_folds, failures, complete = [], [], [], [], True
    for outer in range(config.outer_k):
        inner = inner_split(data, outer, config)
        folder = run.path / f"outer_{outer}"
        folder.mkdir(exist_ok=True)
        log.info(f"outer fold {outer}: the search on its training part ({len(inner.labels):,} examples)")
        where = storage.join(run.ray_storage(config.storage), f"outer_{outer}")
        records = cv_tune.run_trials(
            config, inner, prepared.recipe, plan, where, checkpoints.run_stamp(run.run_id, config)
        )
        trials, best, done, fold_failures = _write_results(folder, config, records)
        all_trials.append(trials.assign(outer_fold=outer))
        all_folds.append(folds_table(records).assign(outer_fold=outer))
        failures += [f"outer fold {outer}: {failure}" for failure in fold_failures]
        complete = complete and done and best is not None
        if best is None:
            continue
        holdout = SplitData(data.inputs, data.labels, (data.assignment == outer).astype(np.int64))
        scored = cv_tune.fit_outer(config, best["params"], best["epochs"], holdout, prepared.recipe, plan)
        rows.append(
            {
                "outer_fold": outer,
                "train_size": len(inner.labels),
                "test_size": int((data.assignment == outer).sum()),
                **best["params"],
                f"inner_mean_{config.metric}": best["value"],
                "epochs": best["epochs"],
                **{score: scored[score] for score in SCORES},
                "diverged": scored.get("diverged", ""),
            }
        )
        shown = "diverged" if scored.get("diverged") else f"{config.metric} {scored[config.metric]:.4f}"
        log.info(f"outer fold {outer}: chose {best['params']}, {shown} on the outer fold")
    outer_table = pd.DataFrame(rows)
    write_csv(run.path / OUTER_FILE, outer_table)
    estimate = outer_estimate(outer_table, config) if len(rows) else None
    if estimate is not None:
        write_json(run.path / OUTER_SUMMARY_FILE, {**estimate, "complete": complete})
    return TuneOutcome(
        run.path,
        pd.concat(all_trials, ignore_index=True),
        pd.concat(all_folds, ignore_index=True),
        None,
        complete,
        failures,
        0.0,
        outer=outer_table,
        estimate=estimate,
    )


def outer_estimate(outer: pd.DataFrame, config: TuneConfig) -> dict:
    """The outer folds' mean of the metric with its corrected 95% interval, and how stable the choices were: for a
    choice, the share of outer folds that chose its most common value; for a number, the spread (std) of the chosen
    values, of their log10 for a log-uniform one."""
    from distml.stats import corrected_interval  # scipy: only once there are outer scores

    scores = outer[config.metric].dropna().astype(float)
    mean, low, high = corrected_interval(scores, outer["train_size"].mean(), outer["test_size"].mean())
    stability = {}
    for name, param in space_params(config.params).items():
        chosen = outer[name].tolist()
        if param.kind == "choice":
            texts = [json.dumps(_plain(value)) for value in chosen]
            most = max(texts, key=texts.count)
            stability[name] = {"most_common": json.loads(most), "share": texts.count(most) / len(texts)}
        else:
            values = np.log10(np.asarray(chosen, dtype=float)) if param.log else np.asarray(chosen, dtype=float)
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            stability[name] = {"spread": spread, "of": "log10 values" if param.log else "values"}
    return {
        "metric": config.metric,
        "outer_k": config.outer_k,
        "mean": mean,
        "std": float(scores.std(ddof=1)) if len(scores) > 1 else math.nan,
        "corrected_ci95_low": low,
        "corrected_ci95_high": high,
        "outer_folds_scored": len(scores),
        "chosen": [{name: _plain(row[name]) for name in config.params} for _, row in outer.iterrows()],
        "stability": stability,
    }


def _announce(run: RunDir, config: TuneConfig, plan, resumed: bool) -> None:
    header = json.loads((run.path / CONFIG_FILE).read_text())
    space = ", ".join(f"{name}={spec}" for name, spec in config.params.items())
    scheduler = (
        f"ASHA on the cross-fold mean of {config.metric} (grace {config.grace_period}, reduction "
        f"{config.reduction_factor:g})"
        if config.scheduler == "asha"
        else "no early stopping"
    )
    nested = "" if config.outer_k is None else f"on the training part of each of {config.outer_k} outer folds, "
    publish(
        log,
        f"{nested}{config.trials} trials of {config.k} folds each over {space}, up to {config.max_epochs} epochs, "
        f"{scheduler}; {plan.concurrent_folds} trial(s) at a time",
        RunStarted(
            "tune",
            str(run.path),
            [f"trial {number}" for number in range(config.trials)],
            config.trials,
            config.max_epochs,
            header["options"],
            header["dataset"],
            resumed,
        ),
    )


def _then_train(run: RunDir, config: TuneConfig, best: dict, given: Given) -> Path:
    """The best configuration trained as `distml train` trains (a stratified validation holdout for its curves) for
    the epochs the best trial ran, tested and exported into the run's final/ folder."""
    from distml.holdout import run_train  # torch: only when a final model is trained

    training = trial_training(best["params"])
    settings = {"batch_size": config.batch_size, "lr": config.lr, **training.settings, "epochs": best["epochs"]}
    fields = {name: getattr(config, name) for name in ("model", "data", "target", "x_key", "y_key", "resize")}
    fields.update(normalize=config.normalize, test_data=config.test_data, lr_schedule=config.lr_schedule)
    optimizer = None
    if training.weight_decay is not None:
        optimizer = partial(adam_with_weight_decay, weight_decay=training.weight_decay)
    holdout = HoldoutConfig(
        **fields,
        **settings,
        seed=config.seed,
        model_kwargs={**config.model_kwargs, **training.model_kwargs},
        optimizer=None if optimizer is None else f"{CALLABLE_PREFIX}adam(weight_decay={training.weight_decay:g})",
        limit=config.limit,
        data_dir=config.data_dir,
        out=run.path / FINAL_DIR,
    )
    log.info(f"final model: {best['params']} for {best['epochs']} epoch(s), trained as `distml train` trains")
    outcome = run_train(holdout, replace(given, optimizer=optimizer))
    return outcome.run_dir / "model"
