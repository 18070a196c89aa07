"""One study's result in the forms a hospital files: a DICOM SR, a DICOM Secondary Capture, FHIR.

- :func:`structured_report`: a Comprehensive SR (``highdicom``) in the source study, holding per
  output the calibrated probability, the decision at the stored operating point and that point,
  ``p_without`` for each modality, the modalities used, each modality's share and attention weight,
  the image map's method and faithfulness verdict, the model's name, version and MLflow URI, any
  input that could not be read, and the statement that this is decision support, not a diagnosis.
  Concepts are coded in the private scheme ``99CLINFUSE`` (:data:`CODES`, listed in docs/pacs.md),
  decisions with SNOMED CT (Positive 10828004 / Negative 260385009), units with UCUM.
- :func:`heatmap_capture`: the heatmap over the source image, full size, as a Secondary Capture
  (``highdicom``) that names its source image (Source Image Sequence).
- :func:`fhir_report`: a FHIR DiagnosticReport with one contained Observation per output
  (``fhir.resources``, R4B models; only elements that R4 has too).

These carry the patient's own identifiers and UIDs (copied from the source images): they file into
that patient's study. They go to the PACS, the EHR and the run's ``--out`` folder, never to MLflow.
"""

from __future__ import annotations

import numpy as np

from .. import __version__

__all__ = ["structured_report", "heatmap_capture", "fhir_report", "CODES", "CODING_SCHEME", "DISCLAIMER",
           "ModelIdentity"]

CODING_SCHEME = "99CLINFUSE"
DISCLAIMER = ("Decision support, not a diagnosis: computed by a machine-learning model from the images and report "
              "of this study; to be read by a clinician together with the images and the clinical picture.")
MANUFACTURER = "clinfuse"

# private concept codes (scheme 99CLINFUSE); docs/pacs.md lists them for the PACS administrator
CODES = {
    "result": ("CF0001", "clinfuse decision-support result"),
    "model_name": ("CF0002", "Model name"),
    "model_version": ("CF0003", "Model version"),
    "model_uri": ("CF0004", "Model URI"),
    "output": ("CF0005", "Model output"),
    "output_name": ("CF0006", "Output name"),
    "probability": ("CF0007", "Calibrated probability"),
    "decision": ("CF0008", "Decision at the operating point"),
    "threshold": ("CF0009", "Operating point threshold"),
    "p_without_image": ("CF0010", "Probability without the image"),
    "p_without_report": ("CF0011", "Probability without the report"),
    "modalities_used": ("CF0012", "Modalities used"),
    "share_image": ("CF0013", "Share of the image in the explained output"),
    "share_report": ("CF0014", "Share of the report in the explained output"),
    "attention_image": ("CF0015", "Attention weight of the image"),
    "attention_report": ("CF0016", "Attention weight of the report"),
    "explained_output": ("CF0017", "Explained output"),
    "image_map_method": ("CF0018", "Image map method"),
    "image_map_faithfulness": ("CF0019", "Image map faithfulness"),
    "report_words_faithfulness": ("CF0020", "Report word scores faithfulness"),
    "source_image": ("CF0021", "Source image"),
    "heatmap": ("CF0022", "Heatmap overlay"),
    "input_problem": ("CF0023", "Input not read"),
    "top_words": ("CF0024", "Report words that raised the explained output most"),
    "image_token": ("CF0025", "Image read by the model"),
    "attention_image_token": ("CF0026", "Attention weight of this image"),
}
POSITIVE, NEGATIVE = ("10828004", "SCT", "Positive"), ("260385009", "SCT", "Negative")


class ModelIdentity:
    """How the results name the model: registered name, version, MLflow URI (from a loaded ``Model``)."""

    def __init__(self, model):
        uri = model.uri
        name = None
        if uri and uri.startswith("models:/"):
            name = uri[len("models:/"):].split("/")[0].split("@")[0]
        self.name = name or (model.dir.name if model.dir is not None else "clinfuse model")
        self.version = str(model.version) if model.version is not None else "unregistered"
        self.uri = uri or (f"runs:/{model.run_id}/model" if model.run_id else "local model folder")
        self.output_names = model.output_names
        self.thresholds = model.thresholds

    def line(self) -> str:
        return f"{self.name} version {self.version} ({self.uri})"


# Type 2 (present, may be empty) patient and study attributes that highdicom copies from the source
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber")


def header_of(ds):
    """The header of a source instance (no pixel data) with absent Type 2 patient/study attributes
    present and empty, as an SR or SC copying them needs (exports often drop StudyID or the referring
    physician)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    h = Dataset()
    for elem in ds:
        if elem.tag != 0x7FE00010:
            h.add(elem)
    h.file_meta = FileMetaDataset(getattr(ds, "file_meta", Dataset()))
    for kw in _TYPE2:
        if kw not in h:
            setattr(h, kw, "")
    return h


def _code(key: str):
    from pydicom.sr.coding import Code

    value, meaning = CODES[key]
    return Code(value, CODING_SCHEME, meaning)


def _unit():
    from pydicom.sr.coding import Code

    return Code("1", "UCUM", "no units")


def _verdict(f: dict | None) -> str | None:
    if not f:
        return None
    ok = f.get("better_than_random")
    nums = (f" (deletion area {f['deletion_area']:.3f} vs {f['random_area']:.3f} for random orders)"
            if isinstance(f.get("deletion_area"), (int, float)) and isinstance(f.get("random_area"), (int, float))
            else "")
    return ("better than random" if ok else "NOT better than random") + nums


def structured_report(sources: list, prediction, model: ModelIdentity, *, explanation=None, heatmap=None,
                      source_image=None, problems: list[str] | None = None, series_number: int = 990,
                      slot_images: list | None = None):
    """The SR of one study (a ``highdicom.sr.ComprehensiveSR``).

    Args:
        sources: pydicom datasets of the study's images that were read (headers suffice); the first
            gives the patient and study; all are recorded as evidence. At least one is needed.
        prediction: the study's :class:`clinfuse.inference.Prediction` (None: nothing could be read).
        model: :class:`ModelIdentity`.
        explanation: the study's :class:`clinfuse.explain.Explanation`, if made.
        heatmap: the Secondary Capture of the map (referenced from the SR and recorded as evidence).
        source_image: the instance the model read (referenced as the source image).
        problems: one line per input that could not be read.
        slot_images: for a model with several image slots, the instance in each slot (in slot order): each
            gets an "Image read by the model" container with its reference and its attention weight.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    if not sources:
        raise ValueError("an SR needs at least one source instance of the study (its patient and study)")
    items = [hd.sr.TextContentItem(Code("121106", "DCM", "Comment"), DISCLAIMER, relationship_type="CONTAINS"),
             hd.sr.TextContentItem(_code("model_name"), model.name, relationship_type="CONTAINS"),
             hd.sr.TextContentItem(_code("model_version"), model.version, relationship_type="CONTAINS"),
             hd.sr.TextContentItem(_code("model_uri"), model.uri, relationship_type="CONTAINS")]
    for line in problems or []:
        items.append(hd.sr.TextContentItem(_code("input_problem"), line[:1024], relationship_type="CONTAINS"))
    ok = prediction is not None and prediction.ok
    if ok:
        used = [m for m in ("image", "report") if prediction.used.get(m)]
        items.append(hd.sr.TextContentItem(_code("modalities_used"), ", ".join(used) or "none",
                                           relationship_type="CONTAINS"))
        for m in ("image", "report"):
            items.append(hd.sr.NumContentItem(_code(f"attention_{m}"), float(prediction.modality_weights[m]), _unit(),
                                              relationship_type="CONTAINS"))
        weights = list(prediction.image_weights or [])
        for ds, w in zip(slot_images or [], weights) if len(weights) > 1 else ():
            token = hd.sr.ContainerContentItem(_code("image_token"), relationship_type="CONTAINS")
            token.ContentSequence = hd.sr.ContentSequence([
                hd.sr.ImageContentItem(_code("source_image"), ds.SOPClassUID, ds.SOPInstanceUID,
                                       relationship_type="CONTAINS"),
                hd.sr.NumContentItem(_code("attention_image_token"), float(w), _unit(), relationship_type="CONTAINS")])
            items.append(token)
        for k, name in enumerate(model.output_names):
            p = prediction.probabilities[name]
            dec = POSITIVE if prediction.decisions[name] else NEGATIVE
            sub = [hd.sr.TextContentItem(_code("output_name"), name, relationship_type="CONTAINS"),
                   hd.sr.NumContentItem(_code("probability"), float(p), _unit(), relationship_type="CONTAINS"),
                   hd.sr.CodeContentItem(_code("decision"), Code(*dec), relationship_type="CONTAINS"),
                   hd.sr.NumContentItem(_code("threshold"), float(model.thresholds[k]), _unit(),
                                        relationship_type="CONTAINS")]
            for m in ("image", "report"):
                without = (prediction.p_without.get(m) or {}).get(name)
                if without is not None:
                    sub.append(hd.sr.NumContentItem(_code(f"p_without_{m}"), float(without), _unit(),
                                                    relationship_type="CONTAINS"))
            out = hd.sr.ContainerContentItem(_code("output"), relationship_type="CONTAINS")
            out.ContentSequence = hd.sr.ContentSequence(sub)
            items.append(out)
    if explanation is not None:
        e = explanation.data if hasattr(explanation, "data") else explanation
        items.append(hd.sr.TextContentItem(_code("explained_output"), e["explained_output"],
                                           relationship_type="CONTAINS"))
        for m in ("image", "report"):
            items.append(hd.sr.NumContentItem(_code(f"share_{m}"), float(e["modalities"]["share"][m]), _unit(),
                                              relationship_type="CONTAINS"))
        if e["image"].get("method") and e["modalities"]["present"]["image"]:
            items.append(hd.sr.TextContentItem(_code("image_map_method"), e["image"]["method"],
                                               relationship_type="CONTAINS"))
        for key, f in (("image_map_faithfulness", e["image"].get("faithfulness")),
                       ("report_words_faithfulness", e["report"].get("faithfulness"))):
            v = _verdict(f)
            if v:
                items.append(hd.sr.TextContentItem(_code(key), v, relationship_type="CONTAINS"))
        top = [w for w, s in sorted(e["report"]["words"], key=lambda t: -t[1])[:5] if s > 0]
        if top:
            items.append(hd.sr.TextContentItem(_code("top_words"), ", ".join(top)[:1024],
                                               relationship_type="CONTAINS"))
    src = sources[0]
    if source_image is not None:
        items.append(hd.sr.ImageContentItem(_code("source_image"), source_image.SOPClassUID,
                                            source_image.SOPInstanceUID, relationship_type="CONTAINS"))
    evidence = [header_of(d) for d in sources]
    if heatmap is not None:
        items.append(hd.sr.ImageContentItem(_code("heatmap"), heatmap.SOPClassUID, heatmap.SOPInstanceUID,
                                            relationship_type="CONTAINS"))
        evidence.append(heatmap)
    root = hd.sr.ContainerContentItem(_code("result"))
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=root, series_instance_uid=hd.UID(), series_number=series_number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, institution_name=getattr(src, "InstitutionName", None) or None)
    sr.SeriesDescription = "clinfuse result (decision support)"
    sr.SoftwareVersions = f"clinfuse {__version__}"
    return sr


def overlay_rgb(pixels: np.ndarray, amap: np.ndarray, method: str) -> np.ndarray:
    """The map resized to the image and blended over it: ``uint8 [H, W, 3]``.

    Args:
        pixels: the source image in [0, 1], ``[H, W]`` (the model's intensity scaling).
        amap: the attribution map at the model's input size, ``[h, w]``.
        method: 'gradcam' (non-negative, inferno) or a signed method (red raises, blue lowers).
    """
    import torch
    from matplotlib import colormaps

    h, w = pixels.shape
    a = torch.nn.functional.interpolate(torch.as_tensor(amap, dtype=torch.float32)[None, None], size=(h, w),
                                        mode="bilinear", align_corners=False)[0, 0].numpy()
    if method == "gradcam":
        a = np.clip(a, 0, None)
        lim = float(a.max()) or 1.0
        rgb = colormaps["inferno"](a / lim)[..., :3]
        alpha = 0.45 * (a / lim)[..., None]
    else:
        lim = float(np.abs(a).max()) or 1.0
        rgb = colormaps["RdBu_r"](0.5 + 0.5 * a / lim)[..., :3]
        alpha = 0.6 * (np.abs(a) / lim)[..., None]
    grey = np.repeat(np.clip(pixels, 0, 1)[..., None], 3, axis=-1)
    return np.round(255 * ((1 - alpha) * grey + alpha * rgb)).astype(np.uint8)


def heatmap_capture(source, pixels: np.ndarray, amap: np.ndarray, method: str, *, explained_output: str,
                    series_number: int = 991):
    """The heatmap over the full-size source image as a Secondary Capture in the source's study.

    Args:
        source: the pydicom dataset of the image the map is of.
        pixels: that image in [0, 1], ``[Rows, Columns]``.
        amap: the map at the model's input size.
    """
    import highdicom as hd
    from pydicom.dataset import Dataset

    orientation = tuple(getattr(source, "PatientOrientation", None) or ()) or None
    sc = hd.sc.SCImage.from_ref_dataset(
        header_of(source), overlay_rgb(pixels, amap, method), "RGB", 8, "PATIENT", hd.UID(), series_number, hd.UID(), 1,
        MANUFACTURER, patient_orientation=orientation if orientation and len(orientation) == 2 else ("L", "F"))
    if not (orientation and len(orientation) == 2):
        sc.PatientOrientation = None  # the source does not say; the overlay has its orientation, whatever it is
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = (f"clinfuse {method} attribution map for '{explained_output}', resized to the source "
                                "image and blended over it")
    sc.SeriesDescription = "clinfuse heatmap (decision support)"
    sc.ImageComments = DISCLAIMER
    sc.BurnedInAnnotation = "NO"
    sc.SoftwareVersions = f"clinfuse {__version__}"
    return sc


def fhir_report(source, prediction, model: ModelIdentity, *, sr_uid: str | None = None, explanation=None,
                problems: list[str] | None = None) -> dict:
    """A FHIR DiagnosticReport (JSON dict) with one contained Observation per output.

    The subject and the imaging study are referenced by the patient's own identifiers (PatientID,
    StudyInstanceUID, AccessionNumber) from `source`; validated by ``fhir.resources``.
    """
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    study_uid = str(source.StudyInstanceUID)
    ok = prediction is not None and prediction.ok
    observations, refs = [], []
    if ok:
        for k, name in enumerate(model.output_names):
            p, pos = prediction.probabilities[name], prediction.decisions[name]
            comps = [{"code": {"text": "operating point threshold"},
                      "valueQuantity": {"value": round(float(model.thresholds[k]), 6), "unit": "1",
                                        "system": "http://unitsofmeasure.org", "code": "1"}}]
            for m in ("image", "report"):
                without = (prediction.p_without.get(m) or {}).get(name)
                if without is not None:
                    comps.append({"code": {"text": f"probability without the {m}"},
                                  "valueQuantity": {"value": round(float(without), 6), "unit": "1",
                                                    "system": "http://unitsofmeasure.org", "code": "1"}})
            oid = f"obs-{k + 1}"
            observations.append({
                "resourceType": "Observation", "id": oid, "status": "preliminary",
                "code": {"coding": [{"system": "urn:clinfuse:output", "code": name, "display": name}],
                         "text": f"{name} (calibrated probability)"},
                "valueQuantity": {"value": round(float(p), 6), "unit": "1", "system": "http://unitsofmeasure.org",
                                  "code": "1"},
                "interpretation": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                    "code": "POS" if pos else "NEG", "display": "Positive" if pos else "Negative"}]}],
                "device": {"display": f"clinfuse model {model.line()}"},
                "component": comps,
            })
            refs.append({"reference": f"#{oid}"})
    lines = [DISCLAIMER, f"Model: {model.line()}."]
    if ok:
        used = [m for m in ("image", "report") if prediction.used.get(m)]
        lines.append(f"Modalities used: {', '.join(used) or 'none'}.")
        lines += [f"{n}: p = {prediction.probabilities[n]:.3f}, {'positive' if prediction.decisions[n] else 'negative'} "
                  f"at the operating point {model.thresholds[k]:.3f}." for k, n in enumerate(model.output_names)]
    else:
        lines.append("No result: " + (prediction.reason if prediction is not None else "no input could be read") + ".")
    lines += [f"Not read: {p}." for p in problems or []]
    if explanation is not None:
        e = explanation.data if hasattr(explanation, "data") else explanation
        v = _verdict(e["image"].get("faithfulness"))
        if v:
            lines.append(f"Image map ({e['image']['method']}): {v}.")
    identifiers = [{"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"}] if sr_uid else []
    accession = str(getattr(source, "AccessionNumber", "") or "")
    if accession:
        identifiers.append({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                 "code": "ACSN"}]}, "value": accession})
    subject = {"identifier": {"value": str(getattr(source, "PatientID", "") or "unknown")}}
    name = str(getattr(source, "PatientName", "") or "")
    if name:
        subject["display"] = name.replace("^", " ").strip()
    data = {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": "clinfuse decision-support result"},
        "subject": subject,
        "imagingStudy": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}],
        "conclusion": " ".join(lines),
        "contained": observations,
        "result": refs,
    }
    if identifiers:
        data["identifier"] = identifiers
    return DiagnosticReport.model_validate(data).model_dump(mode="json", exclude_none=True)
