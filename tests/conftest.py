import contextlib
import os
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from centernet_ray.data.synthetic import write_shapes_dataset


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

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


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

    def start(self, command: list, log_path: Path, **env: str) -> subprocess.Popen:
        """Start ``command`` with ``env(**env)``, its output going to ``log_path``."""
        tag = uuid.uuid4().hex
        with open(log_path, "w") as log:
            process = subprocess.Popen([str(part) for part in command], env=self.env(**env, **{self.TAG: tag}),
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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
