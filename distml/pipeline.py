"""`distml pipeline`: the whole workshop in one run folder, ending in a report.md that shows every table and figure.

Stages: a grid of sample images, holdout training of the MLP, K-fold of the MLP, the ResNet18 fine-tune, the
comparison of the three, and the exported models (inside each stage's folder, under model/). Every stage trains on
the same images (`--limit`: the same stratified subset, drawn with the same seed).

Every stage's options are checked before the first stage runs (check_stages), and the cluster's room for the stages
on Ray as soon as Ray is up, before the first stage trains. A resumed pipeline skips the stages that finished; an
unfinished K-fold or fine-tune carries on with its own resume, an unfinished holdout training (the short one) runs
again from the start in its cleared folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from distml import plots, report, run_report, storage
from distml.atomic import write_text
from distml.compare import COMPARISON_FILE, compare, write_comparison
from distml.config import FinetuneConfig, HoldoutConfig, KFoldConfig, PipelineConfig
from distml.data import MNIST, load_mnist
from distml.distributed import cluster
from distml.errors import DistmlError, Interrupted
from distml.finetune import run_finetune
from distml.holdout import holdout_split, run_train
from distml.kfold import check_data, run_kfold
from distml.resnet import build_resnet18
from distml.rundir import (
    CONFIG_FILE,
    FOLDS_FILE,
    HISTORY_FILE,
    PER_CLASS_FILE,
    RESULTS_FILE,
    SUMMARY_FILE,
    TEST_METRICS_FILE,
    RunDir,
    fresh_run_folder,
)

log = logging.getLogger(__name__)

TRAIN_DIR, KFOLD_DIR, FINETUNE_DIR, COMPARE_DIR = "train-mlp", "kfold-mlp", "finetune-resnet18", "compare"
STAGE_DIRS = (TRAIN_DIR, KFOLD_DIR, FINETUNE_DIR)
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.png"


def stages(config: PipelineConfig, out: Path) -> tuple[HoldoutConfig, KFoldConfig, FinetuneConfig]:
    """Each stage's config, every shared option passed through (the batch size, the limit and the seed to all three,
    the cluster to the two on Ray)."""
    holdout = HoldoutConfig(
        model="mlp",
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        limit=config.limit,
        out=out / TRAIN_DIR,
        data_dir=config.data_dir,
    )
    kfold = KFoldConfig(
        k=config.k,
        model="mlp",
        epochs=config.epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        limit=config.limit,
        out=out / KFOLD_DIR,
        data_dir=config.data_dir,
        cluster=config.cluster,
    )
    finetune = FinetuneConfig(
        weights=config.weights,
        image_size=config.image_size,
        freeze_backbone=config.freeze_backbone,
        epochs=config.finetune_epochs,
        batch_size=config.batch_size,
        seed=config.seed,
        limit=config.limit,
        out=out / FINETUNE_DIR,
        data_dir=config.data_dir,
        cluster=config.cluster,
    )
    return holdout, kfold, finetune


def unfinished(run_dir: Path, k: int) -> list[str]:
    """The stages (their folders) a pipeline's folder has not finished: a holdout training and a fine-tune write
    results.json last, a K-fold's folds.csv has a row per fold once every fold finished."""
    done = {
        TRAIN_DIR: (run_dir / TRAIN_DIR / RESULTS_FILE).is_file(),
        KFOLD_DIR: (run_dir / KFOLD_DIR / FOLDS_FILE).is_file()
        and len(pd.read_csv(run_dir / KFOLD_DIR / FOLDS_FILE)) == k,
        FINETUNE_DIR: (run_dir / FINETUNE_DIR / RESULTS_FILE).is_file(),
    }
    return [stage for stage in STAGE_DIRS if not done[stage]]


def check_stages(
    todo: list[str], holdout: HoldoutConfig, kfold: KFoldConfig, finetune: FinetuneConfig, dataset: MNIST
) -> None:
    """What each stage in `todo` checks at its start, short of training, as a one-line DistmlError: its options, the
    fine-tune's --weights, then the data (the K-fold's folds and batch size and the holdouts, in the subset of
    --limit)."""
    configs = {TRAIN_DIR: holdout, KFOLD_DIR: kfold, FINETUNE_DIR: finetune}
    for stage in todo:
        configs[stage].validate()
    if FINETUNE_DIR in todo:
        build_resnet18(finetune.weights, image_size=finetune.image_size)
    if KFOLD_DIR in todo:
        check_data(kfold)
    for stage in (TRAIN_DIR, FINETUNE_DIR):
        if stage in todo:
            config = configs[stage]
            try:
                holdout_split(dataset, config.val_fraction, config.limit, config.seed)
            except DistmlError as exc:  # too few images to hold some out: the pipeline's option for it is --limit
                if exc.option != "--val-fraction":
                    raise
                raise DistmlError(f"{exc.message}; raise it", option="--limit") from None


def _check_room(todo: list[str], kfold: KFoldConfig, finetune: FinetuneConfig) -> None:
    """The connected cluster's room for a K-fold trainer and for the fine-tune's DDP workers, planned as the stages
    plan it once they start (they log the notes, fewer trainers at once than asked, themselves)."""
    if KFOLD_DIR in todo:
        cluster.plan(kfold.cluster, cluster.cluster_nodes())
    if FINETUNE_DIR in todo:
        cluster.check_room(finetune.cluster)


@dataclass(frozen=True)
class PipelineOutcome:
    run_dir: Path
    comparison: pd.DataFrame
    wall_seconds: float


def run_pipeline(
    config: PipelineConfig, resume: Path | None = None, cluster_overrides: dict | None = None
) -> PipelineOutcome:
    """Run every stage into one run folder, then compare them and write the report.

    With `resume`, the options come from that folder's config.json, the `cluster_overrides` (ClusterConfig fields)
    replacing the saved ones (the address is only ever the override's); the stages that finished are skipped.
    """
    started = time.perf_counter()
    cluster_overrides = cluster_overrides or {}
    run, config = _prepare(config, resume, cluster_overrides)
    holdout, kfold, finetune = stages(config, run.path)
    todo = unfinished(run.path, config.k)
    dataset = load_mnist(config.data_dir)
    check_stages(todo, holdout, kfold, finetune, dataset)
    on_ray = KFOLD_DIR in todo or FINETUNE_DIR in todo
    started_ray = on_ray and cluster.connect(config.cluster.address, quiet=True)  # one Ray for every stage
    try:
        if on_ray:
            _check_room(todo, kfold, finetune)
        with run.lock():
            if resume is None:
                run.write_header("pipeline", config.to_dict(), dataset.summary())
            else:
                log.info(f"resuming {run.path}: {', '.join(todo) or 'every stage finished'}; then the report")
            if not (run.path / SAMPLES_FILE).is_file():
                log.info(f"samples: {dataset.description}")
                plots.sample_grid(dataset.train_images, dataset.train_labels, run.path / SAMPLES_FILE)
            try:
                _run_stages(run, config, todo, (holdout, kfold, finetune), cluster_overrides)
            except KeyboardInterrupt as stop:  # Ctrl-C, or a stop signal the CLI raises as one
                raise Interrupted(getattr(stop, "signum", signal.SIGINT), _resume_command(run)) from None
            log.info("stage 4/4: comparison and report")
            comparison = compare([run.path / stage for stage in STAGE_DIRS])
            write_comparison(comparison, run.path / COMPARE_DIR)
            write_text(run.path / REPORT_FILE, report_markdown(run.path, config, comparison, dataset.description))
            run_report.build(run.path)  # and report.html, every figure in it
    finally:
        if started_ray:
            cluster.shutdown()
    return PipelineOutcome(run.path, comparison, time.perf_counter() - started)


def _prepare(config: PipelineConfig, resume: Path | None, cluster_overrides: dict) -> tuple[RunDir, PipelineConfig]:
    """The run folder and its options, checked before anything loads: a new folder, or a pipeline's to resume with its
    saved options."""
    if resume is None:
        config.validate()
        return RunDir.fresh(fresh_run_folder("pipeline", config.out, config.storage), option="--out"), config
    run, saved, _ = RunDir.resumed(resume, "pipeline", PipelineConfig)
    config = replace(saved, cluster=saved.cluster.with_overrides(**cluster_overrides))
    config.validate()
    run.check_free()  # a pipeline still running here is refused at once, not after its checks and Ray's start
    return run, config


def _run_stages(run: RunDir, config: PipelineConfig, todo: list[str], configs: tuple, cluster_overrides: dict) -> None:
    """Stages 1 to 3, those in `todo`: new, or resumed with their own resume where they have a folder."""
    holdout, kfold, finetune = configs
    stage_storage = _stage_storage(config, run)
    if _starting(1, "holdout training of the MLP", TRAIN_DIR, todo):
        if holdout.out.exists():  # unfinished: the short stage runs again from the start
            shutil.rmtree(holdout.out)
        run_train(holdout)
    if _starting(2, f"{config.k}-fold cross-validation of the MLP", KFOLD_DIR, todo):
        resume = _resumable(kfold.out)
        outcome = run_kfold(replace(kfold, storage=stage_storage), resume=resume, cluster_overrides=cluster_overrides)
        if outcome.failures:
            raise DistmlError(f"K-fold stage failed: {'; '.join(outcome.failures)}")
        if not outcome.complete:  # interrupted after some folds finished: a resume trains the others
            raise Interrupted()
    if _starting(3, "ResNet18 fine-tune on Ray Train", FINETUNE_DIR, todo):
        resume = _resumable(finetune.out)
        run_finetune(replace(finetune, storage=stage_storage), resume=resume, cluster_overrides=cluster_overrides)


def _starting(number: int, title: str, stage: str, todo: list[str]) -> bool:
    """Log the stage's start, or that it finished in an earlier session; True when it runs."""
    log.info(f"stage {number}/4: {title}" + ("" if stage in todo else ": finished before, skipped"))
    return stage in todo


def _resumable(folder: Path) -> Path | None:
    """A stage's folder to resume once its run wrote config.json there; None: the stage starts anew."""
    return folder if (folder / CONFIG_FILE).is_file() else None


def _resume_command(run: RunDir) -> str:
    return f"distml pipeline --resume {run.path}"


def _stage_storage(config: PipelineConfig, run: RunDir) -> str | None:
    """A cloud --storage holds each stage's Ray state under the pipeline's prefix; a local one holds the pipeline's
    folder, and so its stages' folders, already."""
    if config.storage is None or not storage.is_cloud(config.storage):
        return None
    return storage.join(config.storage, run.path.name)


def _trained_section(run_dir: Path, folder: str, title: str) -> list[str]:
    metrics = json.loads((run_dir / folder / TEST_METRICS_FILE).read_text())
    history = pd.read_csv(run_dir / folder / HISTORY_FILE)
    per_class = pd.read_csv(run_dir / folder / PER_CLASS_FILE)
    return [
        f"## {title}",
        "",
        f"Test accuracy **{metrics['accuracy']:.4f}**, macro precision {metrics['precision']:.4f}, "
        f"recall {metrics['recall']:.4f}, F1 {metrics['f1']:.4f} on {metrics['test_images']:,} test images. "
        f"Exported model: `{folder}/model/` (state dict, model.json, torch.export program).",
        "",
        "Per-epoch history:",
        "",
        report.markdown_table(history),
        "",
        f"![learning curves]({folder}/learning_curves.png)",
        "",
        "Per-class test scores:",
        "",
        report.markdown_table(per_class),
        "",
        f"![confusion matrix]({folder}/confusion_matrix.png)",
        "",
    ]


def report_markdown(run_dir: Path, config: PipelineConfig, comparison: pd.DataFrame, data: str) -> str:
    folds = pd.read_csv(run_dir / KFOLD_DIR / FOLDS_FILE).drop(columns=["node"])
    summary = pd.read_csv(run_dir / KFOLD_DIR / SUMMARY_FILE)
    shown = comparison.drop(columns=["run_dir"])
    lines = [
        "# distml pipeline report",
        "",
        f"Data: {data}. Options: `{json.dumps({k: str(v) for k, v in asdict(config).items()})}`",
        "",
        "## Sample images",
        "",
        f"![samples]({SAMPLES_FILE})",
        "",
        *_trained_section(run_dir, TRAIN_DIR, "MLP, holdout training"),
        f"## MLP, {config.k}-fold cross-validation",
        "",
        report.markdown_table(folds),
        "",
        report.markdown_table(summary),
        "",
        f"![fold accuracy]({KFOLD_DIR}/fold_accuracy.png)",
        "",
        f"![learning curves]({KFOLD_DIR}/learning_curves.png)",
        "",
        *_trained_section(run_dir, FINETUNE_DIR, "ResNet18 fine-tune (Ray Train, DDP)"),
        "## Comparison",
        "",
        f"`{COMPARE_DIR}/{COMPARISON_FILE}`; K-fold accuracy is the validation mean (± std), the others are test.",
        "",
        report.markdown_table(shown),
        "",
        f"![comparison]({COMPARE_DIR}/comparison.png)",
        "",
    ]
    return "\n".join(lines)
