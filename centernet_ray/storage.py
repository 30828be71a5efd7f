"""Paths and URIs through pyarrow filesystems: local paths, ``file://``, ``s3://``, ``gs://``, ...

Nothing in the project assumes a disk shared between nodes: every read and write of datasets goes
through these helpers, so a URI works wherever a local path does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pyarrow as pa
import pyarrow.fs as pafs

from centernet_ray.errors import UserInputError

if TYPE_CHECKING:
    from centernet_ray.config import Config


BUCKET_SCHEMES = ("s3", "gs", "gcs")  # pyarrow's paths on these are "bucket/key"


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names a filesystem by scheme (``s3://``, ``gs://``, ``file://``) rather than
    being a plain local path."""
    return "://" in str(path)


def resolve(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI. A bucket's filesystem is made once
    per process: pyarrow's ``from_uri`` looks up credentials and the bucket's region (a request)
    each time, which an ingest reading one image per call would pay per image."""
    text = str(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    scheme, _, rest = text.partition("://")
    bucket = rest.partition("/")[0]
    if scheme in BUCKET_SCHEMES and bucket and "?" not in rest:
        with _bucket_must_exist(text):  # without an endpoint, pyarrow looks up the bucket's region here
            return _bucket_filesystem(scheme, bucket), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid as exc:  # a scheme pyarrow has no filesystem for (https://, ...)
        raise UserInputError(f"{text}: not a path or URI this can read or write ({exc})") from None


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}/")[0]


def absolute(uri: str) -> str:
    """A local path made absolute against the current directory (``~`` expanded); a URI or an
    empty string unchanged. Call it where the path is typed: Ray workers and Tune trials run in
    Ray's session folder, where a relative path means something else."""
    if not uri or is_uri(uri):
        return uri
    return str(Path(uri).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """Join path parts onto a local path or a URI without mangling the scheme. In a URI, ``.`` and
    ``..`` are resolved as a local filesystem resolves them (a COCO ``file_name`` of ``./a.jpg`` is
    the key ``images/a.jpg``, where object storage would look for a key holding ``./``); a path
    that climbs out of its bucket (or host) is refused."""
    text = str(base)
    if not is_uri(text):
        return str(Path(text).joinpath(*parts))
    scheme, _, rest = text.partition("://")
    joined = posixpath.normpath(posixpath.join(rest, *parts))
    if joined.partition("/")[0] != rest.partition("/")[0]:  # the bucket (or host) itself
        raise UserInputError(f"{'/'.join(parts)}: leaves the bucket of {text}")
    return f"{scheme}://{joined}"


def read_bytes(uri: str | Path) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str | Path, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``data`` to ``uri`` (see :func:`open_output` for ``filesystem``)."""
    with open_output(uri, filesystem) as stream:
        stream.write(data)


def write_whole(uri: str | Path, data: bytes) -> None:
    """:func:`write_bytes`, where a reader never finds the file half-written (a manifest, a lease):
    a local file is written beside it and moved over it; an object store's upload is whole already."""
    if in_a_bucket(uri):
        write_bytes(uri, data)
        return
    partial = f"{uri}.{uuid.uuid4().hex}.partial"
    write_bytes(partial, data)
    fs, target = resolve(uri)
    fs.move(resolve(partial)[1], target)


@contextlib.contextmanager
def open_output(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> Iterator[pa.NativeFile]:
    """A stream writing ``uri`` (its folders created), for writers that produce more than they
    should hold in memory at once. With ``filesystem``, ``uri`` is a path inside it, used as it is:
    a folder someone else resolved, as Ray Train's storage context gives its run folder."""
    fs, path = (filesystem, str(uri)) if filesystem is not None else resolve(uri)
    parent = posixpath.dirname(path)
    with _bucket_must_exist(uri):
        if parent:
            try:
                fs.create_dir(parent, recursive=True)
            except (FileExistsError, NotADirectoryError):  # a file where a folder of the path should be
                raise UserInputError(f"cannot write {uri}: a file stands where a folder of that path should be "
                                     "(give a path under a folder)") from None
        stream = fs.open_output_stream(path)
    with stream:
        yield stream


@contextlib.contextmanager
def open_random_access(uri: str | Path) -> Iterator[BinaryIO | pa.NativeFile]:
    """``uri`` for reading with seeks (a zip archive, a ``torch.save`` file): the file itself where
    it is local; else its bytes, read in one request, in memory (a seek on object storage is an
    HTTP request)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "rb") as handle:  # a Python file: torch.load of pre-1.6 files needs readline()
            yield handle
    else:
        yield io.BytesIO(read_bytes(uri))


def exists(uri: str | Path) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def kind(uri: str | Path) -> str | None:
    """``"file"``, ``"folder"`` or None (nothing there) for a path or URI."""
    fs, path = resolve(uri)
    found = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "folder"}.get(found)


def is_file(uri: str | Path) -> bool:
    return kind(uri) == "file"


def in_a_bucket(uri: str | Path) -> bool:
    """Whether ``uri`` names a place in an object store's bucket (``s3://``, ``gs://``)."""
    text = str(uri)
    return is_uri(text) and text.partition("://")[0] in BUCKET_SCHEMES


def copy_folder(source: str | Path, destination: str | Path) -> None:
    """Copy the files under ``source`` to ``destination``, each a local path or a URI: files of the same
    name are replaced, others already there are kept."""
    source_fs, source_path = resolve(source)
    destination_fs, destination_path = resolve(destination)
    with _bucket_must_exist(destination):
        destination_fs.create_dir(destination_path, recursive=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                    destination_filesystem=destination_fs)


def require_bucket(uri: str | Path) -> None:
    """Refuse, in one line, an output URI whose bucket does not exist, before any work is done for
    it (writes by other libraries, such as Ray Train's checkpoints, would end in their traceback)."""
    text = str(uri)
    if not in_a_bucket(text):
        return
    fs, path = resolve(text)  # pyarrow's path: "bucket/key"
    bucket = path.partition("/")[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:  # an endpoint that does not answer: mistyped, or the store down
        unreachable = re.search(r"NETWORK_CONNECTION.*?(?:Details: )?([^;:]*)$", str(exc))
        if unreachable is None:
            raise
        raise UserInputError(f"{text}: cannot reach the object store{_at_endpoint()} ({unreachable.group(1).strip()}): "
                             "check the endpoint (AWS_ENDPOINT_URL) and that the store runs") from None
    if not found:
        raise UserInputError(_no_bucket(text, bucket))


def _at_endpoint() -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" at {endpoint}" if endpoint else ""


def _no_bucket(uri: str, bucket: str) -> str:
    return f"{uri}: there is no bucket '{bucket}'{_at_endpoint()} (create it first, or check the name)"


@contextlib.contextmanager
def _bucket_must_exist(uri: str | Path) -> Iterator[None]:
    """A write to a bucket that does not exist is the user's to fix: one line that names the bucket
    (and the endpoint asked, which a mistyped ``AWS_ENDPOINT_URL`` makes the wrong one), not
    pyarrow's traceback ending in advice about an option of its own."""
    try:
        yield
    except OSError as exc:
        missing = re.search(r"Bucket '([^']+)' not found", str(exc))
        if missing is None:
            raise
        raise UserInputError(_no_bucket(str(uri), missing.group(1))) from None


def file_names(folder: str | Path) -> set[str]:
    """The files under ``folder`` (recursively), as paths relative to it with "/" separators; empty
    when it does not exist. One listing, where a check per file would be a request per file on
    object storage."""
    return set(file_sizes(folder))


def subfolder_names(folder: str | Path) -> list[str]:
    """The names of the folders directly inside ``folder``, sorted (one listing, not recursive);
    empty when it does not exist."""
    fs, path = resolve(folder)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory)


def file_sizes(folder: str | Path) -> dict[str, int]:
    """The files under ``folder`` (recursively), as ``file_names`` gives them, each with its size in
    bytes, from one listing."""
    fs, path = resolve(folder)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {posixpath.relpath(info.path, path): info.size for info in found if info.type == pafs.FileType.File}


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the embedded default: a SQLite file in the command's directory


def tracking_uri(configured: str = "") -> str:
    """The MLflow tracking URI to use: ``configured`` (``tracking.tracking_uri``), else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a local store made absolute
    (:func:`absolute_tracking_uri`)."""
    return absolute_tracking_uri(configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative local store resolved against the current directory:
    ``sqlite:///mlflow.db`` -> ``sqlite:////abs/dir/mlflow.db``, ``mlruns`` or ``file:mlruns`` ->
    ``file:///abs/dir/mlruns``. Servers (``http://``, ``databricks``, ...) and absolute stores
    are returned unchanged. MLflow resolves a relative store in the process that opens it, and Ray
    workers and Tune trials run in Ray's session folder, so drivers resolve it first."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path or path.startswith("/") or path.startswith(":memory:"):
            return uri
        return "sqlite:///" + str(Path(path).expanduser().resolve())
    if uri.startswith("file:"):
        rest = uri[len("file:"):]
        return uri if rest.startswith("//") else Path(rest).expanduser().resolve().as_uri()
    if _is_server(uri):
        return uri
    return Path(uri).expanduser().resolve().as_uri()  # a plain path: MLflow's file store


def _is_server(uri: str) -> bool:
    """A URI with a scheme other than ``sqlite:``/``file:``, or Databricks' bare ``databricks``."""
    return uri.startswith("databricks") or (bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri))
                                            and not uri.startswith(("sqlite:", "file:")))


_ANSWERED: set[str] = set()  # tracking servers this process found answering: asked once


def require_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """Refuse at once, in one line, an MLflow tracking server (``http(s)://``) that does not answer:
    MLflow's client retries a refused connection for ~4 minutes (246 s measured) before its traceback,
    which a command meets after its Ray start and ingest. Any HTTP answer counts, an error or an
    authenticating proxy's included, and so does a TLS handshake this check cannot judge (the
    certificate settings are MLflow's): only a server that cannot be reached is refused. A server
    that answered is not asked again by this process."""
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    import requests  # MLflow's own HTTP client library

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except requests.exceptions.SSLError:
        pass
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
        reason = cause.group(1) if cause else "no answer in %.0f s" % timeout_s if isinstance(
            exc, requests.exceptions.Timeout) else type(exc).__name__
        raise UserInputError(f"the MLflow tracking server {uri} does not answer ({reason}): start it, or set "
                             "tracking.tracking_uri (or $MLFLOW_TRACKING_URI) to one that runs") from None
    _ANSWERED.add(uri)


def is_node_local_store(uri: str) -> bool:
    """Whether an MLflow tracking URI names a store on one machine's disk (SQLite or files)."""
    return not _is_server(uri)


LOCAL_PATH_KEYS = (("data", "root"), ("data", "train_images"), ("data", "train_annotations"), ("data", "val_images"),
                   ("data", "val_annotations"), ("data", "parquet_dir"), ("train", "storage_path"))


def names_a_weights_file(pretrained: str | None) -> bool:
    """Whether ``model.pretrained`` is a file (a folder separator or a ``.pth``/``.pt`` suffix), not a
    torchvision weights name such as ``IMAGENET1K_V1``."""
    return bool(pretrained) and ("/" in pretrained or pretrained.endswith((".pth", ".pt")))


def with_absolute_paths(config: Config) -> Config:
    """A copy of ``config`` whose local dataset and storage paths (``LOCAL_PATH_KEYS``) are absolute,
    resolved against the current directory, and whose ``tracking.tracking_uri`` is the resolved
    store (:func:`tracking_uri`: the environment's or the default one, written down). Drivers call
    it before shipping a config to Ray workers or Tune trials, whose working directory is Ray's
    session folder and whose environment may differ from the driver's."""
    resolved = copy.deepcopy(config)
    for section, key in LOCAL_PATH_KEYS:
        part = getattr(resolved, section)
        setattr(part, key, absolute(getattr(part, key)))
    if names_a_weights_file(resolved.model.pretrained):  # the DLA configs' weights/dla34-ba72cf86.pth
        resolved.model.pretrained = absolute(resolved.model.pretrained)
    resolved.tracking.tracking_uri = tracking_uri(resolved.tracking.tracking_uri)
    return resolved


STORAGE_ENV = "CENTERNET_RAY_STORAGE"


def default_storage_path(config: Config) -> str:
    """``train.storage_path``, else ``$CENTERNET_RAY_STORAGE`` (set once per cluster), else
    ./outputs/ray_results. On a multi-node cluster it must be a URI or a mount every node shares."""
    return config.train.storage_path or os.environ.get(STORAGE_ENV) or str(Path("outputs").resolve() / "ray_results")
