"""The PACS loop's cost: pull -> predict -> SR + SC + STOW against the same model on files already on disk.

A synthetic export is loaded into a throw-away Orthanc on loopback (DICOMweb, basic auth) and a tiny
model (configs/tiny.yaml at --size px, one epoch) is trained on it. Then, for the same studies:

- baseline: ``Model.predict`` (and ``Model.explain``) in process on the DICOM files on disk;
- ``run_studies`` (``clinfuse pacs run``): WADO-RS retrieve, decode check, predict (+ explain), SR +
  heatmap SC + FHIR, STOW-RS and the QIDO check that the PACS holds them.

Printed: studies per minute of each, the ratio to the baseline, and where the PACS loop's time goes
(retrieve = network + parsing, decode, model, encode = SR/SC/FHIR, store = STOW + check), mean per
study. Needs Debian's orthanc and orthanc-dicomweb.

Usage: python benchmarks/pacs.py [--studies 40] [--size 128] [--no-explain]
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.cohort import build_cohort  # noqa: E402
from clinfuse.data.synth import SynthSpec, synthesize  # noqa: E402
from clinfuse.inference import Model, Study  # noqa: E402
from clinfuse.pacs import LocalOrthanc, PacsClient, PacsCredentials, run_studies  # noqa: E402
from clinfuse.pacs.orthanc import orthanc_binary  # noqa: E402
from clinfuse.pipeline import train_and_audit  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--size", type=int, default=128, help="image side of the synthetic export and the model")
    ap.add_argument("--no-explain", action="store_true", help="measure predict only (no heatmap)")
    args = ap.parse_args(argv)
    if orthanc_binary() is None:
        sys.exit("benchmarks/pacs.py: Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    explain = not args.no_explain
    with tempfile.TemporaryDirectory(prefix="clinfuse-bench-pacs-") as tmp:
        d = Path(tmp)
        synthesize(d / "e", SynthSpec(studies=args.studies, seed=0, size=args.size, lateral=0, missing_image=0,
                                      missing_report=0, corrupt=0), progress=False)
        build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", progress=False)
        cfg = load_config(REPO / "configs/tiny.yaml", ["train.epochs=1", f"data.image_size=[{args.size},{args.size}]",
                                                       "tracking.enabled=false", "eval.bootstrap=0"])
        train_and_audit(d / "c", cfg, d / "run", progress=False, log=lambda m: None)
        model = Model.load(d / "run")
        files = sorted(glob.glob(str(d / "e/dicom/**/*.dcm"), recursive=True))
        by = defaultdict(list)
        for f in files:
            by[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)].append(f)
        import csv

        with open(d / "e/reports.csv", newline="") as fh:
            reports = {r["StudyInstanceUID"]: r["report"] for r in csv.DictReader(fh)}
        uids = sorted(by)
        studies = [Study(by[u], reports.get(u), u) for u in uids]

        model.predict([studies[0]])  # warm-up (first-call costs are in neither measurement)
        if explain:
            model.explain(studies[0])
        t = time.perf_counter()
        for s in studies:  # one study at a time, as the PACS loop does
            model.predict([s])
            if explain:
                model.explain(s)
        base = time.perf_counter() - t

        with LocalOrthanc(d / "orthanc") as o:
            o.upload(files)
            client = PacsClient(o.url, PacsCredentials(o.user, o.password))
            t = time.perf_counter()
            summary = run_studies(model, client, uids, d / "out", reports=d / "e/reports.csv", explain=explain,
                                  track=False, progress=False, log=lambda m: None)
            loop = time.perf_counter() - t
        parts = defaultdict(float)
        for r in summary.results:
            for k, v in r.seconds.items():
                parts[k] += v
        n = len(uids)
        c = summary.counts()
        what = "predict + explain" if explain else "predict"
        print(f"{n} studies ({len(files)} instances, {args.size} px), tiny model, {what}; "
              f"{c['predicted']} predicted, {c['stored']} written back\n")
        print(f"| path | seconds | studies/min | ratio |\n|---|---:|---:|---:|")
        print(f"| in process on files (`Model.predict`{' + `explain`' if explain else ''}) | {base:.2f} | "
              f"{60 * n / base:.0f} | 1.00 |")
        print(f"| `pacs run`: retrieve -> {what} -> SR + SC + FHIR -> STOW + check | {loop:.2f} | {60 * n / loop:.0f} | "
              f"{loop / base:.2f} |")
        print(f"\nwhere the PACS loop's time goes (mean ms per study):\n")
        print("| part | ms/study | share |\n|---|---:|---:|")
        total = sum(parts.values())
        for k in ("retrieve", "decode", "model", "encode", "store"):
            print(f"| {k} | {1000 * parts[k] / n:.1f} | {parts[k] / total:.0%} |")
        print(f"| other (report join, local copies, bookkeeping) | {1000 * max(loop - total, 0) / n:.1f} | |")


if __name__ == "__main__":
    main()
