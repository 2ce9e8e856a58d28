"""`distml pipeline`: the whole workshop in one run folder, ending in a report.md that shows every table and figure.

Stages: a grid of sample images, holdout training of the MLP, K-fold of the MLP, the ResNet18 fine-tune, the
comparison of the three, and the exported models (inside each stage's folder, under model/).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from distml import report
from distml.atomic import write_text
from distml.compare import COMPARISON_FILE, compare, write_comparison
from distml.config import ClusterConfig, KFoldConfig
from distml.data import load_mnist
from distml.errors import DistmlError
from distml.evaluation import HISTORY_FILE, PER_CLASS_FILE, TEST_METRICS_FILE
from distml.finetune import FinetuneConfig, run_finetune
from distml.holdout import HoldoutConfig, run_train, start_run
from distml.kfold import FOLDS_FILE, SUMMARY_FILE, default_out, run_kfold
from distml.resnet import DEFAULT_IMAGE_SIZE
from distml.rundir import RunDir

TRAIN_DIR, KFOLD_DIR, FINETUNE_DIR, COMPARE_DIR = "train-mlp", "kfold-mlp", "finetune-resnet18", "compare"
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.png"


@dataclass(frozen=True)
class PipelineConfig:
    """The options that pass through to the stages."""

    epochs: int = 3  # MLP holdout training and each K-fold fold
    k: int = 5
    finetune_epochs: int = 1
    batch_size: int = 64  # every stage
    weights: str = "imagenet"
    image_size: int = DEFAULT_IMAGE_SIZE
    freeze_backbone: bool = False
    limit: int | None = None  # holdout training and fine-tune only; K-fold always uses every training image
    workers: int = 2  # fold trainers at once, and DDP workers of the fine-tune
    max_failures: int = 2
    seed: int = 0
    address: str | None = None
    data_dir: Path | None = None
    out: Path | None = None

    def stages(self, out: Path) -> tuple[HoldoutConfig, KFoldConfig, FinetuneConfig]:
        holdout = HoldoutConfig(
            model="mlp",
            epochs=self.epochs,
            seed=self.seed,
            limit=self.limit,
            out=out / TRAIN_DIR,
            data_dir=self.data_dir,
        )
        kfold = KFoldConfig(
            k=self.k,
            model="mlp",
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            out=out / KFOLD_DIR,
            data_dir=self.data_dir,
            cluster=ClusterConfig(address=self.address, workers=self.workers, max_failures=self.max_failures),
        )
        finetune = FinetuneConfig(
            weights=self.weights,
            image_size=self.image_size,
            freeze_backbone=self.freeze_backbone,
            epochs=self.finetune_epochs,
            batch_size=self.batch_size,
            seed=self.seed,
            limit=self.limit,
            workers=self.workers,
            max_failures=self.max_failures,
            address=self.address,
            out=out / FINETUNE_DIR,
            data_dir=self.data_dir,
        )
        return holdout, kfold, finetune


@dataclass(frozen=True)
class PipelineOutcome:
    run_dir: Path
    comparison: pd.DataFrame
    wall_seconds: float


def run_pipeline(config: PipelineConfig, say: Callable[[str], None] = lambda message: None) -> PipelineOutcome:
    from distml import distributed, plots

    started = time.perf_counter()
    run = RunDir.fresh(config.out or default_out("pipeline"), option="--out")
    holdout, kfold, finetune = config.stages(run.path)
    for stage in (holdout, kfold, finetune):  # every stage's options are checked before the first one runs
        stage.validate()
    dataset = load_mnist(config.data_dir)
    started_ray = distributed.connect(config.address, quiet=True)  # one Ray for every stage
    try:
        with run.lock():
            start_run(run, "pipeline", asdict(config), dataset)
            say(f"samples: {dataset.description}")
            plots.sample_grid(dataset.train_images, dataset.train_labels, run.path / SAMPLES_FILE)
            say("stage 1/4: holdout training of the MLP")
            run_train(holdout, say)
            say(f"stage 2/4: {config.k}-fold cross-validation of the MLP")
            outcome = run_kfold(kfold, say)
            if not outcome.complete:
                raise DistmlError(f"K-fold stage failed: {'; '.join(outcome.failures)}")
            say("stage 3/4: ResNet18 fine-tune on Ray Train")
            run_finetune(finetune, say)
            say("stage 4/4: comparison and report")
            comparison = compare([run.path / TRAIN_DIR, run.path / KFOLD_DIR, run.path / FINETUNE_DIR])
            write_comparison(comparison, run.path / COMPARE_DIR)
            write_text(run.path / REPORT_FILE, report_markdown(run.path, config, comparison, dataset.description))
    finally:
        if started_ray:
            distributed.shutdown()
    return PipelineOutcome(run.path, comparison, time.perf_counter() - started)


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
