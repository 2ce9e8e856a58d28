"""The `distml` command: parse, call the library, print. Bad input is one line on stderr and exit status 2."""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from distml.errors import DistmlError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _OneLineErrors(TyperGroup):
    """Click prints usage errors as a paragraph; a user (and a script) wants one line and exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.ClickException, typer.TyperException) as exc:  # typer >= 0.29 raises its own copy of click's
            click.echo(f"error: {exc.format_message()} (see --help)".replace("\n", " "), err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, typer.Abort):
            click.echo("error: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    help="Ray-distributed K-fold cross-validation and fine-tuning for PyTorch, on MNIST.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


@app.callback()
def _main() -> None:
    """Ray-distributed K-fold cross-validation and fine-tuning for PyTorch, on MNIST."""


def _say(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda message: None
    started = time.perf_counter()
    return lambda message: typer.echo(f"[{time.perf_counter() - started:7.1f}s] {message}", err=True)


def _show_warnings_as_lines() -> None:
    """Our own warnings (the bundled-sample fallback) as one line each; third-party chatter stays hidden."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", category=UserWarning, module=r"distml(\.|$)")
    warnings.showwarning = lambda message, *args, **kwargs: typer.echo(f"warning: {message}", err=True)


def _run(action: Callable[[], int | None]) -> None:
    """Call the library; turn its DistmlError into one line and exit 2, Ctrl-C into exit 130."""
    _show_warnings_as_lines()
    try:
        code = action()
    except DistmlError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # a bug or a broken environment: one line, the traceback only on request
        if os.environ.get("DISTML_DEBUG"):
            raise
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {first_line} (set DISTML_DEBUG=1 for the traceback)", err=True)
        raise typer.Exit(1) from None
    if code:
        raise typer.Exit(code)


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
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result line.")]


@app.command()
def kfold(
    k: Annotated[int, typer.Option("--k", help="Number of folds (2 up to the smallest class's size).")] = 5,
    model: Annotated[str, typer.Option(help="Network: 'mlp' (784-128-64-10) or 'cnn'.")] = "mlp",
    epochs: Annotated[int, typer.Option(help="Training epochs per fold.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed for the fold split, initial weights and shuffling.")] = 0,
    data_dir: DataDir = None,
    out: Annotated[Path | None, typer.Option(help="Run folder for the report. Default: results/kfold-TIME.")] = None,
    workers: Annotated[int, typer.Option(help="Fold trainers running at once.")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per fold trainer (also its torch threads).")] = 1.0,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs per fold trainer. Default: 1 when the cluster has GPUs, else 0.")
    ] = None,
    workers_per_fold: Annotated[
        int, typer.Option(help="Data-parallel workers per fold; above 1 each fold runs a Ray Train TorchTrainer (DDP).")
    ] = 1,
    max_failures: Annotated[
        int, typer.Option(help="Retries of a fold whose trainer dies, each from its last epoch checkpoint.")
    ] = 2,
    address: Address = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted run in this folder: only unfinished folds run, with its saved options."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Stratified K-fold cross-validation of a model on MNIST's training set, one Ray Tune trial per fold."""
    from distml.config import ClusterConfig, KFoldConfig

    def action() -> int:
        from distml.kfold import run_kfold
        from distml.report import format_summary

        config = KFoldConfig(
            k=k,
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            out=out,
            data_dir=data_dir,
            cluster=ClusterConfig(address, workers, cpus_per_worker, gpus_per_worker, workers_per_fold, max_failures),
        )
        say = _say(quiet)
        outcome = run_kfold(config, say, resume=resume)
        accuracy = outcome.summary.set_index("metric").loc["val_accuracy"]
        if not quiet:
            typer.echo(outcome.folds.drop(columns=["node"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
            typer.echo("")
            typer.echo(format_summary(outcome.summary))
            typer.echo("")
        from distml.kfold import dataset_line

        typer.echo(
            f"{len(outcome.folds)}/{outcome.k} folds, mean val_accuracy {accuracy['mean']:.4f} ± {accuracy['std']:.4f} "
            f"(95% CI {accuracy['ci95_low']:.4f}-{accuracy['ci95_high']:.4f}); {dataset_line(outcome.run_dir)};"
            f" wall {outcome.wall_seconds:.1f} s; report in {outcome.run_dir}"
        )
        if outcome.failures:
            for failure in outcome.failures:
                typer.echo(f"error: {failure}", err=True)
            return 1
        if not outcome.complete:
            typer.echo(f"interrupted: resume with `distml kfold --resume {outcome.run_dir}`", err=True)
            return EXIT_INTERRUPTED
        return 0

    _run(action)


@app.command()
def sweep(
    lr_min: Annotated[float, typer.Option(help="Lowest head learning rate searched (log-uniform).")] = 1e-4,
    lr_max: Annotated[float, typer.Option(help="Highest head learning rate searched (log-uniform).")] = 1e-1,
    trials: Annotated[int, typer.Option(help="Learning rates tried (Tune samples).")] = 8,
    metric: Annotated[
        str, typer.Option(help="What ASHA and the choice of the best rate go by: 'val_accuracy' or 'val_loss'.")
    ] = "val_accuracy",
    grace_period: Annotated[int, typer.Option(help="Epochs every trial runs before ASHA may stop it.")] = 1,
    reduction_factor: Annotated[
        float, typer.Option(help="ASHA keeps the best 1/this of the trials at each rung (above 1).")
    ] = 2.0,
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
    weights: Annotated[
        str,
        typer.Option(
            help="Initial ResNet18 weights: 'imagenet' (torchvision's, from its cache or a download), 'none' "
            "(random), or PATH to a state dict file."
        ),
    ] = "imagenet",
    image_size: Annotated[int, typer.Option(help="Side in pixels the 28x28 digits are resized to (32-512).")] = 32,
    val_fraction: Annotated[float, typer.Option(help="Share of the training set held out (stratified).")] = 0.1,
    train_images: Annotated[
        int | None, typer.Option(help="Use a stratified subset of this many training images (quick runs).")
    ] = None,
    then_finetune: Annotated[
        bool,
        typer.Option(
            help="Then train at the best rate on every training image, test it and export it to RUN/model/ "
            "(model.pt, model.json, model.ts)."
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
    out: Annotated[Path | None, typer.Option(help="Run folder for the results. Default: results/sweep-TIME.")] = None,
    workers: Annotated[int, typer.Option(help="Trials running at once (fewer if the cluster holds fewer).")] = 2,
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per trial (also its torch threads).")] = 1.0,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs per trial. Default: 1 when the cluster has GPUs, else 0.")
    ] = None,
    max_failures: Annotated[
        int, typer.Option(help="Retries of a trial that fails, each from its last epoch checkpoint.")
    ] = 2,
    address: Address = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Finish an interrupted sweep in this folder with its saved options: finished trials are kept, "
            "the others carry on from their last epoch."
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Search the ResNet18 head's learning rate with Ray Tune and ASHA; report every trial and the best rate."""
    from distml.config import ClusterConfig, SweepConfig

    def action() -> int:
        from distml.sweep import run_sweep

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
            then_finetune=then_finetune,
            seed=seed,
            out=out,
            data_dir=data_dir,
            cluster=ClusterConfig(address, workers, cpus_per_worker, gpus_per_worker, 1, max_failures),
        )
        outcome = run_sweep(config, _say(quiet), resume=resume)
        if not quiet:
            typer.echo(outcome.trials.drop(columns=["error"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            typer.echo("")
        best = outcome.best
        if best is None:
            typer.echo(f"no trial reported an epoch; wall {outcome.wall_seconds:.1f} s; run in {outcome.run_dir}")
        else:
            tested = f", test accuracy {best['test_accuracy']:.4f}" if "test_accuracy" in best else ""
            typer.echo(
                f"best lr {best['lr']:.4g}: val_accuracy {best['best_val_accuracy']:.4f}, val_loss "
                f"{best['best_val_loss']:.4f}{tested}; {best['trials_done']}/{best['trials']} trials done; "
                f"wall {outcome.wall_seconds:.1f} s; results in {outcome.run_dir}"
            )
        for failure in outcome.failures:
            typer.echo(f"error: {failure}", err=True)
        if not outcome.complete:
            typer.echo(f"interrupted: resume with `distml sweep --resume {outcome.run_dir}`", err=True)
            return EXIT_INTERRUPTED
        return 1 if outcome.failures else 0

    _run(action)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
