"""Where a run's output goes with `--storage`: a local or mounted folder, or a cloud URI Ray writes through pyarrow.

A local or mounted path (`/mnt/efs/distml`, `file:///mnt/efs/distml`) holds the whole run folder: report, Ray's
trial state and checkpoints. A cloud URI (`s3://bucket/prefix`, `gs://...`) gets Ray's trial state directly, and the
report once it is written under `--out` on the driver. Whether a local path is shared by every node of a cluster
is checked in distml/distributed/cluster.py (only that package talks to Ray).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from distml.atomic import write_atomic
from distml.errors import DistmlError

CLOUD_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")  # what pyarrow.fs, and so Ray, can write to
OPTION = "--storage"


def scheme(location: str) -> str | None:
    return location.split("://", 1)[0].lower() if "://" in location else None


def is_cloud(location: str) -> bool:
    return scheme(location) in CLOUD_SCHEMES


def local_path(location: str) -> Path:
    """The absolute folder a local or mounted `--storage` names (`file://` URIs included)."""
    if scheme(location) == "file":
        location = location.split("://", 1)[1]
    return Path(location).expanduser().absolute()


def check(location: str) -> None:
    """Refuse what Ray cannot write to: an unknown URI scheme, or a local path that is a file."""
    kind = scheme(location)
    if kind is not None and kind != "file" and kind not in CLOUD_SCHEMES:
        raise DistmlError(
            f"{location}: {kind}:// is not storage Ray can write to; use a local or mounted path, file://, "
            + ", ".join(f"{s}://" for s in CLOUD_SCHEMES),
            option=OPTION,
        )
    if kind is None or kind == "file":
        path = local_path(location)
        if path.exists() and not path.is_dir():
            raise DistmlError(f"{path} is a file, not a folder", option=OPTION)


def join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


def probe_cloud(uri: str) -> None:
    """Write and delete a small file under `uri`, so missing credentials fail now and not after training."""
    import pyarrow.fs  # a slow import that only cloud storage needs (shipped with ray[train])

    marker = join(uri, f".distml-probe-{uuid.uuid4().hex}")
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(marker)
        with filesystem.open_output_stream(path) as stream:
            stream.write(b"distml\n")
        filesystem.delete_file(path)
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid depending on the backend
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistmlError(f"cannot write to {uri} ({first_line})", option=OPTION) from None


def upload(folder: Path, uri: str, skip: tuple[str, ...] = ()) -> str:
    """Copy the files of `folder` (except the top-level entries named in `skip`) to `uri`; returns the URI."""
    import pyarrow.fs  # a slow import that only cloud storage needs (shipped with ray[train])

    filesystem, root = pyarrow.fs.FileSystem.from_uri(uri)
    filesystem.create_dir(root, recursive=True)
    local = pyarrow.fs.LocalFileSystem()
    for entry in sorted(Path(folder).iterdir()):
        if entry.name in skip or entry.name.startswith(".distml"):
            continue
        target = f"{root.rstrip('/')}/{entry.name}"  # a folder is copied with everything in it
        if entry.is_dir():
            filesystem.create_dir(target, recursive=True)  # object stores need none; a file:// folder does
        pyarrow.fs.copy_files(str(entry), target, source_filesystem=local, destination_filesystem=filesystem)
    return uri


def write_bytes(location: str, data: bytes) -> None:
    """Write a file at a local path or cloud URI; a local one is replaced atomically, never left half-written."""
    if is_cloud(location):
        import pyarrow.fs  # a slow import that only cloud storage needs (shipped with ray[train])

        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as stream:  # an object store's put is atomic itself
            stream.write(data)
        return
    write_atomic(local_path(location), lambda tmp: tmp.write_bytes(data))


def read_bytes(location: str) -> bytes | None:
    """The file at a local path or cloud URI, or None when there is none."""
    if is_cloud(location):
        import pyarrow.fs  # a slow import that only cloud storage needs (shipped with ray[train])

        filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
        if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    path = local_path(location)
    return path.read_bytes() if path.is_file() else None


def marker_name() -> str:
    """A file name no other run uses, for checking that every node sees a folder."""
    return f".distml-shared-{os.getpid()}-{uuid.uuid4().hex[:12]}"
