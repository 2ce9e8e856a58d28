"""The progress display: a LiveDisplay fed a synthetic run's events (no Ray) on a rich console, and the CLI's choice
of handler in a real process: a live display under a pseudo-terminal, today's lines through a pipe, nothing but
the final line with -q. Run as a script (`python test_live.py MODE PAUSE`), this file is that process."""

from __future__ import annotations

import builtins
import io
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import time

import pytest
import typer
from rich.console import Console

from distml.cli import _progress
from distml.errors import DistmlError
from distml.live import LiveDisplay
from distml.progress import (
    BatchProgress,
    EpochEnded,
    RunEnded,
    RunStarted,
    UnitEnded,
    UnitRetried,
    epoch_line,
    publish,
)

UNITS, EPOCHS = ["fold 0", "fold 1"], 3
RUN_DIR = "results/kfold-live"
FINAL_LINE = f"2/2 folds, mean val_accuracy 0.9305 ± 0.0007; wall 2.0 s; report in {RUN_DIR}"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CURSOR_UP = "\x1b[1A"


def synthetic_run() -> list[tuple[str, object, float]]:
    """(message, event or None, pause after it) of a 2-fold, 3-epoch run with a retry, as kfold.py, fold_actors.py
    and worker.py publish them. The pauses let a display refreshed 4 times a second draw each state."""
    started = RunStarted("kfold", RUN_DIR, UNITS, 2, EPOCHS, {"k": 2}, {"source": "mnist"}, resumed=False)
    steps: list[tuple[str, object, float]] = [
        ("running folds [0, 1] of 2: 2 trainers at a time, 1 CPU each, on 1 node(s) with 2 CPU and 0 GPU", started, 0),
        ("a message without an event [in brackets]", None, 0),
    ]
    for epoch in range(1, EPOCHS + 1):
        for index, unit in enumerate(UNITS):
            scores = {
                "train_loss": 0.5 / epoch,
                "train_accuracy": 0.85 + 0.01 * epoch,
                "val_loss": 0.6 / epoch,
                "val_accuracy": 0.9 + 0.01 * epoch + 0.001 * index,
                "seconds": 0.3,
            }
            line = epoch_line(unit, {"epoch": epoch, **scores}, EPOCHS)
            steps.append((line, EpochEnded(unit, index, epoch, EPOCHS, scores), 0.1))
        if epoch == 2:
            retry = "folds [1]: trainer failed (failure 1: RuntimeError: boom); retrying from its last epoch checkpoint"
            steps.append((retry, UnitRetried(["fold 1"], [1], 1, "RuntimeError: boom"), 0.6))
    steps[-1] = (*steps[-1][:2], 0.6)  # the bars at 3/3 are drawn before the folds end
    for index, unit in enumerate(UNITS):
        accuracy = 0.93 + 0.001 * index
        line = f"{unit}: finished, val_acc={accuracy:.4f} in 0.9 s on node-a (cpu)"
        steps.append((line, UnitEnded(unit, index, {"val_accuracy": accuracy}), 0.1))
    ended = RunEnded("kfold", RUN_DIR, "finished", [], [])
    steps.append((f"{RUN_DIR}: finished, 2 of 2 folds", ended, 0))
    return steps


def publish_run(log: logging.Logger, pause: float = 1.0) -> None:
    for message, event, seconds in synthetic_run():
        if event is None:
            log.info(message)
        else:
            publish(log, message, event)
        time.sleep(seconds * pause)


def main(mode: str, pause: float) -> None:
    """The process the terminal and pipe tests run: the CLI's progress handler over the synthetic run, then the final
    line, printed inside the block as `distml kfold` prints it."""
    with _progress(quiet=mode == "quiet"):
        publish_run(logging.getLogger("distml.kfold"), pause)
        typer.echo(FINAL_LINE)


# ---- the display itself, on a console writing to a string ----


@pytest.fixture
def log():
    """A child of the `distml` logger that keeps its records to the handlers a test gives it."""
    logger = logging.getLogger("distml.tests.live")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def _display(log: logging.Logger) -> tuple[LiveDisplay, io.StringIO]:
    out = io.StringIO()
    display = LiveDisplay(Console(file=out, force_terminal=True, force_interactive=True, width=100))
    log.addHandler(display)
    return display, out


def test_the_display_draws_a_bar_per_fold_and_prints_the_other_messages(log):
    display, out = _display(log)
    publish_run(log)
    drawn = out.getvalue()
    text = ANSI.sub("", drawn)
    assert CURSOR_UP in drawn and display._progress is None  # drew live, then stopped at RunEnded
    assert "K-fold: 2 folds" in text and "6/6 epochs  2/2 folds done" in text
    for unit, accuracy in (("fold 0", "0.9300"), ("fold 1", "0.9310")):
        assert f"  {unit} " in text
        assert re.search(rf"  {unit} .*epoch 3/3  val_acc {accuracy}", text), text
        assert f"{unit}: finished, val_acc={accuracy} in 0.9 s on node-a (cpu)\n" in text
    assert re.search(r"  fold 1 .*epoch 2/3  val_acc 0\.9210  retry 1", text), text
    assert (
        "folds [1]: trainer failed (failure 1: RuntimeError: boom); retrying from its last epoch checkpoint\n" in text
    )
    assert "a message without an event [in brackets]\n" in text  # a message is no rich markup
    assert "epoch 1/3 train_loss" not in text  # epochs are drawn, not printed
    assert text.endswith(f"{RUN_DIR}: finished, 2 of 2 folds\n")


def test_batches_move_the_bar_and_redraw_a_few_times_a_second(log):
    _, out = _display(log)
    publish(log, "running fold 0", RunStarted("kfold", RUN_DIR, ["fold 0"], 5, 1, {}, {}, resumed=True))
    started = time.perf_counter()
    for batch in range(1, 1001):
        publish(log, f"fold 0: batch {batch}", BatchProgress("fold 0", 0, 1, batch, 1000))
        time.sleep(0.0005)
    seconds = time.perf_counter() - started
    publish(log, f"{RUN_DIR}: interrupted", RunEnded("kfold", RUN_DIR, "interrupted", [], []))
    text = ANSI.sub("", out.getvalue())
    frames = text.count("K-fold: 1 fold (of 5, resumed)")
    assert 2 <= frames <= 4 * seconds + 4, (frames, seconds)
    assert re.search(r"  fold 0 .*epoch 1/1  batch 1000/1000", text), text
    assert "1/1 epochs  0/1 fold done" in text
    assert "fold 0: batch" not in text  # batches are drawn, never printed


def test_without_a_run_every_message_is_a_line_and_close_stops_a_run(log):
    display, out = _display(log)
    scores = {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.9, "seconds": 1.0}
    publish(log, "holdout: epoch 1/2", EpochEnded("holdout", 0, 1, 2, scores))
    publish(log, "holdout: batch 3", BatchProgress("holdout", 0, 2, 3, 10))
    assert ANSI.sub("", out.getvalue()) == "holdout: epoch 1/2\n"
    publish(log, "running folds", RunStarted("kfold", RUN_DIR, UNITS, 2, EPOCHS, {}, {}, resumed=False))
    publish(log, "fold 0: epoch 1/3", EpochEnded("fold 0", 0, 1, EPOCHS, scores))
    display.close()  # the run raised: the CLI leaves the block without a RunEnded
    assert display._progress is None and out.getvalue().endswith("\x1b[?25h")  # the cursor is back
    assert re.search(r"  fold 0 .*epoch 1/3  val_acc 0\.9000", ANSI.sub("", out.getvalue()))


# ---- the CLI's choice of handler, in a process of its own ----


def _environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DISTML_PROGRESS", "TTY_"))}
    for key in ("FORCE_COLOR", "NO_COLOR", "COLUMNS", "LINES"):
        env.pop(key, None)
    return {**env, "TERM": "xterm-256color", **extra}


def _under_a_terminal(mode: str, pause: float = 1.0, **env: str) -> str:
    """What the script writes to a pseudo-terminal of 100 columns (stdout and stderr both), as a user sees it."""
    import fcntl
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    command = [sys.executable, __file__, mode, str(pause)]
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=_environment(**env))
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        if not select.select([leader], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the script ended and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=10) == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def _lines(text: str) -> list[str]:
    return [line for line in ANSI.sub("", text).replace("\r", "\n").split("\n") if line.strip()]


def test_on_a_terminal_the_command_draws_live_and_prints_the_final_line_once():
    drawn = _under_a_terminal("live")
    assert CURSOR_UP in drawn and "\x1b[?25l" in drawn  # the cursor hidden and moved: drawn live
    text = ANSI.sub("", drawn)
    assert "K-fold: 2 folds" in text and "6/6 epochs  2/2 folds done" in text
    assert re.search(r"  fold 0 .*epoch 3/3  val_acc 0\.9300", text), text
    assert re.search(r"\[ +\d+\.\ds\] fold 1: finished, val_acc=0\.9310 in 0\.9 s on node-a \(cpu\)\n", text)
    assert re.search(r"\[ +\d+\.\ds\] folds \[1\]: trainer failed", text)
    assert "epoch 1/3 train_loss" not in text
    lines = _lines(drawn)
    assert lines.count(FINAL_LINE) == 1 and lines[-1] == FINAL_LINE, lines[-4:]
    assert lines[-2].endswith(f"] {RUN_DIR}: finished, 2 of 2 folds")  # after the last frame, nothing half-drawn


def _plain_lines(text: str) -> list[str]:
    """The messages of '[  12.3s] message' lines, each line's stamp checked."""
    messages = []
    for line in text.splitlines():
        stamp, message = line.split("] ", 1)
        assert re.fullmatch(r"\[ *\d+\.\ds", stamp) and len(stamp) == 9, line
        messages.append(message)
    return messages


def test_through_a_pipe_the_command_prints_a_line_per_message():
    process = subprocess.run(
        [sys.executable, __file__, "live", "0"], capture_output=True, text=True, env=_environment(), timeout=60
    )
    assert process.returncode == 0, process.stderr
    assert "\x1b" not in process.stderr + process.stdout
    assert _plain_lines(process.stderr) == [message for message, _, _ in synthetic_run()]
    assert process.stdout == FINAL_LINE + "\n"


def test_lines_can_be_chosen_on_a_terminal():
    text = _under_a_terminal("live", pause=0, DISTML_PROGRESS="lines")
    assert "\x1b" not in text
    assert _plain_lines(text.removesuffix(FINAL_LINE + "\n")) == [message for message, _, _ in synthetic_run()]


def test_quiet_prints_only_the_final_line_even_on_a_terminal():
    assert _under_a_terminal("quiet", pause=0) == FINAL_LINE + "\n"


def test_a_notebook_gets_the_live_display(monkeypatch):
    class ZMQInteractiveShell:  # what rich looks for: Jupyter's kernel
        pass

    monkeypatch.setitem(sys.modules, "IPython", sys.modules.get("IPython") or type(sys)("IPython"))
    monkeypatch.setattr(builtins, "get_ipython", ZMQInteractiveShell, raising=False)
    with _progress(quiet=False):
        handler = logging.getLogger("distml").handlers[-1]
        assert isinstance(handler, LiveDisplay) and handler.console.is_jupyter
    assert handler not in logging.getLogger("distml").handlers


def test_an_unknown_progress_choice_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("DISTML_PROGRESS", "bars")
    with pytest.raises(DistmlError, match=r"^DISTML_PROGRESS: must be auto, live or lines, got 'bars'$"):
        with _progress(quiet=False):
            pass


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
