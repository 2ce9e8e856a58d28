"""Make the MNIST sample shipped inside distml (distml/sample/): a stratified subset of the official files.

usage: python scripts/make_sample.py MNIST_DIR [TRAIN_IMAGES] [TEST_IMAGES]
MNIST_DIR holds the four official IDX files (raw or .gz). Writes gzipped IDX files with mtime 0, so the
same input gives byte-identical output.
"""

import sys
from pathlib import Path

import numpy as np

from distml.data import FILE_STEMS, SAMPLE_DIR, load_folder, write_idx
from distml.folds import stratified_subset


def subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int = 0):
    index = stratified_subset(labels, size, seed)
    return images[index], labels[index]


def main() -> None:
    source = load_folder(Path(sys.argv[1]), "data-dir")
    train_size = int(sys.argv[2]) if len(sys.argv) > 2 else 6000
    test_size = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    train = subset(source.train_images, source.train_labels, train_size)
    test = subset(source.test_images, source.test_labels, test_size)
    SAMPLE_DIR.mkdir(exist_ok=True)
    for (images, labels), split in ((train, "train"), (test, "test")):
        write_idx(SAMPLE_DIR / f"{FILE_STEMS[split + '_images']}.gz", images)
        write_idx(SAMPLE_DIR / f"{FILE_STEMS[split + '_labels']}.gz", labels)
        print(f"{split}: {len(labels)} images, class counts {np.bincount(labels).tolist()}")


if __name__ == "__main__":
    main()
