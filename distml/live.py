"""A live progress display drawn with rich from the events on the `distml` logger's records (see progress.py): a bar
for the whole run with its ETA, a bar per running fold (or trial) with its epoch, its batches and its last validation
accuracy, and every other message (a fold finished, a retry, a warning) as a line above the bars.

The `distml` command shows it on a terminal and in a notebook (see `cli._progress`). From Python:

    import logging
    from distml.live import LiveDisplay

    logger = logging.getLogger("distml")
    logger.setLevel(logging.INFO)
    logger.addHandler(LiveDisplay())

The display starts at a run's RunStarted and stops at its RunEnded; a run that raises ends without one, so a caller
that keeps going afterwards (a notebook) calls the handler's close() to stop it.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from distml.progress import BatchProgress, EpochEnded, RunEnded, RunStarted, UnitEnded, UnitRetried

REFRESHES_PER_SECOND = 4  # batch reports may come hundreds a second; the screen changes this often at most

_TITLES = {"kfold": ("K-fold", "fold")}  # a command's title and what its units are; others train trials


class LiveDisplay(logging.Handler):
    """Draws the runs the `distml` logger reports on `console` (by default stderr); a record without an event, and a
    fold's end or retry, is printed as its message, formatted by the handler's formatter."""

    wants_batches = True  # the run then reports progress within epochs too (progress.wants_batches)

    def __init__(self, console: Console | None = None):
        super().__init__(logging.INFO)
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._run_task = TaskID(0)
        self._epochs = 0
        self._finished = 0
        self._bars: dict[str, TaskID] = {}
        self._done: dict[str, float] = {}  # epochs done per unit, with the share of the epoch in progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "event", None)
            if isinstance(event, RunStarted):
                self._print(record)
                self._start(event)
            elif isinstance(event, RunEnded):
                self._stop()
                self._print(record)
            elif self._progress is None:  # no run drawn (a command without events): lines, as without a terminal
                if not isinstance(event, BatchProgress):
                    self._print(record)
            elif isinstance(event, EpochEnded):
                accuracy = event.record["val_accuracy"]
                self._set(event.unit, event.epoch, epoch=event.epoch, batch=None, val_accuracy=accuracy, note="")
            elif isinstance(event, BatchProgress):
                done = event.epoch - 1 + event.batch / max(event.batches, 1)
                batch = f"{event.batch}/{event.batches}"
                self._set(event.unit, done, epoch=event.epoch, batch=batch, note="")
            elif isinstance(event, UnitEnded):
                self._print(record)
                self._unit_ended(event.unit)
            elif isinstance(event, UnitRetried):
                self._print(record)
                for unit in event.units:
                    if unit in self._bars:
                        self._progress.update(self._bars[unit], note=f"retry {event.attempt}")
            else:
                self._print(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Stop the display, its last frame left on screen."""
        with self.lock:
            self._stop()
        super().close()

    def _print(self, record: logging.LogRecord) -> None:
        # a Text, not a str: a message's brackets are not rich markup
        self.console.print(Text(self.format(record)))

    def _start(self, event: RunStarted) -> None:
        self._stop()
        title, noun = _TITLES.get(event.command, (event.command, "trial"))
        noun += "s" if len(event.units) != 1 else ""
        resumed = f" (of {event.total}, resumed)" if event.resumed else ""
        self._progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=20),
            _Detail(),
            console=self.console,
            refresh_per_second=REFRESHES_PER_SECOND,
            # stdout's lines go above the bars when they share the screen; redirected, stdout stays where it goes
            redirect_stdout=sys.stdout.isatty(),
        )
        self._epochs = event.epochs
        self._finished = 0
        self._done = dict.fromkeys(event.units, 0.0)
        self._run_task = self._progress.add_task(
            f"{title}: {len(event.units)} {noun}{resumed}",
            total=len(event.units) * event.epochs,
            units=len(event.units),
            finished=0,
            noun=noun,
        )
        self._progress.start()

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._bars = {}
        self._done = {}

    def _set(self, unit: str, done: float, **fields) -> None:
        """A unit's bar at `done` epochs (created as the unit first reports), and the run's bar with it."""
        progress = self._progress
        self._done[unit] = done  # a unit RunStarted did not name joins the run
        if unit not in self._bars:
            self._bars[unit] = progress.add_task(
                f"  {unit}", total=self._epochs, epochs=self._epochs, val_accuracy=None
            )
        progress.update(self._bars[unit], completed=done, **fields)
        self._update_run()

    def _unit_ended(self, unit: str) -> None:
        self._done[unit] = self._epochs
        self._finished += 1
        if unit in self._bars:
            self._progress.remove_task(self._bars.pop(unit))
        self._update_run()

    def _update_run(self) -> None:
        self._progress.update(
            self._run_task,
            completed=sum(self._done.values()),
            total=len(self._done) * self._epochs,
            units=len(self._done),
            finished=self._finished,
        )


class _Detail(ProgressColumn):
    """The run's epochs, finished units and ETA; a unit's epoch, batches, last validation accuracy and retry."""

    def render(self, task: Task) -> Text:
        fields = task.fields
        if "noun" in fields:
            parts = [
                f"{int(task.completed)}/{task.total:.0f} epochs",  # whole epochs: 2.6 done is not 3
                f"{fields['finished']}/{fields['units']} {fields['noun']} done",
                _eta(task),
            ]
        else:
            parts = [f"epoch {fields.get('epoch', 0)}/{fields['epochs']}"]
            if fields.get("batch"):
                parts.append(f"batch {fields['batch']}")
            if fields["val_accuracy"] is not None:
                parts.append(f"val_acc {fields['val_accuracy']:.4f}")
            if fields.get("note"):
                parts.append(fields["note"])
        return Text("  ".join(parts))


def _eta(task: Task) -> str:
    """The time the whole run still needs at its pace so far. (rich's TimeRemainingColumn goes by the last 30 s of
    updates, and an epoch may take longer than that.)"""
    if task.finished:
        return f"elapsed {timedelta(seconds=round(task.finished_time or 0))}"
    if not task.completed or task.elapsed is None or task.total is None:
        return "ETA -:--:--"
    remaining = task.elapsed * (task.total - task.completed) / task.completed
    return f"ETA {timedelta(seconds=round(remaining))}"
