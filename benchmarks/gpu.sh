#!/usr/bin/env bash
# Run on a lent GPU machine (the device tool), from the repository root:
#   bash benchmarks/gpu.sh            # full (about 3-4 minutes on an H200)
#   bash benchmarks/gpu.sh --quick
# Uses that machine's own python3 (torch with CUDA, Pillow, NumPy); bonexray runs from the
# source tree, nothing is installed. Figures are appended to benchmarks/RESULTS.md and,
# under the device tool, copied to $OUT (gpu.json, RESULTS-gpu.md) so they come back.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py "$@"
