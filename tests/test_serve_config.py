"""cluster/serve.yaml: valid for Serve's own schema, and its import path builds the project's app."""

from pathlib import Path

import pytest
import yaml

from centernet_ray.config import ConfigError

SERVE_YAML = Path(__file__).resolve().parents[1] / "cluster" / "serve.yaml"


def test_serve_yaml_matches_serves_schema_and_builds_the_application(untrained_checkpoint):
    from ray.serve import Application
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = schema.applications
    assert app.import_path == "centernet_ray.serving.app:build_app" and app.route_prefix == "/"
    builder = import_attr(app.import_path)
    built = builder({**app.args, "checkpoint": str(untrained_checkpoint)})
    assert isinstance(built, Application)
    ingress = built._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    assert ingress.name == "DetectionAPI" and model.name == "DetectionModel"
    assert model.ray_actor_options["num_gpus"] == 1
    assert model._deployment_config.autoscaling_config.max_replicas == 4
    assert model._deployment_config.max_ongoing_requests >= app.args["max_batch_size"]


def test_build_app_rejects_a_missing_checkpoint_and_unknown_keys(untrained_checkpoint):
    from centernet_ray.serving.app import build_app

    with pytest.raises(ValueError, match="args.checkpoint"):
        build_app({})
    with pytest.raises(ConfigError, match="unknown key 'serve.max_batch'"):
        build_app({"checkpoint": str(untrained_checkpoint), "max_batch": 4})
