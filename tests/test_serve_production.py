"""The endpoint as it runs in production: `centernet-ray serve` started as a user starts it (API
keys, a 413 every client sees, Prometheus metrics, a clean SIGTERM), and a model swap under load
when the registry alias moves. Real Ray Serve, real HTTP on 127.0.0.1."""

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray

pytestmark = pytest.mark.integration

MAX_BODY = 2_000_000
KEY = "k3y-for-tests-0123456789"


def _wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"no healthy endpoint after {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(trained_checkpoint, free_ports, tmp_path_factory):
    """`centernet-ray serve` in a clean folder, its own local Ray, API keys from a file."""
    checkpoint, dataset = trained_checkpoint
    folder = tmp_path_factory.mktemp("serve_cli")
    (folder / "keys.txt").write_text(f"# one key per line\nsomeone-else-key\n{KEY}\n")
    port = free_ports(1)[0]
    log_path = folder / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "centernet_ray", "serve", "--checkpoint", str(checkpoint),
                                    "--port", str(port), "--api-keys-file", "keys.txt",
                                    f"serve.max_body_bytes={MAX_BODY}"], cwd=folder, stdout=log,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log_path)
        image = next((dataset / "images" / "train").iterdir()).read_bytes()
        yield {"url": url, "process": process, "log": log_path, "image": image}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def _post(url, data, key=KEY, content_type="image/jpeg", timeout=60):
    import requests

    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(f"{url}/detect", data=data, headers=headers, timeout=timeout)


def test_api_keys_guard_detect_and_metadata_but_not_healthz(served):
    import requests

    url = served["url"]
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    for key in (None, "wrong-key", ""):
        response = _post(url, served["image"], key=key)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]
    assert requests.get(f"{url}/metadata", timeout=30).status_code == 401
    for path in ("/openapi.json", "/docs", "/redoc"):  # FastAPI's own would answer without a key
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
    schema = requests.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert schema.status_code == 200 and "/detect" in schema.json()["paths"]
    basic = requests.post(f"{url}/detect", data=served["image"], timeout=60,
                          headers={"Content-Type": "image/jpeg", "Authorization": f"Basic {KEY}"})
    assert basic.status_code == 401  # the key, but not as a bearer token
    assert _post(url, served["image"]).status_code == 200
    assert _post(url, served["image"], key="someone-else-key").status_code == 200
    meta = requests.get(f"{url}/metadata", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert meta["api_key_required"] is True and meta["input_size"] == {"height": 64, "width": 64}
    logged = served["log"].read_text()
    assert KEY not in logged and "someone-else-key" not in logged and "2 key(s)" in logged


def test_urllib_sees_the_413_for_a_60_mb_upload(served):
    """urllib sends the whole body before it reads the answer: the endpoint drains it, then answers."""
    request = urllib.request.Request(f"{served['url']}/detect", data=b"\xff" * (60 * 1024 * 1024), method="POST",
                                     headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=120)
    assert caught.value.code == 413
    assert "exceeds the limit of 2000000" in json.loads(caught.value.read())["error"]
    assert _post(served["url"], served["image"]).status_code == 200  # and the service goes on


def _metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


def test_application_metrics_are_scraped_from_rays_prometheus_endpoint(served):
    """The URL `centernet-ray serve` logs; counts by status and kind, batch sizes (16 concurrent
    requests: batches of more than one image form), model latency."""
    # the command logs the URL once `serve.run` returns, which can be after /healthz first answers
    deadline, found = time.time() + 60, None
    while found is None and time.time() < deadline:
        found = re.search(r"metrics \(Prometheus\): (http://\S+)", served["log"].read_text())
        time.sleep(0.5)
    assert found, served["log"].read_text()[-3000:]
    url = found.group(1)
    assert _post(served["url"], served["image"], key=None).status_code == 401
    assert _post(served["url"], b"not an image").status_code == 400
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: _post(served["url"], served["image"]).status_code, range(16)))
    assert statuses == [200] * 16
    # earlier tests of the module already exported 200s and 401s: wait for everything this test sent,
    # not for the metric names, or a scrape from before this test's 400 reached Ray passes the wait
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:  # Ray exports every few seconds
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        if all(_scraped(text).values()):
            break
        time.sleep(2)
    missing = [what for what, seen in _scraped(text).items() if not seen]
    assert not missing, (missing, [line for line in text.splitlines() if "centernet" in line][:20])


def _scraped(text: str) -> dict[str, bool]:
    """What the metrics test expects in one scrape of Ray's Prometheus endpoint, each with whether it is there."""
    seen = {name: bool(_metric_lines(text, name)) for name in (
        "ray_centernet_requests_total", "ray_centernet_request_errors_total", "ray_centernet_batch_size_bucket",
        "ray_centernet_model_latency_ms_count", "ray_centernet_detections_count",
        "ray_centernet_request_latency_ms_count")}
    requests = _metric_lines(text, "ray_centernet_requests_total")
    errors = _metric_lines(text, "ray_centernet_request_errors_total")
    seen["a 200 on /detect"] = any('status="200"' in line and 'route="/detect"' in line for line in requests)
    seen["a 401"] = any('status="401"' in line for line in requests)
    seen["a 400"] = any('status="400"' in line for line in requests)
    seen['kind="unauthorized"'] = any('kind="unauthorized"' in line for line in errors)
    seen['kind="bad_request"'] = any('kind="bad_request"' in line for line in errors)
    # batches of one image fall in the bucket le=1: a batch of more is counted only above it
    single = [float(line.split()[-1]) for line in _metric_lines(text, "ray_centernet_batch_size_bucket")
              if float(re.search(r'le="([^"]+)"', line).group(1)) == 1.0]
    batches = sum(float(line.split()[-1]) for line in _metric_lines(text, "ray_centernet_batch_size_count"))
    seen["a batch of more than one image"] = bool(single) and batches > sum(single)
    return seen


def test_sigterm_shuts_serve_down_cleanly(served):
    """What Kubernetes sends on a pod's stop: exit 0 with a message, no native stack dump."""
    process = served["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(90) == 0
    logged = served["log"].read_text()
    assert "received SIGTERM: shutting down Serve" in logged and "stopped on SIGTERM: Serve shut down cleanly" in logged
    assert "Fatal Python error" not in logged and "most recent call first" not in logged
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{served['url']}/healthz", timeout=5)


@pytest.fixture
def registry(trained_checkpoint, tmp_path):
    """An MLflow store with model `shapes`: version 1 = the trained checkpoint, version 2 = the same
    weights saved as epoch 301 (its version label differs), alias `champion` on version 1."""
    import mlflow
    from mlflow import MlflowClient

    from centernet_ray.checkpoint import load_checkpoint, save_checkpoint

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("swap", artifact_location=str(tmp_path / "artifacts"))
    client.create_registered_model("shapes")
    state = load_checkpoint(trained_checkpoint[0])
    for epoch in (300, 301):
        run = client.create_run(experiment)
        path = tmp_path / f"epoch{epoch}" / "checkpoint.pt"
        save_checkpoint(path, {**state, "epoch": epoch})
        client.log_artifact(run.info.run_id, str(path), "checkpoint")
        client.create_model_version("shapes", f"runs:/{run.info.run_id}/checkpoint", run_id=run.info.run_id)
    client.set_registered_model_alias("shapes", "champion", "1")
    mlflow.set_tracking_uri(None)
    return store, client


def test_moving_the_alias_swaps_the_model_under_load_without_a_failed_request(ray_session, registry,
                                                                             trained_checkpoint, serve_port):
    import requests
    from ray import serve

    from centernet_ray.config import load_config
    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    store, client = registry
    config = load_config(None, [f"serve.port={serve_port}", "serve.model_poll_s=1", "serve.max_batch_size=8",
                                f"tracking.tracking_uri={store}"])
    url = start_app(config, "models:/shapes@champion")
    image = next((trained_checkpoint[1] / "images" / "train").iterdir()).read_bytes()
    try:
        assert requests.get(f"{url}/metadata", timeout=60).json()["model_version"] == "shapes/1"
        stop_at, answers = [time.time() + 1e9], []

        def client_loop(_):
            mine = []
            while time.time() < stop_at[0]:
                response = _post(url, image, key=None)
                mine.append((response.status_code, response.json().get("model") if response.ok else response.text))
            return mine

        with ThreadPoolExecutor(16) as pool:
            running = [pool.submit(client_loop, i) for i in range(16)]
            time.sleep(2)  # every client has had answers from version 1
            try:
                client.set_registered_model_alias("shapes", "champion", "2")
                deadline = time.time() + 60
                while requests.get(f"{url}/metadata", timeout=30).json()["model_version"] != "shapes/2":
                    assert time.time() < deadline, "the replica did not pick up the moved alias"
                    time.sleep(0.5)
            finally:
                stop_at[0] = time.time() + 2  # keep the load on a while after the swap
            per_client = [future.result() for future in running]
        answers = [a for mine in per_client for a in mine]
        failures = [a for a in answers if a[0] != 200]
        assert not failures, failures[:5]
        versions = [model for _, model in answers]
        assert versions.count("shapes/1") > 0 and versions.count("shapes/2") > 0, len(answers)
        assert all(mine[-1][1] == "shapes/2" for mine in per_client)  # 2 s after the swap every client has the new one
    finally:
        serve.delete(APP_NAME)


def test_redeploying_with_another_checkpoint_loses_no_request(ray_session, trained_checkpoint, serve_port, tmp_path):
    """The app deployed again with another `checkpoint` (through `serve.run`, whose code version is
    new each time, so Serve replaces the replica: the new one starts before the old one stops) while
    8 clients keep sending from before the redeploy until 2 s after the new replica answers: every
    request answered 200, by the old model and then by the new one, on a new replica."""
    import dataclasses

    import requests
    from ray import serve

    from centernet_ray.checkpoint import load_checkpoint, save_checkpoint
    from centernet_ray.config import load_config
    from centernet_ray.ray_serve.app import build_app
    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    second = tmp_path / "second" / "checkpoint.pt"
    save_checkpoint(second, {**load_checkpoint(trained_checkpoint[0]), "epoch": 302})
    config = load_config(None, [f"serve.port={serve_port}"])
    url = start_app(config, str(trained_checkpoint[0]))
    image = next((trained_checkpoint[1] / "images" / "train").iterdir()).read_bytes()
    try:
        before = requests.get(f"{url}/metadata", timeout=60).json()
        assert before["epoch"] == 300
        stop_at = [time.time() + 1e9]

        def client_loop():  # sends until 2 s after the new replica answers: the whole rollout is under load
            mine = []
            while time.time() < stop_at[0]:
                response = _post(url, image, key=None)
                mine.append((response.status_code, response.json().get("model") if response.ok else response.text))
            return mine

        with ThreadPoolExecutor(8) as pool:
            sending = [pool.submit(client_loop) for _ in range(8)]
            time.sleep(2)
            args = {**dataclasses.asdict(config.serve), "checkpoint": str(second)}
            try:
                serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)  # as `serve deploy` does
                deadline = time.time() + 60
                while requests.get(f"{url}/metadata", timeout=30).json()["epoch"] != 302:
                    assert time.time() < deadline, "the new checkpoint was not swapped in"
                    time.sleep(0.5)
            finally:
                stop_at[0] = time.time() + 2
            per_client = [future.result() for future in sending]
        answers = [a for mine in per_client for a in mine]
        failures = [a for a in answers if a[0] != 200]
        assert not failures, failures[:5]
        after = requests.get(f"{url}/metadata", timeout=30).json()["model_version"]
        assert after != before["model_version"] and {model for _, model in answers} == {before["model_version"], after}
        assert all(mine[-1][1] == after for mine in per_client)  # 2 s after the swap every client has the new one
        assert requests.get(f"{url}/metadata", timeout=30).json()["replica"] != before["replica"]
    finally:
        serve.delete(APP_NAME)


@pytest.mark.timeout(300)  # replicas Ray cannot place, if deployed, would keep serve.run waiting: fail, not hang
def test_a_checkpoint_the_replicas_cannot_load_is_a_one_line_error_not_a_deploy_traceback(ray_session, serve_port,
                                                                                        tmp_path):
    """What names no checkpoint is refused before Serve deploys anything (a run's folder, a missing
    path, a model the registry does not have); a file that is no checkpoint fails in the replica, and
    `centernet-ray serve` reports the replica's own error (a UserInputError: one line, exit 2), not
    Serve's "Failed to update the deployments" traceback."""
    from ray import serve

    from centernet_ray.config import load_config
    from centernet_ray.errors import UserInputError
    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    config = load_config(None, [f"serve.port={serve_port}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    run = tmp_path / "centernet-resnet18"
    (run / "epoch_0003").mkdir(parents=True)
    (run / "epoch_0003" / "checkpoint.pt").write_text("hello")  # a file that is no torch.save file
    before = set(serve.status().applications)
    refused = {str(run): "is a training run's folder, not one of its checkpoints: give one of epoch_0003",
               str(tmp_path / "absent.pt"): "no checkpoint at",
               "models:/nothing@champion": "models:/nothing@champion: Registered Model with name=nothing not found",
               "runs:/0123456789abcdef/model": "runs:/0123456789abcdef/model: Run with id=0123456789abcdef not found"}
    for source, message in refused.items():
        with pytest.raises((UserInputError, FileNotFoundError), match=message):
            start_app(config, source)
        assert set(serve.status().applications) == before  # nothing was deployed
    if not ray.cluster_resources().get("GPU"):  # nor for replicas this Ray has no GPU for: they would pend for ever
        for replicas, gpus, need in ((2, 0.5, "1 GPU"), (3, 0.6, "3 GPUs")):  # Ray packs fractions within one GPU
            on_gpus = load_config(None, [f"serve.port={serve_port}", f"serve.num_replicas={replicas}",
                                         f"serve.num_gpus={gpus}"])
            with pytest.raises(UserInputError, match=re.escape(
                    f"{replicas} model replicas (serve.num_replicas={replicas}, serve.num_gpus={gpus}) and the "
                    f"ingress need {need}, but the Ray this command started has 0 GPUs: set serve.num_gpus=0 "
                    "(--num-gpus 0) to serve on the CPU; or run on a cluster")):
                start_app(on_gpus, str(run / "epoch_0003"))
            assert set(serve.status().applications) == before
    cpus = int(ray.cluster_resources()["CPU"])  # and replicas that, with the ingress, want more CPUs than it has
    too_many = load_config(None, [f"serve.port={serve_port}", f"serve.num_replicas={cpus}"])
    with pytest.raises(UserInputError, match=re.escape(
            f"{cpus} model replicas (serve.num_replicas={cpus}, serve.num_gpus=0) and the ingress need {cpus + 1} "
            f"CPUs, but the Ray this command started has {cpus} CPUs: lower serve.num_replicas (--replicas)")):
        start_app(too_many, str(run / "epoch_0003"))
    assert set(serve.status().applications) == before
    try:
        with pytest.raises(UserInputError, match=r"^the model replica could not start: .*epoch_0003/checkpoint.pt is "
                                                 r"not a centernet-ray checkpoint: not a readable torch.save file"):
            start_app(config, str(run / "epoch_0003"))
    finally:
        serve.delete(APP_NAME)
