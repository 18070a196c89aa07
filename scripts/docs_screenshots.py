"""Take the docs' MLflow UI screenshots from a real run, the way the browser test does.

Usage: .venv/bin/python scripts/docs_screenshots.py [demo-output]
Needs Debian's chromium. Writes docs/img/mlflow_run.png and docs/img/mlflow_artifacts.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clinfuse.tracking.mlflow_tracker import start_ui  # noqa: E402
from tests.browser import Page  # noqa: E402


def main(out: str = "demo-output") -> None:
    from mlflow import MlflowClient

    run = json.loads((Path(out) / "run" / "mlflow_run.json").read_text())
    uri = run["tracking_uri"]
    exp = MlflowClient(tracking_uri=uri).get_run(run["run_id"]).info.experiment_id
    port = 5099
    server = start_ui(uri, port)
    page = None
    try:
        page = Page(1400, 1100)
        base = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{run['run_id']}"
        img = REPO / "docs" / "img"
        img.mkdir(parents=True, exist_ok=True)
        page.load(base)
        page.wait_for("document.body.innerText.includes('test_auroc')", 90)
        time.sleep(2)
        page.screenshot(img / "mlflow_run.png")
        page.load(base + "/artifacts/explanations")
        page.wait_for("document.body.innerText.includes('explanations')", 90)
        time.sleep(2)
        page.screenshot(img / "mlflow_artifacts.png")
        print(f"wrote {img / 'mlflow_run.png'} and {img / 'mlflow_artifacts.png'}")
    finally:
        if page is not None:
            page.close()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
