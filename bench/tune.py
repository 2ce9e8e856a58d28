"""Tuning benchmark: `distml tune` (folds stacked, with and without ASHA) against the plain way on Ray Tune.

usage: python bench/tune.py [--data-dir ../shared/data/mnist] [--trials 16] [--k 5] [--epochs 3] [--limit N]
                            [--seed 0] [--only plain none asha] [--json bench/results/tune.json] [--smoke]

The plain way is what one writes without distml: a Ray Tune function trainable (`tune.Tuner`, `tune.loguniform` for
the rate, the same seed through `BasicVariantGenerator(random_state=seed)`, 2 trials at a time with 1 CPU each) that
for each trial trains the k folds one after another with distml's own plain loop (`distml.train.new_state`/`fit`,
the built-in MLP, batch 64, Adam; no stacking, no early stopping) on the same folds (`distml.folds.fold_assignment`)
and reports the cross-fold mean validation accuracy at the end. Ray starts the lean way distml starts it (no
dashboard), so that the comparison is about the trials, not the start-up. The contenders: the plain way, `distml tune
--scheduler none` and `distml tune` with ASHA at its defaults (grace 1, reduction 2), each with `--param
lr=loguniform:1e-4:1e-1`, k folds, the same seed, 2 trials at a time.

Each contender runs as its own process, one after another, timed from process start to finish (Ray's start-up,
loading the data and the report included); an untimed `import ray, torch, distml` first warms the file cache. For
each: wall seconds, the best configuration (lr) and its cross-fold mean validation accuracy, and the rates drawn (the
same 16 in all three when the seeds agree). The table is printed and written as JSON (`--json`; `--smoke` writes
bench/results/tune-smoke.json).

    python bench/tune.py --data-dir ../shared/data/mnist    # the benchmark: 16 trials x 5 folds x 3 epochs, 7-9 min
    python bench/tune.py --smoke                              # 2 trials, k 2, 1 epoch, 2,000 images: checks it runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CORES = os.cpu_count() or 1
LOW, HIGH = 1e-4, 1e-1  # the log-uniform rate's bounds
CONTENDERS = {
    "plain": "plain Ray Tune (folds one after another)",
    "none": "distml tune --scheduler none",
    "asha": "distml tune (ASHA, defaults)",
}


def run_timed(command: list[str], checkout: Path = REPO) -> tuple[float, str]:
    """(wall seconds, stdout and stderr) of `command`, run in `checkout` with its distml package first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    process = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout, env=env
    )
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{process.stdout[-3000:]}")
    return wall, process.stdout


# ---- the plain way: one process, run as `bench/tune.py --plain-only ...` ----


def plain_trial(config: dict, x, y, assignment, k: int, epochs: int, seed: int) -> None:
    """One trial: the k folds one after another with distml's plain loop, the cross-fold mean reported at the end."""
    import warnings

    import numpy as np
    import torch
    from ray import tune

    from distml.config import TrainSettings
    from distml.folds import fold_indices
    from distml.train import Diverged, fit, new_state

    torch.set_num_threads(1)  # the trial's one CPU
    with warnings.catch_warnings():  # the object store's arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        images, labels = torch.from_numpy(x), torch.from_numpy(y)
    settings = TrainSettings(model="mlp", epochs=epochs, batch_size=64, lr=config["params"]["lr"], seed=seed)
    accuracies, losses = [], []
    for fold in range(k):
        train_index, val_index = (torch.from_numpy(i) for i in fold_indices(assignment, fold))
        try:
            val = fit(new_state(settings, fold), settings, images, labels, train_index, val_index)
        except Diverged:
            accuracies.append(float("nan"))
            losses.append(float("nan"))
            break
        accuracies.append(val.accuracy)
        losses.append(val.loss)
    tune.report({"val_accuracy": float(np.mean(accuracies)), "val_loss": float(np.mean(losses)), "epoch": epochs})


def plain_only(args: argparse.Namespace) -> None:
    """The plain search in this process; prints one JSON line: every trial's rate and cross-fold mean accuracy."""
    import math

    import ray
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from distml.data import load_folder, normalize
    from distml.folds import fold_assignment, stratified_subset

    ray.init(num_cpus=CORES, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    data = load_folder(args.data_dir, "data-dir")
    images, labels = normalize(data.train_images), data.train_labels
    if args.limit is not None and args.limit < len(labels):
        keep = stratified_subset(labels, args.limit, args.seed)
        images, labels = images[keep], labels[keep]
    assignment = fold_assignment(labels, args.k, args.seed)
    trainable = tune.with_parameters(
        plain_trial, x=images, y=labels, assignment=assignment, k=args.k, epochs=args.epochs, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="distml-bench-plain-") as folder:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"params": {"lr": tune.loguniform(LOW, HIGH)}},  # nested as distml's, so the draws agree
            tune_config=tune.TuneConfig(
                num_samples=args.trials,
                search_alg=BasicVariantGenerator(random_state=args.seed, max_concurrent=CORES),
            ),
            run_config=tune.RunConfig(name="plain", storage_path=folder, verbose=0),
        )
        results = tuner.fit()
        trials = [
            {
                "lr": result.config["params"]["lr"],
                "val_accuracy": (result.metrics or {}).get("val_accuracy", math.nan),
                "error": None if result.error is None else str(result.error).splitlines()[0],
            }
            for result in results
        ]
    ray.shutdown()
    print(json.dumps({"trials": trials}))


def plain(args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--plain-only", *_shared_options(args)]
    wall, output = run_timed(command, args.checkout)
    trials = json.loads(output.strip().splitlines()[-1])["trials"]
    failed = [t["error"] for t in trials if t["error"]]
    if failed:
        raise RuntimeError(f"the plain search had {len(failed)} failed trial(s): {failed[0]}")
    scored = [t for t in trials if t["val_accuracy"] == t["val_accuracy"]]  # nan: diverged
    best = max(scored, key=lambda t: t["val_accuracy"])
    return {
        "wall_s": wall,
        "best_lr": best["lr"],
        "best_mean_val_accuracy": best["val_accuracy"],
        "trials": len(trials),
        "trial_epochs": len(trials) * args.epochs,
        "stopped_early": 0,
        "lrs": sorted(t["lr"] for t in trials),
    }


# ---- distml tune: one process each ----


def distml_tune(args: argparse.Namespace, scheduler: str) -> dict:
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="distml-bench-tune-") as folder:
        out = Path(folder) / "run"
        command = [
            sys.executable,
            "-m",
            "distml.cli",
            "tune",
            "--param",
            f"lr=loguniform:{LOW:g}:{HIGH:g}",
            "--trials",
            str(args.trials),
            "--k",
            str(args.k),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            "64",
            "--seed",
            str(args.seed),
            "--scheduler",
            scheduler,
            "--workers",
            str(CORES),
            "--model",
            "mlp",
            "--data-dir",
            str(args.data_dir),
            "--out",
            str(out),
            "--quiet",
            *(["--limit", str(args.limit)] if args.limit is not None else []),
        ]
        wall, _ = run_timed(command, args.checkout)
        best = json.loads((out / "best.json").read_text())
        trials = pd.read_csv(out / "trials.csv")
    return {
        "wall_s": wall,
        "best_lr": float(best["params"]["lr"]),
        "best_mean_val_accuracy": float(best["value"]),
        "trials": len(trials),
        "trial_epochs": int(trials["epochs_run"].sum()),
        "stopped_early": int(trials["stopped_early"].sum()),
        "lrs": sorted(float(v) for v in trials["lr"]),
    }


def _shared_options(args: argparse.Namespace) -> list[str]:
    options = ["--data-dir", str(args.data_dir), "--trials", str(args.trials), "--k", str(args.k)]
    options += ["--epochs", str(args.epochs), "--seed", str(args.seed)]
    return options + (["--limit", str(args.limit)] if args.limit is not None else [])


# ---- the benchmark ----


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="a stratified subset of this many training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--json", type=Path, default=None, help="default: bench/results/tune.json")
    parser.add_argument(
        "--checkout", type=Path, default=REPO, help="run the distml in this folder (e.g. `git archive HEAD distml`)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 trials, k 2, 1 epoch, 2,000 images: checks it runs")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data_dir, args.checkout = args.data_dir.resolve(), args.checkout.resolve()
    if args.plain_only:
        plain_only(args)
        return
    if args.smoke:
        args.trials, args.k, args.epochs, args.limit = 2, 2, 1, 2000
    target = args.json or RESULTS / ("tune-smoke.json" if args.smoke else "tune.json")

    run_timed([sys.executable, "-c", "import ray, torch, distml.cli"], args.checkout)  # untimed: warm
    runs = {
        "plain": lambda: plain(args),
        "none": lambda: distml_tune(args, "none"),
        "asha": lambda: distml_tune(args, "asha"),
    }
    measured = {}
    for name in args.only:
        measured[name] = runs[name]()
        row = measured[name]
        print(
            f"{CONTENDERS[name]}: {row['wall_s']:.1f} s, {row['trial_epochs']} trial-epochs "
            f"({row['stopped_early']} stopped early), best lr {row['best_lr']:.4g} at cross-fold mean val_accuracy "
            f"{row['best_mean_val_accuracy']:.4f}",
            flush=True,
        )
    report(args, measured, target)


def report(args: argparse.Namespace, measured: dict, target: Path) -> None:
    setting = (
        f"{args.trials} trials x {args.k} folds, {args.epochs} epoch(s), MLP, batch 64, Adam, lr log-uniform "
        f"[{LOW:g}, {HIGH:g}], seed {args.seed}, {'full MNIST training set' if args.limit is None else args.limit} "
        f"images, {CORES} cores, {CORES} trials at a time; one run each"
    )
    print(f"\n{setting}")
    print("| contender | wall (s) | trial-epochs | best lr | best cross-fold mean val_accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in measured.items():
        print(
            f"| {CONTENDERS[name]} | {row['wall_s']:.1f} | {row['trial_epochs']} | {row['best_lr']:.4g} | "
            f"{row['best_mean_val_accuracy']:.4f} |"
        )
    summary = {}
    if "plain" in measured:
        for name in ("none", "asha"):
            if name in measured:
                summary[f"speedup_{name}"] = measured["plain"]["wall_s"] / measured[name]["wall_s"]
                print(f"plain / {CONTENDERS[name]}: {summary[f'speedup_{name}']:.2f}x")
    draws = [row["lrs"] for row in measured.values()]
    summary["same_draws"] = all(_close(a, draws[0]) for a in draws)
    print(f"the same {args.trials} rates drawn by every contender: {summary['same_draws']}")
    for first, second in (("none", "plain"), ("asha", "none"), ("asha", "plain")):
        if first in measured and second in measured:
            same = _close([measured[first]["best_lr"]], [measured[second]["best_lr"]])
            summary[f"same_best_{first}_{second}"] = same
            print(f"best lr of {CONTENDERS[first]} equals that of {CONTENDERS[second]}: {same}")
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "setting": setting,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs_each": 1,
        "revision": _revision() if args.checkout == REPO else f"distml from {args.checkout}",
        "contenders": {CONTENDERS[name]: row for name, row in measured.items()},
        **summary,
    }
    target.write_text(json.dumps(document, indent=2) + "\n")
    print(f"written to {target}")


def _revision() -> str:
    """HEAD's commit, with "+changes" when distml/ differs from it (the code that ran)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "distml"], cwd=REPO).returncode != 0
    return head.stdout.strip() + ("+changes" if dirty else "")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-9 * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


if __name__ == "__main__":
    main()
