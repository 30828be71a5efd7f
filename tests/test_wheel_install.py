"""The package as a user installs it: a wheel in a fresh virtualenv outside the checkout, commands
run from an empty folder. Configs and sweep files must come from inside the wheel (a non-editable
install used to train the built-in defaults, 140 epochs at 512 px, instead of the demo)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from user_store import assert_run_is_in_the_user_s_store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _setuptools_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh virtualenv holding only the wheel, an environment to run it in). The
    dependencies are the test environment's, reached through a path entry (not its .pth files: those
    include the editable install of this checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ and *.egg-info/ into the tree it builds
    source = shutil.copytree(REPO, root / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "mlruns", "mlflow.db", "outputs", "__pycache__", ".pytest_cache"))
    # pyproject's build-system needs setuptools>=77: reuse this environment's when it has one (fast,
    # offline), else let pip build in isolation (it fetches setuptools from the package index)
    no_isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-q", "-w", str(root / "dist"),
                    str(source)], check=True, timeout=600)
    (wheel,) = (root / "dist").glob("centernet_ray-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "PYTHON"))}
    env["CENTERNET_RAY_CACHE"] = str(root / "cache")
    return root / "venv" / "bin", env


def test_the_wheel_is_what_runs(installed, tmp_path):
    bin_dir, env = installed
    where = subprocess.run([bin_dir / "python", "-c", "import centernet_ray; print(centernet_ray.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert str(bin_dir.parent) in where and str(REPO) not in where, where


def test_config_demo_prints_the_shipped_demo(installed, tmp_path):
    bin_dir, env = installed
    shown = subprocess.run([bin_dir / "centernet-ray", "config", "demo"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, check=True, timeout=120).stdout
    assert "width: 0.25" in shown and "time_limit: 585" in shown and "input_size:\n  - 128" in shown
    listed = subprocess.run([bin_dir / "centernet-ray", "config", "--list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=True, timeout=120).stdout.split()
    assert {"demo", "coco_resdcn18", "tune/demo", "tune/search_space"} <= set(listed)


def test_a_two_step_train_of_the_demo_from_an_empty_folder(installed, tmp_path):
    bin_dir, env = installed
    command = [bin_dir / "centernet-ray", "train", "demo", "train.epochs=1", "data.synthetic_train_images=64",
               "data.synthetic_val_images=8", "tracking.log_model=false", "tracking.system_metrics=false",
               "--summary-json", "summary.json"]
    with open(tmp_path / "train.log", "w") as log:  # output to a file, as `ray job logs` or `kubectl logs` keep it
        finished = subprocess.run(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    output = (tmp_path / "train.log").read_text()
    assert finished.returncode == 0, output[-6000:]
    assert '"epochs": 1' in (tmp_path / "summary.json").read_text()
    assert "step 2/2" in output  # 64 images / (2 workers x 16)
    # a file a person can read: no colour codes, no cursor movements of progress bars, no overwritten lines
    assert "\x1b" not in output and "\r" not in output, [line for line in output.splitlines() if "\x1b" in line][:5]
    assert "%|" not in output, [line for line in output.splitlines() if "%|" in line][:5]  # no tqdm bar
    # Ray Data's progress as plain lines where the driver caches the data, not repeated by the
    # trainers' datasets every epoch: their progress is the training loop's own line
    assert "Running Dataset" in output
    assert not [line for line in output.splitlines() if "(SplitCoordinator" in line and "Running Dataset" in line]
    # nor their start and plan, the same two lines for each dataset every epoch
    assert not [line for line in output.splitlines() if "(SplitCoordinator" in line and "Starting execution" in line]
    # nothing but the project's lines and Ray's own notices: no Python warning (deprecated Ray APIs,
    # read-only arrays handed to torch), no line per rank per ray.train.report with its metrics dict
    noise = [line for line in output.splitlines() if "Warning:" in line or "Reporting training result" in line]
    assert not noise, noise[:5]
    # the local Ray the command starts has no node to be preempted: no watcher (and not its error-level
    # "constructor arguments in the object store" line in every run's output)
    assert "PreemptionWatcher" not in output
    # the summary table is the last thing printed: the command stops its local Ray first, so the
    # late lines of Ray's processes (relayed by its log monitor: the workers', the raylet's) come above it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert output.rstrip().splitlines()[-1].split() == ["mlflow", summary["mlflow_run_id"]], output[-3000:]
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "outputs" / "ray_results").is_dir()
    _assert_the_run_and_checkpoint_are_the_demo_s(tmp_path, summary)


def _assert_the_run_and_checkpoint_are_the_demo_s(folder: Path, summary: dict) -> None:
    """The demo's run where `mlflow ui` started in ``folder`` looks; its checkpoint holds the demo's
    model and restores."""
    from centernet_ray.checkpoint import load_checkpoint, model_from_state
    from centernet_ray.config import load_config

    demo = load_config("demo")
    assert_run_is_in_the_user_s_store(folder, summary["mlflow_run_id"], run_name=f"centernet-{demo.model.backbone}",
                                      command="centernet-ray train demo train.epochs=1 ",
                                      shown_as="centernet-ray train demo train.epochs=1 ",
                                      backbone=demo.model.backbone, train_images=64, expected_epochs=1)
    state = load_checkpoint(summary["checkpoint"])  # torch.load(weights_only=True) inside
    assert state["epoch"] == 1 and state["config"]["model"] == demo.to_dict()["model"]
    assert state["config"]["data"]["augment"] == demo.data.augment
    assert type(model_from_state(state).model).__name__ == "CenterNet"
