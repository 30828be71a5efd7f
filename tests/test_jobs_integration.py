"""`ray job submit` of the train job to a real Ray head with token authentication (DESIGN.md: the
Jobs API of Ray 2.60 needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN on the head and the client)."""

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # ray, and the `python` the job's entrypoint runs
TINY_CONFIG = "tests/tiny_train.yaml"  # relative: the job runs in the uploaded copy of the repo


def _http(address: str, path: str, token: str | None, method: str = "GET", body: bytes | None = None) -> int:
    """The HTTP status of one request to the Jobs API (0: no connection)."""
    request = urllib.request.Request(address + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:  # URLError (connection refused while Ray starts), timeouts
        return 0


@pytest.fixture(scope="module")
def ray_head(background_services, free_ports, tmp_path_factory):
    """A real `ray start --head` with its own free ports, temp dir and a throw-away token (the format
    of `ray get-auth-token --generate`), its Jobs API up on 127.0.0.1. Stopped by
    ``background_services``: only this cluster's processes, never a bare `ray stop`."""
    token = secrets.token_hex(32)
    gcs, dashboard, agent_http, agent_grpc, metrics, node_manager, object_manager, client, runtime_env = free_ports(9)
    # Ray's unix sockets live under the temp dir and their paths must stay under 108 characters:
    # pytest's tmp_path is too deep, so a short directory under /tmp.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayjobs-"))
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    address = f"http://127.0.0.1:{dashboard}"
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{VENV_BIN}:{background_services.env()['PATH']}",  # the job's `python` is the venv's
           # Ray Train's PlacementGroupCleaner finds "its" cluster by scanning /tmp/ray and local GCS
           # processes, which fails with a custom temp dir and other Rays on the machine: name it.
           "RAY_API_SERVER_ADDRESS": address,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # teardown: no drain wait on SIGTERM
    head = background_services.start([
        # No --node-ip-address: Ray maps 127.0.0.1 to the machine's own address for its gRPC services
        # anyway; all HTTP (the Jobs API) goes to the dashboard, bound to 127.0.0.1.
        VENV_BIN / "ray", "start", "--head", "--block", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--ray-client-server-port={client}", f"--runtime-env-agent-port={runtime_env}",
        "--min-worker-port=0", "--max-worker-port=0",  # workers: ports chosen by the OS
        "--num-cpus=8", "--object-store-memory=1000000000", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ], log, **env)
    deadline = time.monotonic() + 120
    try:
        while _http(address, "/api/jobs/", token) != 200:
            assert head.poll() is None, f"`ray start` exited with {head.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the Jobs API did not come up in 120 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield SimpleNamespace(address=address, token=token, env=env, temp_dir=temp_dir, log=log)
    finally:
        background_services.stop_all()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(ray_head, entrypoint: list[str], *, env: dict[str, str], options: tuple = ()):
    """`ray job submit --no-wait` (the CLI, with ``env``); the finished process."""
    command = [VENV_BIN / "ray", "job", "submit", "--address", ray_head.address, "--no-wait", *options,
               "--", *entrypoint]
    return subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True, timeout=120)


def _jobs_client(ray_head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(ray_head.address, headers={"Authorization": f"Bearer {ray_head.token}"})


def test_submission_without_the_right_token_is_rejected(ray_head, background_services, tmp_path):
    """Auth is on: the CLI without any token (and a HOME without ~/.ray/auth_token) gets 401, a
    wrong token gets 403, and no job was created."""
    marker = f"rejected-{secrets.token_hex(4)}"
    result = _submit(ray_head, ["echo", marker], env=background_services.env(HOME=str(tmp_path)))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Authentication required" in output, output
    body = json.dumps({"entrypoint": f"echo {marker}"}).encode()
    assert _http(ray_head.address, "/api/jobs/", secrets.token_hex(32), "POST", body) == 403
    assert _http(ray_head.address, "/api/jobs/", None, "POST", body) == 401
    assert not [job for job in _jobs_client(ray_head).list_jobs() if marker in job.entrypoint]


def test_submitted_train_job_succeeds_and_is_tracked_in_mlflow(ray_head, background_services, shapes_dataset,
                                                             tmp_path):
    """`ray job submit --working-dir <repo> -- python -m centernet_ray train ...` with the token:
    the job SUCCEEDS, its MLflow run holds the config and metrics, and the uploaded working dir
    left out what .gitignore and the excludes name (.venv, .git)."""
    import mlflow
    from ray.job_submission import JobStatus

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary_path = tmp_path / "summary.json"
    submission_id = f"centernet-train-{secrets.token_hex(4)}"
    entrypoint = ["python", "-m", "centernet_ray", "train", TINY_CONFIG, f"data.root={shapes_dataset}",
                  f"data.parquet_dir={tmp_path / 'parquet'}", f"train.storage_path={tmp_path / 'runs'}",
                  f"tracking.tracking_uri={tracking_uri}", "--summary-json", summary_path]
    result = _submit(ray_head, entrypoint, env=background_services.env(**ray_head.env), options=(
        "--submission-id", submission_id, "--working-dir", REPO, "--runtime-env-json", '{"excludes": [".git"]}'))
    assert result.returncode == 0, result.stdout + result.stderr

    client = _jobs_client(ray_head)
    deadline = time.monotonic() + 420
    while not client.get_job_status(submission_id).is_terminal():
        if time.monotonic() > deadline:  # fail below with the logs so far
            client.stop_job(submission_id)
            break
        time.sleep(2)
    info = client.get_job_info(submission_id)
    assert info.status == JobStatus.SUCCEEDED, (
        f"job {info.status}: {info.message}\n--- job logs ---\n{client.get_job_logs(submission_id)}")

    summary = json.loads(summary_path.read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["AP"] <= 1.0 and summary["mlflow_run_id"], summary
    tracking = mlflow.MlflowClient(tracking_uri)
    runs = tracking.search_runs([tracking.get_experiment_by_name("centernet-ray").experiment_id])
    assert [run.info.run_id for run in runs] == [summary["mlflow_run_id"]], runs
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "1" and run.data.params["model.head_conv"] == "16"
    assert {"train/loss_total", "train/epoch_loss_total", "val/AP", "val/AP50", "val/best_AP"} <= set(run.data.metrics), run.data.metrics

    # The package the job ran in: the repo without .venv (.gitignore) and .git (excludes).
    package = info.runtime_env["working_dir"].rsplit("/", 1)[-1].removesuffix(".zip")
    unpacked = ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files" / package
    assert unpacked.is_dir(), f"{package} not under {ray_head.temp_dir}"
    shipped = {path.name for path in unpacked.iterdir()}
    assert {"centernet_ray", "tests", "tune", "pyproject.toml"} <= shipped, shipped
    assert (unpacked / "centernet_ray" / "configs" / "demo.yaml").is_file()
    assert not shipped & {".venv", ".git", "data", "outputs", "mlflow.db"}, shipped
