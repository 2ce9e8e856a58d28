"""Find, check and load MNIST.

Where the data comes from, in the order a user expects:
1. `--data-dir` (or `DISTML_DATA_DIR`): a folder with the four IDX files, raw or `.gz`;
2. the per-user cache (`DISTML_CACHE_DIR`, else `$XDG_CACHE_HOME/distml/mnist`, else `~/.cache/distml/mnist`);
3. a download of the official files into that cache (skipped when `DISTML_OFFLINE=1`);
4. the real MNIST sample shipped inside the package (a stratified subset of the official files), with a warning.

The cache is read and written under a file lock, so that concurrent processes neither race nor read a half-written
file; a lock held by another process for longer than CACHE_LOCK_TIMEOUT_S is an error, not a reason to fall back to
the sample. Each file is downloaded under a temporary name, with a socket timeout, and takes its own name once its
checksum is MNIST's.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distml.errors import DistmlError

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGE_SIDE = 28
NUM_CLASSES = 10
# The mean and standard deviation of MNIST's training pixels, as every MNIST example normalises with.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SAMPLE_DIR = Path(__file__).parent / "sample"

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")  # torchvision's
DOWNLOAD_MD5 = {  # the official files' checksums, as torchvision checks them
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DOWNLOAD_TIMEOUT_S = 30.0  # a connection silent this long fails (DISTML_DOWNLOAD_TIMEOUT_S sets another)
CACHE_LOCK_TIMEOUT_S = 600.0  # a download of MNIST's 11 MB takes far less, even on a slow link
LOCK_FILE = ".download.lock"


@dataclass(frozen=True)
class MNIST:
    """The training and test sets as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # "data-dir", "cache", "download" or "bundled-sample"
    location: str

    @property
    def description(self) -> str:
        kind = "MNIST sample shipped with distml" if self.source == "bundled-sample" else "MNIST"
        return (
            f"{kind} ({self.source}: {self.location}): "
            f"{len(self.train_labels):,} training and {len(self.test_labels):,} test images"
        )

    def summary(self) -> dict:
        return {
            "name": "mnist",
            "source": self.source,
            "location": self.location,
            "train_images": int(len(self.train_labels)),
            "test_images": int(len(self.test_labels)),
        }


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


MAX_IDX_BYTES = 4 << 30  # an IDX file's data past this is refused before it is read (MNIST's largest is 47 MB)


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (raw or gzipped), checking its magic number, dimensions and size; the header is read first,
    so a file whose header claims more than MAX_IDX_BYTES is refused without reading (or unzipping) the rest."""
    path = Path(path)
    try:
        with _open(path) as f:
            start = f.read(4)
            if len(start) < 4:
                raise DistmlError(f"{path} is not an IDX file: only {len(start)} bytes")
            magic = int.from_bytes(start, "big")
            if magic != expect_magic:
                raise DistmlError(f"{path} has magic number {magic:#010x}, expected {expect_magic:#010x}")
            ndim = magic & 0xFF
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DistmlError(f"{path} is truncated: its header needs {4 + 4 * ndim} bytes")
            shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
            size = int(np.prod(shape, dtype=np.int64))
            if size > MAX_IDX_BYTES:
                raise DistmlError(f"{path} claims shape {shape}, {size:,} bytes: more than distml reads")
            raw = f.read(size + 1)  # one byte more tells a file longer than its header says
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DistmlError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) != size:
        what = "truncated" if len(raw) < size else "longer than its header says"
        raise DistmlError(f"{path} is {what}: shape {shape} needs {4 + 4 * ndim + size} bytes")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file, gzipped (with mtime 0, so reproducibly) when `path` ends in .gz."""
    path = Path(path)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(folder: Path) -> Path | None:
    """The folder that holds the four files: `folder` itself or torchvision's `MNIST/raw` below it."""
    for candidate in (folder, folder / "MNIST" / "raw"):
        if all(_find_file(candidate, stem) for stem in FILE_STEMS.values()):
            return candidate
    return None


def load_folder(folder: Path, source: str) -> MNIST:
    """Load and check the four IDX files in `folder`."""
    folder = Path(folder)
    found = _idx_folder(folder)
    if found is None:
        missing = [s for s in FILE_STEMS.values() if not _find_file(folder, s)]
        raise DistmlError(f"{folder} lacks the MNIST IDX files {', '.join(missing)} (raw or .gz)")
    arrays = {}
    for key, stem in FILE_STEMS.items():
        path = _find_file(found, stem)
        arrays[key] = read_idx(path, IMAGE_MAGIC if key.endswith("images") else LABEL_MAGIC)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DistmlError(
                f"{_find_file(found, FILE_STEMS[split + '_images'])}: images are {images.shape[1:]}, expected 28x28"
            )
        if len(images) != len(labels):
            raise DistmlError(f"{found}: {len(images)} {split} images but {len(labels)} labels")
        if labels.size and labels.max() >= NUM_CLASSES:
            raise DistmlError(
                f"{_find_file(found, FILE_STEMS[split + '_labels'])}: label {labels.max()} is not a digit"
            )
    return MNIST(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int64),
        source=source,
        location=str(found),
    )


def cache_dir() -> Path:
    if os.environ.get("DISTML_CACHE_DIR"):
        return Path(os.environ["DISTML_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distml" / "mnist"


class DownloadFailed(OSError):
    """No mirror gave a file, each for the reason the one-line message lists."""


def download_timeout_s() -> float:
    given = os.environ.get("DISTML_DOWNLOAD_TIMEOUT_S")
    if not given:
        return DOWNLOAD_TIMEOUT_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise DistmlError(f"must be a positive number of seconds, got {given!r}", option="DISTML_DOWNLOAD_TIMEOUT_S")
    return seconds


def _fetch(name: str, target: Path, timeout_s: float) -> None:
    """One official file from the first mirror that gives it whole, with MNIST's checksum, into `target`: written
    under a temporary name, which is never left behind, and renamed once checked."""
    partial = target.with_name(f"{target.name}.part")
    reasons = []
    for mirror in MIRRORS:
        url = mirror + name
        try:
            digest = hashlib.md5(usedforsecurity=False)
            with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != DOWNLOAD_MD5[name]:
                raise DownloadFailed(f"checksum {digest.hexdigest()}, not MNIST's {DOWNLOAD_MD5[name]}")
            os.replace(partial, target)
            return
        except (OSError, http.client.HTTPException) as exc:  # a refused or silent connection, an HTTP error
            silent = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
            reason = f"no data for {timeout_s:g} s" if silent else (str(exc).splitlines() or [type(exc).__name__])[0]
            reasons.append(f"{url}: {reason}")
        finally:
            partial.unlink(missing_ok=True)
    raise DownloadFailed("; ".join(reasons))


def _download(cache: Path) -> None:
    """The official files missing from the cache, each checked; the caller holds the cache's lock."""
    timeout_s = download_timeout_s()
    for name in DOWNLOAD_MD5:
        if not (cache / name).is_file():  # a file under its own name is whole and checked
            _fetch(name, cache / name, timeout_s)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's lock; one that no process here can write needs none (nothing is written there)."""
    if not os.access(cache, os.W_OK):
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(cache / LOCK_FILE))
    try:
        lock.acquire(timeout=CACHE_LOCK_TIMEOUT_S)
    except Timeout:
        raise DistmlError(
            f"the MNIST cache {cache} has been locked by another process for {CACHE_LOCK_TIMEOUT_S:g} s (another "
            f"distml downloading or loading MNIST there?); wait for it to end, or delete {lock.lock_file} if none is "
            "running"
        ) from None
    try:
        yield
    finally:
        lock.release()


def load_mnist(data_dir: Path | None = None) -> MNIST:
    """Find MNIST the way the module docstring describes and load it."""
    if data_dir is None and os.environ.get("DISTML_DATA_DIR"):
        data_dir = Path(os.environ["DISTML_DATA_DIR"])
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DistmlError(f"{data_dir} is not a folder", option="--data-dir")
        if not os.access(data_dir, os.R_OK | os.X_OK):
            raise DistmlError(f"{data_dir} cannot be read", option="--data-dir")
        return load_folder(data_dir, "data-dir")

    cache = cache_dir()
    online = os.environ.get("DISTML_OFFLINE", "") not in ("1", "true", "yes")
    download_error = "skipped: DISTML_OFFLINE=1"
    if online:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            download_error = f"cannot create the cache: {exc}"
    if cache.is_dir():
        with _cache_lock(cache):  # the files are found, downloaded and read while no other process writes them
            if _idx_folder(cache) is not None:
                return load_folder(cache, "cache")
            if online and not os.access(cache, os.W_OK):
                download_error = "skipped: the cache cannot be written"
            elif online:
                try:
                    _download(cache)
                except OSError as exc:  # offline, a proxy, a silent server, a full disk: fall back to the sample
                    download_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                else:
                    return load_folder(cache, "download")
    warnings.warn(
        f"MNIST not found (no --data-dir, nothing in {cache}, download {download_error}); using the "
        f"MNIST sample shipped with distml. Point --data-dir at the four IDX files for the full dataset.",
        stacklevel=2,
    )
    return load_folder(SAMPLE_DIR, "bundled-sample")


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), scaled and standardised like torchvision's Normalize."""
    out = images.astype(np.float32)[:, None, :, :]
    out *= 1.0 / (255.0 * MNIST_STD)
    out -= MNIST_MEAN / MNIST_STD
    return out
