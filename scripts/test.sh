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
# torchvision's model code (pure Python), for the test that loads torchvision-layout weights into the MONAI
# encoders: its wheel needs a CUDA torch to import, so only the wheel's files are kept, unimported, under
# .venv/share (7 MB, once; the wheel matching torch 2.13 is 0.28).
tv=.venv/share/torchvision-0.28.0
if [ ! -f "$tv/torchvision/models/densenet.py" ]; then
  rm -rf "$tv.part" && mkdir -p "$tv.part" \
    && .venv/bin/python -m pip download -q --no-deps torchvision==0.28.0 -d "$tv.part" >/dev/null 2>&1 \
    && .venv/bin/python -c "import zipfile, glob, sys; zipfile.ZipFile(glob.glob(sys.argv[1] + '/torchvision-*.whl')[0]).extractall(sys.argv[1])" "$tv.part" \
    && mv "$tv.part" "$tv" \
    || echo "test.sh: torchvision 0.28.0 could not be fetched; the torchvision-layout weights test will skip"
fi
export CLINFUSE_TORCHVISION_SRC="$PWD/$tv"
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
