"""Moving the runs of an embedded store onto the team server (``clinfuse server import-runs``).

For each experiment of the source (all, or those named), the experiment is found or created on the
destination by name, and each run is copied: name, start and end time, status, params, tags, the
full history of every metric (steps and timestamps kept), and every artifact. Each copy is tagged
``clinfuse.imported_from = <source run id>`` (and the source store), so a second import skips runs
already there. Not copied: registered models and MLflow 3's logged-model entities (register again
from the imported run's model folder, or keep the embedded store beside it), dataset inputs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

__all__ = ["import_runs", "ImportResult"]

_SKIP_TAGS = {"mlflow.runName", "mlflow.user", "mlflow.log-model.history"}
IMPORTED_FROM = "clinfuse.imported_from"


@dataclass
class ImportResult:
    copied: int = 0
    skipped: int = 0
    experiments: int = 0

    def line(self) -> str:
        return (f"{self.copied} run(s) copied, {self.skipped} already there, in {self.experiments} experiment(s)")


def import_runs(src_uri: str, dst_uri: str, *, experiments: list[str] | None = None, log=print) -> ImportResult:
    """Copy runs from `src_uri` (e.g. ``sqlite:///mlflow.db``) to the server at `dst_uri` (credentials
    from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD: a trainer)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from ..tracking.mlflow_tracker import check_access

    check_access(dst_uri)
    src = MlflowClient(tracking_uri=src_uri, registry_uri=src_uri)
    dst = MlflowClient(tracking_uri=dst_uri, registry_uri=dst_uri)
    res = ImportResult()
    for exp in src.search_experiments():
        if experiments and exp.name not in experiments:
            continue
        res.experiments += 1
        found = dst.get_experiment_by_name(exp.name)
        dst_exp = found.experiment_id if found else dst.create_experiment(exp.name)
        done = {r.data.tags.get(IMPORTED_FROM) for r in dst.search_runs([dst_exp], max_results=50000)}
        for run in src.search_runs([exp.experiment_id], max_results=50000):
            if run.info.run_id in done:
                res.skipped += 1
                continue
            new = dst.create_run(dst_exp, start_time=run.info.start_time, run_name=run.info.run_name,
                                 tags={IMPORTED_FROM: run.info.run_id, "clinfuse.imported_store": src_uri.split("://")[0]})
            rid = new.info.run_id
            params = [Param(k, v) for k, v in run.data.params.items()]
            tags = [RunTag(k, v) for k, v in run.data.tags.items() if k not in _SKIP_TAGS]
            for i in range(0, max(len(params), len(tags)), 100):
                dst.log_batch(rid, params=params[i:i + 100], tags=tags[i:i + 100])
            metrics = [Metric(m.key, m.value, m.timestamp, m.step)
                       for key in run.data.metrics for m in src.get_metric_history(run.info.run_id, key)]
            for i in range(0, len(metrics), 500):
                dst.log_batch(rid, metrics=metrics[i:i + 500])
            with tempfile.TemporaryDirectory(prefix="clinfuse-import-") as tmp:
                if src.list_artifacts(run.info.run_id):
                    local = src.download_artifacts(run.info.run_id, "", tmp)
                    dst.log_artifacts(rid, local)
            dst.set_terminated(rid, status=run.info.status, end_time=run.info.end_time)
            res.copied += 1
            log(f"import: {exp.name}/{run.info.run_name} -> run {rid}")
    return res
