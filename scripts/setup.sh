#!/usr/bin/env bash
# Install Apogee and its test oracles. torch is pinned first: on CPU machines torch==2.13.0 is a
# local CPU wheel, while an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,mpi]"
