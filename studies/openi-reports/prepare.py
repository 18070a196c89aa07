"""Turn Open-I (Indiana University chest X-ray) reports into a clinfuse export, then a cohort.

Two sources:

- ``--csv`` (default ``../shared/data/openi/reports.csv``): the 3,080 reports with their MeSH-derived
  labels and no images. The export is report-only: every study misses the image modality, which is
  the package's missing-modality path on real text.
- ``--xml-dir DIR --png-dir DIR``: a user's full Open-I download (``ecgen-radiology/*.xml`` and
  ``NLMCXR_png/*.png``). Each report's ``parentImage`` ids name its PNGs; they are wrapped into DICOM
  Secondary Capture files (frontal/lateral from the report's figure captions when stated) so that the
  cohort has both modalities. Labels come from the MeSH terms the same way as in the CSV.

The export is ``reports.csv`` (AccessionNumber, report with INDICATION/FINDINGS/IMPRESSION headings),
``labels.csv`` (AccessionNumber, abnormal, 11 findings) and ``dicom/`` when images were given. Open-I
has no patient ids: each report is its own patient (one report per patient in the IU collection).

Usage:
    python studies/openi-reports/prepare.py --out runs/openi/export
    python studies/openi-reports/prepare.py --xml-dir ecgen-radiology --png-dir NLMCXR_png --out runs/openi/export
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

FINDINGS = ["Cardiomegaly", "Opacity", "Lung_Hypoinflation", "Lung_Hyperdistention", "Atelectasis", "Calcinosis",
            "Calcified_Granuloma", "Pleural_Effusion", "Airspace_Disease", "Nodule", "Pneumonia"]
DEFAULT_CSV = HERE.parents[1].parent / "shared" / "data" / "openi" / "reports.csv"


def labels_from_mesh(mesh: str) -> dict[str, int]:
    """``abnormal`` and the 11 findings from Open-I MeSH terms (``Term/qualifier;Term;...``)."""
    terms = [t.strip() for t in mesh.split(";") if t.strip()]
    # a finding matches the words of a term's heading plus its first qualifier ("Pulmonary Atelectasis/base",
    # "Lung/hypoinflation"; not "Lung/left/hypoinflation"): the rule the shared reports.csv was made by
    words = [set(re.findall(r"[a-z]+", " ".join(t.lower().split("/")[:2]))) for t in terms]
    out = {"abnormal": 0 if [t.lower() for t in terms] == ["normal"] else 1}
    for f in FINDINGS:
        need = set(f.lower().split("_"))
        out[f] = int(any(need <= w for w in words))
    return out


def report_text(indication: str, findings: str, impression: str) -> str:
    parts = [(h, (t or "").strip()) for h, t in (("INDICATION", indication), ("FINDINGS", findings),
                                                 ("IMPRESSION", impression))]
    return "\n".join(f"{h}: {t}" for h, t in parts if t)


def from_csv(path: Path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({"key": f"OPENI-{r['study_id']}", "report": report_text(r["indication"], r["findings"],
                         r["impression"]), "labels": {"abnormal": int(r["abnormal"]),
                                                      **{k: int(r[k]) for k in FINDINGS}}, "images": []})
    return rows


def from_xml(xml_dir: Path, png_dir: Path | None) -> list[dict]:
    rows = []
    for x in sorted(xml_dir.glob("*.xml")):
        root = ET.parse(x).getroot()
        sec = {a.get("Label", "").upper(): (a.text or "") for a in root.iter("AbstractText")}
        mesh = ";".join((m.text or "") for m in root.iter("major")) or "normal"
        images = []
        for pi in root.iter("parentImage"):
            caption = (pi.findtext("caption") or "").lower()
            view = "LL" if "lateral" in caption else ("PA" if re.search(r"\b(pa|frontal)\b", caption) else "")
            images.append((pi.get("id"), view))
        uid = (root.find(".//uId").get("id") if root.find(".//uId") is not None else x.stem)
        rows.append({"key": f"OPENI-{uid}", "report": report_text(sec.get("INDICATION", ""), sec.get("FINDINGS", ""),
                     sec.get("IMPRESSION", "")), "labels": labels_from_mesh(mesh), "images": images if png_dir else []})
    return rows


def write_export(rows: list[dict], out: Path, png_dir: Path | None) -> dict:
    from clinfuse.data.convert import ConversionError, image_to_dicom

    out.mkdir(parents=True, exist_ok=True)
    missing_png = 0
    with open(out / "reports.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", "report"])
        for r in rows:
            w.writerow([r["key"], r["report"]])
    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["AccessionNumber", "abnormal", *FINDINGS])
        for r in rows:
            w.writerow([r["key"], r["labels"]["abnormal"], *(r["labels"][k] for k in FINDINGS)])
    n_img = 0
    for r in rows:
        for image_id, view in r["images"]:
            png = png_dir / f"{image_id}.png"
            if not png.is_file():
                missing_png += 1
                continue
            try:
                image_to_dicom(png, out / "dicom" / r["key"] / f"{image_id}.dcm", patient_id=r["key"],
                               study_key=r["key"], accession=r["key"], view=view or None)
                n_img += 1
            except ConversionError as e:
                print(f"prepare: skipped {e}", file=sys.stderr)
    return {"studies": len(rows), "images": n_img, "missing_png": missing_png}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="Open-I reports.csv (default: %(default)s)")
    ap.add_argument("--xml-dir", type=Path, help="full download: folder of Open-I XML reports (instead of --csv)")
    ap.add_argument("--png-dir", type=Path, help="full download: folder of the Open-I PNG images")
    ap.add_argument("--out", type=Path, default=Path("runs/openi/export"), help="export folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.xml_dir:
        rows = from_xml(args.xml_dir, args.png_dir)
    else:
        if not args.csv.is_file():
            sys.exit(f"prepare: {args.csv} not found; pass --csv PATH (the Open-I reports.csv) or --xml-dir")
        rows = from_csv(args.csv)
    stats = write_export(rows, args.out, args.png_dir)
    print(f"prepare: {stats['studies']} reports, {stats['images']} images -> {args.out}"
          + (f" ({stats['missing_png']} PNGs named by reports were not found)" if stats["missing_png"] else ""))


if __name__ == "__main__":
    main()
