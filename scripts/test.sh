#!/usr/bin/env bash
# Set up and run the test suite (the README's test command; .ci/run calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m pytest -q "$@"
