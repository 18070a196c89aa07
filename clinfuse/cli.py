"""The `clinfuse` command. Thin: parses arguments and calls the library.

Every command is ``main([...])``-callable so tests run it in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .config import load_config
from .errors import ClinfuseError

_EPILOG = "Run `clinfuse <command> --help` for the options of one command. Docs: docs/index.md"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/); defaults apply when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set cohort.split.seed=3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _Formatter(argparse.HelpFormatter):
    """argparse measures subcommand names one indent short, so the longest one ('reproduce') wrapped its
    help onto a second line; count the indent they are printed at."""

    def add_argument(self, action):
        super().add_argument(action)
        if action.help is not argparse.SUPPRESS:
            for sub in self._iter_indented_subactions(action):
                self._action_max_length = max(self._action_max_length,
                                              len(self._format_action_invocation(sub)) + self._current_indent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clinfuse",
        formatter_class=_Formatter,
        description="Multimodal clinical decision support: DICOM + radiology reports -> cohort -> fused model.",
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"clinfuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    cohort = sub.add_parser("cohort", help="build or inspect a cohort from DICOM + reports + labels",
                            description="Build or inspect a cohort.", epilog=_EPILOG)
    csub = cohort.add_subparsers(dest="cohort_command", metavar="<subcommand>", required=True)
    b = csub.add_parser(
        "build", help="scan DICOM, join reports + labels, split by patient",
        description="Scan a DICOM tree (headers first, pixels verified after), join reports and labels by the "
        "key, split by patient (stratified, seeded) and write cohort.csv, quarantine.csv, cohort.json, "
        "config.yaml and private/ to --out. Bad files are set aside with the reason, never fatal.",
    )
    b.add_argument("--dicom", metavar="DIR", help="folder of DICOM files (any layout); omit for a report-only cohort")
    b.add_argument("--reports", metavar="FILE_OR_DIR",
                   help="reports: CSV, JSON lines, or a folder of <key>.txt; omit for an image-only cohort")
    b.add_argument("--labels", metavar="FILE", required=True, help="labels CSV: the key column and label column(s)")
    b.add_argument("--variables", metavar="FILE",
                   help="structured clinical variables CSV: the key column and one column per variable (declare "
                   "them in cohort.variables, or let the build infer numeric/categorical and record it)")
    b.add_argument("--key", choices=["StudyInstanceUID", "AccessionNumber"],
                   help="join key (default from config: StudyInstanceUID)")
    b.add_argument("--reports-key", metavar="COL", help="key column name in the reports file (default: the key)")
    b.add_argument("--report-column", metavar="COL", help="report text column (default: report)")
    b.add_argument("--labels-key", metavar="COL", help="key column name in the labels file (default: the key)")
    b.add_argument("--label-columns", metavar="COL[,COL...]", help="label column(s) (default: label)")
    b.add_argument("--task", choices=["binary", "multiclass", "multilabel"], help="kind of target (default: binary)")
    b.add_argument("--classes", metavar="NAME[,NAME...]",
                   help="class names: the allowed values for multiclass; negative,positive names for binary")
    b.add_argument("--out", metavar="DIR", required=True, help="output folder")
    _add_config_args(b)

    i = csub.add_parser("inspect", help="print the summary table of a cohort",
                        description="Print counts, prevalence per split, missingness and quarantine reasons.")
    i.add_argument("dir", metavar="DIR", help="cohort folder (holds cohort.json)")
    i.add_argument("--json", action="store_true", help="print cohort.json instead of the table")

    s = sub.add_parser(
        "synth", help="write a synthetic hospital export with known ground truth",
        description="Write a synthetic hospital export: real DICOM files with fake identifiers, reports.csv, "
        "labels.csv and truth.csv (latent cues and Bayes-optimal probabilities for image, report and both).",
    )
    s.add_argument("--out", metavar="DIR", required=True, help="output folder")
    s.add_argument("--studies", type=int, default=200, metavar="N", help="number of studies (default 200)")
    s.add_argument("--prevalence", type=float, default=0.3, metavar="P",
                   help="positive rate per finding (default 0.3)")
    s.add_argument("--missing-image", type=float, default=0.1, metavar="R", help="share with no image (default 0.1)")
    s.add_argument("--missing-report", type=float, default=0.1, metavar="R",
                   help="share with no report (default 0.1; never both missing)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    s.add_argument("--size", type=int, default=128, metavar="PX", help="image size in pixels (default 128)")
    s.add_argument("--task", choices=["binary", "multiclass", "multilabel"], default="binary",
                   help="kind of target (default binary)")
    s.add_argument("--findings", type=int, default=3, choices=[1, 2, 3], help="findings for multiclass/multilabel")
    s.add_argument("--key", choices=["StudyInstanceUID", "AccessionNumber"], default="StudyInstanceUID",
                   help="key of reports.csv and labels.csv")
    s.add_argument("--corrupt", type=int, default=0, metavar="N",
                   help="add N broken files (zero-byte, not DICOM, truncated, cut header)")
    s.add_argument("--views", type=int, choices=[1, 2], default=1,
                   help="2: every imaged study has a frontal and a lateral view, the finding visible in either, "
                   "both or neither (default 1: a frontal view, 20%% with a lateral that shows nothing)")
    s.add_argument("--missing-view", type=float, default=0.1, metavar="R",
                   help="with --views 2: share of imaged studies missing one of the two views (default 0.1)")
    s.add_argument("--variables", type=int, default=0, metavar="N",
                   help="write variables.csv: N numeric clinical variables carrying part of the signal "
                   "(temperature_c, wbc, crp, spo2, ...) and an uninformative 'sex' (default 0: none)")
    s.add_argument("--missing-variable", type=float, default=0.15, metavar="R",
                   help="with --variables: share of missing values per variable (default 0.15)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    t = sub.add_parser(
        "train", help="train the fusion model on a cohort (resumable; torchrun: DDP)",
        description="Train on a cohort: AdamW with separate learning rates, warm-up + cosine, clipping, "
        "accumulation, early stopping, mixed precision on CUDA. Writes best/ and last/ model folders, "
        "state.pt (resumable) and metrics.jsonl to --out. Several GPUs or nodes: "
        "torchrun --nproc_per_node N -m clinfuse.cli train ...",
    )
    t.add_argument("--cohort", metavar="DIR", required=True, help="cohort folder (from `clinfuse cohort build`)")
    t.add_argument("--out", metavar="DIR", default="runs/train", help="run folder (default runs/train)")
    t.add_argument("--resume", action="store_true", help="continue from --out/state.pt after an interruption")
    t.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (resumable)")
    t.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    t.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default clinfuse)")
    t.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow (metrics.jsonl is still written)")
    _add_config_args(t)

    e = sub.add_parser(
        "evaluate", help="score a model on a cohort split: table, plots, metrics.json",
        description="Score a model folder on a cohort split with the temperature and operating points stored "
        "with the model (fitted on validation, never on the split scored): AUROC/AUPRC with 95% bootstrap "
        "intervals, sensitivity, specificity, PPV, NPV, F1, balanced accuracy, ECE, Brier; per missingness "
        "pattern and with each modality hidden on purpose. Writes metrics.json and plots/ to --out.",
    )
    e.add_argument("--model", metavar="REF", required=True,
                   help="model folder, training run folder (takes best/), or MLflow URI (models:/clinfuse-fusion/3, "
                   "models:/NAME@ALIAS, runs:/RUN_ID/model)")
    e.add_argument("--tracking-uri", metavar="URI", help="MLflow store for a models:/ URI (default as for train)")
    e.add_argument("--cohort", metavar="DIR", required=True, help="cohort folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score (default test)")
    e.add_argument("--out", metavar="DIR", help="where metrics.json and plots/ go (default: MODEL/eval-SPLIT)")
    e.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples (default from the model's config)")

    x = sub.add_parser(
        "explain", help="explain predictions: heatmap, report words, modality shares",
        description="Explain studies with Captum: an image map by the model's explain.image_method or --method "
        "(auto: Occlusion with a blurred window for 2D images, Grad-CAM for volumes; or ig, gradcam, occlusion), "
        "Integrated Gradients on the report's word embeddings merged into words, exact Shapley values of the "
        "modalities, and deletion-curve faithfulness against random orders (removed patches in-painted by "
        "default). One folder per study under --out "
        "(explanation.json, image_attribution.npy, overlay.png, explanation.html); logged to the model's MLflow run.",
    )
    x.add_argument("--model", metavar="REF", required=True,
                   help="model folder, training run folder (takes best/), or MLflow URI (models:/NAME/VERSION)")
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--cohort", metavar="DIR", help="explain studies of a cohort split")
    src.add_argument("--dicom", metavar="PATH", nargs="+", help="explain one study given as DICOM file(s) (with --report)")
    x.add_argument("--report", metavar="FILE", help="the study's report text (with --dicom)")
    x.add_argument("--variables", metavar="JSON", help="the study's structured variables (with --dicom): a JSON "
                   "object or a .json file, e.g. '{\"crp\": 42, \"sex\": \"F\"}' (a model that reads variables)")
    x.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default test)")
    x.add_argument("--limit", type=int, default=10, metavar="N", help="at most N studies (default 10; 0 = all)")
    x.add_argument("--method", choices=["auto", "ig", "gradcam", "occlusion"],
                   help="image method (default: the model config's explain.image_method; 'auto' for models trained "
                   "since it became the default: Occlusion for 2D images, Grad-CAM for volumes)")
    x.add_argument("--steps", type=int, metavar="N", help="Integrated Gradients steps (default: explain.steps, 32)")
    x.add_argument("--deletion-fill", choices=["zero", "inpaint"],
                   help="what the image deletion test puts in a removed patch (default: the model config's "
                   "explain.deletion_fill): black, or in-painted from the patches kept around it")
    x.add_argument("--occlusion-baseline", choices=["zero", "blur"],
                   help="what Occlusion puts in its window (default: the model config's explain.occlusion_baseline): "
                   "black, or the image blurred at the window's scale")
    x.add_argument("--target", metavar="OUTPUT", help="output to explain (default: the predicted one)")
    x.add_argument("--out", metavar="DIR", default="explanations", help="output folder (default ./explanations)")
    x.add_argument("--tracking-uri", metavar="URI", help="MLflow store for a models:/ URI")
    x.add_argument("--no-mlflow", action="store_true", help="do not log the explanations to MLflow")
    x.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    pr = sub.add_parser("predict", help="probabilities for a cohort split or one study, as CSV",
                        description="Predict a cohort split (--cohort) or one study given as DICOM file(s) and a "
                        "report (--dicom, --report): calibrated probabilities, decisions at the stored operating "
                        "points, modality weights, the probability with each modality hidden (p_without) and a "
                        "status per study; a study that cannot be read gets status 'error' and its reason.")
    pr.add_argument("--model", metavar="REF", required=True,
                    help="model folder, training run folder (takes best/), or MLflow URI (models:/NAME/VERSION, "
                    "models:/NAME@ALIAS, runs:/RUN_ID/model)")
    prs = pr.add_mutually_exclusive_group(required=True)
    prs.add_argument("--cohort", metavar="DIR", help="cohort folder")
    prs.add_argument("--dicom", metavar="PATH", nargs="+", help="one study given as DICOM file(s)")
    pr.add_argument("--report", metavar="FILE", help="the study's report text (with --dicom)")
    pr.add_argument("--variables", metavar="JSON", help="the study's structured variables (with --dicom): a JSON "
                    "object or a .json file (a model that reads variables)")
    pr.add_argument("--study-id", default="study", help="name of the study given by --dicom (default: study)")
    pr.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="split (default test)")
    pr.add_argument("--out", metavar="FILE", default="predictions.csv",
                    help="CSV file (default predictions.csv; '-' with --dicom: print only)")
    pr.add_argument("--tracking-uri", metavar="URI", help="MLflow store for a models:/ URI")

    dm = sub.add_parser(
        "demo", help="the whole path on generated data, offline, in a few minutes",
        description="Generate a synthetic hospital export (DICOM with fake identifiers, reports, labels, some studies "
        "missing a modality, broken files on purpose), build the cohort, train the fusion model (configs/demo.yaml), "
        "evaluate it against the Bayes-optimal answers, explain a few test studies and log everything to an MLflow "
        "store in --out. About 3-5 minutes on 2 CPU cores.")
    dm.add_argument("--out", metavar="DIR", default="demo-output", help="output folder (default demo-output; replaced)")
    dm.add_argument("--config", metavar="FILE", help="config (default configs/demo.yaml)")
    dm.add_argument("--studies", type=int, default=600, metavar="N", help="synthetic studies (default 600)")
    dm.add_argument("--seed", type=int, default=0, help="seed of the export and the split (default 0)")
    dm.add_argument("--explain", type=int, default=5, metavar="N", help="test studies to explain (default 5)")
    dm.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rp = sub.add_parser(
        "reproduce", help="retrain a logged run; say if the result is the same",
        description="Read a logged run (run id or models:/NAME/VERSION), check that the cohort's fingerprint and the "
        "code commit match what it logged (a mismatch is refused; --force retrains anyway and logs the warning), "
        "retrain with the logged config, seed and torch thread count, and print the logged and the new test "
        "metrics side by side and whether the weights are identical. The new run is tagged clinfuse.reproduces.")
    rp.add_argument("run", metavar="RUN_REF", help="MLflow run id, or models:/NAME/VERSION of a registered model")
    rp.add_argument("--cohort", metavar="DIR", required=True, help="the cohort folder to retrain on")
    rp.add_argument("--out", metavar="DIR", help="run folder of the retraining (default runs/reproduce-<run id>)")
    rp.add_argument("--tracking-uri", metavar="URI", help="MLflow store (default as for train)")
    rp.add_argument("--force", action="store_true", help="retrain even if the cohort or the code differs (logged)")
    rp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change one config value (named in the output and in the new run's tags)")
    rp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    from .pacs.commands import add_parsers as add_pacs_parsers

    add_pacs_parsers(sub, _Formatter, _EPILOG)
    from .server.commands import add_parsers as add_server_parsers

    add_server_parsers(sub, _Formatter, _EPILOG)

    u = sub.add_parser("ui", help="start the MLflow UI on the clinfuse store, print its address",
                       description="Start `mlflow ui` on the same store that training logs to.")
    u.add_argument("--tracking-uri", metavar="URI", help="store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    u.add_argument("--workers", type=int, default=1, help="server workers (default 1)")
    return parser


def _explain(args) -> int:
    from .inference import Model
    from .pipeline import explain_and_log

    if args.dicom and not args.report:
        print("clinfuse explain: note: no --report given; explaining the image alone", file=sys.stderr)
    model = Model.load(args.model, tracking_uri=args.tracking_uri)
    if args.deletion_fill:
        model.config.explain.deletion_fill = args.deletion_fill
    if args.occlusion_baseline:
        model.config.explain.occlusion_baseline = args.occlusion_baseline
    res = explain_and_log(model, args.out, cohort_dir=args.cohort, split=args.split, limit=args.limit or None,
                          dicom=args.dicom, report=args.report, variables=_variables_arg(args.variables),
                          method=args.method, steps=args.steps,
                          target=args.target, log_to_mlflow=not args.no_mlflow, progress=not args.no_progress)
    for e in res:
        print(e.summary())
    print(f"\n{len(res)} explanation(s) in {args.out}/<study_id>/explanation.html")
    return 0


def _variables_arg(value: str | None) -> dict | None:
    """--variables: a JSON object given inline or as a file."""
    if not value:
        return None
    from .errors import ClinfuseError

    text = value
    if not value.lstrip().startswith("{"):
        p = Path(value)
        if not p.is_file():
            raise ClinfuseError(f"--variables {value}: neither a JSON object nor a file")
        text = p.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClinfuseError(f"--variables: not valid JSON ({e.msg} at character {e.pos}); give an object like "
                            "'{\"crp\": 42, \"sex\": \"F\"}'") from None
    if not isinstance(obj, dict):
        raise ClinfuseError(f"--variables: a JSON object (name -> value) is needed, not a {type(obj).__name__}")
    return obj


def _predict(args) -> int:
    from .inference import Model, Study

    model = Model.load(args.model, tracking_uri=args.tracking_uri)
    if args.cohort:
        from .pipeline import predict_csv

        n = predict_csv(model, args.cohort, args.out, args.split)
        print(f"{n} predictions written to {args.out}")
        return 0
    report = None
    if args.report:
        from .pipeline import read_report_file

        report = read_report_file(args.report, model)
    preds = model.predict([Study(list(args.dicom or []), report, args.study_id, _variables_arg(args.variables))])
    frame = preds.to_frame()
    if args.out != "-":
        frame.to_csv(args.out, index=False, float_format="%.6f")
    p = preds[0]
    if not p.ok:
        print(f"clinfuse predict: {p.study_id}: {p.reason}", file=sys.stderr)
        return 1
    for n in model.output_names:
        print(f"{n}: p = {p.probabilities[n]:.4f}  decision {'positive' if p.decisions[n] else 'negative'} "
              f"(operating point {model.thresholds[model.output_names.index(n)]:.3f})")
    print("modality weights: " + ", ".join(f"{g} {w:.2f}" for g, w in p.modality_weights.items()))
    if args.out != "-":
        print(f"written to {args.out}")
    return 0


def _demo(args) -> int:
    from .pipeline import DemoError, run_demo

    try:
        run_demo(args.out, args.config, studies=args.studies, seed=args.seed, explain_n=args.explain,
                 progress=not args.no_progress, log=lambda m: print(m, flush=True))
    except DemoError as e:
        print(f"clinfuse demo: {e}", file=sys.stderr)
        return 1
    return 0


def _ui(args) -> int:
    import os
    import subprocess

    from .tracking.mlflow_tracker import resolve_tracking_uri, ui_command

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):  # a server has its own UI, behind its login
        from .tracking.mlflow_tracker import check_access

        check_access(uri)
        print(f"{uri} is an MLflow server: open {uri} in a browser and sign in with your account "
              "(no local UI is started)")
        return 0
    cmd = ui_command(uri, args.host, args.port, args.workers)
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def _evaluate(args) -> int:
    from .evaluation.evaluate import evaluate, format_table
    from .inference import Model

    model = Model.load(args.model, tracking_uri=args.tracking_uri)
    out = args.out or (str(model.dir / f"eval-{args.split}") if Path(args.model).is_dir() else f"eval-{args.split}")
    cfg = None
    if args.bootstrap is not None:
        cfg = model.config.eval.model_copy(update={"bootstrap": args.bootstrap})
    result = evaluate(model, args.cohort, args.split, out, cfg)
    print(format_table(result))
    print(f"\nmetrics.json and plots written to {out}")
    return 0


def _train(args) -> int:
    import os

    from .pipeline import train_and_audit

    overrides = list(args.overrides)
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    if args.experiment:
        overrides.append(f"tracking.experiment={args.experiment}")
    if args.no_mlflow:
        overrides.append("tracking.enabled=false")
    cfg = load_config(args.config, overrides)
    audited = train_and_audit(args.cohort, cfg, args.out, resume=args.resume, max_steps=args.max_steps,
                              progress=not args.no_progress)
    r = audited.result

    if int(os.environ.get("RANK", 0)) == 0:
        for h in r.history:
            vals = "  ".join(f"{k} {v:.4f}" for k, v in h.items() if k in ("train_loss", "val_loss", "val_auroc"))
            print(f"epoch {h['epoch']:>3}  {vals}  ({h['studies_per_second']:.1f} studies/s)")
        state = "interrupted (resume with --resume)" if r.interrupted else \
            "stopped early" if r.stopped_early else "finished"
        print(f"training {state} after {r.global_step} steps; best model: {r.best_dir}; last: {r.last_dir}")
        if audited.test_metrics:
            from .evaluation.evaluate import format_table

            print(format_table(audited.test_metrics))
        if audited.run_id:
            reg = audited.model or {}
            print(f"mlflow run {audited.run_id}" + (f"; registered model {reg.get('registered_name')} version "
                                                    f"{reg.get('version')}" if reg.get("version") else ""))
            print(f"open the audit trail: clinfuse ui --tracking-uri {audited.tracking_uri}")
    return 0


def _reproduce(args) -> int:
    from .pipeline import reproduce

    out = args.out or f"runs/reproduce-{args.run.replace('/', '_').replace(':', '')[:40]}"
    r = reproduce(args.run, args.cohort, out, tracking_uri=args.tracking_uri, force=args.force,
                  overrides=args.overrides, progress=not args.no_progress)
    print(f"\n{'metric':<20} {'logged':>10} {'reproduced':>11}")
    for k, (a, b) in r["metrics"].items():
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"  # noqa: E731
        print(f"{k:<20} {fmt(a):>10} {fmt(b):>11}")
    print(f"weights identical: {'yes' if r['weights_identical'] else 'NO'} (torch threads {r['threads'] or 'default'})")
    if r["config_changes"]:
        print("config changed: " + "; ".join(r["config_changes"]))
    print(f"new run {r['new_run_id']} (tag clinfuse.reproduces = {r['run_id']})")
    return 0


def _cohort_build(args) -> int:
    from .data.cohort import build_cohort, format_summary

    overrides = list(args.overrides)
    for flag, key in (("key", "cohort.key"), ("reports_key", "cohort.reports.key_column"),
                      ("report_column", "cohort.reports.text_column"), ("labels_key", "cohort.labels.key_column"),
                      ("task", "cohort.labels.task")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    for flag, key in (("label_columns", "cohort.labels.columns"), ("classes", "cohort.labels.classes")):
        v = getattr(args, flag)
        if v:
            overrides.append(f"{key}={json.dumps([c.strip() for c in v.split(',') if c.strip()])}")
    cfg = load_config(args.config, overrides)
    summary = build_cohort(args.dicom, args.reports, args.labels, args.out, cfg, progress=not args.no_progress,
                           variables=args.variables)
    print(format_summary(summary.info))
    print(f"\ncohort written to {summary.out_dir} ({summary.n_studies} studies; "
          f"{summary.n_quarantined} set aside: see quarantine.csv)")
    return 0


def _cohort_inspect(args) -> int:
    from .data.cohort import format_summary, read_cohort

    _, info = read_cohort(args.dir)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _synth(args) -> int:
    from .data.synth import SynthSpec, synthesize

    spec = SynthSpec(studies=args.studies, prevalence=args.prevalence, missing_image=args.missing_image,
                     missing_report=args.missing_report, seed=args.seed, size=args.size, task=args.task,
                     n_findings=args.findings, key=args.key, corrupt=args.corrupt, views=args.views,
                     missing_view=args.missing_view, variables=args.variables,
                     missing_variable=args.missing_variable)
    s = synthesize(args.out, spec, progress=not args.no_progress)
    print(f"synthetic export written to {args.out}: {s['studies']} studies, {s['with_image']} with images, "
          f"{s['with_report']} with reports, {len(s['corrupt_files'])} broken files; labels {s['label_columns']}"
          + (f"; variables {', '.join(s['variables']['numeric'])}, sex" if s.get("variables") else ""))
    print(f"next: clinfuse cohort build --dicom {Path(args.out) / 'dicom'} --reports {Path(args.out) / 'reports.csv'} "
          f"--labels {Path(args.out) / 'labels.csv'} --key {args.key} --task {args.task}"
          + (f" --variables {Path(args.out) / 'variables.csv'}" if s.get("variables") else "")
          + (" --set cohort.dicom.view_policy=all" if args.views == 2 else "")
          + (f" --label-columns {','.join(s['label_columns'])}" if args.task == "multilabel" else "")
          + (f" --classes {','.join(s['classes'])}" if args.task == "multiclass" else "")
          + " --out COHORT_DIR")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``clinfuse <command> ...``. Returns the exit status.

    A :class:`clinfuse.errors.ClinfuseError` (bad input, config or reference) prints one line and
    gives status 2; any other exception is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    handlers = {("cohort", "build"): _cohort_build, ("cohort", "inspect"): _cohort_inspect, ("synth", None): _synth,
                ("train", None): _train, ("evaluate", None): _evaluate, ("ui", None): _ui,
                ("explain", None): _explain, ("predict", None): _predict, ("demo", None): _demo,
                ("reproduce", None): _reproduce}
    if args.command == "pacs":
        from .pacs.commands import HANDLERS

        handler = HANDLERS[args.pacs_command]
    elif args.command == "server":
        from .server.commands import handler as server_handler

        handler = server_handler(args)
    else:
        handler = handlers[(args.command, getattr(args, "cohort_command", None))]
    try:
        return handler(args)
    except ClinfuseError as e:  # ConfigError, CohortInputError, DicomReadError, TrainingError, ModelLoadError, ...
        print(f"clinfuse {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:
        # an MLflow server refusing this account (a reviewer writing): the user's to fix, not a bug
        if type(e).__module__.startswith("mlflow") and getattr(e, "error_code", None) in ("PERMISSION_DENIED",
                                                                                           "UNAUTHENTICATED"):
            msg = " ".join(str(e).split())
            print(f"clinfuse {args.command}: error: the MLflow server refused this account "
                  f"(MLFLOW_TRACKING_USERNAME={os.environ.get('MLFLOW_TRACKING_USERNAME', '')!r}): {msg}",
                  file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
