"""benchmarks/gpu_check.py end to end at toy sizes on this machine's CPU (--dry-run): the models'
table, the kernels, the real training job and the Serve endpoint with 200 requests from 16
clients, so that the one-call GPU check is known to work before a GPU is lent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_end_to_end_in_dry_run_mode(tmp_path):
    out = tmp_path / "check"
    finished = subprocess.run([str(REPO / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                              env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    summary = (out / "summary.md").read_text()
    assert "| resnet18 |" in summary and "decode_b32_ms" in summary and "focal_fwd_bwd_ms" in summary
    assert "| returncode | 0 |" in summary and "| ok | 200 |" in summary, summary
    assert finished.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    for log in ("gpu_check.log", "train.log", "serve.log"):
        assert (out / log).stat().st_size > 0, log
