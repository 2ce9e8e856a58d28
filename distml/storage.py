"""Where a run's output goes with `--storage`: a local or mounted folder, or a cloud URI Ray writes through pyarrow.

A local or mounted path (`/mnt/efs/distml`, `file:///mnt/efs/distml`) holds the whole run folder: report, Ray's
trial state and checkpoints. A cloud URI (`s3://bucket/prefix`, `gs://...`) gets Ray's trial state directly, and the
report once it is written under `--out` on the driver. A URI may end in pyarrow's query options
(`s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http`), which stay at its end as names are added to its
path, and may hold credentials (`s3://KEY:SECRET@bucket/...`), which config.json and messages never show: they get
`redacted`. Whether a local path is shared by every node of a cluster is checked in distml/distributed/cluster.py
(only that package talks to Ray).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from distml.atomic import write_atomic
from distml.errors import DistmlError

CLOUD_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")  # what pyarrow.fs, and so Ray, can write to
OPTION = "--storage"
REDACTED = "***"  # what config.json and messages show in place of a credential a URI holds
# query options that hold a credential (pyarrow's Azure and GCS options among them: account_key, sas_token,
# client_secret, access_token); `sig` is a SAS token's signature
SECRET_WORDS = ("key", "secret", "token", "password", "credential")
# URIs whose user (`KEY:SECRET@`) is an access key; abfs' user is a container, hdfs' a login name
KEY_AS_USER = ("s3", "gs", "gcs")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def scheme(location: str) -> str | None:
    """The URI scheme of `location` in lower case, or None for a plain path. A known scheme, or any followed by a
    slash, makes a URI, a broken one too (`s3:/x`, `s3:bucket`): it is refused, never taken for a folder's name."""
    match = _SCHEME.match(location)
    if match is None:
        return None
    kind = match.group(1).lower()
    return kind if kind in (*CLOUD_SCHEMES, "file") or location[match.end() :].startswith("/") else None


def is_cloud(location: str) -> bool:
    return scheme(location) in CLOUD_SCHEMES


def local_path(location: str) -> Path:
    """The absolute folder a local or mounted `--storage` names (`file://` URIs included)."""
    if scheme(location) == "file":
        location = unquote(urlsplit(location).path)
    return Path(location).expanduser().absolute()


def check(location: str) -> None:
    """Refuse what Ray cannot write to, in one line: an unknown URI scheme, a URI without its `//` (`s3:/x`), a cloud
    URI without a bucket, a file:// URI with a host, or a local path that is a file."""
    kind = scheme(location)
    shown = redacted(location)
    if kind is not None and kind != "file" and kind not in CLOUD_SCHEMES:
        raise DistmlError(
            f"{shown}: {kind}:// is not storage Ray can write to; use a local or mounted path, file://, "
            + ", ".join(f"{s}://" for s in CLOUD_SCHEMES),
            option=OPTION,
        )
    if kind is not None:
        example = "/ABSOLUTE/PATH" if kind == "file" else "BUCKET/PREFIX"
        if not location[len(kind) + 1 :].startswith("//"):
            raise DistmlError(f"{shown} is not a URI: write {kind}://{example}", option=OPTION)
        try:
            parts = urlsplit(location)
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError as exc:
            raise DistmlError(f"{shown} is not a URI ({exc}): write {kind}://{example}", option=OPTION) from None
        if kind != "file" and not parts.hostname:
            raise DistmlError(f"{shown} names no bucket: write {kind}://{example}", option=OPTION)
        if kind == "file" and parts.netloc not in ("", "localhost"):
            raise DistmlError(f"{shown}: file:// takes an absolute path, as in file://{example}", option=OPTION)
    if kind is None or kind == "file":
        path = local_path(location)
        if path.exists() and not path.is_dir():
            raise DistmlError(f"{path} is a file, not a folder", option=OPTION)


def join(location: str, name: str) -> str:
    """`location` with `name` added to its path; a URI's query (`?endpoint_override=...`) stays at its end."""
    if scheme(location) is None:
        return location.rstrip("/") + "/" + name
    parts = urlsplit(location)
    return _unsplit(location, parts._replace(path=parts.path.rstrip("/") + "/" + name))


def redacted(location: str) -> str:
    """`location` as config.json and messages show it: the credentials of a URI (`KEY:SECRET@`, a query option such
    as `secret_key=...`) are REDACTED. A plain path is shown as it is."""
    if scheme(location) is None:
        return location
    return _without_credentials(location, REDACTED)


def same_place(first: str, second: str) -> bool:
    """Whether two `--storage` values name the same place, whatever credentials each holds."""
    return _without_credentials(first, None) == _without_credentials(second, None)


def holds_redacted(location: str) -> bool:
    """Whether `location` is a redacted URI that held credentials (those of config.json: they cannot be used)."""
    return scheme(location) is not None and redacted(location) == location != _without_credentials(location, None)


def _without_credentials(location: str, placeholder: str | None) -> str:
    """`location` with each credential replaced by `placeholder`, or removed when it is None."""
    try:
        parts = urlsplit(location)
    except ValueError:  # an unparsable URI: show no more than its scheme
        return f"{scheme(location)}://{placeholder or ''}"
    user_info, at, host = parts.netloc.rpartition("@")
    user, colon, _ = user_info.partition(":")
    if parts.scheme in KEY_AS_USER:  # the user is an access key: all of it is a credential
        user_info = placeholder if user_info and placeholder is not None else ""
    else:  # the user is a name (abfs' container, hdfs' login); only a password is a credential
        user_info = f"{user}:{placeholder}" if colon and placeholder is not None else user
    netloc = f"{user_info}@{host}" if at and user_info else host
    kept = []
    for option in parts.query.split("&") if parts.query else []:
        key, sign, _ = option.partition("=")
        secret = key.lower() == "sig" or any(word in key.lower() for word in SECRET_WORDS)
        if not secret:
            kept.append(option)
        elif placeholder is not None:
            kept.append(f"{key}{sign}{placeholder}")
    return _unsplit(location, parts._replace(netloc=netloc, query="&".join(kept)))


def _unsplit(location: str, parts) -> str:
    """The URI of `parts`, split from `location`, written as `location` is (urlunsplit drops an empty host's `//`)."""
    slashes = "//" if location[len(parts.scheme) + 1 :].startswith("//") else ""
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}:{slashes}{parts.netloc}{parts.path}{query}{fragment}"


def for_resume(saved: str | None, given: str | None) -> str | None:
    """The `--storage` a resumed run uses: the saved one, or the `given` one where it names the same place (config.json
    keeps no credentials, so a URI that held some must be given again, with them or with none to use the
    environment's)."""
    if saved is not None and given is not None and same_place(saved, given) and not holds_redacted(given):
        return given
    if saved is not None and holds_redacted(saved):
        raise DistmlError(
            f"{saved}: its credentials are not kept in config.json; give the same storage again with them (set "
            "DISTML_STORAGE, or storage= from Python), or without them to use the environment's",
            option="--resume",
        )
    return saved


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
        raise DistmlError(f"cannot write to {redacted(uri)} ({first_line})", option=OPTION) from None


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


def files_under(location: str) -> list[str]:
    """The files under a local folder or cloud prefix, as paths relative to it, sorted ([] when there are none)."""
    if is_cloud(location):
        import pyarrow.fs  # a slow import that only cloud storage needs (shipped with ray[train])

        filesystem, root = pyarrow.fs.FileSystem.from_uri(location)
        root = root.rstrip("/")
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted(info.path[len(root) + 1 :] for info in found if info.type == pyarrow.fs.FileType.File)
    folder = local_path(location)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def marker_name() -> str:
    """A file name no other run uses, for checking that every node sees a folder."""
    return f".distml-shared-{os.getpid()}-{uuid.uuid4().hex[:12]}"
