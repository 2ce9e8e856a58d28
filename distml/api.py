"""distml from Python, shaped like scikit-learn's `cross_validate`: the model and the data are objects passed in.

    import distml
    result = distml.cross_validate("mlp", (X, y), k=5, epochs=3)
    result.summary, result.folds, result.fold_assignment

Each verb builds the command's typed config and calls the same workflow the CLI calls. Nothing is printed: progress
goes to the `distml` logger (give it a handler to see it), errors are `DistmlError` (a ValueError), and no signal
handler is installed. A Ray already initialised in the process (a notebook) is used and left running; otherwise a
local Ray is started for the call and stopped after it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distml.config import (
    IN_MEMORY,
    RESUMABLE_CLUSTER_FIELDS,
    ClusterConfig,
    FinetuneConfig,
    HoldoutConfig,
    KFoldConfig,
    SweepConfig,
    TuneConfig,
)
from distml.errors import DistmlError
from distml.recipe import Given
from distml.rundir import CONFIG_FILE

if TYPE_CHECKING:
    import pandas as pd  # a slow import: `import distml` stays light, as the CLI's start-up needs

    from distml.compare import Comparison


@dataclass(frozen=True)
class CVResult:
    """What a cross-validation gives back. `run_dir` is None when `out` was None (nothing was kept)."""

    folds: pd.DataFrame  # one row per fold: sizes, validation (and test) scores, seconds, node, attempts
    history: pd.DataFrame  # train and validation loss and accuracy per epoch of every fold
    summary: pd.DataFrame  # mean, std and 95% interval of each metric
    # the validation fold of every example, StratifiedKFold(k, shuffle=True, seed)'s; (R, N) with R repeats
    fold_assignment: np.ndarray
    classes: list  # the label values, in the order of the model's outputs
    run_dir: Path | None
    complete: bool  # False when some fold failed for good (`failures` says why)
    failures: list[str]
    # every example's prediction by the fold model that did not train on it: repeat, fold, index, label, predicted,
    # and p_<class> per class
    oof: pd.DataFrame | None = None
    oof_scores: pd.DataFrame | None = None  # metric, value: accuracy, macro P/R/F1, log loss, calibration error
    ensemble_scores: pd.DataFrame | None = None  # the fold models' ensemble on test_data, when given


def _model_and_label(model) -> tuple[str, Callable | None]:
    """A config's name for `model` and the callable to hand the trainers (None: the name rebuilds it)."""
    if isinstance(model, str):
        return model, None
    if callable(model):
        return _label(model), model
    raise DistmlError(f"must be a model name, package.module:function, file.py:function or a callable, got {model!r}")


def _label(factory: Callable | None) -> str | None:
    """How config.json names a Python callable (it cannot rebuild one)."""
    if factory is None:
        return None
    from distml.models import model_label  # torch: only once a model is really built

    return model_label(factory)


def _shared(model, data, test_data, model_kwargs, normalize, target, resize, loss, optimizer) -> tuple[dict, Given]:
    """What cross_validate and train both take: the config's data and model fields, and the objects it can only
    name (see recipe.Given)."""
    name, factory = _model_and_label(model)
    spec, given = _data_and_spec(data)
    test_spec, test_given = (None, None) if test_data is None else _data_and_spec(test_data)
    fields = {
        "model": name,
        "data": spec,
        "target": target,
        "resize": resize,
        "normalize": normalize,
        "test_data": test_spec,
        "model_kwargs": dict(model_kwargs or {}),
        "loss": _label(loss),
        "optimizer": _label(optimizer),
    }
    return fields, Given(given, test_given, factory, loss, optimizer)


def _data_and_spec(data) -> tuple[str, object]:
    """A config's name for `data` and the object to load (None: the name loads it)."""
    if isinstance(data, str):
        return data, None
    return IN_MEMORY, data


def cross_validate(
    model,
    data,
    *,
    k: int = 5,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    lr_schedule: str = "constant",
    cluster: ClusterConfig | None = None,
    out: str | Path | None = None,
    test_data=None,
    model_kwargs: dict | None = None,
    normalize: str = "auto",
    target: str | None = None,
    resize: str | None = None,
    folds_per_trial: int | None = None,
    storage: str | None = None,
    resume: str | Path | None = None,
    loss: Callable[[], Callable] | None = None,
    optimizer: Callable | None = None,
    repeats: int = 1,
    groups=None,
    folds=None,
    keep_fold_models: bool = False,
    oof_format: str = "csv",
    track: str | None = None,
) -> CVResult:
    """Stratified K-fold cross-validation of `model` on `data`, the folds trained in parallel on Ray.

    model: "mlp", "cnn", "package.module:function", "path/file.py:function", or a callable returning an nn.Module;
        it is called once per fold with num_classes= and input_shape= (when it takes them) and `model_kwargs`.
    data: (X, y) arrays (images N x C x H x W or N x H x W, or tabular N x F; any hashable labels), a map-style
        torch Dataset, "mnist", "imagefolder:DIR", "npz:FILE" or "csv:FILE" (with `target`).
    test_data: the same kinds, kept out of every fold; each fold's model is scored on it (MNIST brings its own).
    normalize: "auto" (per fold from its training part, MNIST's known constants for MNIST), "fold", "none", or
        "MEAN:STD"; the step is part of every model. out: the run folder; None keeps nothing. resume: a run folder
        to finish with its saved options (give the same model and data when they were Python objects); `cluster`,
        when given, replaces its saved address, resources and retries, and without it the run uses RAY_ADDRESS or a
        local Ray, never the address it was started with.
    loss: a factory of the training loss, called once per fold, e.g. `lambda: nn.CrossEntropyLoss(label_smoothing=
        0.1)`; it takes (logits, targets) and returns the batch's mean loss. Default: cross-entropy.
    optimizer: a factory `optimizer(params, lr)`, e.g. `lambda params, lr: torch.optim.SGD(params, lr, momentum=
        0.9)`. Default: Adam. With either, folds train one at a time (the stacked MLP path is Adam on cross-entropy).
    repeats: R repetitions of the k folds with fresh shuffles (RepeatedStratifiedKFold's folds). groups: a group
        label per example (or a file of them, or a CSV column's name): every group in one fold
        (StratifiedGroupKFold's). folds: your own fold index per example (or a file of them).
    keep_fold_models: export each fold's model and their ensemble into the run folder (needs `out`).
    track: "mlflow" (to MLFLOW_TRACKING_URI: a parent run and a child run per fold) or "tensorboard" (event files
        per fold under the run folder).
    The result holds the out-of-fold predictions (`oof`) and their scores; with test_data, the ensemble's scores.
    """
    from distml.kfold import run_kfold, saved_assignment  # Ray: only once a run really starts

    fields, objects = _shared(model, data, test_data, model_kwargs, normalize, target, resize, loss, optimizer)
    group_label, group_values = _spec_or_values(groups)
    fold_label, fold_values = _spec_or_values(folds)
    objects = replace(objects, groups=group_values, folds=fold_values)
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="distml-cv-")) / "run"
    config = KFoldConfig(
        **fields,
        repeats=repeats,
        groups=group_label,
        fold_file=fold_label,
        keep_fold_models=keep_fold_models,
        oof_format=oof_format,
        track=track,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        lr_schedule=lr_schedule,
        k=k,
        folds_per_trial=folds_per_trial,
        out=folder,
        storage=storage,
        cluster=cluster or ClusterConfig(),
    )
    try:
        outcome = run_kfold(config, Path(resume) if resume else None, objects, _resumable(cluster))
        assignment = saved_assignment(outcome.run_dir)
        classes = _classes(outcome.run_dir)
    finally:
        if out is None and resume is None:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return CVResult(
        outcome.folds,
        outcome.history,
        outcome.summary,
        assignment,
        classes,
        None if out is None and resume is None else outcome.run_dir,
        outcome.complete,
        outcome.failures,
        outcome.oof,
        outcome.oof_scores,
        outcome.ensemble_scores,
    )


def _resumable(cluster: ClusterConfig | None) -> dict:
    """What a resume takes from a given `cluster`: its address, resources and retries (the run keeps the rest)."""
    return {} if cluster is None else {name: getattr(cluster, name) for name in RESUMABLE_CLUSTER_FIELDS}


def _spec_or_values(value) -> tuple[str | None, np.ndarray | None]:
    """A file name or CSV column as the config's, or an array of values as the Given's (config.json: "in memory")."""
    if value is None or isinstance(value, str | Path):
        return (None if value is None else str(value)), None
    return IN_MEMORY, np.asarray(value)


def _classes(run_dir: Path) -> list:
    header = json.loads((run_dir / CONFIG_FILE).read_text())
    return header.get("classes") or header["dataset"].get("classes", [])


def train(
    model,
    data,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    lr_schedule: str = "constant",
    val_fraction: float = 0.1,
    limit: int | None = None,
    out: str | Path | None = None,
    test_data=None,
    model_kwargs: dict | None = None,
    normalize: str = "auto",
    target: str | None = None,
    resize: str | None = None,
    loss: Callable[[], Callable] | None = None,
    optimizer: Callable | None = None,
    track: str | None = None,
):
    """Train one model on `data` minus a stratified validation holdout, test it (on `test_data`, MNIST's test set,
    or the holdout when there is neither), and export it into `out` (default results/train-TIME). Same `model` and
    `data` kinds, and `loss` and `optimizer` factories, and `track`, as cross_validate. Returns the outcome: run_dir,
    results (the scores), history."""
    from distml.holdout import run_train  # torch: only once a run really starts

    fields, objects = _shared(model, data, test_data, model_kwargs, normalize, target, resize, loss, optimizer)
    config = HoldoutConfig(
        **fields,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        lr_schedule=lr_schedule,
        val_fraction=val_fraction,
        limit=limit,
        out=Path(out) if out is not None else None,
        track=track,
    )
    return run_train(config, objects)


def finetune(**options):
    """Fine-tune ResNet18 with a new head on MNIST on Ray Train (DDP): the options of `distml finetune`
    (weights, image_size, freeze_backbone, epochs, batch_size, lr, backbone_lr, seed, val_fraction, limit, out,
    data_dir, storage, cluster=ClusterConfig(workers=...)). Returns the outcome: run_dir, results, history."""
    from distml.finetune import run_finetune  # Ray and torch: only once a run really starts

    return run_finetune(FinetuneConfig(**options))


def sweep(**options):
    """Search the ResNet18 head's learning rate with Ray Tune and ASHA: the options of `distml sweep` (lr_min,
    lr_max, trials, metric, epochs, ..., cluster=ClusterConfig(...)). Returns the outcome: trials (pandas), best."""
    from distml.sweep import run_sweep  # Ray and torch: only once a run really starts

    return run_sweep(SweepConfig(**options))


def tune(
    model,
    data,
    space: dict,
    *,
    k: int = 5,
    trials: int = 8,
    metric: str = "val_accuracy",
    scheduler: str = "asha",
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    lr_schedule: str = "constant",
    cluster: ClusterConfig | None = None,
    out: str | Path | None = None,
    test_data=None,
    model_kwargs: dict | None = None,
    normalize: str = "auto",
    target: str | None = None,
    resize: str | None = None,
    limit: int | None = None,
    then_train: bool = False,
    outer_k: int | None = None,
    storage: str | None = None,
    resume: str | Path | None = None,
    track: str | None = None,
):
    """Search hyperparameters with Ray Tune, each trial a whole K-fold run of its configuration, scored (and, with
    scheduler="asha", stopped early) on the cross-fold mean of `metric`.

    space: {name: distribution}, each a Ray Tune distribution (tune.loguniform, tune.uniform, tune.randint,
        tune.choice) or the CLI's "DIST:ARGS" text ("loguniform:1e-4:1e-1", "randint:16:128", "choice:16,64").
        lr, batch_size, epochs and weight_decay set the training; every other name is a keyword of the model factory.
    outer_k: nested cross-validation, the whole search on the training part of each outer fold (`outcome.outer`:
        one row per outer fold; `outcome.estimate`: the outer mean, its corrected interval, the choices' stability).
    The other arguments are cross_validate's (`epochs`, `lr`, `batch_size`: the values of those not searched).
    Returns the outcome: trials (pandas, best first), trial_folds, best (a dict), run_dir (results/tune-TIME when
    `out` is None). resume: a run folder to finish, with the same model and data when they were Python objects.
    """
    from distml.tune import run_tune, space_specs  # Ray: only once a run really starts

    fields, objects = _shared(model, data, test_data, model_kwargs, normalize, target, resize, None, None)
    config = TuneConfig(
        **fields,
        params=space_specs(space),
        k=k,
        trials=trials,
        metric=metric,
        scheduler=scheduler,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        lr_schedule=lr_schedule,
        limit=limit,
        then_train=then_train,
        outer_k=outer_k,
        out=Path(out) if out is not None else None,
        storage=storage,
        cluster=cluster or ClusterConfig(),
        track=track,
    )
    return run_tune(config, Path(resume) if resume else None, objects, _resumable(cluster))


def load_model(path: str | Path):
    """The trained network of a model folder (or a run folder holding model/), in eval mode on the CPU. A model
    saved as `file.py:function` runs that file to rebuild it: load only your own."""
    from distml.export import load_model as load  # torch: only when a model is loaded

    return load(Path(path)).model


def predict(model: str | Path, data, *, target: str | None = None) -> pd.DataFrame:
    """Class predictions of a saved model (a model or run folder) for `data` (the kinds cross_validate takes; its
    labels, when it has any, are ignored): one row per example, the predicted class and each class's probability."""
    from distml.predict import predict_dataset  # torch: only when a model is loaded

    return predict_dataset(Path(model), data, target=target)


def compare(run_dirs: list[str | Path], metric: str = "val_accuracy", rope: float = 0.005) -> Comparison:
    """`.runs`: one row per run folder (train, finetune or kfold): accuracy (K-fold: the validation mean with its
    corrected 95% interval), macro scores, parameters, speed. `.tests`: for each pair of K-fold runs, `metric`'s
    per-fold differences judged by the corrected paired t-test and the Bayesian correlated t-test with a region of
    practical equivalence of ±`rope` (in the metric's units), Welch's test for runs on different folds, McNemar's
    test on the ensembles' test predictions, and a verdict. Nothing is written."""
    from distml.compare import decide

    return decide([Path(path) for path in run_dirs], metric=metric, rope=rope)
