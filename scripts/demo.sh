#!/usr/bin/env bash
# Set up (if needed) and run the main job on generated data, offline: clinfuse demo. Output: ./demo-output/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/clinfuse demo --out "${1:-demo-output}"
