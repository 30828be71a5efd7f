"""benchmarks/gpu_check.py end to end at toy sizes on this machine's CPU (--dry-run): the models'
table, the kernels, the real training job and the Serve endpoint with 200 requests from 16
clients, so that the one-call GPU check is known to work before a GPU is lent. The command runs
beside the unit tests, started when the session's tests are collected (tests/conftest.py)."""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def _dry_run(folder: Path) -> tuple[list, dict[str, str]]:
    return [REPO / "benchmarks" / "gpu_check.sh", folder / "check", "--dry-run"], {"PYTHON": sys.executable}


@pytest.mark.beside_the_suite.with_args(_dry_run)  # (with_args: a lone callable would be decorated)
def test_the_gpu_check_runs_end_to_end_in_dry_run_mode(beside_the_suite):
    finished, out = beside_the_suite, beside_the_suite.folder / "check"
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert "| resnet18 |" in summary and "decode_b32_ms" in summary and "focal_fwd_bwd_ms" in summary
    assert "| returncode | 0 |" in summary and "| ok | 200 |" in summary, summary
    assert finished.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    for log in ("gpu_check.log", "train.log", "serve.log"):
        assert (out / log).stat().st_size > 0, log
