#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
# Default: every test but those marked `slow` (DDP, MLflow UI, browser, whole demo); with CI=true, or
# with --all as the first argument, the slow ones too. Exits non-zero when a test fails or when no
# test ran (pytest's status 5).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Debian's chromium renders pages in the browser tests; Orthanc with its DICOMweb plugin is the PACS of
# the PACS tests; PostgreSQL backs the team-server tests (about a minute, once; the tests start and
# stop the servers themselves).
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "test.sh: installing Debian's ${need[*]} for the browser, PACS and server tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "test.sh: ${need[*]} could not be installed; the tests that need them will say so and skip"
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
