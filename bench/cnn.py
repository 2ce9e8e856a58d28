"""The CNN's validation accuracy, fold by fold, exactly as `distml kfold --model cnn` trains each fold.

usage: python bench/cnn.py [--data-dir ../shared/data/mnist] [--folds 0 1 2 3 4] [--epochs 5]
                           [--lr-schedule cosine] [--threads 2]

Each fold starts from the same weights and shuffling as in a kfold run (`new_state(settings, stream=fold)`) and
trains with the same plain loop, in this process, so the numbers are the ones a kfold run reports without Ray's
start-up. Prints every epoch's validation accuracy and, at the end, one JSON line per fold.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distml.config import TrainSettings
from distml.data import load_folder, normalize
from distml.folds import fold_assignment, fold_indices
from distml.train import fit, new_state

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--folds", type=int, nargs="+", default=None, help="default: all k")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr-schedule", default="cosine")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_folder(args.data_dir, "data-dir")
    x, y = torch.from_numpy(normalize(data.train_images)), torch.from_numpy(data.train_labels)
    assignment = fold_assignment(data.train_labels, args.k, 0)
    settings = TrainSettings(model="cnn", epochs=args.epochs, lr_schedule=args.lr_schedule)
    results = []
    for fold in args.folds if args.folds is not None else range(args.k):
        train_index, val_index = (torch.from_numpy(i) for i in fold_indices(assignment, fold))
        started = time.perf_counter()

        def show(state, record, fold=fold):
            print(f"fold {fold} epoch {record.epoch}: val_accuracy {record.val_accuracy:.4f} ({record.seconds:.0f} s)")

        val = fit(new_state(settings, fold), settings, x, y, train_index, val_index, on_epoch=show)
        results.append({"fold": fold, "val_accuracy": val.accuracy, "seconds": time.perf_counter() - started})
    print(f"cnn, {args.epochs} epochs, lr schedule {args.lr_schedule}, batch 64, Adam 1e-3, {args.threads} threads")
    for result in results:
        print(json.dumps(result))
    print(f"mean val_accuracy {sum(r['val_accuracy'] for r in results) / len(results):.4f} over {len(results)} folds")


if __name__ == "__main__":
    main()
