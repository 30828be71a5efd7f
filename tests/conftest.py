import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from centernet_ray.data.synthetic import write_shapes_dataset

# Ray Train's controller polls its workers every 2 s: the end of a run waits for a poll, and so does a
# `ray.train.report` while the one before it is still unread (the worker's queue holds one). Epochs
# of a user's run last far longer than that; the suite's last under a second, and four reports of
# epochs that train nothing took 17.8 s, 8.6 s at 0.25 s. Set before any Ray starts, so that every
# Ray of the session inherits it: the local Ray, `ray start --head`, the commands run as subprocesses
# (the wheel's test, run as a new user runs it, keeps Ray's default).
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
os.environ.setdefault(TRAIN_POLL_ENV, "0.25")


def pytest_collection_modifyitems(items):
    """Test modules run whole, in three groups, collection order within each: the modules that never
    use the session's local Ray (`ray_session`) first, so that the ones starting a Ray of their own
    (the `ray start` cluster, the wheel's command) do not share the two cores with the idle daemons
    of the session's Ray, which starts with the first test that needs it. Among those, the modules
    without an integration test come first and the modules whose command runs beside the suite
    (``beside_the_suite``) right after them: their command has had the unit tests' time, and no
    other Ray runs on the machine meanwhile."""
    def group(module_items: list) -> tuple[bool, int]:
        if any("ray_session" in item.fixturenames for item in module_items):
            return True, 0
        if any(item.get_closest_marker("beside_the_suite") for item in module_items):
            return False, 1
        return False, 2 if any(item.get_closest_marker("integration") for item in module_items) else 0

    by_module: dict = {}
    for item in items:
        by_module.setdefault(item.module, []).append(item)
    groups = {module: group(module_items) for module, module_items in by_module.items()}
    items.sort(key=lambda item: groups[item.module])  # stable: collection order otherwise


_BESIDE: dict[str, SimpleNamespace] = {}  # test id -> its command, started (by _BESIDE_SERVICES, below)


def pytest_collection_finish(session):
    """Start the command of every test to run marked ``beside_the_suite(command)`` (``command(folder)``:
    the argv and extra environment of a command that writes into ``folder``), as soon as the
    session knows its tests. Such a command is one process's chain of starts (imports, a local Ray
    of its own, a server) that leaves a core idle most of its time: it runs while the unit tests
    do, and the test (its ``beside_the_suite`` fixture) waits for what is left of it and checks its
    results. The GPU check's dry run so: the unit modules and it 126-131 s one after the other,
    112-122 s side by side (the unit tests' torch uses both cores: a fifth of its minute comes back).
    Three tries at running whole test modules side by side lost time (BENCHMARKS.md); this is one
    command, and no Ray runs beside it."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("beside_the_suite")
        if marker is None:
            continue
        folder = Path(tempfile.mkdtemp(prefix="centernet-ray-beside-"))
        command, env = marker.args[0](folder)
        # the suite's Ray Train poll (above), which BackgroundServices.env leaves out with every RAY_ setting
        env = {TRAIN_POLL_ENV: os.environ[TRAIN_POLL_ENV], **env}
        process = _BESIDE_SERVICES.start(command, folder / "stdout.log", cwd=folder,
                                         stderr_path=folder / "stderr.log", **env)
        _BESIDE[item.nodeid] = SimpleNamespace(process=process, folder=folder, started=time.monotonic())


def pytest_sessionfinish(session):
    """Whatever a ``beside_the_suite`` command left running (its test failed or never ran) is stopped."""
    _BESIDE_SERVICES.stop_all()
    for started in _BESIDE.values():
        shutil.rmtree(started.folder, ignore_errors=True)


@pytest.fixture
def beside_the_suite(request):
    """The command this test's ``beside_the_suite`` marker started when the session began, waited
    for (10 minutes at most): ``returncode``, ``stdout``, ``stderr``, ``folder`` (what it wrote)."""
    started = _BESIDE.get(request.node.nodeid)
    if started is None:  # collected with --collect-only, or by a plugin that skips the hook
        pytest.fail("the command was not started: run the test through pytest's normal collection")
    started.process.wait(timeout=max(1.0, 600 - (time.monotonic() - started.started)))
    return SimpleNamespace(returncode=started.process.returncode, folder=started.folder,
                           stdout=(started.folder / "stdout.log").read_text(),
                           stderr=(started.folder / "stderr.log").read_text())


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """A small synthetic shapes dataset in COCO layout, written once per test session."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=24, num_val=12, image_size=96, seed=7)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test of the session. More logical CPUs than cores, so
    that Ray Data's preprocessing actors are not starved by train workers (DESIGN.md)."""
    ray = pytest.importorskip("ray")
    from ray.data import DataContext

    from centernet_ray.ray_runtime import use_single_node_train_env

    use_single_node_train_env()  # as `centernet-ray` does for the local Ray it starts
    # the dashboard serves the State API that Ray Train needs to free a stopped run's placement group
    ray.init(num_cpus=8, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_session, free_ports):
    """The HTTP port of Ray Serve on the session's Ray. The first test that deploys starts Serve on
    it (`start_app`); tests delete their application, not Serve, whose controller and proxy would
    otherwise start again for each (seconds of CPU each time); it is shut down once, at the end."""
    port = free_ports(1)[0]
    yield port
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="session")
def untrained_checkpoint(tmp_path_factory):
    """A small, untrained 4-class checkpoint (random detections, valid format)."""
    import torch

    from centernet_ray.checkpoint import checkpoint_state, save_checkpoint
    from centernet_ray.config import load_config
    from centernet_ray.model import build_model

    torch.manual_seed(0)
    config = load_config(None, ["data.input_size=[64,64]", "model.neck_channels=[32,32,32]", "model.head_conv=16"])
    model = build_model(config.model, 4)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, checkpoint_state(model, config, ["circle", "rectangle", "triangle", "cross"], [1, 2, 3, 4], epoch=0))
    return path


@pytest.fixture(scope="session")
def free_ports():
    """``free_ports(n)``: n distinct TCP ports on 127.0.0.1 that were free a moment ago (bound all at
    once, then released), so that services started by a test do not collide with another local one."""

    def pick(count: int) -> list[int]:
        sockets = [socket.socket() for _ in range(count)]
        try:
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            return [sock.getsockname()[1] for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()

    return pick


class BackgroundServices:
    """Long-running services of a test module (a Ray head, an MLflow server), each started in its own
    session with a unique environment tag that everything it spawns inherits (Ray workers, job
    drivers). ``stop_all`` kills exactly the tagged processes: unlike a bare `ray stop`, another Ray
    or server on the machine is left alone."""

    TAG = "CENTERNET_RAY_TEST_SERVICE"

    def __init__(self) -> None:
        self.started: list[tuple[subprocess.Popen, str]] = []

    @staticmethod
    def env(**extra: str) -> dict[str, str]:
        """This process's environment without Ray and MLflow settings (an earlier ``ray.init`` in the
        test process sets RAY_AUTH_MODE, for instance), plus ``extra``."""
        return {**{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}, **extra}

    def start(self, command: list, log_path: Path, *, cwd: Path | None = None, stderr_path: Path | None = None,
              **env: str) -> subprocess.Popen:
        """Start ``command`` in ``cwd`` with ``env(**env)``, its output going to ``log_path`` (its
        standard error to ``stderr_path`` when given)."""
        tag = uuid.uuid4().hex
        with contextlib.ExitStack() as files:
            log = files.enter_context(open(log_path, "w"))
            errors = files.enter_context(open(stderr_path, "w")) if stderr_path else subprocess.STDOUT
            process = subprocess.Popen([str(part) for part in command], env=self.env(**env, **{self.TAG: tag}),
                                       cwd=cwd, stdout=log, stderr=errors, start_new_session=True)
        self.started.append((process, tag))
        return process

    def stop_all(self) -> None:
        while self.started:
            self._stop(*self.started.pop())

    def _stop(self, process: subprocess.Popen, tag: str) -> None:
        import psutil

        # SIGTERM the service's root first (`ray start --block` then stops its node's processes in
        # order) and give it 30 s; then SIGTERM, and after 10 s SIGKILL, whatever is left of it.
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        left = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get(self.TAG) == tag:
                    left.append(proc)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)


_BESIDE_SERVICES = BackgroundServices()  # the beside_the_suite commands (pytest_collection_finish)


@pytest.fixture(scope="module")
def background_services():
    """A :class:`BackgroundServices` for the test module; its services are stopped on teardown, also
    after a failure."""
    pytest.importorskip("ray")
    services = BackgroundServices()
    try:
        yield services
    finally:
        services.stop_all()


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """(checkpoint path, dataset dir): a quarter-width model overfitted on 8 synthetic 64x64 training
    images with a plain PyTorch loop (no Ray), so that it finds the objects of those images."""
    import json

    import torch

    from centernet_ray.checkpoint import checkpoint_state, save_checkpoint
    from centernet_ray.config import load_config
    from centernet_ray.data.preprocess import Preprocessor
    from centernet_ray.data.transforms import normalize_images
    from centernet_ray.losses import CenterNetLoss
    from centernet_ray.model import IMAGE_MEAN, IMAGE_STD, build_model
    from centernet_ray.targets import render_targets

    root = tmp_path_factory.mktemp("overfit")
    dataset = write_shapes_dataset(root / "shapes", num_train=8, num_val=4, image_size=64, seed=11)
    config = load_config(None, ["model.width=0.25", "model.lateral=true", "model.neck_channels=[32,32,32]",
                                "model.head_conv=16", "data.input_size=[64,64]", "targets.max_objects=8"])
    annotations = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    by_image: dict[int, list] = {}
    for ann in annotations["annotations"]:
        x, y, w, h = ann["bbox"]
        by_image.setdefault(ann["image_id"], []).append(([x, y, x + w, y + h], ann["category_id"] - 1))
    rows = {"image": [], "boxes": [], "labels": [], "image_id": []}
    for record in annotations["images"]:
        rows["image"].append((dataset / "images" / "train" / record["file_name"]).read_bytes())
        rows["boxes"].append([b for b, _ in by_image.get(record["id"], [])])
        rows["labels"].append([c for _, c in by_image.get(record["id"], [])])
        rows["image_id"].append(record["id"])
    batch = Preprocessor((64, 64), 8, train=False)(rows)
    targets = render_targets(batch["boxes"], batch["classes"], batch["num_boxes"], 4, (16, 16), 8)
    images = normalize_images(torch.from_numpy(batch["image"]), IMAGE_MEAN, IMAGE_STD)
    torch.manual_seed(0)
    model = build_model(config.model, 4)
    criterion = CenterNetLoss.from_config(config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = criterion(model(images), targets)["total"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = root / "checkpoint.pt"
    save_checkpoint(path, checkpoint_state(model.eval(), config, [c["name"] for c in annotations["categories"]],
                                           [c["id"] for c in annotations["categories"]], epoch=300,
                                           metrics={"final_loss": float(loss)}))
    return path, dataset


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # connection refused while the server starts, HTTP errors, timeouts
        return False


@pytest.fixture(scope="session")
def mlflow_server(free_ports, tmp_path_factory):
    """`mlflow server` on 127.0.0.1 and a free port, one worker, SQLite backend; artifacts go through
    the server (mlflow-artifacts:/) into ``artifacts``. One for the session (its start and stop are
    ~15 s of the machine): each test tracks into an experiment of its own."""
    services = BackgroundServices()
    root = tmp_path_factory.mktemp("mlflow_server")
    (port,) = free_ports(1)
    log = root / "server.log"
    # Without MLflow's server-side job runner (GenAI evaluation jobs; nothing here submits one): its
    # 8 processes took 8 CPU-seconds to start and ~1 a minute idle, on two cores shared with the tests.
    server = services.start([
        Path(sys.executable).parent / "mlflow", "server", "--host", "127.0.0.1", "--port", port, "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", root / "artifacts",
    ], log, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(uri):
            assert server.poll() is None, f"`mlflow server` exited with {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"`mlflow server` not healthy in 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield SimpleNamespace(uri=uri, artifacts=root / "artifacts", log=log)
    finally:
        services.stop_all()
