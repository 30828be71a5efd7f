"""The core/Ray boundary as a test: every module of the package is discovered, and all but the Ray
stages import without Ray; the data layer imports no model."""

import json
import pkgutil
import subprocess
import sys

import centernet_ray

# The Ray stages: thin modules over the core that put it on Ray (Data, Train, Tune, Serve). Every
# other module, present or future, is core and must import without Ray.
RAY_STAGES = ("centernet_ray.pipeline", "centernet_ray.ray_runtime", "centernet_ray.batch_inference",
              "centernet_ray.training.job", "centernet_ray.training.loop", "centernet_ray.tuning",
              "centernet_ray.serving")
MODULES = sorted(m.name for m in pkgutil.walk_packages(centernet_ray.__path__, "centernet_ray.")
                 if not m.name.endswith("__main__"))  # the entry point runs the CLI when imported
CORE = [m for m in MODULES if not m.startswith(RAY_STAGES)]


def _imports(modules: list[str], prefix: str) -> dict[str, list[str]]:
    """For each of ``modules`` imported in turn in a fresh interpreter: the modules starting with
    ``prefix`` that its import brought in first."""
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
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_module_is_either_core_or_a_ray_stage():
    assert len(MODULES) > 40 and len(CORE) > 25
    assert {"centernet_ray.engine", "centernet_ray.config", "centernet_ray.cli", "centernet_ray.ray_compat"} <= set(CORE)


def test_core_modules_import_without_ray():
    assert _imports(CORE, "ray") == {}


def test_each_ray_stage_is_one():  # the list above is not stale: every stage imports Ray at its top
    import ast
    import importlib.util

    for stage in RAY_STAGES:
        files = [importlib.util.find_spec(m).origin for m in MODULES if m == stage or m.startswith(stage + ".")]
        top_level = [node for f in files for node in ast.parse(open(f).read()).body
                     if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
        assert any(name == "ray" or name.startswith("ray.") for name in names), stage


def test_the_data_layer_imports_no_model():
    data = [m for m in MODULES if m.startswith("centernet_ray.data")]
    assert _imports(data, "centernet_ray.model") == {}
