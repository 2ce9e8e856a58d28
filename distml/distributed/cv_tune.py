"""Ray Tune trials that are whole K-fold runs: each trial trains all k folds of its configuration in its own process
(stacked as one model when the engine can stack it, else a fold at a time, epoch by epoch) and reports after every
epoch the cross-fold mean of every score with its corrected interval; ASHA decides on that mean, and only ever sees
the trial's own validation folds."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import ray
from ray import tune

from distml import storage
from distml.checkpoints import STATE_FILE, Stamp
from distml.config import TuneConfig
from distml.distributed.cluster import Plan, await_task
from distml.distributed.tune import (
    FOLD_COLUMNS,
    FeasibilityStopper,
    FoldStates,
    TrialProgress,
    cross_fold,
    fit_tuner,
    trial_unit,
    trials_run_config,
)
from distml.distributed.worker import (
    device_for,
    fold_index,
    options_for_ray,
    restore_checkpoint,
    save_checkpoint,
    ship_model_code,
    tensors,
)
from distml.folds import SplitData
from distml.progress import FOLDS_KEY, UnitEnded, publish, publish_epoch
from distml.recipe import ModelRecipe
from distml.search_space import Param, adam_with_weight_decay, space_params, trial_training

log = logging.getLogger(__name__)


def domain(param: Param):
    """The Ray Tune distribution of a parsed parameter (randint's HIGH is inclusive, Tune's exclusive)."""
    if param.kind == "loguniform":
        return tune.loguniform(param.low, param.high)  # ray:
    if param.kind == "uniform":
        return tune.uniform(param.low, param.high)  # ray:
    if param.kind == "randint":
        return tune.randint(int(param.low), int(param.high) + 1)  # ray:
    return tune.choice(list(param.values))  # ray:


def spec_of(value) -> str:
    """A Python caller's Tune distribution (or DIST:ARGS text) as the DIST:ARGS text config.json keeps."""
    from ray.tune.search import sample  # ray:

    if isinstance(value, str):
        return value
    if isinstance(value, sample.Categorical):
        return "choice:" + ",".join(json.dumps(v) for v in value.categories)
    if isinstance(value, sample.Integer) and isinstance(value.get_sampler(), sample.Uniform):
        return f"randint:{value.lower}:{value.upper - 1}"
    if isinstance(value, sample.Float) and isinstance(value.get_sampler(), sample.LogUniform | sample.Uniform):
        kind = "loguniform" if isinstance(value.get_sampler(), sample.LogUniform) else "uniform"
        return f"{kind}:{value.lower!r}:{value.upper!r}"
    raise TypeError(
        f"{value!r} is not a distribution distml tunes: give tune.loguniform, tune.uniform, tune.randint, tune.choice "
        "or 'DIST:ARGS' text"
    )


def _trial_recipe(recipe: ModelRecipe, model_kwargs: dict, weight_decay: float | None) -> ModelRecipe:
    optimizer = recipe.optimizer
    if weight_decay is not None:
        optimizer = partial(adam_with_weight_decay, weight_decay=weight_decay)
    return replace(recipe, model_kwargs={**recipe.model_kwargs, **model_kwargs}, optimizer=optimizer)


def cv_trial(config: dict, data_box: tuple, stamp: Stamp | None) -> None:
    """One Tune trial: all k folds of the sampled configuration, reporting (and checkpointing, with the run's `stamp`)
    after every epoch. A fold whose loss stops being finite makes the trial diverged: it reports that once, and
    ends."""
    import torch  # the trial's process only: the driver schedules

    from distml.models import can_stack
    from distml.train import Diverged, Divergence, fit, fit_group, new_group_state, new_state

    options = TuneConfig.from_dict(config["tune"])
    training = trial_training(config["params"])
    settings = replace(options.train_settings, **training.settings)
    torch.set_num_threads(max(1, int(options.cluster.cpus_per_worker)))
    device = device_for(float(config["gpus_per_worker"]))
    data: SplitData = ray.get(data_box[0])  # ray: zero-copy on the same node
    recipe = _trial_recipe(ray.get(data_box[1]), training.model_kwargs, training.weight_decay)  # ray:
    images, labels = tensors(data, device)
    folds = list(range(data.k))
    train_indices, val_indices = (
        list(part) for part in zip(*(fold_index(data, f, device) for f in folds), strict=True)
    )
    sizes = (float(np.mean([len(i) for i in train_indices])), float(np.mean([len(i) for i in val_indices])))
    stacked = can_stack(recipe.model) and not recipe.custom_training
    if stacked:
        stats = [recipe.normalization(images, index) for index in train_indices]
        state = new_group_state(settings, folds, device, recipe.build, None if stats[0] is None else stats)
    else:
        builders = [partial(recipe.for_fold, images, index) for index in train_indices]
        state = FoldStates([new_state(settings, f, device, builders[f], recipe.optimizer, recipe.loss) for f in folds])
    checkpoint = tune.get_checkpoint()  # ray: set when Tune retries this trial, or resumes an interrupted search
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            restore_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)

    def train_epoch(epoch: int) -> list:
        """Every fold up to `epoch`: each one's last EpochRecord, or its Divergence (a fold at a time, the folds after
        a diverged one are left out)."""
        if stacked:
            vals = fit_group(state, settings, images, labels, train_indices, val_indices, until=epoch)
            return [val if isinstance(val, Divergence) else state.histories[g][-1] for g, val in enumerate(vals)]
        records = []
        for f, fold_state in enumerate(state.states):
            try:
                fit(fold_state, settings, images, labels, train_indices[f], val_indices[f], until=epoch)
            except Diverged as stop:
                return [*records, stop.divergence]
            records.append(fold_state.history[-1])
        return records

    for epoch in range(state.epochs_done + 1, settings.epochs + 1):
        records = train_epoch(epoch)
        diverged = [f"fold {f} {r}" for f, r in enumerate(records) if isinstance(r, Divergence)]
        if diverged:
            # ray: Tune wants the metric in every result; without an epoch, ASHA leaves this one out
            tune.report({"diverged": "; ".join(diverged), options.metric: None})
            return
        fold_rows = [{"fold": f, **{key: getattr(r, key) for key in FOLD_COLUMNS}} for f, r in enumerate(records)]
        metrics = {
            "epoch": epoch,
            **cross_fold(records, sizes),
            "train_seconds": state.train_seconds,
            "stacked": stacked,
            FOLDS_KEY: json.dumps(fold_rows),
        }
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, str(Path(folder) / STATE_FILE), stamp)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))  # ray:


def _label(trial) -> str:
    shown = ", ".join(f"{name}={_short(value)}" for name, value in trial.config["params"].items())
    return f"trial {trial.trial_id} ({shown})"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _progress(epochs: int, metric: str) -> TrialProgress:
    """Each epoch's cross-fold means as the epoch line; each trial's end, stopped early or diverged, in one line."""

    def on_result(trial, result: dict) -> None:
        unit, number = trial_unit(trial)
        if result.get("diverged"):
            ended = UnitEnded(unit, number, {**trial.config["params"], "diverged": True})
            publish(log, f"{_label(trial)}: {result['diverged']}", ended)
            return
        publish_epoch(log, unit, number, result, epochs, label=f"{_label(trial)} cross-fold mean")

    def on_complete(trial) -> None:
        result = trial.last_result or {}
        if result.get("diverged"):
            return
        done = result.get("epoch", 0)
        planned = int(trial.config["params"].get("epochs", epochs))
        how = "finished" if done >= planned else f"stopped early by ASHA after {done} epoch(s)"
        unit, number = trial_unit(trial)
        scores = {
            key: result[key] for key in ("epoch", metric, f"ci_low_{metric}", f"ci_high_{metric}") if key in result
        }
        ended = UnitEnded(unit, number, {**trial.config["params"], **scores, "stopped_early": done < planned})
        mean = f": {metric} {result[metric]:.4f} (cross-fold mean)" if metric in result else ""
        publish(log, f"{_label(trial)}: {how}{mean}", ended)

    return TrialProgress(_label, on_result, on_complete)


@dataclass(frozen=True)
class CVTrialRecord:
    """One trial as Tune left it: its sampled values, status, every epoch's cross-fold scores and every fold's."""

    trial_id: str
    params: dict
    status: str  # Tune's: TERMINATED (finished or stopped early), ERROR, or PENDING/PAUSED when interrupted
    attempts: int
    history: list[dict]  # per epoch: the cross-fold means, stds and intervals
    folds: list[dict]  # per fold and epoch: FOLD_COLUMNS
    error: str | None
    diverged: str | None
    stacked: bool | None


def _search(config: TuneConfig, concurrent: int):
    """How configurations are drawn, `concurrent` trials at a time: at random (seeded: a rerun draws the same ones), or
    by Optuna's TPE (seeded too), which proposes each new trial from the cross-fold means of those that ended."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter  # ray:

    if config.search == "random":
        return BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrent)  # ray:
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch  # ray:

    sampler = TPESampler(seed=config.seed)
    searcher = OptunaSearch(metric=config.metric, mode=config.mode, sampler=sampler)  # ray:
    return ConcurrencyLimiter(searcher, max_concurrent=concurrent)  # ray:


def _scheduler(config: TuneConfig):
    if config.scheduler == "none":
        return None  # Tune's FIFO: every trial runs all its epochs
    from ray.tune.schedulers import ASHAScheduler  # ray:

    return ASHAScheduler(
        time_attr="epoch",  # our own counter: it survives retries and resumes unchanged
        metric=config.metric,  # the cross-fold mean, never one fold's
        mode=config.mode,
        max_t=config.max_epochs,
        grace_period=config.grace_period,
        reduction_factor=config.reduction_factor,
    )


def run_trials(
    config: TuneConfig,
    data: SplitData,
    recipe: ModelRecipe,
    the_plan: Plan,
    storage_path: str,
    stamp: Stamp | None = None,
) -> list[CVTrialRecord]:
    """Run (or, when `storage_path` holds an interrupted search, resume) the trials; return every trial's record.
    Each trial's checkpoints hold the run's `stamp` (checkpoints.Stamp), and one another run wrote is refused.

    The data and the recipe enter the object store once. A resumed search keeps its finished trials as they are and
    carries its unfinished and failed ones on from their last epoch checkpoints; ASHA's rung record starts afresh.
    """
    ship_model_code(recipe.model, recipe.loss, recipe.optimizer)
    # ray: the tuple keeps Tune from resolving the references; each trial fetches them itself
    trainable = tune.with_parameters(cv_trial, data_box=(ray.put(data), ray.put(recipe)), stamp=stamp)  # ray:
    trainable = tune.with_resources(trainable, {"cpu": the_plan.cpus_per_worker, "gpu": the_plan.gpus_per_worker})
    experiment = storage.join(storage_path, "tune")
    stopper = FeasibilityStopper(config.cluster, config.cluster.lost_node_grace_s)  # a resumed search keeps its own
    if tune.Tuner.can_restore(experiment):  # ray:
        log.info(
            f"resuming the search in {experiment}: finished trials stay as they are; ASHA's rung record starts afresh"
        )
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)  # ray:
    else:
        space = {name: domain(param) for name, param in space_params(config.params).items()}
        tuner = tune.Tuner(  # ray:
            trainable,
            param_space={
                "params": space,
                "tune": options_for_ray(config),
                "gpus_per_worker": the_plan.gpus_per_worker,
            },
            tune_config=tune.TuneConfig(
                num_samples=config.trials,
                # reruns draw the same values; the concurrency limit goes here (Tune ignores max_concurrent_trials
                # when a search algorithm is given)
                search_alg=_search(config, the_plan.concurrent_folds),
                scheduler=_scheduler(config),
                reuse_actors=True,
            ),
            run_config=trials_run_config(
                config.cluster, storage_path, _progress(config.epochs, config.metric), stopper
            ),
        )
    results = fit_tuner(tuner)  # ray: Ctrl-C ends it as KeyboardInterrupt, its state saved for --resume
    if stopper.reason:
        raise RuntimeError(f"{stopper.reason}; finished trials are kept, resume with --resume")
    errors = {r.path: str(r.error).splitlines()[0] for r in results if r.error}
    analysis = tune.ExperimentAnalysis(results.experiment_path)  # ray: the trials' statuses, as saved
    return [
        _record(trial, analysis.trial_dataframes.get(trial.trial_id), errors.get(trial.path))
        for trial in analysis.trials
    ]


def _record(trial, frame, error: str | None) -> CVTrialRecord:
    history, folds, stacked = [], [], None
    if frame is not None and "epoch" in frame.columns:
        frame = frame.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        summary = [c for c in frame.columns if c == "epoch" or c.startswith(("std_", "ci_")) or c in FOLD_COLUMNS]
        history = frame[[*summary, "train_seconds"]].to_dict("records")
        folds = [row for text in frame[FOLDS_KEY] for row in json.loads(text)]
        stacked = bool(frame["stacked"].iloc[-1])
    return CVTrialRecord(
        trial.trial_id,
        dict(trial.config["params"]),
        trial.status,
        1 + trial.run_metadata.num_failures,
        history,
        folds,
        error,
        (trial.last_result or {}).get("diverged"),
        stacked,
    )


# ---- nested cross-validation: the chosen configuration, retrained and scored on its outer fold ----


def _fit_outer(config: dict, params: dict, epochs: int, data: SplitData, recipe: ModelRecipe, gpus: float) -> dict:
    import torch  # the task's process only

    from distml.train import Diverged, fit, new_state

    options = TuneConfig.from_dict(config)
    training = trial_training(params)
    settings = replace(options.train_settings, **{**training.settings, "epochs": epochs})
    torch.set_num_threads(max(1, int(options.cluster.cpus_per_worker)))
    device = device_for(gpus)
    recipe = _trial_recipe(recipe, training.model_kwargs, training.weight_decay)
    images, labels = tensors(data, device)
    train_index, test_index = fold_index(data, 1, device)
    build = partial(recipe.for_fold, images, train_index)
    state = new_state(settings, 0, device, build, recipe.optimizer, recipe.loss)
    try:
        scores = fit(state, settings, images, labels, train_index, test_index)
    except Diverged as stop:
        return {"diverged": str(stop), "val_accuracy": None, "val_loss": None}
    return {"val_accuracy": scores.accuracy, "val_loss": scores.loss, "train_seconds": state.train_seconds}


def fit_outer(
    config: TuneConfig, params: dict, epochs: int, data: SplitData, recipe: ModelRecipe, the_plan: Plan
) -> dict:
    """Train `params` for `epochs` on the training part of `data` (fold 0) and score it on its outer fold (fold 1),
    as one Ray task with one trial's resources, waited for as cluster.await_task does."""
    cpus, gpus = the_plan.cpus_per_worker, the_plan.gpus_per_worker
    task = ray.remote(_fit_outer).options(  # ray: a task lost with its node runs again, --max-failures times
        num_cpus=cpus, num_gpus=gpus, max_retries=config.cluster.max_failures
    )
    result = task.remote(options_for_ray(config), params, epochs, data, recipe, gpus)  # ray:
    await_task(result, config.cluster, cpus, gpus, "the outer fold's final fit")
    return ray.get(result)  # ray:
