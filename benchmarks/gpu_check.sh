#!/usr/bin/env bash
# The GPU check in one call, for a machine with an NVIDIA GPU, Python 3.12 and torch but no package
# index: the project's other dependencies come as the offline bundle built by
# ../shared/tools/offline_bundle.sh .bundle (unpacked here when present).
#   benchmarks/gpu_check.sh OUT_DIR [gpu_check options]      (PYTHON=... picks the interpreter; default python3)
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--dry-run] [--train-seconds S] [--models a,b]}
shift
cd "$(dirname "$0")/.."
if [ -f .bundle/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .bundle/site.tar.xz -C /tmp/site
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$out"
timeout 480 "${PYTHON:-python3}" -m benchmarks.gpu_check "$out" "$@"
