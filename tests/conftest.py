import pytest

from centernet_ray.data.synthetic import write_shapes_dataset


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
    """A small synthetic shapes dataset in COCO layout, written once per test session."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=24, num_val=12, image_size=96, seed=7)
