"""The core/Ray boundary as a test: every module of the package is discovered, and all but the Ray
stages (named ``ray_*``) import without Ray; the data layer imports no model."""

import json
import pkgutil
import subprocess
import sys

import pytest

import centernet_ray

# The layout is the boundary: the Ray stages (Data, Train, Tune, Serve, and the helpers that start
# and wrap Ray) are the modules named ``ray_*`` or inside a ``ray_*`` package; every other module,
# present or future, is core and must import without Ray.
MODULES = sorted(m.name for m in pkgutil.walk_packages(centernet_ray.__path__, "centernet_ray.")
                 if not m.name.endswith("__main__"))  # the entry point runs the CLI when imported


def is_ray_stage(module: str) -> bool:
    return any(part.startswith("ray_") for part in module.split(".")[1:])


RAY_STAGES = [m for m in MODULES if is_ray_stage(m)]
CORE = [m for m in MODULES if not is_ray_stage(m)]


def _start_probe(modules: list[str], prefix: str) -> subprocess.Popen:
    """A fresh interpreter that imports ``modules`` in turn and prints, as JSON, for each of them the
    modules starting with ``prefix`` that its import brought in first (read with :func:`_pulled`)."""
    code = f"""
import importlib, json, sys
pulled = {{}}
for name in {modules!r}:
    before = {{m for m in sys.modules if m == {prefix!r} or m.startswith({prefix!r} + ".")}}
    importlib.import_module(name)
    new = sorted({{m for m in sys.modules if m == {prefix!r} or m.startswith({prefix!r} + ".")}} - before)
    if new:
        pulled[name] = new[:3]
print(json.dumps(pulled))
"""
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pulled(probe: subprocess.Popen) -> dict[str, list[str]]:
    out, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _imports(modules: list[str], prefix: str) -> dict[str, list[str]]:
    return _pulled(_start_probe(modules, prefix))


@pytest.fixture(scope="module")
def heavy_probes():
    """The two probes that import torch (5-7 s each on these 2-core VMs), started together so that
    they run side by side on the two cores while the tests wait."""
    probes = {"core without ray": _start_probe(CORE, "ray"),
              "data without model": _start_probe([m for m in MODULES if m.startswith("centernet_ray.data")],
                                                 "centernet_ray.model")}
    yield probes
    for probe in probes.values():
        if probe.poll() is None:
            probe.kill()
            probe.communicate()


def test_the_layout_names_the_ray_stages():
    assert len(MODULES) > 40 and len(CORE) > 25
    assert {"centernet_ray.training.engine", "centernet_ray.config", "centernet_ray.targets", "centernet_ray.tracking",
            "centernet_ray.evaluation", "centernet_ray.checkpoint", "centernet_ray.cli"} <= set(CORE)
    for stage in ("ray_data.pipeline", "ray_data.ingest", "ray_data.batch_predict", "ray_train.job", "ray_train.loop",
                  "ray_tune.sweep", "ray_serve.app", "ray_compat", "ray_runtime"):
        assert f"centernet_ray.{stage}" in RAY_STAGES


def test_core_modules_import_without_ray(heavy_probes):
    assert _pulled(heavy_probes["core without ray"]) == {}


def test_each_ray_stage_package_imports_ray():  # a ``ray_*`` package holds Ray code, not core code in disguise
    import ast
    import importlib.util

    packages = sorted({".".join(m.split(".")[:2]) for m in RAY_STAGES if m.count(".") >= 2})
    assert packages == ["centernet_ray.ray_data", "centernet_ray.ray_serve", "centernet_ray.ray_train", "centernet_ray.ray_tune"]
    for package in packages:
        files = [importlib.util.find_spec(m).origin for m in MODULES if m == package or m.startswith(package + ".")]
        top_level = [node for f in files for node in ast.parse(open(f).read()).body
                     if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
        assert any(name == "ray" or name.startswith("ray.") for name in names), package


def test_the_data_layer_imports_no_model(heavy_probes):
    assert _pulled(heavy_probes["data without model"]) == {}


def test_the_cli_and_the_light_helpers_import_no_torch():
    """`centernet-ray config`/`--help` answer in a fraction of a second: importing torch and
    torchvision (torchvision brings torch._dynamo) took 6 s on a 2-core VM before the CLI printed a
    config. The COCO metrics and the MLflow helpers are what the CLI reads; the torch evaluation pass
    is imported from its own module."""
    light = ["centernet_ray.cli", "centernet_ray.config", "centernet_ray.tracking", "centernet_ray.evaluation"]
    assert _imports(light, "torch") == {}
    shown = subprocess.run([sys.executable, "-X", "importtime", "-m", "centernet_ray", "config", "demo"],
                           capture_output=True, text=True, check=True)
    assert "width: 0.25" in shown.stdout
    assert not [line for line in shown.stderr.splitlines() if line.rstrip().endswith("| torch")]


def test_the_ingest_imports_no_torch():
    """The ingest reads and checks images in Ray tasks, each in a worker process of its own that
    imports the ingest's module: with torch in it (through the image decoder), the 8 workers of a
    local ingest spent ~1.7 s of CPU each importing it, 23-28 s of ingest against 14-17 s without,
    on a 2-core AVX2 VM (BENCHMARKS.md)."""
    assert _imports(["centernet_ray.data.image_check", "centernet_ray.ray_data.ingest"], "torch") == {}
