"""`distml finetune`: ResNet18 with a new 10-class head, fine-tuned on MNIST by a Ray Train TorchTrainer.

The driver builds the starting weights (so a bad --weights fails before Ray starts) and puts them and the data
in the object store; `distributed.ddp` trains with DDP; the driver then tests and exports the model from the last
checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from distml import checkpoints, run_report, storage, tracking
from distml.config import FinetuneConfig, check_track
from distml.data import MNIST, load_mnist, normalize
from distml.distributed import cluster, ddp
from distml.errors import DistmlError, Interrupted
from distml.evaluation import read_trained_model, record_trained_model
from distml.export import metadata
from distml.holdout import TrainOutcome, holdout_split
from distml.progress import RunEnded, RunStarted, UnitEnded, publish, publish_epoch, run_files, score_rows
from distml.resnet import build_resnet18
from distml.rundir import CONFIG_FILE, FINETUNE_RUN, RESULTS_FILE, RunDir, fresh_run_folder
from distml.train import EpochRecord

log = logging.getLogger(__name__)
UNIT = "finetune"  # the one unit of work a tracker and the live display see


def run_finetune(
    config: FinetuneConfig, resume: Path | None = None, cluster_overrides: dict | None = None
) -> TrainOutcome:
    """Fine-tune ResNet18 on Ray Train, then evaluate it on the test set, save and export it.

    With `resume`, the options come from that folder's config.json, the `cluster_overrides` (ClusterConfig fields)
    replacing the saved ones (the address is only ever the override's), and training carries on from the last
    epoch checkpoint in its Ray storage; a finished run is left as it is. `config.track` records the run in an
    experiment tracker (this call's choice, with `resume` too).
    """
    check_track(config.track)
    with tracking.tracked(config.track):
        return _run_finetune(config, resume, cluster_overrides or {})


def _run_finetune(config: FinetuneConfig, resume: Path | None, cluster_overrides: dict) -> TrainOutcome:
    started = time.perf_counter()
    run, config, saved = _prepare(config, resume, cluster_overrides)
    if saved is not None and (run.path / RESULTS_FILE).is_file():
        log.info(f"{run.path}: the fine-tune already finished; nothing to do")
        results, history = read_trained_model(run.path)
        return TrainOutcome(run.path, results, history, time.perf_counter() - started)
    start_model = build_resnet18(config.weights, image_size=config.image_size)  # a bad --weights fails here
    dataset = load_mnist(config.data_dir)
    log.info(f"data: {dataset.description}")
    split = holdout_split(dataset, config.val_fraction, config.limit, config.seed)
    with run.lock():  # before Ray starts: a second run on this folder is refused at once
        resumed_from = _check_resume(run, config, saved, dataset)
        started_ray = cluster.connect(config.cluster.address, quiet=True)
        try:
            gpus = cluster.check_room(config.cluster)
            if not storage.is_cloud(run.ray_storage(config.storage)):
                cluster.check_shared(run.path, option="--storage" if config.storage else "--out")
            if saved is None:
                run.write_header("finetune", config.to_dict(), dataset.summary())
            else:
                log.info(f"resuming {run.path} with its saved options, from its last epoch checkpoint ({resumed_from})")
            header = json.loads((run.path / CONFIG_FILE).read_text())
            publish(
                log,
                f"fine-tuning ResNet18 ({'head only' if config.freeze_backbone else 'head and backbone'}, "
                f"{config.image_size}x{config.image_size}, weights {config.weights}) on {split.train_size:,} images, "
                f"validating on {split.val_size:,}: {config.cluster.workers} DDP worker(s) on Ray Train",
                RunStarted(
                    "finetune",
                    str(run.path),
                    [UNIT],
                    1,
                    config.epochs,
                    header["options"],
                    header["dataset"],
                    bool(saved),
                ),
            )
            try:
                final = ddp.run_finetune(
                    config,
                    gpus,
                    split,
                    start_model.state_dict(),
                    run.ray_storage(config.storage),
                    on_epoch=lambda record: publish_epoch(log, UNIT, 0, record, config.epochs, label=config.name),
                    stamp=checkpoints.run_stamp(run.run_id, config),
                )
            except DistmlError as exc:
                raise DistmlError(
                    f"{exc}; carry on from the last epoch checkpoint with `distml finetune --resume {run.path}`"
                ) from None
            except KeyboardInterrupt as stop:  # a stop signal the CLI raises as one, inside Train's fit()
                raise Interrupted.of(stop, f"distml finetune --resume {run.path}", log) from None
        finally:
            if started_ray:
                cluster.shutdown()
        results, history = _test_and_export(run, config, final, dataset, split.train_size)
        run_report.build(run.path)
        _upload(run, config)
    publish(log, f"{UNIT}: finished, {results['accuracy']:.4f} accuracy", UnitEnded(UNIT, 0, results))
    publish(
        log,
        f"{run.path}: finished",
        RunEnded("finetune", str(run.path), "finished", score_rows(results), run_files(run.path)),
    )
    return TrainOutcome(run.path, results, history, time.perf_counter() - started)


def _prepare(
    config: FinetuneConfig, resume: Path | None, cluster_overrides: dict
) -> tuple[RunDir, FinetuneConfig, dict | None]:
    """The run folder and options, checked before anything loads; for a resumed run, its saved config.json."""
    saved = None
    if resume is not None:
        run, config, saved = RunDir.resumed(resume, "finetune", FinetuneConfig, storage_given=config.storage)
        config = replace(config, cluster=config.cluster.with_overrides(**cluster_overrides))
        if (run.path / RESULTS_FILE).is_file():
            return run, config, saved
    config.validate()
    if resume is None:
        run = RunDir.fresh(fresh_run_folder("finetune", config.out, config.storage), option="--out")
    run.check_storage(config.storage)
    return run, config, saved


def _check_resume(run: RunDir, config: FinetuneConfig, saved: dict | None, dataset: MNIST) -> str | None:
    """For a resumed run (under its lock): the same data, and the checkpoint it carries on from (named)."""
    if saved is None:
        return None
    if saved.get("dataset") != dataset.summary():
        raise DistmlError(f"{run.path}: the data are no longer those the run started with", option="--resume")
    if storage.is_cloud(run.ray_storage(config.storage)):
        return "the last one Ray Train registered"
    point = checkpoints.train_resume_point(run.storage / FINETUNE_RUN)
    for note in point.skipped:
        log.info(note)
    return point.checkpoint.name if point.checkpoint is not None else "none yet: from the first epoch"


def _test_and_export(run: RunDir, config: FinetuneConfig, final: dict, dataset: MNIST, train_images: int):
    model = build_resnet18("none", image_size=config.image_size)
    model.load_state_dict(final["model"])
    history = [EpochRecord(**record) for record in final["history"]]
    log.info("evaluating on the test set and exporting the model")
    info = metadata(
        "resnet18",
        model,
        image_size=config.image_size,
        trained_with="distml finetune",
        weights=str(config.weights),
        freeze_backbone=config.freeze_backbone,
        data=dataset.source,
    )
    results = record_trained_model(
        run.path,
        config.name,
        model,
        info,
        history,
        float(final["train_seconds"]),
        train_images,
        (normalize(dataset.test_images), dataset.test_labels),
        attempts=int(final["attempts"]),
        trained_by={key: final[key] for key in ("world_size", "ranks") if key in final},
    )
    return results, history


def _upload(run: RunDir, config: FinetuneConfig) -> None:
    """With a cloud --storage, Ray wrote its checkpoints there already; the results join them."""
    if config.storage is not None and storage.is_cloud(config.storage):
        uploaded_to = storage.upload(run.path, run.ray_storage(config.storage), skip=(run.storage.name,))
        log.info(f"results uploaded to {storage.redacted(uploaded_to)}")
