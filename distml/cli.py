"""The `distml` command: parse, call the library, print. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.core import _click as click  # typer vendors click: its exceptions are these, not the click package's

from distml.atomic import write_csv
from distml.config import (
    DEFAULT_IMAGE_SIZE,
    RESUMABLE_CLUSTER_FIELDS,
    ClusterConfig,
    FinetuneConfig,
    HoldoutConfig,
    KFoldConfig,
    PipelineConfig,
    SweepConfig,
    parse_model_args,
)
from distml.errors import DistmlError, Interrupted
from distml.rundir import PER_CLASS_FILE, default_out
from distml.version import __version__

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _OneLineErrors(TyperGroup):
    """Click prints usage errors as a paragraph; a user (and a script) wants one line and exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message())
            sys.exit(0)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()} (see --help)".replace("\n", " "), err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:  # typer's vendored click has no Abort of its own
            click.echo("error: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    help="Ray-distributed K-fold cross-validation for any PyTorch classifier, on a laptop or a cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"distml {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print distml's version and exit."),
    ] = False,
) -> None:
    """Ray-distributed K-fold cross-validation for any PyTorch classifier, on a laptop or a cluster.

    Exit status: 0 done, 1 a run failed, 2 bad input, 129/130/143 interrupted (SIGHUP, Ctrl-C, SIGTERM).
    Example: distml kfold --model mynets.py:build --data imagefolder:photos --k 5
    """


class _TimedLines(logging.Formatter):
    """A progress message as '[  12.3s] message', timed from the command's start."""

    def __init__(self):
        super().__init__()
        self.started = time.perf_counter()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.perf_counter() - self.started:7.1f}s] {record.getMessage()}"


class _ProgressLines(logging.Handler):
    """The distml logger's messages as lines on stderr, one each."""

    def __init__(self):
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _in_notebook() -> bool:
    """Jupyter (or Colab) runs this process: rich's test, once IPython is loaded at all (rich is a slow import)."""
    if "IPython" not in sys.modules:
        return False
    from rich.console import Console

    return Console().is_jupyter


def _progress_handler() -> logging.Handler:
    """A live display on a terminal or in a notebook, else a line per message (a pipe, a CI log, `ray job logs`);
    DISTML_PROGRESS=live or lines chooses."""
    choice = os.environ.get("DISTML_PROGRESS") or "auto"
    if choice not in ("auto", "live", "lines"):
        raise DistmlError(f"must be auto, live or lines, got {choice!r}", option="DISTML_PROGRESS")
    notebook = _in_notebook()
    if choice == "auto":
        terminal = sys.stderr.isatty() and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
        choice = "live" if terminal or notebook else "lines"
    if choice == "lines":
        return _ProgressLines()
    from rich.console import Console

    from distml.live import LiveDisplay  # rich.progress: a slow import, only for a live display

    # DISTML_PROGRESS=live draws even on a stderr that is no terminal (an IDE's console that reads ANSI codes)
    return LiveDisplay(Console(stderr=True, force_terminal=None if notebook else True))


@contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    """Show the library's progress for one command (nothing with -q); the library itself prints nothing. A live
    display stops before the command prints its result (at the run's end, or at the latest on leaving the block)."""
    if quiet:
        yield
        return
    logger = logging.getLogger("distml")
    handler = _progress_handler()
    handler.setFormatter(_TimedLines())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()  # a live display stops, its last frame left above what the command prints next
        logger.setLevel(level)


def _show_warnings_as_lines() -> None:
    """Our own warnings (the bundled-sample fallback) as one line each; third-party chatter stays hidden.

    Called inside warnings.catch_warnings(), so it changes nothing beyond one command.
    """
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=UserWarning, module=r"distml(\.|$)")
    warnings.showwarning = lambda message, *args, **kwargs: typer.echo(f"warning: {message}", err=True)


_STOPPED_BY: list[int] = []  # the stop signals received, last one last
_UNHOOK: list[Callable[[], None]] = []  # what ends the command's hook on Ray's start (_stop_on_signals)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _catch_stop_signals() -> None:
    """SIGINT, SIGTERM (`ray job stop`, Kubernetes) and SIGHUP (a closed terminal) stop a run as Ctrl-C does: the
    trainers stop, finished folds are kept and the resume line is printed. Installed once Ray has started (ray.init
    replaces SIGTERM's handler), by the CLI only: the library installs no handler."""

    def stop(signum, frame) -> None:
        _STOPPED_BY.append(signum)
        ctrl_c = signal.getsignal(signal.SIGINT)
        if signum != signal.SIGINT and callable(ctrl_c) and not getattr(ctrl_c, "distml_stop", False):
            # Ray Tune holds Ctrl-C for the length of a fit to end its trials gracefully (saving its state for the
            # resume): SIGTERM and SIGHUP go the same way, and the run then raises as for Ctrl-C
            ctrl_c(signal.SIGINT, frame)
            return
        raise Interrupted(signum)

    stop.distml_stop = True
    for number in STOP_SIGNALS:
        signal.signal(number, stop)


@contextmanager
def _restored(handlers: dict) -> Iterator[None]:
    """When the block (a command) ends: no more hook on Ray's start, and the signal `handlers` back as they were
    (installed from the main thread only)."""
    try:
        yield
    finally:
        while _UNHOOK:  # a later library call in this process installs no handler of the CLI's
            _UNHOOK.pop()()
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)


def _interrupted_status() -> int:
    """128 + the signal that stopped the run: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return 128 + (_STOPPED_BY[-1] if _STOPPED_BY else signal.SIGINT)


def _stop_on_signals() -> None:
    """Install _catch_stop_signals each time the command starts or joins Ray (imports Ray: only once a command
    really runs)."""
    from distml.distributed import cluster

    _UNHOOK.append(cluster.on_connect(_catch_stop_signals))


def _run(action: Callable[[], int | None], quiet: bool = False) -> None:
    """Call the library with its progress shown; turn its DistmlError into one line and exit 2, Ctrl-C into exit
    130. The stop signals' handlers are as before afterwards: a command run in-process (as the tests run them) leaves
    none behind."""
    _STOPPED_BY.clear()
    handlers = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    try:
        with warnings.catch_warnings(), _progress(quiet), _restored(handlers):
            _show_warnings_as_lines()
            code = action()
    except DistmlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt as stop:
        resume = getattr(stop, "resume", None)
        typer.echo(f"interrupted: resume with `{resume}`" if resume else "interrupted", err=True)
        raise typer.Exit(_interrupted_status()) from None
    except Exception as exc:  # a bug or a broken environment: one line, the traceback only on request
        if os.environ.get("DISTML_DEBUG"):
            raise
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {first_line} (set DISTML_DEBUG=1 for the traceback)", err=True)
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)


# ---- options shared by several commands, declared once ----

DataDir = Annotated[
    Path | None,
    typer.Option(
        help="Folder with the four MNIST IDX files (raw or .gz). Default: the per-user cache, a "
        "download, else the sample shipped with distml.",
        envvar="DISTML_DATA_DIR",
    ),
]
Address = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster to join (HOST:PORT, or 'auto'). Default: RAY_ADDRESS, else a local Ray.", envvar="RAY_ADDRESS"
    ),
]
Storage = Annotated[
    str | None,
    typer.Option(
        help="Where runs go: a local or mounted folder that holds the run folder (on a cluster of several nodes it "
        "must be shared by all, e.g. NFS/EFS), or an s3:// or gs:// URI that gets Ray's trial state and a copy of "
        "the report. Default: the run folder alone (--out).",
        envvar="DISTML_STORAGE",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result line.")]
Track = Annotated[
    str | None,
    typer.Option(
        help="Record the run in an experiment tracker: mlflow (to MLFLOW_TRACKING_URI; pip install "
        "'distml[mlflow]') or tensorboard (event files under the run folder). Example: --track mlflow",
    ),
]
Workers = Annotated[int, typer.Option(help="Trainers (or DDP workers, for a fine-tune) running at once.")]
TrialWorkers = Annotated[int, typer.Option(help="Trials running at once (fewer if the cluster holds fewer).")]
GracePeriod = Annotated[int, typer.Option(help="Epochs every trial runs before ASHA may stop it.")]
ReductionFactor = Annotated[
    float, typer.Option(help="ASHA keeps the best 1/this of the trials at each rung (above 1).")
]
CpusPerWorker = Annotated[float, typer.Option(help="CPUs per trainer or worker (also its torch threads).")]
GpusPerWorker = Annotated[
    float | None, typer.Option(help="GPUs per trainer or worker. Default: 1 when the cluster has GPUs, else 0.")
]
MaxFailures = Annotated[
    int, typer.Option(help="Retries of a fold, trial or worker group that fails, each from its last epoch checkpoint.")
]
LostNodeGrace = Annotated[
    float,
    typer.Option(
        help="Seconds a run whose cluster lost the nodes its trainers need waits for room to come back before it "
        "ends, keeping what finished.",
        envvar="DISTML_LOST_NODE_GRACE_S",
    ),
]
StallTimeout = Annotated[
    float | None,
    typer.Option(
        help="Seconds a fold trainer may go without reporting an epoch (its process's start does not count) before "
        "it is killed and its folds retried from their last epoch checkpoint, a failure like any other (see "
        "--max-failures). Default: no limit.",
        envvar="DISTML_STALL_TIMEOUT_S",
    ),
]
LrSchedule = Annotated[
    str,
    typer.Option(
        help="'constant' (the workshop's) or 'cosine': the rate decays from --lr to zero over the run, step by "
        "step (the CNN passes 99% validation accuracy with it, see README)."
    ),
]
Epochs = Annotated[int, typer.Option(help="Training epochs.")]
BatchSize = Annotated[int, typer.Option(help="Mini-batch size (across all workers).")]
Seed = Annotated[int, typer.Option(help="Seed for the split, initial weights and shuffling.")]
ValFraction = Annotated[
    float, typer.Option(help="Share of the training images held out (stratified) for validation curves.")
]
Limit = Annotated[
    int | None,
    typer.Option(help="Use only this many training images (a stratified subset): a quick smoke run. Default: all."),
]
Weights = Annotated[
    str,
    typer.Option(
        help="Starting ResNet18 weights: 'imagenet' (torchvision's, from its cache or a download), 'none' (random), "
        "or the path of a ResNet18 state dict."
    ),
]
ImageSize = Annotated[
    int, typer.Option(help="Side in pixels the 28x28 digits are resized to for ResNet18 (32-512); larger is slower.")
]


ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        help="The network: 'mlp' or 'cnn' (both adapt to the data's shape and classes), 'resnet18' (images), or "
        "your own factory as "
        "package.module:function or path/to/file.py:function, called with num_classes= and input_shape= (when it "
        "takes them) and the --model-arg keywords; it returns an nn.Module whose forward gives (N, classes) logits.",
    ),
]
ModelArg = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg", help="KEY=VALUE for the model factory, repeated; values parsed as JSON where they parse."
    ),
]
DataOption = Annotated[
    str,
    typer.Option(
        "--data",
        help="What to train on: 'mnist' (see --data-dir), imagefolder:DIR (a sub-folder per class), npz:FILE "
        "(arrays x and y, see --x-key/--y-key) or csv:FILE (numeric features, label column --target).",
    ),
]
Target = Annotated[str | None, typer.Option(help="The label column of a csv: --data.")]
XKey = Annotated[str, typer.Option(help="The inputs' array in an npz: --data.")]
YKey = Annotated[str, typer.Option(help="The labels' array in an npz: --data.")]
Resize = Annotated[
    str | None, typer.Option(help="HxW: resize an imagefolder: --data's images to one size (needed for mixed sizes).")
]
Normalize = Annotated[
    str,
    typer.Option(
        help="'auto' (MNIST's constants for MNIST, else 'fold'), 'fold' (per channel or feature, from each fold's "
        "training part), 'none', or MEAN:STD values (comma-separated per channel or feature). A step of the model: "
        "exported models carry it."
    ),
]
TestData = Annotated[
    str | None,
    typer.Option(
        help="A test set kept out of every fold (the --data kinds); each model is scored on it. MNIST brings its own."
    ),
]


def _data_options(data, target, x_key, y_key, resize, normalize, test_data, model_args) -> dict:
    return {
        "data": data,
        "target": target,
        "x_key": x_key,
        "y_key": y_key,
        "resize": resize,
        "normalize": normalize,
        "test_data": test_data,
        "model_kwargs": parse_model_args(model_args or []),
    }


def _out(command: str) -> Any:
    return typer.Option(
        help=f"Run folder for the results: results/{command}-TIME by default; a name inside --storage when that is "
        "a folder."
    )


def _cluster(
    address: str | None,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float | None,
    max_failures: int,
    workers_per_fold: int = 1,
    lost_node_grace: float = 60.0,
    stall_timeout: float | None = None,
):
    return ClusterConfig(
        address=address,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        workers_per_fold=workers_per_fold,
        max_failures=max_failures,
        lost_node_grace_s=lost_node_grace,
        stall_timeout_s=stall_timeout,
    )


# What a resumed run takes from the call that resumes it: where it runs and with what (a new cluster may be larger),
# and how it is shown and tracked; every other option is the run's own, saved in its config.json. The cluster
# options by parameter name (--lost-node-grace sets lost_node_grace_s).
_RESUME_CLUSTER_PARAMETERS = {field.removesuffix("_s"): field for field in RESUMABLE_CLUSTER_FIELDS}
_RESUME_PARAMETERS = (*_RESUME_CLUSTER_PARAMETERS, "track", "quiet")
_GIVEN = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
_RESUME_GIVES = (
    " Only where it runs (--address, --workers and the other cluster options), -q and --track may be given with it; "
    "the saved address is not reused."
)


def _resume_overrides(ctx: typer.Context, resume: Path | None, also: tuple[str, ...] = ()) -> dict:
    """With --resume, the cluster options this call gives, as ClusterConfig fields (the address always: None when
    neither --address nor RAY_ADDRESS gives one); any other option on the command line is refused in one line.

    Given means given by the parser's account, whatever the value. An environment variable gives a resumable option
    and is ignored for the others: cluster.yaml sets DISTML_STORAGE on every node, and a job resuming a run there
    must not be refused for it. `also`: more of the command's parameters that a resume takes.
    """
    if resume is None:
        return {}
    allowed = (*_RESUME_PARAMETERS, *also)
    flags = {param.name: max(param.opts, key=len) for param in ctx.command.params}  # --quiet, not -q
    refused = [
        flag
        for name, flag in flags.items()
        if name not in (*allowed, "resume") and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if refused:
        raise DistmlError(
            f"{', '.join(refused)} cannot be changed when resuming: the run keeps its saved options; allowed: "
            + ", ".join(flags[name] for name in allowed if name in flags),
            option="--resume",
        )
    given = {
        field: ctx.params[name]
        for name, field in _RESUME_CLUSTER_PARAMETERS.items()
        if name in ctx.params and ctx.get_parameter_source(name) in _GIVEN
    }
    return {"address": ctx.params.get("address"), **given}


# ---- the commands ----


@app.command()
def kfold(
    ctx: typer.Context,
    k: Annotated[int, typer.Option("--k", help="Number of folds (2 up to the smallest class's size).")] = 5,
    repeats: Annotated[
        int,
        typer.Option(
            help="Repeat the K folds this many times with fresh shuffles (scikit-learn's RepeatedStratifiedKFold): "
            "R x k models, a steadier estimate.",
        ),
    ] = 1,
    groups: Annotated[
        str | None,
        typer.Option(
            help="Keep every group in one fold (scikit-learn's StratifiedGroupKFold): a file with one group label per "
            "line in dataset order, or a column of the --data CSV. Example: --groups patients.txt",
        ),
    ] = None,
    fold_file: Annotated[
        Path | None,
        typer.Option(
            "--folds",
            help="Your own assignment: a file with one fold index (0..k-1) per line in dataset order. Example: "
            "--folds folds.txt --k 5",
        ),
    ] = None,
    track: Track = None,
    keep_fold_models: Annotated[
        bool,
        typer.Option(
            help="Export every fold's model (fold_models/) and their ensemble (ensemble/, the mean of their "
            "probabilities), each loadable like a trained model.",
        ),
    ] = False,
    oof_format: Annotated[
        str, typer.Option(help="File format of the out-of-fold predictions: csv or parquet.")
    ] = "csv",
    model: ModelOption = "mlp",
    model_arg: ModelArg = None,
    data: DataOption = "mnist",
    target: Target = None,
    x_key: XKey = "x",
    y_key: YKey = "y",
    resize: Resize = None,
    normalize: Normalize = "auto",
    test_data: TestData = None,
    epochs: Annotated[int, typer.Option(help="Training epochs per fold.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for the fold split, initial weights and shuffling.")] = 0,
    lr_schedule: LrSchedule = "constant",
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("kfold")] = None,
    storage: Storage = None,
    workers: Workers = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = None,
    workers_per_fold: Annotated[
        int, typer.Option(help="Data-parallel workers per fold; above 1 each fold runs a Ray Train TorchTrainer (DDP).")
    ] = 1,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Cross-validate on only this many examples: a stratified subset drawn with --seed (train --limit's, "
            "and again on --resume), for a quick run. Not with --folds or --groups. Example: --limit 3000",
        ),
    ] = None,
    folds_per_trial: Annotated[
        str,
        typer.Option(
            help="Folds one trainer trains together: 'auto' (the folds shared out evenly, one group per worker), 1 "
            "(a fold at a time) or a number. An MLP group trains at once as a stacked model, about twice as fast on a "
            "CPU; other models always train a fold at a time.",
        ),
    ] = "auto",
    max_failures: MaxFailures = 2,
    lost_node_grace: LostNodeGrace = 60.0,
    stall_timeout: StallTimeout = None,
    address: Address = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted run in this folder: only unfinished folds run, with its saved options."
            + _RESUME_GIVES
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Stratified K-fold cross-validation of any model on any classification data, folds spread over Ray trainers.

    Example: distml kfold --model mynets.py:build --model-arg hidden=256 --data imagefolder:photos --k 5
    """

    def action() -> int:
        overrides = _resume_overrides(ctx, resume)  # before Ray or torch is imported
        from distml.kfold import NoFoldFinished, dataset_line, run_kfold

        _stop_on_signals()

        if folds_per_trial == "auto":
            per_trial = None
        elif folds_per_trial.lstrip("-").isdigit():
            per_trial = int(folds_per_trial)
        else:
            raise DistmlError(f"must be a number or 'auto', got {folds_per_trial!r}", option="--folds-per-trial")
        config = KFoldConfig(
            k=k,
            repeats=repeats,
            groups=groups,
            fold_file=None if fold_file is None else str(fold_file),
            keep_fold_models=keep_fold_models,
            oof_format=oof_format,
            track=track,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            lr_schedule=lr_schedule,
            **_data_options(data, target, x_key, y_key, resize, normalize, test_data, model_arg),
            folds_per_trial=per_trial,
            limit=limit,
            out=out,
            data_dir=data_dir,
            storage=storage,
            cluster=_cluster(
                address,
                workers,
                cpus_per_worker,
                gpus_per_worker,
                max_failures,
                workers_per_fold,
                lost_node_grace,
                stall_timeout,
            ),
        )
        try:
            outcome = run_kfold(config, resume=resume, cluster_overrides=overrides)
        except NoFoldFinished as failed:  # every fold failed or diverged: a failed run, not bad input
            typer.echo(f"error: {failed}", err=True)
            return 1
        # pandas and scipy load while the folds train (see kfold.REPORT_MODULES), not before Ray starts
        from distml.report import format_summary

        accuracy = outcome.summary.set_index("metric").loc["val_accuracy"]
        if not quiet:
            shown = outcome.folds.drop(columns=["node", "node_id"])
            typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            typer.echo("")
            typer.echo(format_summary(outcome.summary))
            typer.echo("")
            extra = (("out-of-fold", outcome.oof_scores), ("fold ensemble on the test set", outcome.ensemble_scores))
            for title, scores in extra:
                if scores is not None:
                    shown = [f"{row.metric} {row.value:.4f}" for row in scores.itertuples() if row.metric != "examples"]
                    typer.echo(f"{title}: {', '.join(shown)}")
        typer.echo(
            f"{len(outcome.folds)}/{outcome.splits} folds, mean val_accuracy {accuracy['mean']:.4f} ± "
            f"{accuracy['std']:.4f} (95% CI {accuracy['corrected_ci95_low']:.4f}-"
            f"{accuracy['corrected_ci95_high']:.4f}, corrected for overlapping folds); {dataset_line(outcome.run_dir)};"
            f" wall {outcome.wall_seconds:.1f} s; report in {outcome.run_dir}"
            + (f" and {outcome.uploaded_to}" if outcome.uploaded_to else "")
        )
        if outcome.failures:
            for failure in outcome.failures:
                typer.echo(f"error: {failure}", err=True)
            return 1
        if not outcome.complete:
            typer.echo(f"interrupted: resume with `distml kfold --resume {outcome.run_dir}`", err=True)
            return _interrupted_status()
        return 0

    _run(action, quiet)


def run_command(command: str, argv: list[str]) -> None:
    """`distml COMMAND ARGV...`, as the jobs/*.py entry points run it; first a line for the job log on where it runs.

    Inside `ray job submit` Ray sets RAY_ADDRESS, so the command joins the cluster the job runs in.
    """
    address = os.environ.get("RAY_ADDRESS")
    where = f"RAY_ADDRESS={address}" if address else "no RAY_ADDRESS: a local Ray unless --address is given"
    typer.echo(f"distml {__version__} from {Path(__file__).parent}; {where}", err=True)
    app([command, *argv], prog_name=f"jobs/{command}.py")


def _echo_trained(outcome, quiet: bool) -> None:
    results = outcome.results
    if not quiet:
        import pandas as pd  # a slow import: only for the table this prints

        table = pd.read_csv(outcome.run_dir / PER_CLASS_FILE).to_string(index=False, float_format=lambda v: f"{v:.4f}")
        typer.echo(f"per-class test scores:\n{table}\n")
    typer.echo(
        f"{results['model']}: test accuracy {results['accuracy']:.4f}, macro F1 {results['f1']:.4f}, "
        f"{results['parameters']:,} parameters, trained {results['train_seconds']:.1f} s "
        f"({results['train_images_per_second']:.0f} images/s); wall {outcome.wall_seconds:.1f} s; "
        f"results in {outcome.run_dir}"
    )


@app.command()
def train(
    model: ModelOption = "mlp",
    model_arg: ModelArg = None,
    data: DataOption = "mnist",
    target: Target = None,
    x_key: XKey = "x",
    y_key: YKey = "y",
    resize: Resize = None,
    normalize: Normalize = "auto",
    test_data: TestData = None,
    epochs: Epochs = 3,
    batch_size: BatchSize = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lr_schedule: LrSchedule = "constant",
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    limit: Limit = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("train")] = None,
    track: Track = None,
    quiet: Quiet = False,
) -> None:
    """Train one model with a validation holdout, then test, save and export it (curves, confusion matrix).

    Example: distml train --model cnn --epochs 5 --lr-schedule cosine (or --data csv:iris.csv --target species)
    """

    def action() -> int | None:
        from distml.holdout import run_train  # imports torch: only once a command really runs
        from distml.train import Diverged

        config = HoldoutConfig(
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            lr_schedule=lr_schedule,
            **_data_options(data, target, x_key, y_key, resize, normalize, test_data, model_arg),
            val_fraction=val_fraction,
            limit=limit,
            out=out,
            data_dir=data_dir,
            track=track,
        )
        try:
            outcome = run_train(config)
        except Diverged as failed:  # a failed run, not bad input: nothing is exported
            typer.echo(f"error: {failed}", err=True)
            return 1
        _echo_trained(outcome, quiet)

    _run(action, quiet)


@app.command()
def finetune(
    ctx: typer.Context,
    weights: Weights = "imagenet",
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    freeze_backbone: Annotated[
        bool, typer.Option("--freeze-backbone", help="Train the new head only; the backbone keeps its weights.")
    ] = False,
    epochs: Epochs = 1,
    batch_size: BatchSize = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate of the new head.")] = 1e-3,
    backbone_lr: Annotated[float, typer.Option(help="Adam learning rate of the backbone (unless frozen).")] = 1e-4,
    val_fraction: ValFraction = 0.1,
    seed: Seed = 0,
    limit: Limit = None,
    workers: Annotated[int, typer.Option(help="Data-parallel (DDP) Ray Train workers.")] = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = None,
    max_failures: MaxFailures = 2,
    address: Address = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("finetune")] = None,
    storage: Storage = None,
    sweep: Annotated[
        bool,
        typer.Option(
            "--sweep",
            help="First search the head's learning rate with Ray Tune (as distml sweep --then-finetune, with "
            "these options and --trials), then train and export the model at the best rate.",
        ),
    ] = False,
    trials: Annotated[int, typer.Option(help="With --sweep: learning rates tried.")] = 8,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted fine-tune in this folder with its saved options: training carries on from "
            "its last epoch checkpoint, then tests and exports (with --sweep: an interrupted sweep's folder)."
            + _RESUME_GIVES
        ),
    ] = None,
    track: Track = None,
    quiet: Quiet = False,
) -> None:
    """Fine-tune torchvision's ResNet18 with a new 10-class head on Ray Train (DDP), then test, save and export it.

    Example: distml finetune --weights none --image-size 32 --limit 2000 --workers 2
    """
    cluster = _cluster(address, workers, cpus_per_worker, gpus_per_worker, max_failures)

    def action() -> int | None:
        overrides = _resume_overrides(ctx, resume, also=("sweep",))  # --sweep: the run to resume is a sweep
        _stop_on_signals()
        if sweep:
            sweep_config = SweepConfig(
                trials=trials,
                epochs=epochs,
                batch_size=batch_size,
                freeze_backbone=freeze_backbone,
                backbone_lr=backbone_lr,
                weights=weights,
                image_size=image_size,
                val_fraction=val_fraction,
                train_images=limit,
                then_finetune=True,
                seed=seed,
                out=out,
                data_dir=data_dir,
                storage=storage,
                cluster=cluster,
                track=track,
            )
            return _sweep_and_echo(sweep_config, quiet, resume, overrides)
        from distml.finetune import run_finetune  # imports Ray and torch: only once a command really runs
        from distml.train import Diverged

        config = FinetuneConfig(
            weights=weights,
            image_size=image_size,
            freeze_backbone=freeze_backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            backbone_lr=backbone_lr,
            seed=seed,
            val_fraction=val_fraction,
            limit=limit,
            out=out,
            data_dir=data_dir,
            storage=storage,
            cluster=cluster,
            track=track,
        )
        try:
            outcome = run_finetune(config, resume=resume, cluster_overrides=overrides)
        except Diverged as failed:  # a failed run, not bad input: nothing is exported
            typer.echo(f"error: {failed}", err=True)
            return 1
        _echo_trained(outcome, quiet)

    _run(action, quiet)


@app.command(name="compare")
def compare_runs(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run folders of distml train, finetune or kfold (K-fold: mean ± std, corrected interval)."),
    ],
    metric: Annotated[
        str,
        typer.Option(
            help="The folds.csv score two K-fold runs are judged on: val_accuracy, val_loss, precision_macro, "
            "recall_macro, f1_macro, test_accuracy or test_loss (for a loss, lower is better)."
        ),
    ] = "val_accuracy",
    rope: Annotated[
        float,
        typer.Option(
            help="Half-width of the region of practical equivalence, in the metric's units: differences within "
            "±ROPE count as equal (0.005: half an accuracy point)."
        ),
    ] = 0.005,
    out: Annotated[Path | None, _out("compare")] = None,
    quiet: Quiet = False,
) -> None:
    """One CSV row per model (accuracy, precision, recall, F1, parameters, speed) and a bar chart; between K-fold runs,
    a decision per pair (paired_tests.csv, paired_differences.png): the corrected paired t-test and the Bayesian
    correlated t-test on the per-fold differences (Welch's test for runs on different folds), and McNemar's test on
    the ensembles' test predictions.

    Example: distml compare results/kfold-mlp results/kfold-cnn --metric val_accuracy --rope 0.005
    """

    def action() -> None:
        from distml.compare import COMPARISON_FILE, TESTS_FILE, decide, write_decision  # pandas: only once it runs

        comparison = decide(run_dirs, metric=metric, rope=rope)
        folder = out or default_out("compare")
        write_decision(comparison, folder)
        table, tests = comparison.runs, comparison.tests
        if not quiet:
            typer.echo(table.drop(columns=["run_dir"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            if table["accuracy_ci95_low"].notna().any():
                typer.echo("accuracy_ci95: K-fold's corrected interval (Nadeau & Bengio: folds share training data)")
            if len(tests):
                shown = tests.drop(
                    columns=["metric", "rope", "t", "df", "mcnemar_only_a_right", "mcnemar_only_b_right"]
                )
                shown = shown.assign(
                    run_a=[Path(p).name for p in tests["run_a"]], run_b=[Path(p).name for p in tests["run_b"]]
                )
                lower = " (lower)" if metric.endswith("loss") else ""
                typer.echo(f"\n{metric} differences, positive where A is better{lower}; equivalent within ±{rope:g}:")
                typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            for line in comparison.refusals:
                typer.echo(line)
        best = table.loc[table["accuracy"].idxmax()]
        decided = f"; {len(tests)} pair(s) tested: {folder / TESTS_FILE}" if len(tests) else ""
        typer.echo(
            f"{len(table)} models; best {best['model']} ({best['accuracy']:.4f}); {folder / COMPARISON_FILE}{decided}"
        )

    _run(action, quiet)


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="The folder of a kfold, train, finetune, sweep or pipeline run, or of a compare --out."),
    ],
    quiet: Quiet = False,
) -> None:
    """(Re)build a run folder's report.md and report.html (one self-contained page: figures embedded, tables as HTML)
    from the files the run left; every command writes them at its end, this rebuilds them.

    Example: distml report results/kfold-20250101-120000
    """

    def action() -> None:
        from distml.run_report import build  # pandas: only once it runs

        markdown, page = build(run_dir)
        typer.echo(f"report in {markdown} and {page}")

    _run(action, quiet)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="A model folder (or a run folder, or a file inside model/).")],
    files: Annotated[
        list[Path], typer.Argument(help="PNG/JPEG images, or IDX image files (e.g. t10k-images-idx3-ubyte.gz).")
    ],
    labels: Annotated[Path | None, typer.Option(help="IDX label file for the images: also print the accuracy.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the predictions to this CSV file.")] = None,
    quiet: Quiet = False,
) -> None:
    """Classify digit images with a saved model, printing the class and its probability per image.

    Example: distml predict results/train-X/model digit.png
    """

    def action() -> None:
        from distml.predict import predict_files  # imports torch: only once a command really runs

        table = predict_files(model, files, labels)
        if not quiet:
            for row in table.itertuples(index=False):
                truth = f" (label {row.label})" if labels is not None else ""
                typer.echo(f"{row.file}: {row.predicted} p={row.probability:.4f}{truth}")
        if out is not None:
            write_csv(out, table)
        summary = f"{len(table)} images"
        if labels is not None:
            summary += f", accuracy {(table['predicted'] == table['label']).mean():.4f}"
        typer.echo(summary + (f"; predictions in {out}" if out is not None else ""))

    _run(action, quiet)


@app.command()
def pipeline(
    ctx: typer.Context,
    epochs: Annotated[int, typer.Option(help="Epochs of the MLP's holdout training and of each K-fold fold.")] = 3,
    k: Annotated[int, typer.Option("--k", help="Folds of the MLP's cross-validation.")] = 5,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of the ResNet18 fine-tune.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size of every stage.")] = 64,
    weights: Weights = "imagenet",
    image_size: ImageSize = DEFAULT_IMAGE_SIZE,
    freeze_backbone: Annotated[bool, typer.Option("--freeze-backbone", help="Fine-tune ResNet18's head only.")] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Training images of every stage: the same stratified subset for the holdout training, the K-fold "
            "and the fine-tune (at least --k of each class). Default: all."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="K-fold trainers at once, and DDP workers of the fine-tune.")] = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = None,
    max_failures: MaxFailures = 2,
    seed: Seed = 0,
    address: Address = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("pipeline")] = None,
    storage: Storage = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted pipeline in this folder with its saved options: finished stages are skipped, "
            "an unfinished K-fold or fine-tune carries on as its own --resume does, an unfinished holdout training "
            "runs again in its cleared folder; then the comparison and report. Only where it runs (--address, "
            "--workers and the other cluster options) and -q may be given with it; the saved address is not reused."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """The whole workshop in one folder: samples, MLP holdout and K-fold, ResNet18 fine-tune, comparison, report.md.

    Every stage's options are checked before the first one runs (the cluster's room once Ray is up, before any
    training).

    Example: distml pipeline --weights none --limit 3000 --k 3
    """

    def action() -> None:
        overrides = _resume_overrides(ctx, resume)  # before Ray or torch is imported
        from distml.pipeline import REPORT_FILE, run_pipeline  # imports Ray and torch: only once it really runs

        _stop_on_signals()
        config = PipelineConfig(
            epochs=epochs,
            k=k,
            finetune_epochs=finetune_epochs,
            batch_size=batch_size,
            weights=weights,
            image_size=image_size,
            freeze_backbone=freeze_backbone,
            limit=limit,
            seed=seed,
            data_dir=data_dir,
            out=out,
            storage=storage,
            cluster=_cluster(address, workers, cpus_per_worker, gpus_per_worker, max_failures),
        )
        outcome = run_pipeline(config, resume=resume, cluster_overrides=overrides)
        if not quiet:
            table = outcome.comparison.drop(columns=["run_dir"])
            typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        typer.echo(f"pipeline done in {outcome.wall_seconds:.1f} s; report in {outcome.run_dir / REPORT_FILE}")

    _run(action, quiet)


def _sweep_and_echo(config, quiet: bool, resume: Path | None, cluster_overrides: dict) -> int:
    """Run a sweep and print its trial table and best rate (distml sweep and distml finetune --sweep)."""
    from distml.sweep import run_sweep  # imports Ray and torch: only once a command really runs

    outcome = run_sweep(config, resume=resume, cluster_overrides=cluster_overrides)
    if not quiet:
        typer.echo(outcome.trials.drop(columns=["error"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        typer.echo("")
    best = outcome.best
    if best is None:
        typer.echo(f"no trial reported an epoch; wall {outcome.wall_seconds:.1f} s; run in {outcome.run_dir}")
    else:
        tested = f", test accuracy {best['test_accuracy']:.4f}" if "test_accuracy" in best else ""
        folds = (
            f" ({best['cv']}-fold means; {best['metric']} corrected 95% interval [{best['corrected_ci95_low']:.4f}, "
            f"{best['corrected_ci95_high']:.4f}])"
            if "cv" in best
            else ""
        )
        typer.echo(
            f"best lr {best['lr']:.4g}: val_accuracy {best['best_val_accuracy']:.4f}, val_loss "
            f"{best['best_val_loss']:.4f}{folds}{tested}; {best['trials_done']}/{best['trials']} trials done; "
            f"wall {outcome.wall_seconds:.1f} s; results in {outcome.run_dir}"
        )
    for failure in outcome.failures:
        typer.echo(f"error: {failure}", err=True)
    if not outcome.complete:
        typer.echo(f"interrupted: resume with `distml sweep --resume {outcome.run_dir}`", err=True)
        return EXIT_INTERRUPTED
    return 1 if outcome.failures else 0


@app.command()
def sweep(
    ctx: typer.Context,
    lr_min: Annotated[float, typer.Option(help="Lowest head learning rate searched (log-uniform).")] = 1e-4,
    lr_max: Annotated[float, typer.Option(help="Highest head learning rate searched (log-uniform).")] = 1e-1,
    trials: Annotated[int, typer.Option(help="Learning rates tried (Tune samples).")] = 8,
    metric: Annotated[
        str, typer.Option(help="What ASHA and the choice of the best rate go by: 'val_accuracy' or 'val_loss'.")
    ] = "val_accuracy",
    grace_period: GracePeriod = 1,
    reduction_factor: ReductionFactor = 2.0,
    epochs: Annotated[int, typer.Option(help="Epochs per trial (ASHA's max_t).")] = 5,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 128,
    freeze_backbone: Annotated[
        bool,
        typer.Option(
            help="Train the head only, on backbone features computed once and shared through the object store; "
            "--no-freeze-backbone trains the whole network in every trial."
        ),
    ] = True,
    backbone_lr: Annotated[
        float, typer.Option(help="Adam learning rate of the backbone, with --no-freeze-backbone.")
    ] = 1e-4,
    weights: Weights = "imagenet",
    image_size: ImageSize = 32,
    val_fraction: Annotated[float, typer.Option(help="Share of the training set held out (stratified).")] = 0.1,
    train_images: Annotated[
        int | None, typer.Option(help="Use a stratified subset of this many training images (quick runs).")
    ] = None,
    cv: Annotated[
        int | None,
        typer.Option(
            "--cv",
            metavar="K",
            help="Score each rate by K-fold cross-validation instead of the holdout: a head per fold on the cached "
            "features (frozen backbone only), ASHA and the ranking on the cross-fold mean; trials.csv adds each "
            "score's std and corrected 95% interval.",
        ),
    ] = None,
    then_finetune: Annotated[
        bool,
        typer.Option(
            help="Then train at the best rate on every training image, test it and export it to RUN/model/ "
            "(model.pt, model.json, model.pt2, as distml finetune exports)."
        ),
    ] = False,
    uncached: Annotated[
        bool,
        typer.Option(
            help="Benchmark baseline: run the frozen backbone in every trial instead of caching its features.",
            hidden=True,
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for the split, the sampled rates, the head and shuffling.")] = 0,
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("sweep")] = None,
    storage: Storage = None,
    workers: TrialWorkers = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = None,
    max_failures: MaxFailures = 2,
    address: Address = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted sweep in this folder with its saved options: finished trials are kept, "
            "the others carry on from their last epoch." + _RESUME_GIVES
        ),
    ] = None,
    track: Track = None,
    quiet: Quiet = False,
) -> None:
    """Search the ResNet18 head's learning rate with Ray Tune and ASHA; report every trial and the best rate.

    Example: distml sweep --weights none --train-images 2000 --trials 8 --epochs 3
    """

    def action() -> int:
        overrides = _resume_overrides(ctx, resume)
        _stop_on_signals()
        config = SweepConfig(
            lr_min=lr_min,
            lr_max=lr_max,
            trials=trials,
            metric=metric,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            epochs=epochs,
            batch_size=batch_size,
            freeze_backbone=freeze_backbone,
            backbone_lr=backbone_lr,
            weights=weights,
            image_size=image_size,
            val_fraction=val_fraction,
            train_images=train_images,
            uncached=uncached,
            cv=cv,
            then_finetune=then_finetune,
            seed=seed,
            out=out,
            data_dir=data_dir,
            storage=storage,
            cluster=_cluster(address, workers, cpus_per_worker, gpus_per_worker, max_failures),
            track=track,
        )
        return _sweep_and_echo(config, quiet, resume, overrides)

    _run(action, quiet)


@app.command()
def tune(
    ctx: typer.Context,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="NAME=DIST:ARGS, repeated: loguniform:LOW:HIGH, uniform:LOW:HIGH, randint:LOW:HIGH (HIGH inclusive) "
            "or choice:A,B,C (values parsed as JSON where they parse). lr, batch_size, epochs and weight_decay set the "
            "training; every other name is a keyword of the model factory.",
        ),
    ] = None,
    trials: Annotated[int, typer.Option(help="Configurations tried, each a whole K-fold run.")] = 8,
    k: Annotated[int, typer.Option("--k", help="Folds of every trial (2 up to the smallest class's size).")] = 5,
    metric: Annotated[
        str, typer.Option(help="What ASHA and the ranking go by, as its cross-fold mean: val_accuracy or val_loss.")
    ] = "val_accuracy",
    search: Annotated[
        str,
        typer.Option(
            help="How configurations are drawn: 'random', or 'optuna' (Optuna's TPE, from the trials that ended; "
            "pip install 'distml[optuna]'); both seeded by --seed."
        ),
    ] = "random",
    scheduler: Annotated[
        str, typer.Option(help="'asha' (stop poor trials early on the cross-fold mean) or 'none' (every trial runs).")
    ] = "asha",
    grace_period: GracePeriod = 1,
    reduction_factor: ReductionFactor = 2.0,
    then_train: Annotated[
        bool,
        typer.Option(
            help="Then train the best configuration as `distml train` does (for the epochs its trial ran) and export "
            "it to RUN/final/model/."
        ),
    ] = False,
    outer_k: Annotated[
        int | None,
        typer.Option(
            help="Nested cross-validation: run the whole search on the training part of each of this many outer "
            "folds, retrain its choice there and score it on the outer fold (outer.csv, outer.json)."
        ),
    ] = None,
    model: ModelOption = "mlp",
    model_arg: ModelArg = None,
    data: DataOption = "mnist",
    target: Target = None,
    x_key: XKey = "x",
    y_key: YKey = "y",
    resize: Resize = None,
    normalize: Normalize = "auto",
    test_data: TestData = None,
    epochs: Annotated[int, typer.Option(help="Epochs per trial, unless searched (ASHA's max_t).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size, unless searched.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate, unless searched.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for the folds, the drawn configurations, weights and shuffling.")] = 0,
    lr_schedule: LrSchedule = "constant",
    limit: Annotated[
        int | None, typer.Option(help="Tune on a stratified subset of this many examples, drawn with --seed.")
    ] = None,
    data_dir: DataDir = None,
    out: Annotated[Path | None, _out("tune")] = None,
    storage: Storage = None,
    workers: TrialWorkers = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    gpus_per_worker: GpusPerWorker = None,
    max_failures: MaxFailures = 2,
    lost_node_grace: LostNodeGrace = 60.0,
    address: Address = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted search in this folder with its saved options: finished trials are kept, the "
            "others carry on from their last epoch; ASHA's rung record starts afresh." + _RESUME_GIVES
        ),
    ] = None,
    track: Track = None,
    quiet: Quiet = False,
) -> None:
    """Tune hyperparameters on cross-validated scores: every trial is a K-fold run, ASHA stops on the cross-fold mean.

    Example: distml tune --param lr=loguniform:1e-4:1e-1 --param hidden=choice:64,256 --k 3 --trials 8 --limit 3000
    """

    def action() -> int:
        overrides = _resume_overrides(ctx, resume)  # before Ray or torch is imported
        from distml.config import TuneConfig
        from distml.search_space import parse_space

        config = TuneConfig(
            params=parse_space(param or []) if resume is None else {},
            trials=trials,
            k=k,
            metric=metric,
            search=search,
            scheduler=scheduler,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            then_train=then_train,
            outer_k=outer_k,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            lr_schedule=lr_schedule,
            **_data_options(data, target, x_key, y_key, resize, normalize, test_data, model_arg),
            limit=limit,
            out=out,
            data_dir=data_dir,
            storage=storage,
            cluster=_cluster(address, workers, cpus_per_worker, gpus_per_worker, max_failures, 1, lost_node_grace),
            track=track,
        )
        if resume is None:
            config.validate()  # before Ray, Tune or torch is imported
        from distml.tune import run_tune  # imports Ray and Tune: only once a command really runs

        _stop_on_signals()
        outcome = run_tune(config, resume=resume, cluster_overrides=overrides)
        if not quiet:
            shown = outcome.trials.drop(columns=["error"], errors="ignore")
            typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            typer.echo("")
        best, estimate = outcome.best, outcome.estimate
        if estimate is not None:
            typer.echo(
                f"nested: {estimate['metric']} {estimate['mean']:.4f} over {estimate['outer_folds_scored']}/"
                f"{estimate['outer_k']} outer folds (95% CI {estimate['corrected_ci95_low']:.4f}-"
                f"{estimate['corrected_ci95_high']:.4f}, corrected); choices in outer.csv; wall "
                f"{outcome.wall_seconds:.1f} s; results in {outcome.run_dir}"
            )
        elif best is None:
            typer.echo(f"no trial reported an epoch; wall {outcome.wall_seconds:.1f} s; run in {outcome.run_dir}")
        else:
            chosen = ", ".join(
                f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                for name, value in best["params"].items()
            )
            typer.echo(
                f"best {chosen}: {best['metric']} {best['value']:.4f} over {best['k']} folds (95% CI "
                f"{best['corrected_ci95_low']:.4f}-{best['corrected_ci95_high']:.4f}, corrected for overlapping "
                f"folds); {best['trials_done']}/{best['trials']} trials done; wall {outcome.wall_seconds:.1f} s; "
                f"results in {outcome.run_dir}"
            )
        for failure in outcome.failures:
            typer.echo(f"error: {failure}", err=True)
        if not outcome.complete and not outcome.failures:
            typer.echo(f"interrupted: resume with `distml tune --resume {outcome.run_dir}`", err=True)
            return _interrupted_status()
        return 1 if outcome.failures else 0

    _run(action, quiet)


class _KeepGoing:
    """stdout or stderr, where a closed reader (`distml kfold 2>&1 | head`) costs the output, never the run: Python
    ignores SIGPIPE, so a write to a closed pipe raises, and would otherwise end the run in the middle."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # EPIPE, or a stream closed under us
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main() -> None:
    """The `distml` command. Once the command has returned, every file is written and closed and Ray is shut down;
    the interpreter's own teardown (Ray's and Tune's exit hooks, module finalisation) would still take seconds,
    so the process ends right away with the command's exit status."""
    sys.stdout, sys.stderr = _KeepGoing(sys.stdout), _KeepGoing(sys.stderr)
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
