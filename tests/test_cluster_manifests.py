"""cluster/: the Ray cluster launcher config, the KubeRay manifests and the runtime_env file pass the
validation of the tools that read them (the pinned Ray, the KubeRay CRDs), and say what the project
relies on: a head that runs no work, node pools labelled as ClusterConfig expects, token
authentication, storage and MLflow from the environment, job entrypoints that parse, and the Serve
application of cluster/serve.yaml. Nothing here starts Ray."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from centernet_ray.cli import build_parser
from centernet_ray.config import files as config_files
from centernet_ray.config import ClusterConfig, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
VALIDATOR = Path(os.environ.get("KUBERAY_VALIDATOR", REPO.parent / "shared" / "tools" / "validate_kuberay.py"))

POOLS = ClusterConfig()
GROUP_LABELS = {"cpu-pool": {POOLS.pool_label: POOLS.cpu_pool}, "gpu-pool": {POOLS.pool_label: POOLS.gpu_pool}}
ENV_KEYS = {"CENTERNET_RAY_STORAGE", "MLFLOW_TRACKING_URI"}
BINARY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def ray_resource(path: Path) -> dict:
    (resource,) = [doc for doc in documents(path) if doc["apiVersion"].startswith("ray.io/")]
    return resource


def cluster_spec(resource: dict) -> dict:
    spec = resource["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[resource["kind"]]


def bytes_of(quantity: str) -> int:
    """A Kubernetes binary quantity ("17Gi") in bytes."""
    return int(quantity[:-2]) * BINARY_UNITS[quantity[-2:]]


def pod_groups(spec: dict):
    """(name, group spec) for the head group and every worker group."""
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


# --- the Ray cluster launcher (ray up cluster/aws.yaml) ------------------------------------------

def test_launcher_config_passes_rays_own_validation():
    """What `ray up` runs before it touches AWS: defaults filled in, then the pinned Ray's ray-schema.json."""
    from centernet_ray.ray_compat import validate_launcher_config

    validate_launcher_config(read_yaml(CLUSTER / "aws.yaml"))


def test_launcher_head_runs_no_work_and_workers_carry_the_pool_labels():
    node_types = read_yaml(CLUSTER / "aws.yaml")["available_node_types"]
    assert node_types["head"]["resources"]["CPU"] == 0
    assert "labels" not in node_types["head"]
    assert node_types["cpu_worker"]["labels"] == {POOLS.pool_label: POOLS.cpu_pool}
    assert node_types["gpu_worker"]["labels"] == {POOLS.pool_label: POOLS.gpu_pool}


def test_launcher_hands_node_type_labels_to_ray_start(monkeypatch):
    """The launcher exports a node type's `labels` as RAY_OVERRIDE_LABELS in front of its start
    commands (autoscaler/_private/updater.py); `ray start` reads them back as the node's labels."""
    from centernet_ray.ray_compat import labels_from_environment, launcher_start_command

    labels = read_yaml(CLUSTER / "aws.yaml")["available_node_types"]["gpu_worker"]["labels"]
    command = launcher_start_command("ray start", labels)
    export, _ = command.split(";", 1)  # export RAY_OVERRIDE_LABELS='{"centernet-ray/pool":"gpu"}'
    name, _, value = shlex.split(export)[1].partition("=")
    monkeypatch.setenv(name, value)
    assert labels_from_environment() == labels


def test_launcher_nodes_start_with_token_auth_storage_and_mlflow():
    config = read_yaml(CLUSTER / "aws.yaml")
    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in command and "ray start" in command
        assert all(f"{key}=" in command for key in ENV_KEYS)


# --- KubeRay manifests -----------------------------------------------------------------------------

def test_kuberay_manifests_pass_the_strict_crd_validator():
    if not VALIDATOR.is_file():
        pytest.skip(f"KubeRay validator not found at {VALIDATOR} (set KUBERAY_VALIDATOR to its path)")
    result = subprocess.run([sys.executable, str(VALIDATOR), *map(str, MANIFESTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(MANIFESTS)} KubeRay documents checked, 0 problems" in result.stdout


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_head_runs_no_work_and_worker_groups_carry_the_pool_labels(path):
    spec = cluster_spec(ray_resource(path))
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["labels"] == GROUP_LABELS[group["groupName"]]
        assert "labels" not in group.get("rayStartParams", {})  # one source of truth: the group's labels


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_gpu_pool_requests_gpus_and_cpu_pool_none(path):
    groups = {group["groupName"]: group for group in cluster_spec(ray_resource(path))["workerGroupSpecs"]}
    assert "gpu-pool" in groups
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (name == "gpu-pool")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_rays_kuberay_autoscaler_sees_an_idle_head_and_labelled_pools(path):
    """The node types Ray's autoscaler derives from the manifest (what it scales for a demand)."""
    from centernet_ray.ray_compat import kuberay_node_types

    ray_cr = {"metadata": {"name": "centernet-ray", "namespace": "default"}, "spec": cluster_spec(ray_resource(path))}
    node_types = kuberay_node_types(ray_cr)
    assert node_types.pop("headgroup")["resources"]["CPU"] == 0
    for name, node_type in node_types.items():
        assert node_type["labels"] == GROUP_LABELS[name]
        assert node_type["resources"].get("GPU", 0) == (1 if name == "gpu-pool" else 0)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_pod_mounts_shm_big_enough_for_its_object_store(path):
    for name, group in pod_groups(cluster_spec(ray_resource(path))):
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["emptyDir"]["medium"] == "Memory", name
        shm = bytes_of(volume["emptyDir"]["sizeLimit"])
        assert shm >= int(group["rayStartParams"]["object-store-memory"]), name
        assert shm < bytes_of(container["resources"]["limits"]["memory"]), name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_token_auth_is_on(path):
    spec = cluster_spec(ray_resource(path))
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)  # the first Ray with token auth


def test_every_cluster_file_names_the_pinned_ray():
    """The KubeRay rayVersion, the image the Dockerfile builds FROM and the cluster launcher's images
    are the Ray of constraints.txt (and ray_compat's): a cluster of another Ray refuses the jobs."""
    import re

    from centernet_ray.ray_compat import RAY_VERSION

    assert f"ray=={RAY_VERSION}" in (REPO / "constraints.txt").read_text()
    for path in MANIFESTS:
        assert cluster_spec(ray_resource(path))["rayVersion"] == RAY_VERSION, path.name
    named = re.findall(r"rayproject/ray:([\d.]+)-", (KUBERAY / "raycluster.yaml").read_text()
                       + (CLUSTER / "aws.yaml").read_text())
    assert len(named) >= 4 and set(named) == {RAY_VERSION}, named


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_ray_container_gets_storage_and_mlflow_from_the_configmap(path):
    (configmap,) = [doc for doc in documents(path) if doc["kind"] == "ConfigMap"]
    assert ENV_KEYS <= set(configmap["data"])
    for name, group in pod_groups(cluster_spec(ray_resource(path))):
        (container,) = group["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"], name


def test_the_configmap_is_the_same_in_every_manifest():
    configmaps = [[doc for doc in documents(path) if doc["kind"] == "ConfigMap"] for path in MANIFESTS]
    assert all(found == configmaps[0] for found in configmaps)


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-tune.yaml", "tune")])
def test_rayjob_entrypoint_is_a_centernet_ray_command_with_a_valid_config(name, command):
    spec = ray_resource(KUBERAY / name)["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "centernet_ray"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == command
    config = load_config(args.config, args.overrides)  # a shipped name: found from any working directory
    assert config.cluster.node_pools is True
    assert not config.train.storage_path  # CENTERNET_RAY_STORAGE supplies it
    if command == "tune":
        assert config_files.find(config.tune.search_space).is_file()
    if config.tracking.registered_model:  # the promotion's export check runs in the driver, on the head
        assert 0 < config.tracking.export_check_images <= 1000


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_gpu_pool_can_grow_to_the_gpus_its_entrypoint_trains_on(name):
    """A config whose workers outnumber the pool's GPUs would leave the job waiting for GPUs that
    the autoscaler will never add: train.num_workers for a run, times tune.max_concurrent_trials
    for a sweep (each trial is a run of train.num_workers)."""
    resource = ray_resource(KUBERAY / name)
    args = build_parser().parse_args(shlex.split(resource["spec"]["entrypoint"])[3:])
    config = load_config(args.config, args.overrides)
    assert config.train.use_gpu
    concurrent = config.tune.max_concurrent_trials if args.command == "tune" else 1
    assert concurrent, "a sweep on a cluster that starts with no GPU node needs tune.max_concurrent_trials"
    needed = config.train.num_workers * concurrent
    (pool,) = [group for group in cluster_spec(resource)["workerGroupSpecs"] if group["groupName"] == "gpu-pool"]
    (container,) = pool["template"]["spec"]["containers"]
    assert pool["maxReplicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"]) >= needed, needed


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-tune.yaml"])
def test_rayjob_runtime_env_is_valid_and_excludes_what_runtime_env_yaml_does(name):
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load(ray_resource(KUBERAY / name)["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/centernet-ray"  # the checkout inside the image
    RuntimeEnv(**{**runtime_env, "working_dir": str(REPO)})  # RuntimeEnv checks that the directory exists
    assert runtime_env["excludes"] == read_yaml(CLUSTER / "runtime_env.yaml")["excludes"]


def test_rayservice_serves_the_application_of_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    from centernet_ray.ray_compat import import_attr

    serve_config = yaml.safe_load(ray_resource(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema(**serve_config)
    (app,) = serve_config["applications"]
    assert app == read_yaml(CLUSTER / "serve.yaml")["applications"][0]
    assert callable(import_attr(app["import_path"]))


# --- runtime_env (ray job submit --runtime-env cluster/runtime_env.yaml) ----------------------------

def test_runtime_env_file_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    runtime_env = read_yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**runtime_env)
    assert "env_vars" not in runtime_env  # they would override the nodes' storage and MLflow settings
    assert "working_dir" not in runtime_env  # given on the command line: --working-dir .


def test_runtime_env_excludes_drop_local_state_and_keep_the_code():
    from centernet_ray.ray_compat import working_dir_excluder  # the matcher Ray uploads working_dir with

    excluded = working_dir_excluder(REPO, read_yaml(CLUSTER / "runtime_env.yaml")["excludes"])
    for local_state in (".git", ".venv", "outputs", "mlruns", "mlflow.db", "centernet_ray.egg-info"):
        assert excluded(REPO / local_state), local_state
    code = [*(REPO / "centernet_ray").rglob("*.py"), *(REPO / "centernet_ray" / "configs").rglob("*.yaml"),
            *(REPO / "tune").glob("*.py")]
    assert code and not [path for path in code if excluded(path)]  # e.g. a bare "data/" drops centernet_ray/data/


# --- the README's guide ------------------------------------------------------------------------------

def test_every_cluster_file_the_readme_names_exists():
    import re

    named = set(re.findall(r"cluster/[\w./-]+\.yaml", (REPO / "README.md").read_text()))
    assert {"cluster/aws.yaml", "cluster/kuberay/rayjob-train.yaml", "cluster/kuberay/rayservice.yaml"} <= named
    assert sorted(path for path in named if not (REPO / path).is_file()) == []
    names = {document["metadata"]["name"] for path in MANIFESTS for document in documents(path)}
    assert "centernet-ray-train" in names  # `kubectl get rayjob centernet-ray-train` in the guide
