#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
# Default: every test but those marked `slow` (DDP, MLflow UI, browser, whole demo); with CI=true, or
# with --all as the first argument, the slow ones too. Exits non-zero when a test fails or when no
# test ran (pytest's status 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Debian's chromium renders pages in the browser tests (about a minute, once).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test.sh: installing Debian's chromium for the rendering tests"
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "test.sh: chromium could not be installed; the rendering tests will say so and skip"
fi
export MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
select=(-m "not slow")
if [ "${CI:-}" = "true" ] || [ "${1:-}" = "--all" ]; then
  select=()
  [ "${1:-}" = "--all" ] && shift
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "${select[@]}" "$@"
status=$?
if [ $status -eq 5 ]; then
  echo "test.sh: no test ran; failing on purpose" >&2
  exit 1
fi
exit $status
