#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py): the test suite on the GPU, the demo, the
# command line on an image tree and one torchrun process, a table in docs/results/gpu.md.
# One command on a machine with a GPU, from anywhere; at most about 6 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
# the package from this checkout, installed without the network when it is not yet there
python3 -c "import selmix" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || echo "gpu_check: selmix not installed; running from src/ (PYTHONPATH)"
exec python3 scripts/gpu_check.py "$@"
