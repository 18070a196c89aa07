"""Synthetic hospital exports with known ground truth.

The generator's model (per finding k; see docs/synthetic.md):

- label ``y_k`` (binary / multi-label: Bernoulli(prevalence); multi-class: one of
  ``normal`` + findings, each finding with the given prevalence);
- an **image-only** cue ``o_k`` in {none, faint, dense}: an opacity in the finding's lung zone,
  drawn from ``P(o | y_k)``; the report never mentions it;
- a **report-only** cue ``t_k`` in {none, hedged, stated}: a phrase in the INDICATION section
  ("history of ...", "clinical concern for ..."), drawn from ``P(t | y_k)``; the image never shows it.

Cues are independent given the label, so the Bayes posterior is exact:
``P(y | o, t) ∝ P(y) P(o | y) P(t | y)``. ``truth.csv`` holds it for the image alone, the report
alone, both, and the modalities the study actually has. Faint opacities are about 4 noise standard
deviations above the background over ~300 pixels at 128 px: a good image model can read them.

The export has real DICOM files (file meta, CR tags, fake patient names, IDs, birth dates and
accession numbers, some MONOCHROME1, some lateral views), ``reports.csv``, ``labels.csv`` and, on
request, broken files of the kinds a real export holds.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from ..errors import ClinfuseError
from ..progress import progress as progress_of

__all__ = ["SynthSpec", "synthesize", "FINDINGS", "P_IMAGE", "P_TEXT", "P_LATERAL", "VARIABLES", "GROUPS",
           "posterior", "subset_name", "variable_names"]

# P(cue level | label) for image cues (none, faint, dense) and text cues (none, hedged, stated).
P_IMAGE = {1: np.array([0.25, 0.35, 0.40]), 0: np.array([0.85, 0.12, 0.03])}
P_TEXT = {1: np.array([0.35, 0.35, 0.30]), 0: np.array([0.75, 0.20, 0.05])}


@dataclass(frozen=True)
class Finding:
    name: str
    zone: tuple[float, float]  # (row, col) as a fraction of the image
    hedged: tuple[str, ...]
    stated: tuple[str, ...]


FINDINGS = (
    Finding("pneumonia", (0.62, 0.30),
            ("History of pneumonia.", "Rule out pneumonia.", "Recent cough, possible pneumonia."),
            ("Fever and productive cough, clinical concern for pneumonia.", "Known pneumonia on antibiotics, follow-up.")),
    Finding("effusion", (0.74, 0.70),
            ("History of congestive heart failure.", "Rule out pleural effusion."),
            ("Dullness to percussion at the left base, concern for effusion.", "Known pleural effusion, follow-up.")),
    Finding("nodule", (0.33, 0.33),
            ("Former smoker.", "Rule out mass."),
            ("Nodule seen on outside CT, follow-up.", "Weight loss and hemoptysis, concern for malignancy.")),
)
_BENIGN = ("Preoperative evaluation.", "Chest pain.", "Routine follow-up.", "Shortness of breath.",
           "Cough for XXXX days.", "Evaluate line placement.", "Trauma.")
_FINDINGS_TEXT = ("Heart size is normal.", "The mediastinal contour is within normal limits.", "No pneumothorax.",
                  "Osseous structures are intact.", "Degenerative changes of the thoracic spine.",
                  "Trachea is midline.", "Surgical clips in the upper abdomen.", "Stable appearance of XXXX.")
_IMPRESSION = ("Please see findings.", "Correlate clinically.", "Comparison with prior studies is recommended.",
               "Dictated by Dr. XXXX.")
_SYL = ("ka", "zu", "mir", "vel", "tor", "quin", "bra", "lox", "dre", "pim", "sab", "yor", "fen", "gul")


@dataclass
class SynthSpec:
    """What to generate. See `clinfuse synth --help`."""

    studies: int = 200
    prevalence: float = 0.3
    missing_image: float = 0.1
    missing_report: float = 0.1
    seed: int = 0
    size: int = 128
    task: Literal["binary", "multiclass", "multilabel"] = "binary"
    n_findings: int = 3  # multiclass / multilabel
    key: Literal["StudyInstanceUID", "AccessionNumber"] = "StudyInstanceUID"
    lateral: float = 0.2  # share of studies that also have a lateral view
    monochrome1: float = 0.15
    corrupt: int = 0  # broken files added to the export (zero-byte, truncated, not DICOM, ...)
    views: int = 1  # 2: every imaged study has a frontal and a lateral view, each with its own cue
    missing_view: float = 0.1  # views=2: share of imaged studies missing one view (either, at random)
    variables: int = 0  # structured numeric variables carrying signal (plus an uninformative 'sex')
    missing_variable: float = 0.15  # share of missing values per variable (completely at random)


# views=2: P(lateral cue | label). A finding is visible on the frontal view, the lateral view, both or
# neither, each view's cue drawn independently given the label.
P_LATERAL = {1: np.array([0.40, 0.30, 0.30]), 0: np.array([0.88, 0.09, 0.03])}
# Structured variables: (name, unit base, unit scale, direction); the value is base + scale * z with
# z ~ N(direction * effect * y_k, 1) for the finding k = j mod K the variable informs.
VARIABLES = (("temperature_c", 37.0, 0.6, 1), ("wbc", 8.0, 2.5, 1), ("crp", 20.0, 15.0, 1),
             ("spo2", 96.0, 2.0, -1), ("heart_rate", 80.0, 12.0, 1), ("resp_rate", 16.0, 3.0, 1),
             ("lactate", 1.2, 0.5, 1), ("age", 60.0, 15.0, 1))
VARIABLE_EFFECT = 0.8  # separation in SD units of each variable between y=1 and y=0
# Groups of evidence whose subsets truth.csv covers (views=2 or variables>0): frontal, lateral, report, variables
GROUPS = ("frontal", "lateral", "report", "variables")


def _findings(spec: SynthSpec) -> tuple[Finding, ...]:
    return FINDINGS[:1] if spec.task == "binary" else FINDINGS[: spec.n_findings]


def class_names(spec: SynthSpec) -> list[str]:
    f = _findings(spec)
    if spec.task == "binary":
        return ["label"]
    if spec.task == "multiclass":
        return ["normal"] + [x.name for x in f]
    return [x.name for x in f]


def posterior(spec: SynthSpec, o: np.ndarray | None, t: np.ndarray | None, lat: np.ndarray | None = None,
              z: np.ndarray | None = None) -> np.ndarray:
    """Exact P(label | cues). `o`, `t`, `lat`: int arrays ``[K]`` of cue levels (frontal image, report, lateral
    image), or None when unseen; `z`: the variables' standardised values ``[V]``, NaN where missing (or None).

    Returns ``[K]`` per-finding probabilities (binary, multilabel) or ``[K+1]`` class probabilities.
    """
    k = len(_findings(spec))

    def loglik(j: int, pos: int) -> float:
        """log P(evidence about finding j | y_j = pos)."""
        v = 0.0
        if o is not None:
            v += np.log(P_IMAGE[pos][o[j]])
        if t is not None:
            v += np.log(P_TEXT[pos][t[j]])
        if lat is not None:
            v += np.log(P_LATERAL[pos][lat[j]])
        if z is not None:
            for i, zi in enumerate(z):
                if i % k == j and np.isfinite(zi):
                    mu = VARIABLES[i % len(VARIABLES)][3] * VARIABLE_EFFECT * pos
                    v += -0.5 * (zi - mu) ** 2
        return v

    if spec.task == "multiclass":
        prior = np.array([1 - spec.prevalence * k] + [spec.prevalence] * k)
        logp = np.log(prior)
        for y in range(k + 1):
            for j in range(k):
                logp[y] += loglik(j, int(y == j + 1))
        p = np.exp(logp - logp.max())
        return p / p.sum()
    out = np.empty(k)
    for j in range(k):
        l1 = np.log(spec.prevalence) + loglik(j, 1)
        l0 = np.log(1 - spec.prevalence) + loglik(j, 0)
        out[j] = 1.0 / (1.0 + np.exp(l0 - l1))
    return out


def subset_name(groups) -> str:
    """The truth.csv name of a subset of :data:`GROUPS` ('none' for the empty one), e.g. 'frontal+report'."""
    return "+".join(g for g in GROUPS if g in groups) or "none"


def variable_names(spec: SynthSpec) -> list[str]:
    """The numeric variables of `spec` (``variables.csv`` also holds the categorical 'sex')."""
    return [VARIABLES[i % len(VARIABLES)][0] + ("" if i < len(VARIABLES) else f"_{i // len(VARIABLES)}")
            for i in range(spec.variables)]


def _render(rng: np.random.Generator, size: int, findings, o: np.ndarray, lateral: bool = False) -> np.ndarray:
    """A chest-like radiograph in [0, 1] (bright = dense), with opacities at the cue levels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    dy, dx, s = rng.normal(0, 0.02), rng.normal(0, 0.02), rng.uniform(0.95, 1.05)
    img = np.full((size, size), 0.08, np.float32)
    body = ((yy - 0.55 - dy) / (0.48 * s)) ** 2 + ((xx - 0.5 - dx) / (0.45 * s)) ** 2 < 1
    img[body] = 0.55
    if lateral:
        lung = ((yy - 0.5 - dy) / (0.3 * s)) ** 2 + ((xx - 0.5 - dx) / (0.25 * s)) ** 2 < 1
        img[lung] = 0.25
        for f, level in zip(findings, o):  # one lung field seen from the side: the finding's height, mid-depth
            if level == 0:
                continue
            amp = (0.12 if level == 1 else 0.30) * rng.uniform(0.85, 1.15)
            cy, cx = f.zone[0] + dy + rng.normal(0, 0.03), 0.45 + dx + rng.normal(0, 0.03)
            r = rng.uniform(0.06, 0.09)
            img += amp * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    else:
        for cx in (0.31, 0.69):
            lung = ((yy - 0.52 - dy) / (0.30 * s)) ** 2 + ((xx - cx - dx) / (0.15 * s)) ** 2 < 1
            img[lung] = 0.22
        heart = ((yy - 0.66 - dy) / (0.14 * s)) ** 2 + ((xx - 0.55 - dx) / (0.12 * s)) ** 2 < 1
        img[heart] = 0.62
        spine = (np.abs(xx - 0.5 - dx) < 0.035) & body
        img[spine] = 0.7
        for f, level in zip(findings, o):
            if level == 0:
                continue
            amp = (0.12 if level == 1 else 0.30) * rng.uniform(0.85, 1.15)
            cy, cx = f.zone[0] + dy + rng.normal(0, 0.03), f.zone[1] + dx + rng.normal(0, 0.03)
            r = rng.uniform(0.06, 0.09)
            img += amp * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def _name(rng) -> str:
    def word(n):
        return "".join(rng.choice(_SYL, n)).upper()

    return f"{word(3)}^{word(2)}"


def _write_dicom(path: Path, pixels: np.ndarray, meta: dict, mono1: bool) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    raw = np.round(pixels * 4095).astype(np.uint16)
    if mono1:
        raw = (4095 - raw).astype(np.uint16)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    fm.MediaStorageSOPInstanceUID = meta["sop"]
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta["sop"]
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.AccessionNumber = meta["accession"]
    ds.PatientName = meta["patient_name"]
    ds.PatientID = meta["patient_id"]
    ds.PatientBirthDate = meta["birth_date"]
    ds.PatientSex = meta["sex"]
    ds.StudyDate = meta["study_date"]
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = meta["referrer"]
    ds.InstitutionName = "CLINFUSE SYNTHETIC GENERAL HOSPITAL"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.StudyDescription = "XR CHEST 2 VIEWS"
    ds.ViewPosition = meta["view"]
    ds.SeriesNumber = meta["series_number"]
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.Rows, ds.Columns = raw.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [round(350.0 / raw.shape[0], 4)] * 2
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = raw.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def synthesize(out_dir: str | Path, spec: SynthSpec | None = None, progress: bool = True) -> dict:
    """Write a synthetic hospital export under `out_dir` and return a summary.

    Layout: ``dicom/<PatientID>/<AccessionNumber>/<SOPInstanceUID>.dcm``, ``reports.csv``
    (key column + ``report``), ``labels.csv`` (key column + label columns), ``truth.csv`` (latent
    cues and Bayes-optimal probabilities) and ``synth.json`` (the spec).

    Raises:
        ValueError: a spec value out of range.
    """
    from pydicom.uid import generate_uid

    spec = spec or SynthSpec()
    findings = _findings(spec)
    k = len(findings)
    if not 0 < spec.prevalence < 1 or (spec.task == "multiclass" and spec.prevalence * k >= 1):
        raise ClinfuseError(f"prevalence {spec.prevalence} is out of range for task '{spec.task}' with {k} findings")
    if spec.views not in (1, 2) or spec.variables < 0:
        raise ClinfuseError(f"views must be 1 or 2 and variables >= 0, got views={spec.views}, "
                            f"variables={spec.variables}")
    for name in ("missing_image", "missing_report", "lateral", "monochrome1", "missing_view", "missing_variable"):
        v = getattr(spec, name)
        if not 0 <= v <= 1:
            raise ClinfuseError(f"{name} must be in [0, 1], got {v}")
    if spec.studies < 1 or spec.size < 32:
        raise ClinfuseError("need studies >= 1 and size >= 32")
    out = Path(out_dir)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    names = class_names(spec)
    label_cols = names if spec.task == "multilabel" else ["label"]

    # Patients with 1-3 studies each.
    patients = []
    while sum(p["n"] for p in patients) < spec.studies:
        patients.append({"n": int(rng.choice([1, 1, 2, 3])), "name": _name(rng),
                         "id": f"MRN{rng.integers(10**7, 10**8)}", "sex": str(rng.choice(["F", "M"])),
                         "birth": f"{rng.integers(1930, 2005)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}"})
    owner = [i for i, p in enumerate(patients) for _ in range(p["n"])][: spec.studies]

    reports, labels, truth, variables = [], [], [], []
    uid = 0
    # Draws for the second view and the variables come from their own stream, so that the exports made
    # before they existed (views=1, no variables) stay byte for byte what they were.
    rx = np.random.default_rng([spec.seed, 13])
    var_names = variable_names(spec)
    extended = spec.views == 2 or spec.variables > 0

    def new_uid(tag: str) -> str:
        nonlocal uid
        uid += 1
        return generate_uid(entropy_srcs=[f"clinfuse-synth:{spec.seed}:{tag}:{uid}"])

    for i in progress_of(range(spec.studies), "synth", "study", enabled=progress):
        p = patients[owner[i]]
        if spec.task == "multiclass":
            prior = [1 - spec.prevalence * k] + [spec.prevalence] * k
            cls = int(rng.choice(k + 1, p=prior))
            y = np.array([int(cls == j + 1) for j in range(k)])
            label_vals = [names[cls]]
        else:
            y = (rng.random(k) < spec.prevalence).astype(int)
            label_vals = list(y)
        o = np.array([rng.choice(3, p=P_IMAGE[int(v)]) for v in y])
        t = np.array([rng.choice(3, p=P_TEXT[int(v)]) for v in y])
        has_image = rng.random() >= spec.missing_image
        has_report = rng.random() >= spec.missing_report or not has_image
        lat = np.array([rx.choice(3, p=P_LATERAL[int(v)]) for v in y]) if spec.views == 2 else None
        has_frontal, has_lateral = has_image, False
        if spec.views == 2 and has_image:
            has_lateral = True
            if rx.random() < spec.missing_view:
                if rx.random() < 0.5:
                    has_frontal = False
                else:
                    has_lateral = False
        z = None
        if spec.variables:
            z = np.full(spec.variables, np.nan)
            var_row = {}
            for i, name in enumerate(var_names):
                _, base, scale, sign = VARIABLES[i % len(VARIABLES)]
                zi = rx.normal(sign * VARIABLE_EFFECT * y[i % k], 1.0)
                if rx.random() >= spec.missing_variable:
                    value = round(base + scale * zi, 2)
                    z[i] = (value - base) / scale  # the posterior reads the value as written
                    var_row[name] = value
                else:
                    var_row[name] = ""
            var_row["sex"] = p["sex"] if rx.random() >= spec.missing_variable else ""
        study_uid, accession = new_uid("study"), f"ACC{rng.integers(10**8, 10**9)}"
        key = study_uid if spec.key == "StudyInstanceUID" else accession
        if spec.variables:
            var_row[spec.key] = key
            variables.append(var_row)
        if has_image:
            meta = {"study_uid": study_uid, "accession": accession, "patient_name": p["name"],
                    "patient_id": p["id"], "birth_date": p["birth"], "sex": p["sex"],
                    "study_date": f"20{rng.integers(15, 25)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
                    "referrer": _name(rng)}
            mono1 = bool(rng.random() < spec.monochrome1)
            views = [("PA" if rng.random() < 0.6 else "AP", False)]
            if rng.random() < spec.lateral and spec.views == 1:
                views.append(("LL", True))
            if spec.views == 2:
                views = ([views[0]] if has_frontal else []) + ([("LL", True)] if has_lateral else [])
            for n_series, (view, is_lat) in enumerate(views, start=1):
                sop = new_uid("sop")
                cue = (lat if spec.views == 2 else np.zeros(k, int)) if is_lat else o
                img = _render(rng, spec.size, findings, cue, lateral=is_lat)
                _write_dicom(out / "dicom" / p["id"] / accession / f"{sop}.dcm", img,
                             {**meta, "sop": sop, "series_uid": new_uid("series"), "view": view,
                              "series_number": n_series}, mono1)
        if has_report:
            reports.append({spec.key: key, "report": _report(rng, findings, t)})
        labels.append({spec.key: key, "PatientID": p["id"], **dict(zip(label_cols, label_vals))})
        row = {spec.key: key, "has_image": int(has_image), "has_report": int(has_report)}
        for j, f in enumerate(findings):
            row[f"y_{f.name}"], row[f"image_cue_{f.name}"], row[f"report_cue_{f.name}"] = int(y[j]), int(o[j]), int(t[j])
        post = {"image": posterior(spec, o, None), "report": posterior(spec, None, t), "both": posterior(spec, o, t),
                "available": posterior(spec, o if has_frontal else None, t if has_report else None,
                                       lat if has_lateral else None, z)}
        if extended:
            if lat is not None:
                for j, f in enumerate(findings):
                    row[f"lateral_cue_{f.name}"] = int(lat[j])
            row["has_frontal"], row["has_lateral"] = int(has_frontal), int(has_lateral)
            row["n_variables"] = int(np.isfinite(z).sum()) if z is not None else 0
            groups = [g for g in GROUPS if (g != "lateral" or spec.views == 2) and (g != "variables" or z is not None)]
            for mask in range(1, 2 ** len(groups)):
                chosen = {g for i, g in enumerate(groups) if mask >> i & 1}
                post[subset_name(chosen)] = posterior(spec, o if "frontal" in chosen else None,
                                                      t if "report" in chosen else None,
                                                      lat if "lateral" in chosen else None,
                                                      z if "variables" in chosen else None)
        out_names = names if spec.task != "binary" else ["label"]
        for which, probs in post.items():
            for n, pr in zip(out_names, probs):
                row[f"p_{which}_{n}"] = round(float(pr), 6)
        truth.append(row)

    _write_csv(out / "reports.csv", reports, [spec.key, "report"])
    _write_csv(out / "labels.csv", labels, [spec.key, "PatientID"] + label_cols)
    _write_csv(out / "truth.csv", truth, list(truth[0]))
    if spec.variables:
        _write_csv(out / "variables.csv", variables, [spec.key] + var_names + ["sex"])
    broken = _add_corrupt(out / "dicom", spec.corrupt, rng) if spec.corrupt else []
    summary = {"spec": spec.__dict__, "label_columns": label_cols, "classes": names, "studies": spec.studies,
               "with_image": sum(r["has_image"] for r in truth), "with_report": sum(r["has_report"] for r in truth),
               "corrupt_files": broken,
               "variables": {"numeric": var_names, "categorical": {"sex": ["F", "M"]}} if spec.variables else None}
    (out / "synth.json").write_text(json.dumps(summary, indent=2))
    return summary


def _report(rng, findings, t: np.ndarray) -> str:
    cues = [rng.choice(f.hedged if lvl == 1 else f.stated) for f, lvl in zip(findings, t) if lvl > 0]
    indication = " ".join(cues) if cues else str(rng.choice(_BENIGN))
    body = " ".join(rng.choice(_FINDINGS_TEXT, size=int(rng.integers(2, 5)), replace=False))
    parts = [f"INDICATION: {indication}"]
    if rng.random() < 0.7:
        parts.append(f"COMPARISON: {rng.choice(['None.', 'XXXX.', 'Prior radiograph XXXX.'])}")
    parts.append(f"FINDINGS: {body}")
    parts.append(f"IMPRESSION: {rng.choice(_IMPRESSION)}")
    return "\n".join(parts)


def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _add_corrupt(dicom_dir: Path, n: int, rng) -> list[dict]:
    """Add `n` broken files: zero-byte, not DICOM, truncated pixel data, header cut short (cycled)."""
    import pydicom

    good = [p for p in sorted(dicom_dir.rglob("*.dcm"))
            if pydicom.dcmread(p, stop_before_pixels=True).get("ViewPosition") in ("PA", "AP")]
    made = []
    bad_dir = dicom_dir / "INCOMING"
    bad_dir.mkdir(exist_ok=True)
    for i in range(n):
        kind = ("zero_byte", "not_dicom", "truncated_pixels", "cut_header")[i % 4]
        path = bad_dir / f"broken_{i:03d}_{kind}.dcm"
        if kind == "zero_byte":
            path.write_bytes(b"")
        elif kind == "not_dicom":
            path.write_text("this is a scanner log, not an image\n")
        elif good:
            src = good[int(rng.integers(len(good)))].read_bytes()
            path.write_bytes(src[: len(src) - 4000] if kind == "truncated_pixels" else src[:200])
        made.append({"file": path.name, "kind": kind})
    return made
