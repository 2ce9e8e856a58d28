"""The MNIST download and the cache's lock, against a local HTTP server and a second process: a silent server ends the
download in one line with no file left behind, a good one fills the cache, and a lock held too long is an error."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from distml import data as mnist
from distml.data import DOWNLOAD_MD5, FILE_STEMS, DownloadFailed, load_mnist, write_idx
from distml.errors import DistmlError


def official_like_files(folder) -> dict[str, bytes]:
    """Small IDX files under the official names, gzipped, by name."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (20, 28, 28)),
        "train_labels": np.arange(20) % 10,
        "test_images": rng.integers(0, 256, (10, 28, 28)),
        "test_labels": np.arange(10) % 10,
    }
    folder.mkdir()
    return {
        f"{FILE_STEMS[key]}.gz": write_idx(folder / f"{FILE_STEMS[key]}.gz", array).read_bytes()
        for key, array in arrays.items()
    }


class Server:
    """A server on 127.0.0.1: `files` by name; with `stall`, it sends a file's headers and a few bytes, then nothing."""

    def __init__(self, files: dict[str, bytes], stall: bool = False):
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if stall:
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    outer.released.wait(30)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads allowed, from the test's server only (set by the test), to a fresh cache, never through a proxy."""
    monkeypatch.delenv("DISTML_OFFLINE")
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setattr(mnist, "MIRRORS", ())
    cache = tmp_path / "cache"
    monkeypatch.setenv("DISTML_CACHE_DIR", str(cache))
    return cache


def test_a_silent_server_ends_the_download_in_one_line_with_no_file_left(online, monkeypatch, tmp_path):
    server = Server(official_like_files(tmp_path / "files"), stall=True)
    monkeypatch.setattr(mnist, "MIRRORS", (server.url,))
    monkeypatch.setenv("DISTML_DOWNLOAD_TIMEOUT_S", "0.5")
    try:
        started = time.monotonic()
        online.mkdir()
        with pytest.raises(DownloadFailed, match=r"train-images-idx3-ubyte.gz: no data for 0.5 s$") as info:
            mnist._download(online)
        assert time.monotonic() - started < 10
        assert "\n" not in str(info.value)
        assert list(online.iterdir()) == []  # neither the file's own name nor its temporary one
        with pytest.warns(UserWarning, match=r"download DownloadFailed: .*no data for 0.5 s\); using the MNIST sample"):
            assert load_mnist().source == "bundled-sample"  # a silent mirror is an offline one
    finally:
        server.close()


def test_a_good_server_fills_the_cache_under_the_files_own_names(online, monkeypatch, tmp_path):
    files = official_like_files(tmp_path / "files")
    server = Server(files)
    monkeypatch.setattr(mnist, "MIRRORS", (server.url,))
    monkeypatch.setattr(mnist, "DOWNLOAD_MD5", {name: hashlib.md5(body).hexdigest() for name, body in files.items()})
    try:
        found = load_mnist()
        assert (found.source, len(found.train_labels), len(found.test_labels)) == ("download", 20, 10)
        assert sorted(path.name for path in online.iterdir() if not path.name.startswith(".")) == sorted(files)
        assert load_mnist().source == "cache"
    finally:
        server.close()


def test_a_file_with_the_wrong_checksum_is_not_kept(online, monkeypatch, tmp_path):
    server = Server(official_like_files(tmp_path / "files"))  # not the official bytes: DOWNLOAD_MD5 refuses them
    monkeypatch.setattr(mnist, "MIRRORS", (server.url,))
    try:
        online.mkdir()
        official = DOWNLOAD_MD5["train-images-idx3-ubyte.gz"]
        refused = f"train-images-idx3-ubyte.gz: checksum [0-9a-f]{{32}}, not MNIST's {official}"
        with pytest.raises(DownloadFailed, match=refused):
            mnist._download(online)
        assert list(online.iterdir()) == []
    finally:
        server.close()


HOLD_LOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_cache_lock_held_too_long_is_an_error_not_the_sample(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("DISTML_CACHE_DIR", str(cache))
    monkeypatch.setattr(mnist, "CACHE_LOCK_TIMEOUT_S", 0.5)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cache / mnist.LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DistmlError, match=r"has been locked by another process for 0.5 s") as info:
            load_mnist()
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert "\n" not in message and str(cache / mnist.LOCK_FILE) in message
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="using the MNIST sample"):
        assert load_mnist().source == "bundled-sample"  # the lock is free again (offline, nothing cached)


@pytest.mark.parametrize("given", ["0", "-1", "soon", "inf"])
def test_a_download_timeout_must_be_positive_seconds(monkeypatch, given):
    monkeypatch.setenv("DISTML_DOWNLOAD_TIMEOUT_S", given)
    with pytest.raises(DistmlError, match="DISTML_DOWNLOAD_TIMEOUT_S: must be a positive number of seconds"):
        mnist.download_timeout_s()
