"""docs/api.md runs: its Python blocks are executed in order, in a fresh folder, as a user would paste them."""

from __future__ import annotations

import os
import re
import shutil

from .conftest import REPO


def test_api_page_code_blocks_run(tmp_path, monkeypatch):
    page = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) >= 6
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    scope: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"docs/api.md block {i + 1}", "exec"), scope)
        except Exception as e:  # noqa: BLE001 - name the block
            raise AssertionError(f"docs/api.md block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    assert (tmp_path / "explanations/a/explanation.html").is_file()
    assert os.path.isfile(tmp_path / "eval-test" / "metrics.json")
