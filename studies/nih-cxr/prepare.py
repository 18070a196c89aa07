"""Wrap the NIH chest X-ray PNGs into DICOM so that the study enters through the cohort builder.

Each PNG becomes a DICOM Secondary Capture (modality DX) with PatientID, PatientSex, PatientAge and
ViewPosition from ``labels.csv`` and AccessionNumber = the image name; the cohort builder then
pseudonymises patients and splits by patient, as for a hospital export. The export also holds:

- ``labels.csv``: AccessionNumber, pneumonia (0/1);
- ``context.csv``: AccessionNumber, report: the real clinical context rendered as text
  ("INDICATION: 58 year old female. AP view.") for the shortcut question (the second modality).

Usage: python studies/nih-cxr/prepare.py [--data ../shared/data/nih-cxr] [--out runs/nih/export]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "nih-cxr"


def context_text(age: str, sex: str, view: str) -> str:
    who = {"M": "male", "F": "female"}.get(sex.upper(), "patient")
    return f"INDICATION: {int(float(age))} year old {who}. {view.upper()} view."


def prepare(data: Path, out: Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from clinfuse.data.convert import ConversionError, image_to_dicom

    rows = list(csv.DictReader(open(data / "labels.csv", newline="")))
    out.mkdir(parents=True, exist_ok=True)
    skipped = []
    with open(out / "labels.csv", "w", newline="") as fl, open(out / "context.csv", "w", newline="") as fc:
        wl, wc = csv.writer(fl), csv.writer(fc)
        wl.writerow(["AccessionNumber", "pneumonia"])
        wc.writerow(["AccessionNumber", "report"])
        for r in tqdm(rows, desc="png -> dicom", unit="image", disable=None if progress else True):
            acc = Path(r["file"]).stem
            dst = out / "dicom" / r["patient_id"] / f"{acc}.dcm"
            if not dst.is_file():
                try:
                    image_to_dicom(data / r["file"], dst, patient_id=r["patient_id"], study_key=f"nih-{acc}",
                                   accession=acc, view=r["view_position"], sex=r["sex"], age=int(float(r["age"])))
                except ConversionError as e:
                    skipped.append(str(e))
                    continue
            wl.writerow([acc, int(r["label"] == "pneumonia")])
            wc.writerow([acc, context_text(r["age"], r["sex"], r["view_position"])])
    return {"images": len(rows) - len(skipped), "skipped": skipped}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with labels.csv and images/ (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/nih/export"), help="export folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"prepare: {args.data}/labels.csv not found; pass --data (the NIH chest X-ray folder)")
    s = prepare(args.data, args.out)
    print(f"prepare: {s['images']} DICOM files -> {args.out / 'dicom'}" + "".join(f"\n  skipped {x}" for x in s["skipped"]))


if __name__ == "__main__":
    main()
