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
