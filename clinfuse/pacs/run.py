"""``clinfuse pacs run``: studies from the PACS -> prediction and explanation -> SR, SC and FHIR back.

Per study: retrieve its instances (WADO-RS), set aside each one that does not decode (the SR says
which and why), take its report from ``--reports`` (joined by StudyInstanceUID or AccessionNumber)
or else from a text SR stored in the study, predict and explain it with the model object, build the
SR, the heatmap Secondary Capture and the FHIR DiagnosticReport, keep local copies under ``--out``
and store the SR and SC into the same study as new series (STOW-RS). A study that fails (unknown,
nothing readable, a STOW rejection) is reported and the others go on.

``--out`` is inside the hospital's boundary, like the PACS: its DICOM and FHIR files carry the
patient's identifiers. Everything else (the console, the MLflow audit run and its artifacts) names
studies by a keyed pseudonym (``pacs-<hmac>``; the key and the pseudonym -> UID table live in
``--out/private/``) and is screened by the PHI guard against every identifier read from the headers
and against the PACS credentials.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ClinfuseError
from ..progress import progress as progress_of
from .client import PacsClient, PacsError
from .results import ModelIdentity, fhir_report, heatmap_capture, structured_report

__all__ = ["run_studies", "StudyResult", "RunSummary", "Pseudonyms", "study_sources", "predict_study",
           "predict_or_fail", "report_for"]

IDENTIFYING = {"PatientName": "patient_name", "PatientID": "patient_id", "PatientBirthDate": "birth_date",
               "StudyInstanceUID": "uid", "SeriesInstanceUID": "uid", "SOPInstanceUID": "uid",
               "AccessionNumber": "accession", "OtherPatientIDs": "other_id"}


class Pseudonyms:
    """Keyed pseudonyms for StudyInstanceUIDs (HMAC-SHA256 with a key kept in ``private/``)."""

    def __init__(self, private_dir: Path):
        self.dir = private_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        keyf = self.dir / "pseudonym.key"
        if not keyf.is_file():
            fd = os.open(keyf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        self._key = bytes.fromhex(keyf.read_text().strip())
        self.table = self.dir / "studies.csv"
        self._known: set[str] = set()  # pseudonyms already in the table, read once
        if self.table.is_file():
            with open(self.table, newline="") as f:
                self._known = {r["pseudonym"] for r in csv.DictReader(f)}

    def of(self, study_uid: str) -> str:
        return "pacs-" + hmac.new(self._key, study_uid.encode(), hashlib.sha256).hexdigest()[:16]

    def assign(self, study_uid: str) -> str:
        """The study's pseudonym, recorded in ``studies.csv`` the first time it is seen."""
        ps = self.of(study_uid)
        if ps not in self._known:
            fresh = not self.table.is_file()
            with open(self.table, "a", newline="") as f:
                w = csv.writer(f)
                if fresh:
                    w.writerow(["pseudonym", "StudyInstanceUID"])
                w.writerow([ps, study_uid])
            self._known.add(ps)
        return ps


@dataclass
class StudyResult:
    pseudonym: str
    status: str  # 'ok' (predicted), 'error' (no result), 'stored' is a separate flag
    reason: str = ""
    probabilities: dict = field(default_factory=dict)
    decisions: dict = field(default_factory=dict)
    used: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # instances set aside (reasons name SOP pseudonyms only)
    stored: bool = False
    store_error: str = ""
    fhir_posted: bool | None = None
    files: list[str] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)


@dataclass
class RunSummary:
    results: list[StudyResult]
    out: Path
    seconds: float

    def counts(self) -> dict:
        return {"studies": len(self.results), "predicted": sum(r.status == "ok" for r in self.results),
                "fhir_failed": sum(r.fhir_posted is False for r in self.results),
                "failed": sum(r.status != "ok" for r in self.results),
                "stored": sum(r.stored for r in self.results),
                "store_failed": sum(bool(r.store_error) for r in self.results),
                "instances_set_aside": sum(len(r.problems) for r in self.results)}

    def line(self) -> str:
        c = self.counts()
        return (f"{c['studies']} studies: {c['predicted']} predicted, {c['failed']} without a result, "
                f"{c['stored']} written back to the PACS, {c['store_failed']} refused by it, "
                f"{c['instances_set_aside']} instance(s) set aside; {self.seconds:.1f} s")


def _report_of_sr(ds) -> str | None:
    """The text of a report stored as a DICOM SR (its TEXT content items, in order), or None."""
    texts = []

    def walk(seq):
        for item in seq or []:
            if getattr(item, "ValueType", "") == "TEXT" and getattr(item, "TextValue", ""):
                texts.append(str(item.TextValue))
            walk(getattr(item, "ContentSequence", None))

    walk(getattr(ds, "ContentSequence", None))
    return "\n".join(texts) or None


def study_sources(datasets: list) -> tuple[list, str | None]:
    """Split a study's instances: (images, report text from an SR not made by clinfuse); clinfuse's
    own results (an earlier run's SR and SC) are neither."""
    images, report = [], None
    for ds in datasets:
        if str(getattr(ds, "Manufacturer", "")) == "clinfuse":
            continue
        if str(getattr(ds, "Modality", "")) == "SR":
            report = report or _report_of_sr(ds)
        else:
            images.append(ds)
    return images, report


def _bytes_of(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _scaled(pixels: np.ndarray, intensity: str) -> np.ndarray:
    """[H, W] in [0, 1] as the model scales intensities (percentile 0.5-99.5 or min-max)."""
    p = pixels.astype(np.float32)
    lo, hi = (np.percentile(p, 0.5), np.percentile(p, 99.5)) if intensity == "percentile" else (p.min(), p.max())
    return np.clip((p - lo) / ((hi - lo) or 1.0), 0, 1)


def predict_study(model, identity: ModelIdentity, datasets: list, report: str | None, pseudonym: str, *,
                  explain: bool = True) -> tuple[StudyResult, list, dict | None]:
    """Predict and explain one study given as pydicom datasets; returns (result, [SC, SR], FHIR dict).

    An instance that does not decode is set aside (named by its position and a reason) and the
    study goes on with the rest; with nothing readable the SR says so and carries no outputs.
    """
    from ..data.dicom import DicomReadError, read_dicom
    from ..data.studies import screen_pixels
    from ..inference import Study

    t = {}
    t0 = time.perf_counter()
    images, sr_report = study_sources(datasets)
    report = report if report else sr_report
    spec = model.input
    good, problems = [], []

    def not_read(k, ds, reason):
        problems.append(f"instance {k + 1} of {len(images)} ({getattr(ds, 'Modality', '?')}): not read: "
                        f"{' '.join(str(reason).split())[:300]}")

    encoded = []
    for k, ds in enumerate(images):
        try:
            encoded.append((k, ds, _bytes_of(ds)))
        except (ValueError, TypeError, AttributeError, OSError) as e:
            not_read(k, ds, f"{type(e).__name__}: {e}")
    # each instance is decoded first in a reading process, bounded in time and memory (a hostile instance
    # costs its own reason; done whatever cohort.dicom.verify_pixels says: a PACS instance is not a
    # cohort file the user has vouched for); the model decodes what passed (screen=False: screened),
    # and this process decodes only the one image the heatmap is drawn on
    verdicts = screen_pixels([(f"instance {k + 1}", data) for k, _, data in encoded], model.config.cohort.dicom)
    for (k, ds, data), why in zip(encoded, verdicts):
        if why:
            not_read(k, ds, why)
        else:
            good.append((ds, data))
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    study = Study([d for _, d in good], report, pseudonym)
    if not good and not report:
        from ..inference import Prediction

        why = "no image of the study could be read" if images else "the study holds no image"
        pred = Prediction(pseudonym, "error", f"{why}, and there is no report: nothing to predict from")
        exp = row = None
    else:  # read, decoded and preprocessed once for the prediction and its explanation
        pred, exp, row = model._predict_and_explain(study, explain=explain, screen=False)
    t["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = StudyResult(pseudonym, pred.status, pred.reason, dict(pred.probabilities), dict(pred.decisions),
                         dict(pred.used), problems)
    header_src = good[0][0] if good else (images[0] if images else (datasets[0] if datasets else None))
    if header_src is None:
        result.status, result.reason = "error", "the study holds no instance"
        return result, [], None
    sc = chosen = None
    slots = []
    if pred.ok and pred.used.get("image"):
        # '<dicom #k>': the images the model read, in slot order; the first is the one the map is drawn on
        slots = [int(label.split("#")[1].rstrip(">")) - 1 for label in row["image_paths"]]
        chosen = slots[0]
    if chosen is not None and exp is not None and exp.image_map is not None and spec.spatial_dims == 2:
        try:
            shown = read_dicom(f"instance {chosen + 1}", voi=spec.voi, window=spec.window, channels=1,
                               data=good[chosen][1]).pixels[0]
            sc = heatmap_capture(good[chosen][0], _scaled(shown, spec.intensity), exp.image_map,
                                 exp["image"]["method"], explained_output=exp["explained_output"])
        except (DicomReadError, ValueError, TypeError, AttributeError, OSError) as e:  # the model read it; cannot happen
            problems.append(f"heatmap not drawn: {e.reason if isinstance(e, DicomReadError) else f'{type(e).__name__}: {e}'}")
    sources = [ds for ds, _ in good] or [header_src]
    sr = structured_report(sources, pred if pred.ok else None, identity, explanation=exp, heatmap=sc,
                           source_image=good[chosen][0] if chosen is not None else None,
                           problems=problems + ([] if pred.ok else [f"no result: {pred.reason}"]),
                           slot_images=[good[k][0] for k in slots])
    fhir = fhir_report(header_src, pred, identity, sr_uid=str(sr.SOPInstanceUID), explanation=exp, problems=problems)
    t["encode"] = time.perf_counter() - t0
    result.seconds = t
    return result, [x for x in (sc, sr) if x is not None], fhir


def load_report_table(path: str | Path, cfg) -> dict[str, str]:
    """Reports keyed by StudyInstanceUID and, where the file has the column, by AccessionNumber."""
    from ..data.reports import load_reports

    p = Path(path)
    head = p.read_text(errors="replace").splitlines()[:1] if p.is_file() else []
    keys = [k for k in ("StudyInstanceUID", "AccessionNumber") if not head or k in head[0]]
    if not keys:
        raise ClinfuseError(f"{p}: the reports need a StudyInstanceUID or AccessionNumber column to be joined "
                            "with the PACS's studies")
    table = {}
    for k in keys:
        for key, rep in load_reports(p, k, cfg).reports.items():
            table[f"{k}={key}"] = rep.text
    return table


def report_for(table: dict[str, str], uid: str, datasets: list) -> str | None:
    """The study's report from a :func:`load_report_table` table: by StudyInstanceUID, else by accession."""
    acc = next((str(d.AccessionNumber) for d in datasets if getattr(d, "AccessionNumber", "")), None)
    return table.get(f"StudyInstanceUID={uid}") or (table.get(f"AccessionNumber={acc}") if acc else None)


def predict_or_fail(model, identity: ModelIdentity, datasets: list, report: str | None, pseudonym: str, *,
                    explain: bool = True) -> tuple[StudyResult, list, dict | None]:
    """:func:`predict_study`, with any failure of this one study turned into its result (never raised)."""
    try:
        return predict_study(model, identity, datasets, report, pseudonym, explain=explain)
    except Exception as e:  # noqa: BLE001 - one study's failure never stops the others
        return StudyResult(pseudonym, "error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"), [], None


def add_identifiers(ids: dict[str, set[str]], datasets: list) -> None:
    """Gather the identifying header values of `datasets` into `ids` (kind -> values) for the PHI guard."""
    from pydicom.multival import MultiValue

    for ds in datasets:
        for kw, kind in IDENTIFYING.items():
            v = getattr(ds, kw, None)
            if v:
                ids.setdefault(kind, set()).update(str(x) for x in (v if isinstance(v, (list, tuple, MultiValue))
                                                                     else [v]))


def _guard(ids: dict[str, set[str]], credentials):
    from ..phi import PhiGuard

    kinds = {k: sorted(v) for k, v in ids.items()}
    kinds["other_id"] = kinds.get("other_id", []) + list(credentials.secrets)
    return PhiGuard(kinds)


def run_studies(model, client: PacsClient, study_uids: list[str], out: str | Path, *, reports: str | Path | None = None,
                explain: bool = True, store: bool = True, fhir_url: str | None = None,
                tracking_uri: str | None = None, track: bool = True, progress: bool = True,
                log=print) -> RunSummary:
    """The loop of ``clinfuse pacs run`` (see the module doc).

    Raises:
        PacsError: the PACS cannot be reached or refuses the credentials (before any study).
    """
    t_start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ClinfuseError(f"{out}: not writable; choose another --out")
    client.check()
    if track:
        from ..tracking.mlflow_tracker import check_access, resolve_tracking_uri

        check_access(resolve_tracking_uri(tracking_uri))  # the audit run's store, before any study
    table = load_report_table(reports, model.config.cohort.reports) if reports else {}
    pseud = Pseudonyms(out / "private")
    identity = ModelIdentity(model)
    results, ids = [], {}
    for uid in progress_of(list(dict.fromkeys(study_uids)), "pacs run", "study", enabled=progress):
        ps = pseud.assign(uid)
        t0 = time.perf_counter()
        try:
            listing = client.instances(uid)
            datasets = [client.retrieve(*ref) for ref in listing]
        except PacsError as e:
            results.append(StudyResult(ps, "error", f"not retrieved: {_strip(str(e), [uid])}"))
            log(f"{ps}: not retrieved ({_strip(str(e), [uid])})")
            continue
        t_net = time.perf_counter() - t0
        add_identifiers(ids, datasets)  # the values, not the datasets: the pixels are not kept for the run
        res, new, fhir = predict_or_fail(model, identity, datasets, report_for(table, uid, datasets), ps,
                                         explain=explain)
        res.seconds["retrieve"] = t_net
        deliver(res, new, fhir, out, (lambda dss, u=uid: client.store(dss, u)) if store else None,
                fhir_url=fhir_url, verify=client.verify, log=log, hide=[uid])
        results.append(res)
        log(_line(res, model.output_names))
    summary = RunSummary(results, out, time.monotonic() - t_start)
    _write_results(out, summary, model.output_names)
    if track:
        _audit(summary, identity, client, ids, tracking_uri, explain=explain)
    return summary


def deliver(res: StudyResult, new: list, fhir: dict | None, out: Path, send, *, fhir_url: str | None = None,
            verify=True, log=print, hide: list[str] = ()) -> None:
    """Keep local copies of a study's results under ``out/<pseudonym>/``, then send the SR and SC
    (``send(datasets)``: STOW-RS or C-STORE; None: keep them local) and POST the FHIR report. A refusal
    is recorded in `res` and logged; the local copies stay."""
    folder = out / res.pseudonym
    folder.mkdir(exist_ok=True)
    for ds in new:
        name = "sr.dcm" if str(ds.Modality) == "SR" else "heatmap_sc.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        res.files.append(f"{res.pseudonym}/{name}")
    if fhir is not None:
        (folder / "fhir_diagnostic_report.json").write_text(json.dumps(fhir, indent=2))
        res.files.append(f"{res.pseudonym}/fhir_diagnostic_report.json")
    t0 = time.perf_counter()
    if send is not None and new:
        try:
            send(new)
            res.stored = True
        except PacsError as e:
            res.store_error = _strip(str(e), list(hide))
            log(f"{res.pseudonym}: the results were refused ({res.store_error}); local copies kept in {folder}")
    if fhir is not None and fhir_url:
        res.fhir_posted = _post_fhir(fhir_url, fhir, verify)
    res.seconds["store"] = time.perf_counter() - t0


def _strip(text: str, values: list[str]) -> str:
    for v in values:
        text = text.replace(v, "<study>")
    return text


def _line(r: StudyResult, names: list[str]) -> str:
    if r.status != "ok":
        return f"{r.pseudonym}: no result ({r.reason})"
    ps = ", ".join(f"p({n}) = {r.probabilities[n]:.3f}{' +' if r.decisions[n] else ''}" for n in names)
    used = "+".join(m for m in ("image", "report") if r.used.get(m)) or "nothing"
    extra = f"; {len(r.problems)} instance(s) set aside" if r.problems else ""
    return f"{r.pseudonym}: {ps} from {used}{extra}; {'stored in the PACS' if r.stored else 'not stored'}"


def _post_fhir(url: str, resource: dict, verify=True) -> bool:
    import requests

    headers = {"Content-Type": "application/fhir+json"}
    if os.environ.get("CLINFUSE_FHIR_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['CLINFUSE_FHIR_TOKEN']}"
    try:
        r = requests.post(url.rstrip("/") + "/DiagnosticReport", data=json.dumps(resource), timeout=30,
                          headers=headers, verify=verify)
        return r.status_code in (200, 201)
    except requests.exceptions.RequestException:
        return False


def _write_results(out: Path, summary: RunSummary, names: list[str]) -> None:
    cols = ["study", "status", "reason"] + [f"p_{n}" for n in names] + [f"pred_{n}" for n in names] + \
        ["used_image", "used_report", "instances_set_aside", "stored", "store_error", "fhir_posted"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in summary.results:
            w.writerow([r.pseudonym, r.status, r.reason] + [f"{r.probabilities.get(n, float('nan')):.6f}" for n in names]
                       + [int(r.decisions[n]) if n in r.decisions else -1 for n in names]
                       + [int(bool(r.used.get("image"))), int(bool(r.used.get("report"))), len(r.problems),
                          int(r.stored), r.store_error, "" if r.fhir_posted is None else int(r.fhir_posted)])
    (out / "run.json").write_text(json.dumps({"format": "clinfuse-pacs-run/1", **summary.counts(),
                                              "seconds": round(summary.seconds, 3),
                                              "per_study_seconds": [r.seconds for r in summary.results]}, indent=2))


def _audit(summary: RunSummary, identity: ModelIdentity, client: PacsClient, ids: dict[str, set[str]],
           tracking_uri: str | None, *, explain: bool) -> None:
    """One MLflow run per PACS run: counts, timings, the results table (pseudonyms only), screened."""
    from ..tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker(tracking_uri, experiment="clinfuse-pacs", guard=_guard(ids, client.credentials),
                            run_name="pacs-run", system_metrics=False)
    try:
        tracker.set_tags({"clinfuse.kind": "pacs-run", "clinfuse.model_uri": identity.uri,
                          "clinfuse.model_version": identity.version})
        tracker.log_params({"model": identity.name, "pacs_url": client.url, "studies": len(summary.results),
                            "explain": explain})
        c = summary.counts()
        tracker.log_metrics({**{k: float(v) for k, v in c.items()}, "seconds": summary.seconds,
                             "studies_per_minute": 60 * len(summary.results) / max(summary.seconds, 1e-9)}, step=0)
        tracker.log_artifact(summary.out / "results.csv")
        tracker.log_artifact(summary.out / "run.json")
    except BaseException:
        tracker.close("FAILED")
        raise
    tracker.close()
