"""`distml pipeline`: the whole workshop in one run folder, ending in a report.md that shows every table and figure.

Stages: a grid of sample images, holdout training of the MLP, K-fold of the MLP, the ResNet18 fine-tune, the
comparison of the three, and the exported models (inside each stage's folder, under model/).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from distml import plots, report, run_report, storage
from distml.atomic import write_text
from distml.compare import COMPARISON_FILE, compare, write_comparison
from distml.config import FinetuneConfig, HoldoutConfig, KFoldConfig, PipelineConfig
from distml.data import load_mnist
from distml.distributed import cluster
from distml.errors import DistmlError
from distml.finetune import run_finetune
from distml.holdout import run_train
from distml.kfold import run_kfold
from distml.rundir import (
    FOLDS_FILE,
    HISTORY_FILE,
    PER_CLASS_FILE,
    SUMMARY_FILE,
    TEST_METRICS_FILE,
    RunDir,
    fresh_run_folder,
)

log = logging.getLogger(__name__)

TRAIN_DIR, KFOLD_DIR, FINETUNE_DIR, COMPARE_DIR = "train-mlp", "kfold-mlp", "finetune-resnet18", "compare"
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.png"


def stages(config: PipelineConfig, out: Path) -> tuple[HoldoutConfig, KFoldConfig, FinetuneConfig]:
    """Each stage's config, every shared option passed through (the batch size and the cluster to all three)."""
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


@dataclass(frozen=True)
class PipelineOutcome:
    run_dir: Path
    comparison: pd.DataFrame
    wall_seconds: float


def run_pipeline(config: PipelineConfig) -> PipelineOutcome:
    started = time.perf_counter()
    if config.storage is not None:
        storage.check(config.storage)
    run = RunDir.fresh(fresh_run_folder("pipeline", config.out, config.storage), option="--out")
    holdout, kfold, finetune = stages(config, run.path)
    for stage in (holdout, kfold, finetune):  # every stage's options are checked before the first one runs
        stage.validate()
    dataset = load_mnist(config.data_dir)
    started_ray = cluster.connect(config.cluster.address, quiet=True)  # one Ray for every stage
    try:
        with run.lock():
            run.write_header("pipeline", config.to_dict(), dataset.summary())
            log.info(f"samples: {dataset.description}")
            plots.sample_grid(dataset.train_images, dataset.train_labels, run.path / SAMPLES_FILE)
            log.info("stage 1/4: holdout training of the MLP")
            run_train(holdout)
            log.info(f"stage 2/4: {config.k}-fold cross-validation of the MLP")
            outcome = run_kfold(replace(kfold, storage=_stage_storage(config, run)))
            if not outcome.complete:
                raise DistmlError(f"K-fold stage failed: {'; '.join(outcome.failures)}")
            log.info("stage 3/4: ResNet18 fine-tune on Ray Train")
            run_finetune(replace(finetune, storage=_stage_storage(config, run)))
            log.info("stage 4/4: comparison and report")
            comparison = compare([run.path / TRAIN_DIR, run.path / KFOLD_DIR, run.path / FINETUNE_DIR])
            write_comparison(comparison, run.path / COMPARE_DIR)
            write_text(run.path / REPORT_FILE, report_markdown(run.path, config, comparison, dataset.description))
            run_report.build(run.path)  # and report.html, every figure in it
    finally:
        if started_ray:
            cluster.shutdown()
    return PipelineOutcome(run.path, comparison, time.perf_counter() - started)


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
