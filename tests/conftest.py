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
