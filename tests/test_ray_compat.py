"""Ray's internals have one door (centernet_ray/ray_compat.py): nothing else imports a private Ray
module, and the door refuses a Ray it was not written for with a message that says what to do."""

import ast
from pathlib import Path

import pytest

from centernet_ray import ray_compat

REPO = Path(__file__).resolve().parents[1]
SOURCES = [path for folder in ("centernet_ray", "pipelines", "tune", "benchmarks", "tests")
           for path in sorted((REPO / folder).rglob("*.py")) if path.name != "ray_compat.py"]


def _private_ray_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [name for name in names
                  if name.split(".")[0] == "ray" and any(part.startswith("_") for part in name.split("."))]
    return found


def test_no_module_but_ray_compat_imports_a_private_ray_module():
    assert len(SOURCES) > 50
    offenders = {str(p.relative_to(REPO)): _private_ray_imports(p) for p in SOURCES if _private_ray_imports(p)}
    assert offenders == {}


def test_the_private_attributes_ray_compat_wraps_are_used_nowhere_else():
    wrapped = ("_resolve_execution_options", "_bound_deployment", "_deployment_config", "_brackets", "_rungs",
               "_trial_info", "_num_stopped", "_load_env_labels", "get_storage()")
    uses = {str(p.relative_to(REPO)): name for p in SOURCES for name in wrapped
            if name in p.read_text() and p.name != "test_ray_compat.py"}
    assert uses == {}


def test_another_ray_version_gets_a_clear_error(monkeypatch):
    import ray

    ray_compat.require_ray_version("anything")  # the pinned Ray passes
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(ray_compat.RayVersionError, match=r"written for Ray 2\.60\.0, but Ray 2\.61\.0 is installed"):
        ray_compat.validate_label_selector({"a": "b"})


def test_a_train_data_config_s_execution_options_come_without_ray_s_own_deprecation_warning():
    """Ray 2.60's default ingest options pass the deprecated ``exclude_resources`` on: every run's
    DatasetManager printed a RayDeprecationWarning for it."""
    import warnings

    import ray.data
    from ray.train import DataConfig
    from ray.util.annotations import RayDeprecationWarning

    ray.data.DataContext.get_current()  # created outside the check: creating it warns of other things
    with warnings.catch_warnings():
        warnings.simplefilter("error", RayDeprecationWarning)
        options = ray_compat.execution_options(DataConfig(), "train")
    assert options.resource_limits == ray.data.DataContext.get_current().execution_options.resource_limits


def test_train_report_lines_are_filtered_but_warnings_pass_and_another_ray_is_left_alone(monkeypatch):
    import logging

    import ray

    logger = ray_compat.train_report_logger()
    assert logger is not None and logger.name.endswith("context.py")  # Ray names it after the file
    record = lambda level: logging.LogRecord(logger.name, level, "context.py", 1, "Reporting", None, None)  # noqa: E731
    before = list(logger.filters)
    try:
        ray_compat.quiet_train_reports()
        ray_compat.quiet_train_reports()  # once is enough: no second filter
        assert len(logger.filters) == len(before) + 1
        assert not logger.filter(record(logging.INFO)) and logger.filter(record(logging.WARNING))
    finally:
        logger.filters[:] = before
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    assert ray_compat.train_report_logger() is None
    ray_compat.quiet_train_reports()  # cosmetic: no error, the run goes on
    assert logger.filters == before


def test_the_package_requires_the_ray_its_internals_were_written_for():
    """pip without the constraints file must not install a Ray that every training run would refuse."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    ray = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    assert ray.specifier.contains(ray_compat.RAY_VERSION) and not ray.specifier.contains("2.61.0")
    assert f"ray=={ray_compat.RAY_VERSION}" in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text()


def test_a_checkpoint_write_is_retried_on_a_bucket_s_transient_errors_and_nothing_else(monkeypatch):
    import time

    waits, attempts = [], []
    monkeypatch.setattr(time, "sleep", waits.append)  # Ray's backoff, recorded instead of waited

    def throttled_twice():
        attempts.append("write")
        if len(attempts) < 3:
            raise OSError("When uploading part for key 'runs/tiny/epoch_0001/checkpoint.pt': AWS Error SLOW_DOWN "
                          "during UploadPart operation: Please reduce your request rate.")
        return "written"

    assert ray_compat.with_storage_retries(throttled_twice, "write the checkpoint") == "written"
    assert len(attempts) == 3 and len(waits) == 2 and 0.8 <= waits[0] <= 1.2 and 1.6 <= waits[1] <= 2.4  # 20% jitter

    attempts.clear()

    def always_throttled():
        attempts.append("write")
        raise OSError("AWS Error SLOW_DOWN during PutObject operation")

    with pytest.raises(OSError, match="SLOW_DOWN"):
        ray_compat.with_storage_retries(always_throttled, "write the checkpoint")
    assert len(attempts) == 3  # then the worker fails, as Ray Train's own upload did

    attempts.clear()

    def no_such_bucket():
        attempts.append("write")
        raise FileNotFoundError("Bucket 'nobucket' not found")

    with pytest.raises(FileNotFoundError):
        ray_compat.with_storage_retries(no_such_bucket, "write the checkpoint")
    assert attempts == ["write"]
