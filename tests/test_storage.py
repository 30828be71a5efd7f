"""Paths and URIs: one filesystem per bucket, paths inside it as pyarrow's own."""

from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from centernet_ray import storage
from centernet_ray.errors import UserInputError


def test_a_bucket_s_filesystem_is_made_once_and_its_paths_are_pyarrow_s(monkeypatch):
    """pyarrow's from_uri looks up credentials and the bucket's region (a request) on every call;
    an ingest resolves one URI per image. The region is given here so that nothing goes online."""
    made = []
    real = pafs.FileSystem.from_uri

    def from_uri(uri):
        made.append(uri)
        return real(uri + "?region=us-east-1")

    monkeypatch.setattr(storage, "pafs", SimpleNamespace(FileSystem=SimpleNamespace(from_uri=from_uri),
                                                         LocalFileSystem=pafs.LocalFileSystem))
    storage._bucket_filesystem.cache_clear()
    first, path = storage.resolve("s3://photos/val2017/000000000139.jpg")
    second, other = storage.resolve("s3://photos/val2017/")
    assert first is second and made == ["s3://photos/"]
    assert path == real("s3://photos/val2017/000000000139.jpg?region=us-east-1")[1] == "photos/val2017/000000000139.jpg"
    assert other == real("s3://photos/val2017/?region=us-east-1")[1]
    storage._bucket_filesystem.cache_clear()


def test_local_paths_and_file_uris_resolve_to_the_local_filesystem(tmp_path):
    fs, path = storage.resolve(tmp_path / "x.jpg")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x.jpg")
    fs, path = storage.resolve(f"file://{tmp_path}/x.jpg")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/x.jpg"


def test_a_uri_of_a_scheme_without_a_filesystem_is_a_user_error():
    with pytest.raises(UserInputError, match="https://example.com/resnet18.pth: not a path or URI this can read"):
        storage.is_file("https://example.com/resnet18.pth")


def test_a_join_in_a_uri_resolves_dot_segments_as_a_local_path_does_and_stays_in_its_bucket():
    """S3 stores keys literally (``images/./a.jpg`` is a key of its own) and clients differ in what they
    do with dot segments in a request's URL; a local filesystem resolves both to one file. The key
    is made the one a local path means (COCO files written by some tools name ``./a.jpg``)."""
    assert storage.join("s3://coco/images", "./a.jpg") == "s3://coco/images/a.jpg"
    assert storage.join("s3://coco/images/", "val", "../train/a.jpg") == "s3://coco/images/train/a.jpg"
    assert storage.join("gs://coco", "runs", "demo") == "gs://coco/runs/demo"
    assert storage.join("file:///data/coco/images", "./a.jpg") == "file:///data/coco/images/a.jpg"
    with pytest.raises(UserInputError, match=r"\.\./\.\./other/a.jpg: leaves the bucket of s3://coco/images"):
        storage.join("s3://coco/images", "../../other/a.jpg")


def test_a_path_inside_a_given_filesystem_is_written_as_it_is_with_its_folders(tmp_path):
    """As the training loop writes a checkpoint into the folder Ray Train's storage context names:
    a filesystem and a path in it, not a URI to resolve again."""
    from centernet_ray.checkpoint import save_checkpoint

    root = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    storage.write_bytes("run/epoch_0001/config.yaml", b"train: {}\n", root)
    save_checkpoint("run/epoch_0001/checkpoint.pt", {"schema_version": 0}, root)
    assert (tmp_path / "run" / "epoch_0001" / "config.yaml").read_bytes() == b"train: {}\n"
    assert (tmp_path / "run" / "epoch_0001" / "checkpoint.pt").is_file()
    assert not (Path.cwd() / "run" / "epoch_0001").exists()  # not resolved against the working folder


def test_a_tracking_server_that_does_not_answer_is_refused_at_once_and_any_answer_is_accepted():
    """MLflow's client retries a refused connection for ~4 minutes before its traceback (246 s
    measured against a closed port), after the command's Ray start and ingest."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    with pytest.raises(UserInputError, match=rf"^the MLflow tracking server http://127.0.0.1:{closed} does not answer "
                                             r"\(Connection refused\): start it, or set tracking.tracking_uri"):
        storage.require_tracking_server(f"http://127.0.0.1:{closed}")

    class Unauthorized(BaseHTTPRequestHandler):  # an authenticating proxy in front of the server
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answering = f"http://127.0.0.1:{server.server_port}/"
    try:
        storage.require_tracking_server(answering)
    finally:
        server.shutdown()
        server.server_close()
    storage.require_tracking_server(answering)  # answered once in this process: not asked again
    for local in ("sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "databricks"):
        storage.require_tracking_server(local)  # not a server this checks


def test_writing_under_a_file_is_a_one_line_error(tmp_path):
    """`data show --out a_file/x.png`, `predict --output a_file/out`: was pyarrow's FileExistsError."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserInputError, match=r"cannot write .*a_file/x.png: a file stands where a folder of that path"):
        storage.write_bytes(tmp_path / "a_file" / "x.png", b"png")
