"""Fold trainers as Ray actors: started as soon as Ray is up, handed groups of folds, replaced when they die.

A trainer imports torch as it starts, while the driver still splits and ships the data, and then keeps its process
for every group of folds it is given. Each group checkpoints every epoch under the run's storage, so a replacement
trainer, or a `--resume`d run, carries on from the last finished epoch. The driver sees each epoch as it ends (an
actor generator streams the reports), and ends a run whose cluster lost the room for its trainers.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

import ray

from distml import storage
from distml.checkpoints import STATE_FILE, Stamp
from distml.config import KFoldConfig
from distml.distributed.cluster import Plan, RoomWatch
from distml.distributed.worker import (
    device_for,
    epoch_report,
    error_line,
    final_report,
    fold_index,
    log_epochs,
    restore_checkpoint,
    save_checkpoint,
    ship_model_code,
    tensors,
)
from distml.folds import SplitData
from distml.progress import BatchProgress, UnitRetried, publish, wants_batches
from distml.recipe import ModelRecipe

log = logging.getLogger(__name__)


def checkpoint_location(storage_path: str, folds: list[int]) -> str:
    """Where a group of folds keeps its last epoch: one file per group, replaced every epoch."""
    return storage.join(storage_path, f"folds/folds-{'-'.join(str(f) for f in folds)}/{STATE_FILE}")


@ray.remote(num_cpus=0)  # ray:
class ProgressInbox:
    """Where trainers leave their progress within epochs, for a live display; the driver collects it."""

    def __init__(self):
        self.items: list[dict] = []

    def put(self, item: dict) -> None:
        self.items.append(item)

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        return items


BATCH_REPORT_EVERY_S = 0.25  # a live display redraws a few times a second: more reports would be wasted


def batch_reporter(inbox, data: SplitData, folds: list[int]) -> Callable[[int, int, int], None] | None:
    """The training loop's on_batch for a group of folds: a report to `inbox` at most every BATCH_REPORT_EVERY_S."""
    if inbox is None:
        return None
    last = [0.0]

    def report(epoch: int, done: int, steps: int) -> None:
        now = time.monotonic()
        if now - last[0] < BATCH_REPORT_EVERY_S:
            return
        last[0] = now
        for split in folds:  # ray: fire and forget, the step goes on at once
            inbox.put.remote({"split": split, "name": data.name(split), "epoch": epoch, "batch": done, "of": steps})

    return report


def train_folds(
    config: dict,
    folds: list[int],
    gpus: float,
    data: SplitData,
    checkpoint: str,
    recipe: ModelRecipe,
    inbox=None,
    stamp: Stamp | None = None,
) -> Iterator[dict]:
    """Train a group of folds from their last checkpoint, yielding a report after every epoch and a final one.

    One fold trains with the plain loop; several MLP folds train at once as one stacked model. Each fold's model is
    `recipe`'s, behind the normalisation step of its own training part; with a test set, each is evaluated on it. A
    fold whose loss stops being finite has its final report (diverged, without predictions) sent at once; the others
    train on. The checkpoint holds the run's `stamp`, and one with another run's is refused.
    """
    from distml.train import Diverged, Divergence, fit, fit_group, new_group_state, new_state  # torch: here only

    settings = KFoldConfig.from_dict(config).train_settings
    device = device_for(gpus)
    images, labels = tensors(data, device)
    train_indices, val_indices = (
        list(part) for part in zip(*(fold_index(data, f, device) for f in folds), strict=True)
    )
    single = len(folds) == 1
    if single:
        build = lambda: recipe.for_fold(images, train_indices[0])  # noqa: E731
        state = new_state(settings, folds[0], device, build, recipe.optimizer, recipe.loss)
    else:
        stats = [recipe.normalization(images, index) for index in train_indices]
        state = new_group_state(settings, folds, device, recipe.build, None if stats[0] is None else stats)
    restore_checkpoint(state, checkpoint, stamp)
    histories = [state.history] if single else state.histories  # after the restore, which replaces the lists
    reported = set() if single else set(state.diverged)  # a checkpoint's diverged folds were reported before it

    on_batch = batch_reporter(inbox, data, folds)

    def fit_until(epoch: int) -> list:  # trains up to `epoch` (nothing once it is done), then validates
        if not single:
            return fit_group(
                state, settings, images, labels, train_indices, val_indices, until=epoch, on_batch=on_batch
            )
        train_index, val_index = train_indices[0], val_indices[0]
        try:
            return [fit(state, settings, images, labels, train_index, val_index, until=epoch, on_batch=on_batch)]
        except Diverged as stop:
            return [stop.divergence]

    indices = list(zip(train_indices, val_indices, strict=True))
    keep = bool(config.get("keep_fold_models"))

    def final(positions: list[int], vals: list) -> dict:  # the final report of the group's folds at these positions
        reported.update(positions)
        models = [state.model] if single else state.model.unstack()
        pick = lambda items: [items[i] for i in positions]  # noqa: E731
        columns = map(pick, (folds, models, histories, vals, indices))
        return final_report(data, *columns, device, state.train_seconds, keep)

    vals = None
    for epoch in range(state.epochs_done + 1, settings.epochs + 1):
        vals = fit_until(epoch)
        diverged = {i for i, val in enumerate(vals) if isinstance(val, Divergence)}
        if diverged - reported:
            yield final(sorted(diverged - reported), vals)
        if len(diverged) == len(folds):
            return  # nothing left to train or checkpoint
        save_checkpoint(state, checkpoint, stamp)
        training = [i for i in range(len(folds)) if i not in diverged]
        yield epoch_report(data, [folds[i] for i in training], [histories[i][-1] for i in training])
    if vals is None:  # every epoch was done before this trainer started: only the validation is left
        vals = fit_until(settings.epochs)
    yield final([i for i in range(len(folds)) if i not in reported], vals)


def take_progress(inbox) -> list[dict]:
    """The progress items the trainers left in `inbox` since the last take; none when it does not answer in time (a
    live display then skips a redraw: the run goes on)."""
    try:
        return ray.get(inbox.take.remote(), timeout=RoomWatch.CHECK_EVERY_S)  # ray:
    except ray.exceptions.RayError:  # ray: a timeout, or the inbox's node lost
        return []


def stalled(heard: dict, now: float, timeout_s: float | None) -> list:
    """The keys of `heard` (each running group's time of its last report) silent for more than `timeout_s` seconds;
    none without a timeout."""
    if timeout_s is None:
        return []
    return [key for key, last in heard.items() if now - last > timeout_s]


def stall_reason(silent_s: float, timeout_s: float) -> str:
    return f"no epoch reported for {silent_s:.0f} s (--stall-timeout {timeout_s:g})"


def log_batches(items: list[dict]) -> None:
    """The latest progress within its epoch of each fold, as events for the live display."""
    latest = {item["split"]: item for item in items}
    for item in latest.values():
        event = BatchProgress(item["name"], item["split"], item["epoch"], item["batch"], item["of"])
        publish(log, f"{item['name']}: epoch {item['epoch']}, batch {item['batch']}/{item['of']}", event)


@ray.remote  # ray: resources are set per run with .options()
class FoldTrainer:
    """One trainer process, kept for every group of folds it is given."""

    def __init__(self, threads: int):
        import torch  # the trainer's process: torch and the loop load now, while the driver still prepares the run

        import distml.train  # noqa: F401

        torch.set_num_threads(threads)

    def ready(self) -> bool:
        """Answers once the process is up (torch imported): a stall is counted from then."""
        return True

    def train(
        self,
        config: dict,
        folds: list[int],
        gpus: float,
        data: SplitData,
        checkpoint: str,
        recipe: ModelRecipe,
        inbox=None,
        stamp: Stamp | None = None,
    ) -> Iterator[dict]:
        yield from train_folds(config, folds, gpus, data, checkpoint, recipe, inbox, stamp)


def start_trainers(count: int, the_plan: Plan, threads_share: bool) -> list:
    """`count` trainer slots, asked for now so that their processes start while the driver does the rest.

    On one CPU-only node the slots are threads of one process: torch releases the GIL inside its kernels, so two
    threads train as fast as two processes, and a worker then costs its models and optimizer state, not a second
    Python with torch loaded. Only for models that may share a process (`threads_share`: the built-in MLP; others
    may draw from torch's one global generator, for dropout say, which threads would share, so a fold would no
    longer repeat exactly) and one CPU per worker (torch's intra-op threads barely help a thread other than the main
    one). Elsewhere each slot is its own process.
    """
    if (
        count > 1
        and the_plan.nodes == 1
        and the_plan.cpus_per_worker == 1
        and not the_plan.gpus_per_worker
        and threads_share
    ):
        return [_new_trainer(the_plan, slots=count)] * count
    return [_new_trainer(the_plan) for _ in range(count)]


def _new_trainer(the_plan: Plan, slots: int = 1):
    options = {
        "num_cpus": the_plan.cpus_per_worker * slots,
        "num_gpus": the_plan.gpus_per_worker,
        "max_concurrency": slots,  # ray: one thread per slot
    }
    return FoldTrainer.options(**options).remote(max(1, int(the_plan.cpus_per_worker)))  # ray:


def run_groups(
    config: KFoldConfig,
    groups: list[list[int]],
    trainers: list,
    data: SplitData,
    the_plan: Plan,
    storage_path: str,
    recipe: ModelRecipe,
    on_fold_done: Callable[[dict, str | None], None],
    stamp: Stamp | None = None,
) -> list[str]:
    """Train the groups on the trainers, a group per idle trainer; `on_fold_done(result, outputs)` as each fold finishes
    (worker.fold_result and worker.fold_outputs; a fold that diverged has no outputs, None). Each group's checkpoint
    holds the run's `stamp` (checkpoints.Stamp).

    A group whose trainer dies (its process or node lost), whose training raised, or whose trainer reported nothing
    for --stall-timeout seconds (then killed) is retried from its last epoch checkpoint, up to --max-failures times; a
    dead trainer is replaced, for every slot it held. Returns the errors of groups that failed for good, and why the
    run ended early if its cluster lost the room for a trainer. Ctrl-C (or a stop signal the CLI turns into it) kills
    the trainers and is raised again; finished folds stay.
    """
    data_ref = ray.put(data)  # ray: once; trainers on the same node read it zero-copy
    ship_model_code(recipe.model, recipe.loss, recipe.optimizer)
    recipe_ref = ray.put(recipe)  # ray: once (a user's callable model factory can be large)
    pending = deque(groups)
    failures = {tuple(group): 0 for group in groups}
    slots = list(trainers)  # slot i's trainer; threaded slots of one process share a handle
    idle, running, errors = list(range(len(slots))), {}, []
    watch = RoomWatch(config.cluster, config.cluster.lost_node_grace_s)
    options = config.to_dict()
    inbox = ProgressInbox.remote() if wants_batches() else None  # ray: only for a live display
    wait_s = BATCH_REPORT_EVERY_S if inbox is not None else RoomWatch.CHECK_EVERY_S
    stall_timeout_s = config.cluster.stall_timeout_s
    heard = {}  # each running stream's last report (an epoch, or progress within one): to find a hung trainer
    starting = {}  # with a stall timeout, each trainer still starting (its silence is no stall yet) -> its ready()

    def watch_start(trainer) -> None:
        if stall_timeout_s is not None:  # ray: before any train() call, which a one-slot trainer would run first
            starting[trainer] = trainer.ready.remote()

    for trainer in set(slots):
        watch_start(trainer)

    def replace_dead(trainer) -> None:
        """Every slot of a trainer whose process is gone gets a trainer of its own (once, however many fail)."""
        for i, held in enumerate(slots):
            if held is trainer:
                slots[i] = _new_trainer(the_plan)
                watch_start(slots[i])

    def stop(stream) -> None:
        slot, _, _ = running.pop(stream)
        heard.pop(stream)
        idle.append(slot)

    def failed(group: list[int], why: str) -> None:
        """Retry a group from its last epoch checkpoint, or, past --max-failures, record its error for good."""
        failures[tuple(group)] += 1
        count = failures[tuple(group)]
        if count <= config.cluster.max_failures:
            names = [data.name(split) for split in group]
            publish(
                log,
                f"folds {group}: trainer failed (failure {count}: {why}); retrying from its last epoch checkpoint",
                UnitRetried(names, list(group), count, why),
            )
            pending.appendleft(group)
        else:
            log.info(f"folds {group}: failed for good after {count} failure(s)")
            errors.append(f"folds {group}: {why}")

    def kill_stalled(stream, why: str) -> None:
        """Kill a hung trainer; its group fails, and the other groups it held (threaded slots) start again."""
        _, trainer, group = running[stream]
        ray.kill(trainer)  # ray:
        replace_dead(trainer)
        for other, (_, held, other_group) in list(running.items()):
            if held is trainer and other is not stream:
                stop(other)
                log.info(f"folds {other_group}: its trainer was stopped with folds {group}'s; starting them again")
                pending.appendleft(other_group)
        stop(stream)
        failed(group, why)

    try:
        while pending or running:
            while pending and idle:
                slot, group = idle.pop(), pending.popleft()
                trainer, checkpoint = slots[slot], checkpoint_location(storage_path, group)
                gpus = the_plan.gpus_per_worker
                stream = trainer.train.remote(  # ray:
                    options, group, gpus, data_ref, checkpoint, recipe_ref, inbox, stamp
                )
                running[stream], heard[stream] = (slot, trainer, group), time.monotonic()
            ready, _ = ray.wait(list(running), num_returns=1, timeout=wait_s)  # ray:
            if inbox is not None:
                items = take_progress(inbox)
                log_batches(items)
                splits = {item["split"] for item in items}
                for stream, (_, _, group) in running.items():
                    if splits.intersection(group):
                        heard[stream] = time.monotonic()
            if watch.lost():
                errors.append(watch.reason)
                break
            for stream in ready:
                _, trainer, group = running[stream]
                try:
                    report = ray.get(next(stream))  # ray:
                except StopIteration:
                    stop(stream)
                    continue
                except ray.exceptions.RayError as exc:  # ray: the trainer's process died, or its training raised
                    stop(stream)
                    if isinstance(exc, ray.exceptions.RayActorError):  # ray: gone; a raised error leaves it usable
                        replace_dead(trainer)
                    failed(group, error_line(exc))
                    continue
                heard[stream] = time.monotonic()
                if not report["fold_done"]:
                    log_epochs(report, config.epochs)
                    continue
                outputs = json.loads(report["outputs_json"])
                for result, output in zip(json.loads(report["results_json"]), outputs, strict=True):
                    result["attempts"] = 1 + failures[tuple(group)]
                    on_fold_done(result, output)
            now = time.monotonic()
            if starting:  # ray: the trainers whose processes came up (or died) since the last look
                up, _ = ray.wait(list(starting.values()), num_returns=len(starting), timeout=0)
                for trainer in [trainer for trainer, ref in starting.items() if ref in up]:
                    del starting[trainer]
            for stream, (_, trainer, _) in running.items():
                if trainer in starting:
                    heard[stream] = now
            silent = stalled(heard, now, stall_timeout_s)
            if silent:  # ray: a report that came in meanwhile, not yet taken, is no stall
                reported, _ = ray.wait(silent, num_returns=len(silent), timeout=0)
                for stream in silent:
                    if stream in running and stream not in reported:  # not stopped with another of its trainer's
                        kill_stalled(stream, stall_reason(now - heard[stream], stall_timeout_s))
    except KeyboardInterrupt:
        log.info("interrupted: stopping the trainers; the finished folds are kept")
        raise
    finally:
        for trainer in {id(t): t for t in [*slots, *(t for _, t, _ in running.values())]}.values():
            ray.kill(trainer)  # ray: their resources are free at once, on a cluster too
    return errors
