"""cluster/serve.yaml: valid for Serve's own schema, and its import path builds the project's app."""

from pathlib import Path

import pytest
import yaml

from centernet_ray.config import ConfigError

SERVE_YAML = Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml"


def test_serve_yaml_matches_serves_schema_and_builds_the_application(untrained_checkpoint):
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from centernet_ray.ray_compat import bound_deployment, deployment_config, import_attr

    schema = ServeDeploySchema(**yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "centernet_ray.ray_serve.app:build_app" and app.route_prefix == "/"
    builder = import_attr(app.import_path)
    built = builder({**app.args, "checkpoint": str(untrained_checkpoint)})
    assert isinstance(built, Application)
    ingress = bound_deployment(built)
    model = bound_deployment(ingress.init_args[0])
    assert ingress.name == "DetectionAPI" and model.name == "DetectionModel"
    assert model.ray_actor_options["num_gpus"] == 1
    assert deployment_config(model).autoscaling_config.max_replicas == 4
    assert deployment_config(model).max_ongoing_requests >= app.args["max_batch_size"]
    # a stopping endpoint fits Kubernetes' 30 s between SIGTERM and SIGKILL: the two deployments
    # stop one after the other, each waiting at most this long for its requests in flight
    assert sum(deployment_config(d).graceful_shutdown_timeout_s for d in (ingress, model)) <= 20
    # a redeploy starts each replacement before its old replica stops (Serve's default, 0, stops first)
    assert [deployment_config(d).max_surge_percent for d in (ingress, model)] == [100, 100]
    no_surge = bound_deployment(builder({**app.args, "checkpoint": str(untrained_checkpoint), "max_surge_percent": 0}))
    assert deployment_config(no_surge).max_surge_percent == 0


def test_build_app_rejects_a_missing_checkpoint_and_unknown_keys(untrained_checkpoint):
    from centernet_ray.ray_serve.app import build_app

    with pytest.raises(ValueError, match="args.checkpoint"):
        build_app({})
    with pytest.raises(ConfigError, match="unknown key 'serve.max_batch'"):
        build_app({"checkpoint": str(untrained_checkpoint), "max_batch": 4})


def test_a_replica_runs_on_a_gpu_only_when_ray_gave_it_one(monkeypatch):
    """Ray leaves CUDA_VISIBLE_DEVICES alone for an actor of num_gpus=0: on a GPU node such a replica
    sees every GPU, and must not take one a training worker holds."""
    import torch

    from centernet_ray.ray_serve.app import replica_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node, whatever this machine is
    monkeypatch.setattr("ray.get_gpu_ids", lambda: [])  # serve.num_gpus=0: no GPU reserved for the replica
    assert replica_device() == torch.device("cpu")
    monkeypatch.setattr("ray.get_gpu_ids", lambda: [0])  # serve.num_gpus=1
    assert replica_device() == torch.device("cuda")
