"""Turn the covid-notes folder (real radiographs + real clinical notes) into a hospital-style export.

Each PNG becomes a DICOM Secondary Capture (``clinfuse.data.convert``) with PatientID, PatientSex,
PatientAge and ViewPosition from ``labels.csv`` ("AP Supine" -> AP) and AccessionNumber ``CN<row>``
(the row of labels.csv; ``accessions.csv`` maps it to the image file: the file names are longer than
the 16 characters DICOM allows); each image is one study (a patient's images of other days are other studies of the same
patient, so the cohort builder's patient-level split keeps them together). The export holds:

- ``dicom/``: the images;
- ``reports.csv``: AccessionNumber, report = the clinical notes (images without notes have no row:
  image-only studies);
- ``reports_no_outcome.csv``: the same notes with every sentence that names an outcome removed
  (``OUTCOME_WORDS``), for the leakage question;
- ``labels_<outcome>.csv`` for ``went_icu`` and ``intubated``: AccessionNumber, PatientID, the outcome
  as 1 (Y) / 0 (N), or the source's own word where it stated none ("", "?", "Would have been
  stated", "Not visible"): the cohort builder sets those studies aside and names each with its value.

Usage: python studies/covid-notes/prepare.py [--data ../shared/data/covid-notes] [--out runs/covid-notes/export]
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "covid-notes"
OUTCOMES = ("went_icu", "intubated")
# A sentence naming any of these is dropped from reports_no_outcome.csv: the outcomes themselves
# (ICU, intubation, ventilation, death or survival) and what restates them (ECMO, extubation,
# discharge, "passed away"). Matched case-insensitively as word prefixes.
OUTCOME_WORDS = ("icu", "intensive care", "critical care", "intubat", "extubat", "ventilat", "ventilator",
                 "mechanical", "ecmo", "tracheostom", "died", "death", "dead", "deceased", "expired", "passed away",
                 "surviv", "discharg", "recovered", "mortality", "fatal")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORDS = re.compile(r"\b(" + "|".join(re.escape(w) for w in OUTCOME_WORDS) + r")", re.IGNORECASE)


def without_outcome(text: str) -> tuple[str, int]:
    """The notes without the sentences that name an outcome; and how many were removed."""
    kept, dropped = [], 0
    for s in _SENTENCE.split(text.strip()):
        if _WORDS.search(s):
            dropped += 1
        else:
            kept.append(s)
    return " ".join(kept), dropped


def _view(v: str) -> str | None:
    v = (v or "").strip().upper()
    return "AP" if v.startswith("AP") else ("PA" if v == "PA" else None)


def _age(v: str) -> int | None:
    try:
        return int(float(v))
    except ValueError:
        return None


def prepare(data: Path, out: Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from clinfuse.data.convert import ConversionError, image_to_dicom

    with open(data / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out.mkdir(parents=True, exist_ok=True)
    skipped, dropped, with_notes = [], 0, 0
    reports, clean = [], []
    labels = {o: [] for o in OUTCOMES}
    accessions = []
    for i, r in enumerate(tqdm(rows, desc="png -> dicom", unit="image", disable=None if progress else True)):
        acc = f"CN{i + 1:05d}"
        accessions.append([acc, r["file"]])
        dst = out / "dicom" / r["patient_id"] / f"{acc}.dcm"
        if not dst.is_file():
            try:
                image_to_dicom(data / r["file"], dst, patient_id=f"covid-{r['patient_id']}", study_key=f"covid-{acc}",
                               accession=acc, view=_view(r["view"]), sex=(r["sex"] or "").strip()[:1].upper() or None,
                               age=_age(r["age"]))
            except ConversionError as e:
                skipped.append(str(e))
                continue
        notes = (r["clinical_notes"] or "").strip()
        if notes:
            with_notes += 1
            reports.append([acc, notes])
            text, n = without_outcome(notes)
            dropped += n
            if text:
                clean.append([acc, text])
        for o in OUTCOMES:
            v = (r[o] or "").strip()
            labels[o].append([acc, f"covid-{r['patient_id']}", {"Y": "1", "N": "0"}.get(v, v)])
    for name, head, body in (("reports.csv", "report", reports), ("reports_no_outcome.csv", "report", clean),
                             ("accessions.csv", "file", accessions)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["AccessionNumber", head])
            w.writerows(body)
    for o in OUTCOMES:
        with open(out / f"labels_{o}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["AccessionNumber", "PatientID", o])
            w.writerows(labels[o])
    return {"images": len(rows) - len(skipped), "skipped": skipped, "with_notes": with_notes,
            "sentences_dropped": dropped, "notes_left_empty": with_notes - len(clean),
            "labelled": {o: sum(x[2] in ("0", "1") for x in labels[o]) for o in OUTCOMES}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the covid-notes folder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/covid-notes/export"), help="export folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        sys.exit(f"prepare: {args.data}/labels.csv not found; pass --data (the covid-notes folder)")
    s = prepare(args.data, args.out)
    print(f"prepare: {s['images']} DICOM files, {s['with_notes']} with notes ({s['sentences_dropped']} outcome "
          f"sentences removed in reports_no_outcome.csv, {s['notes_left_empty']} notes left empty); labelled: "
          f"{s['labelled']} -> {args.out}" + "".join(f"\n  skipped {x}" for x in s["skipped"]))


if __name__ == "__main__":
    main()
