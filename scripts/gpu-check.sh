#!/usr/bin/env bash
# The GPU-only checks in one command, into one JSON report (bench/gpu_check.py holds the checks).
#
#   bash scripts/gpu-check.sh [REPORT.json]     default: bench/results/gpu-check-<date>.json
#
# Installs nothing from the network: it uses this machine's PyTorch (2.11 or newer) and installs the
# project over it with `pip install --no-deps --no-build-isolation -e .`; a check whose packages
# are missing (e.g. Transformer Engine) is reported as skipped. On a machine without a GPU it says
# so, prints what it would run, and exits 0. The whole script stays under 9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
REPORT="${1:-bench/results/gpu-check-$(date +%Y-%m-%d).json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu-check: would run these checks (python -m bench.gpu_check --out $REPORT):"
"$PYTHON" -m bench.gpu_check --list

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$gpus" -eq 0 ]; then
    echo "gpu-check: no GPU on this machine (PyTorch sees 0 CUDA devices): nothing run, no report written."
    exit 0
fi
if ! "$PYTHON" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))'; then
    echo "gpu-check: this machine's PyTorch is $("$PYTHON" -c 'import torch; print(torch.__version__)'); the checks need 2.11 or newer" >&2
    exit 2
fi
echo "gpu-check: $gpus GPU(s); installing the project over this machine's PyTorch (no network)"
"$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .
timeout 480 "$PYTHON" -m bench.gpu_check --out "$REPORT"
