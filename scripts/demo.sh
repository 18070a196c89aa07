#!/usr/bin/env bash
# Set up (if needed) and run the main job on generated data, offline. Output: ./demo-output/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${1:-demo-output}
rm -rf "$OUT/export" "$OUT/cohort" "$OUT/run" "$OUT/explanations" "$OUT/mlflow.db" "$OUT/mlruns"
echo "== 1/5 synthetic hospital export (DICOM with fake identifiers, reports, labels, truth)"
.venv/bin/clinfuse synth --out "$OUT/export" --studies 400 --missing-image 0.1 --missing-report 0.1 --corrupt 4
echo "== 2/5 cohort build (broken files are set aside, not fatal)"
.venv/bin/clinfuse cohort build --dicom "$OUT/export/dicom" --reports "$OUT/export/reports.csv" \
  --labels "$OUT/export/labels.csv" --config configs/demo.yaml --out "$OUT/cohort"
echo "== 3/5 what was set aside and why"
cat "$OUT/cohort/quarantine.csv"
echo "== 4/5 train, calibrate on validation, evaluate on test, log to MLflow (tiny MONAI DenseNet + tiny BERT, CPU)"
.venv/bin/clinfuse train --cohort "$OUT/cohort" --config configs/demo.yaml --out "$OUT/run" \
  --tracking-uri "sqlite:///$(pwd)/$OUT/mlflow.db"
echo "== 5/5 explain 5 test studies (logged to the same MLflow run)"
.venv/bin/clinfuse explain --model "$OUT/run/best" --cohort "$OUT/cohort" --limit 5 --out "$OUT/explanations"
echo
echo "cohort: $OUT/cohort (cohort.csv, cohort.json, quarantine.csv; private/ holds the key map: never share it)"
echo "model: $OUT/run/best (model.safetensors + model.json); test metrics and plots: $OUT/run/eval-test"
echo "explanations: $OUT/explanations/<study_id>/explanation.html"
echo "open the MLflow UI: .venv/bin/clinfuse ui --tracking-uri sqlite:///$(pwd)/$OUT/mlflow.db"
echo "inspect the cohort again with: .venv/bin/clinfuse cohort inspect $OUT/cohort"
