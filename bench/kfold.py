"""K-fold benchmark: the workshop loop, scikit-learn's peer and `distml kfold`, one after another on one machine.

usage: python bench/kfold.py [--data-dir ../shared/data/mnist] [--repeats 3] [--scaling] [--skip-workshop]
                             [--skip-peers] [--baseline CHECKOUT]

Each contender runs as its own process and is timed from process start to finish (Ray's start-up included for
distml); the mean fold accuracy is read from its output. The compute floor is the same five folds trained with
distml's plain loop, one after another, in one process with the data already in memory. `--scaling` adds wall
time and peak memory (PSS of the whole process tree, so pages shared through Ray's object store count once)
against k and workers. `--baseline CHECKOUT` adds the same `distml kfold` run from another checkout of distml (a
`git worktree` of an earlier revision), taking turns with this one, so that a change is judged "no slower" within one
invocation on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
CORES = os.cpu_count() or 1


def run_timed(
    command: list[str], env: dict | None = None, memory: bool = False, cwd: Path = REPO
) -> tuple[float, str, float]:
    """(wall seconds, stdout, peak PSS in MiB of the process and all its descendants when `memory`).

    Reading every process's PSS costs CPU of its own, so the timed runs leave it out.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    peak = [0.0]

    def watch() -> None:
        root = psutil.Process(process.pid)
        while process.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            peak[0] = max(peak[0], total / 2**20)
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    if memory:
        watcher.start()
    output, _ = process.communicate()
    wall = time.perf_counter() - started
    if memory:
        watcher.join(timeout=1)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return wall, output, peak[0]


def mean_from_line(output: str) -> float:
    return float(re.search(r"mean=([0-9.]+)", output).group(1))


def workshop(data_dir: Path) -> tuple[float, float]:
    wall, output, _ = run_timed([sys.executable, str(SHARED_BENCH / "seed_kfold_baseline.py"), str(data_dir), "5", "3"])
    return wall, mean_from_line(output)


def sklearn_peer(data_dir: Path) -> tuple[float, float]:
    wall, output, _ = run_timed([sys.executable, str(SHARED_BENCH / "sklearn_kfold_peer.py"), str(data_dir), "5", "3"])
    return wall, mean_from_line(output)


def distml(
    data_dir: Path,
    k: int = 5,
    workers: int = CORES,
    extra: tuple[str, ...] = (),
    memory: bool = False,
    checkout: Path = REPO,
) -> tuple[float, float, float]:
    """`distml kfold` from `checkout` (its own distml package comes first on the path)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [
            sys.executable,
            "-m",
            "distml.cli",
            "kfold",
            "--k",
            str(k),
            "--epochs",
            "3",
            "--batch-size",
            "64",
            "--lr",
            "1e-3",
            "--model",
            "mlp",
            "--workers",
            str(workers),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
        wall, _, peak = run_timed(command, memory=memory, cwd=checkout)
        accuracy = pd.read_csv(out / "folds.csv")["val_accuracy"].mean()
    return wall, float(accuracy), peak


def floor(data_dir: Path) -> tuple[float, float]:
    wall, output, _ = run_timed([sys.executable, __file__, "--floor-only", "--data-dir", str(data_dir)])
    result = json.loads(output.strip().splitlines()[-1])
    return result["seconds"], result["accuracy"]


def floor_only(data_dir: Path) -> None:
    """Train the five folds with distml's plain loop in this process; time only the training."""
    import torch

    from distml.data import load_folder, normalize
    from distml.folds import fold_assignment, fold_indices
    from distml.train import TrainSettings, fit, new_state

    data = load_folder(data_dir, "data-dir")
    x, y = torch.from_numpy(normalize(data.train_images)), torch.from_numpy(data.train_labels)
    assignment = fold_assignment(data.train_labels, 5, 0)
    settings = TrainSettings(model="mlp", epochs=3, batch_size=64, lr=1e-3, seed=0)
    started = time.perf_counter()
    accuracies = []
    for fold in range(5):
        train_index, val_index = (torch.from_numpy(i) for i in fold_indices(assignment, fold))
        accuracies.append(fit(new_state(settings, fold), settings, x, y, train_index, val_index).accuracy)
    print(json.dumps({"seconds": time.perf_counter() - started, "accuracy": sum(accuracies) / 5}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--repeats", type=int, default=3, help="0: only --scaling")
    parser.add_argument("--scaling", action="store_true", help="also time k in (2, 5, 10) and workers in (1, 2)")
    parser.add_argument("--skip-workshop", action="store_true", help="leave out the 3-minute workshop loop")
    parser.add_argument("--skip-peers", action="store_true", help="time distml alone: no scikit-learn, no floor")
    parser.add_argument("--baseline", type=Path, help="also run distml kfold from this checkout, turn about")
    parser.add_argument("--floor-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = args.data_dir.resolve()
    if args.floor_only:
        floor_only(data_dir)
        return

    contenders = {
        "distml kfold (defaults: folds stacked)": lambda: distml(data_dir)[:2],
        "distml kfold --folds-per-trial 1": lambda: distml(data_dir, extra=("--folds-per-trial", "1"))[:2],
        # the cost of exporting every fold model and their ensemble, measured apart from the default run's
        "distml kfold --keep-fold-models": lambda: distml(data_dir, extra=("--keep-fold-models",))[:2],
    }
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        contenders[f"baseline {baseline.name} (defaults)"] = lambda: distml(data_dir, checkout=baseline)[:2]
    if not args.skip_peers:
        contenders["scikit-learn cross_validate(n_jobs=2)"] = lambda: sklearn_peer(data_dir)
        contenders["compute floor (plain loop, one process)"] = lambda: floor(data_dir)
    if not args.skip_workshop:
        contenders["workshop loop"] = lambda: workshop(data_dir)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    accuracies: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats):
        for name, contender in contenders.items():
            wall, accuracy = contender()
            times[name].append(wall)
            accuracies[name].append(accuracy)
            print(
                f"run {repeat + 1}/{args.repeats} {name}: {wall:.1f} s, mean fold accuracy {accuracy:.4f}", flush=True
            )

    if args.repeats > 0:
        report(contenders, times, accuracies, args.repeats)
    if args.scaling:
        scaling(data_dir)


def report(contenders: dict, times: dict, accuracies: dict, repeats: int) -> None:
    rows = [
        {
            "contender": name,
            "median_wall_s": statistics.median(times[name]),
            "runs": " ".join(f"{t:.1f}" for t in times[name]),
            "mean_accuracy": statistics.median(accuracies[name]),
        }
        for name in contenders
    ]
    table = pd.DataFrame(rows)
    print(f"\nk=5, 3 epochs, batch 64, Adam 1e-3, MLP, {CORES} workers; medians of {repeats} runs")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    best = table.iloc[0]
    median = dict(zip(table["contender"], table["median_wall_s"], strict=True))
    accuracy = dict(zip(table["contender"], table["mean_accuracy"], strict=True))
    fast = median[best["contender"]]
    baseline = next((name for name in median if name.startswith("baseline ")), None)
    if baseline is not None:
        print(f"\ndistml / {baseline}: {median['distml kfold (defaults: folds stacked)'] / median[baseline]:.2f}x")
    if "scikit-learn cross_validate(n_jobs=2)" in median:
        print(f"\nscikit-learn / distml: {median['scikit-learn cross_validate(n_jobs=2)'] / fast:.2f}x")
        print(f"distml / compute floor: {fast / median['compute floor (plain loop, one process)']:.2f}x")
    if "workshop loop" in median:
        print(f"workshop loop / distml: {median['workshop loop'] / fast:.2f}x")
        gap = 100 * (accuracy[best["contender"]] - accuracy["workshop loop"])
        print(f"accuracy, distml - workshop: {gap:+.2f} points")


def scaling(data_dir: Path) -> None:
    print("\nscaling (distml kfold at its defaults, one run each): k, workers, wall s, peak PSS MiB")
    for k in (2, 5, 10):
        for workers in (1, 2):
            wall, acc, peak = distml(data_dir, k=k, workers=workers, memory=True)
            print(f"k={k:<3} workers={workers}  {wall:6.1f} s  {peak:7.0f} MiB  accuracy {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
