"""Benchmark: a learning-rate sweep on cached backbone features against the same sweep re-running the frozen
backbone in every trial (`--uncached`), on the same machine, in one run, on one local Ray.

Default size: 16 trials at the sweep's defaults (5 epochs, ASHA grace 1 and reduction 2, batch 128, 32-pixel
images, 2 trials at a time with 1 CPU each) on the MNIST sample shipped with distml: 6,000 training images, of
which 5,400 train and 600 validate. Weights are random (`none`): ImageNet's cannot be downloaded here, and the
backbone costs the same either way. Both variants start from the same seed, so they draw the same 16 rates.
Measured on 2 shared cores (load average 7 to 15 from other jobs): cached 101 s, uncached 1,248 s, 12.4x, with
the same 35 trial-epochs and the same best rate in both. Uncontended, the uncached sweep should take about 5 minutes.
An untimed one-trial warm-up sweep runs first; each timed wall includes loading the data, building the model,
the feature pass (cached), Tune's start and the report, but not Ray's start.

    python bench/sweep.py            # the benchmark: nearly all of its time is the uncached sweep
    python bench/sweep.py --smoke    # 2 trials, 1 epoch, 300 images: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from distml.config import ClusterConfig, SweepConfig
from distml.distributed import cluster
from distml.sweep import run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-images", type=int, default=None, help="stratified subset (default: all of them)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the sample shipped with distml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks the benchmark works")
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.train_images = 2, 1, 300
    if args.data_dir is None:
        from distml.data import SAMPLE_DIR

        args.data_dir = SAMPLE_DIR

    config = SweepConfig(
        trials=args.trials,
        epochs=args.epochs,
        weights="none",
        train_images=args.train_images,
        data_dir=args.data_dir,
        cluster=ClusterConfig(workers=args.workers),
    )
    started_ray = cluster.connect(quiet=True, num_cpus=os.cpu_count())  # one Ray for both: startup not timed
    try:
        with tempfile.TemporaryDirectory(prefix="distml-bench-") as folder:
            # untimed: the driver's one-time imports (matplotlib, sklearn) would otherwise count against the first
            run_sweep(replace(config, trials=1, epochs=1, train_images=300, out=Path(folder) / "warm-up"))
            walls = {}
            for name, uncached in (("cached", False), ("uncached", True)):
                started = time.perf_counter()
                outcome = run_sweep(replace(config, uncached=uncached, out=Path(folder) / name))
                walls[name] = time.perf_counter() - started
                trials = outcome.trials
                print(
                    f"{name:>8}: {walls[name]:7.1f} s wall, {len(trials)} trials, {int(trials['epochs'].sum())} "
                    f"trial-epochs ({int(trials['stopped_early'].sum())} stopped early), best lr "
                    f"{outcome.best['lr']:.3g} at val_accuracy {outcome.best['best_val_accuracy']:.4f}",
                    flush=True,
                )
    finally:
        if started_ray:
            cluster.shutdown()
    print(
        f"cached is {walls['uncached'] / walls['cached']:.1f}x faster "
        f"({walls['uncached']:.1f} s uncached / {walls['cached']:.1f} s cached; target >= 10x)"
    )


if __name__ == "__main__":
    main()
