"""The trained model as one object: load it from wherever it lives, give it what the hospital has.

``Model.load(ref)`` takes a model folder, a training run folder (its ``best/``), or an MLflow URI
(``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model``). The object carries what
every consumer needs as typed attributes (config, task, output names, operating points,
temperature, input spec, tokenizer, where it came from) and does the work:

- ``preprocess(study)``: DICOM files (paths, bytes or pydicom datasets) and report text -> the batch
  contract, through the very code path of the validation dataset (``clinfuse.data.dataset``);
- ``predict(studies)``: calibrated probabilities, decisions at the stored operating points, modality
  weights and ``p_without`` per study; a study that cannot be read gets a status with the reason and
  the rest of the batch goes on;
- ``explain(study)``: a :class:`clinfuse.explain.Explanation` (Captum maps, word scores, Shapley
  shares, faithfulness), rendered and saved by the object itself;
- ``predict_and_explain(study)``: both from one read and decode of the study's files.

Evaluation, explanation, ``clinfuse predict``, the served MLflow model, the demo and the studies
all use this object, loaded once per command.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..data.dataset import GREY_PHOTOMETRICS, StudyDataset, image_item
from ..data.reports import prepare_report
from ..errors import ClinfuseError, ModelLoadError, StudyInputError
from ..models.model import FusionModel, load_model, probabilities, recover_folder, save_model, study_kwargs
from .run import hide_modality, to_device

__all__ = ["Model", "Study", "Prediction", "Predictions", "InputSpec", "MAX_REPORT_CHARS"]

MAX_REPORT_CHARS = 1_000_000  # a radiology report is a few kB; anything near this is not one


@dataclass(frozen=True)
class InputSpec:
    """What the model reads: image channels, size and intensity handling, the view policy, text length."""

    channels: int
    image_size: tuple[int, ...]
    spatial_dims: int
    voi: str  # cohort.dicom.voi: none | file | window
    window: tuple[float, float] | None  # (center, width) when voi == 'window'
    intensity: str  # data.intensity: percentile | minmax scaling to [0, 1]
    view_policy: str  # cohort.dicom.view_policy: frontal | all
    frontal_views: tuple[str, ...]
    modalities: tuple[str, ...]
    photometrics: tuple[str, ...] | None  # accepted PhotometricInterpretation values (None: any)
    max_length: int
    long_text: str
    max_chunks: int

    @classmethod
    def from_config(cls, cfg: Config) -> "InputSpec":
        d = cfg.cohort.dicom
        return cls(channels=cfg.model.image.in_channels, image_size=tuple(cfg.data.image_size),
                   spatial_dims=cfg.model.image.spatial_dims, voi=d.voi,
                   window=(d.window_center, d.window_width) if d.voi == "window" else None,
                   intensity=cfg.data.intensity, view_policy=d.view_policy, frontal_views=tuple(d.frontal_views),
                   modalities=tuple(d.modalities),
                   photometrics=GREY_PHOTOMETRICS if cfg.model.image.in_channels == 1 else None,
                   max_length=cfg.model.text.max_length, long_text=cfg.model.text.long_text,
                   max_chunks=cfg.model.text.max_chunks)


@dataclass
class Study:
    """One study as the hospital has it.

    Args:
        images: DICOM files of the study: paths, bytes of files, or pydicom datasets (may be empty).
        report: the report's raw text (None or "" when there is none).
        study_id: how results name the study (default: its position in the batch).
        variables: structured clinical variables, name -> number or category (None or {} when there
            are none; a name the model does not read is refused, a missing one is missing).
    """

    images: list = field(default_factory=list)
    report: str | None = None
    study_id: str | None = None
    variables: dict | None = None

    @classmethod
    def coerce(cls, x, i: int = 0) -> "Study":
        """A Study from a Study, a dict (``images``/``dicom``, ``report``, ``study_id``) or a DICOM path."""
        if isinstance(x, Study):
            s = x
        elif isinstance(x, dict):
            unknown = set(x) - {"images", "dicom", "report", "study_id", "variables"}
            if unknown:
                raise StudyInputError(f"study #{i + 1}: unknown key(s) {sorted(unknown)}; use images, report, "
                                      "variables, study_id")
            imgs = x.get("images", x.get("dicom"))
            s = Study(list(imgs) if isinstance(imgs, (list, tuple)) else ([imgs] if imgs is not None else []),
                      x.get("report"), x.get("study_id"), x.get("variables"))
        elif isinstance(x, (str, Path, bytes)):
            s = Study([x])
        else:
            raise StudyInputError(f"study #{i + 1}: a {type(x).__name__} is not a study (give a Study or a dict)")
        if s.variables is not None and not isinstance(s.variables, dict):
            raise StudyInputError(f"study #{i + 1}: variables must be a mapping of name to value, not "
                                  f"{type(s.variables).__name__}")
        if s.study_id is None:
            s = Study(list(s.images), s.report, f"study-{i + 1}", s.variables)
        return s


@dataclass
class Prediction:
    """The result for one study. ``status`` is 'ok' or 'error' (then ``reason`` says why and the
    numbers are empty); an 'ok' study with a ``reason`` was predicted from its other images, the reason
    naming each file set aside and why."""

    study_id: str
    status: str
    reason: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    decisions: dict[str, bool] = field(default_factory=dict)
    modality_weights: dict[str, float] = field(default_factory=dict)  # per group: image, report[, variables]
    # per output, the probability with that modality hidden and the others kept (None unless the study
    # has it and at least one other)
    p_without: dict[str, dict[str, float] | None] = field(default_factory=dict)
    used: dict[str, bool] = field(default_factory=dict)  # which modalities the model read
    image_weights: list[float] = field(default_factory=list)  # per image slot, for a model with several

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Predictions(list):
    """A list of :class:`Prediction` with ``to_frame()``."""

    def __init__(self, items, output_names: list[str], groups=("image", "report")):
        super().__init__(items)
        self.output_names = list(output_names)
        self.groups = tuple(groups)  # the model's modality groups: a column each in to_frame

    def to_frame(self):
        """One row per study: ``study_id``, ``status``, ``reason``, ``p_<output>``, ``pred_<output>``,
        ``w_image``, ``w_report``, ``p_<output>_without_image``, ``p_<output>_without_report`` (and
        ``w_variables``, ``p_<output>_without_variables`` for a model that reads variables)."""
        import pandas as pd

        rows = []
        for p in self:
            r = {"study_id": p.study_id, "status": p.status, "reason": p.reason}
            for n in self.output_names:
                r[f"p_{n}"] = p.probabilities.get(n, math.nan)
                r[f"pred_{n}"] = int(p.decisions[n]) if n in p.decisions else -1
            for m in self.groups:
                r[f"w_{m}"] = p.modality_weights.get(m, math.nan)
            for m in self.groups:
                without = p.p_without.get(m) or {}
                for n in self.output_names:
                    r[f"p_{n}_without_{m}"] = without.get(n, math.nan)
            rows.append(r)
        return pd.DataFrame(rows)


class Model:
    """A trained clinfuse model (see the module doc). Build it with :meth:`load`.

    Attributes:
        network: the ``FusionModel`` (eval mode).
        config: the resolved configuration it was trained with.
        task: 'binary', 'multiclass' or 'multilabel'.
        output_names, class_names, label_columns: what its outputs mean.
        thresholds, temperature, operating_point: calibration fitted on validation.
        input: the :class:`InputSpec`.
        tokenizer: the report tokenizer (None for an image-only model).
        dir, uri, version, run_id: where it came from (None where unknown).
    """

    def __init__(self, network: FusionModel, meta: dict, tokenizer=None, *, dir: str | Path | None = None,
                 uri: str | None = None, version: str | None = None, run_id: str | None = None,
                 tracking_uri: str | None = None, device: str | torch.device = "cpu"):
        self.network = network.eval()
        self.meta = meta
        self.config = Config.model_validate(meta["config"])
        self.tokenizer = tokenizer
        self.dir = Path(dir) if dir is not None else None
        self.uri, self.version, self.run_id, self.tracking_uri = uri, version, run_id, tracking_uri
        self.input = InputSpec.from_config(self.config)
        self.device = torch.device(device)
        self.network.to(self.device)

    # ------------------------------------------------------------------ typed views of model.json
    task = property(lambda self: self.meta["task"])
    output_names = property(lambda self: list(self.meta["output_names"]))
    class_names = property(lambda self: list(self.meta["class_names"]))
    label_columns = property(lambda self: list(self.meta["label_columns"]))
    temperature = property(lambda self: float(self.meta.get("temperature", 1.0)))
    thresholds = property(lambda self: [float(t) for t in self.meta.get("thresholds", [0.5] * len(self.output_names))])
    operating_point = property(lambda self: self.meta.get("operating_point"))
    cohort_fingerprint = property(lambda self: self.meta.get("cohort_fingerprint"))

    @property
    def ref(self) -> dict:
        """How explanations and logs cite the model."""
        return {"dir": str(self.dir) if self.dir and not self.uri else None, "uri": self.uri,
                "version": self.version, "run_id": self.run_id}

    def __repr__(self) -> str:
        where = self.uri or self.dir
        return (f"Model({self.task}, outputs={self.output_names}, fusion={self.config.model.fusion.kind}, "
                f"image={self.config.model.image.name}, text={self.config.model.text.name_or_path}, from={where})")

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(cls, ref: str | Path, *, tracking_uri: str | None = None, device: str = "cpu") -> "Model":
        """Load a model from a folder, a training run folder, or an MLflow model URI.

        Args:
            ref: a model folder (holds ``model.json``), a run folder from ``clinfuse train --out``
                (its ``best/`` is taken), ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
                ``runs:/RUN_ID/model``.
            tracking_uri: the MLflow store for URIs (default: MLFLOW_TRACKING_URI, else ./mlflow.db).
            device: where the network runs.

        Raises:
            ModelLoadError: `ref` names no clinfuse model (the message says what was looked for).
        """
        s = str(ref)
        p = Path(s)
        if ":/" not in s:
            recover_folder(p)  # a save killed half-way: the previous folder comes back
        if p.is_dir():
            for folder in (p / "best", p / "last"):
                recover_folder(folder)
            run_dir = None
            if (p / "model.json").is_file():
                model_dir = p
                run_dir = p.parent if (p.parent / "mlflow_run.json").is_file() else None
            elif (p / "best" / "model.json").is_file():
                model_dir, run_dir = p / "best", p
            elif (p / "last" / "model.json").is_file():
                raise ModelLoadError(f"{p}: this run has no best/ model yet (only last/); pass {p / 'last'} "
                                     "to use the last epoch's weights")
            else:
                raise ModelLoadError(f"{p}: not a clinfuse model folder (no model.json) nor a training run folder "
                                     "(no best/model.json)")
            run = {}
            if run_dir is not None and (run_dir / "mlflow_run.json").is_file():
                run = json.loads((run_dir / "mlflow_run.json").read_text())
            net, meta, tok = load_model(model_dir)
            return cls(net, meta, tok, dir=model_dir, run_id=run.get("run_id"), tracking_uri=run.get("tracking_uri"),
                       device=device)
        if ":/" not in s:
            raise ModelLoadError(f"{s}: no such folder, and not an MLflow URI (models:/NAME/VERSION, "
                                 "models:/NAME@ALIAS, runs:/RUN_ID/model)")
        from ..tracking.mlflow_tracker import check_access, describe_model_uri, resolve_model, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        check_access(uri)  # an unreachable server or refused credentials: one line, before anything else
        model_dir = resolve_model(s, uri)
        info = describe_model_uri(s, uri)
        net, meta, tok = load_model(model_dir)
        return cls(net, meta, tok, dir=model_dir, uri=s, version=info.get("version"), run_id=info.get("run_id"),
                   tracking_uri=uri, device=device)

    def save(self, out_dir: str | Path) -> Path:
        """Write the model folder (``model.safetensors``, ``model.json``, ``text/``) to `out_dir`."""
        hf = self.network.text_encoder.bert.config if self.network.text_encoder is not None else None
        meta = {k: v for k, v in self.meta.items() if k not in ("format", "clinfuse_version", "weights_sha256")}
        out = save_model(self.network, out_dir, meta, self.tokenizer, hf)
        self.meta = json.loads((out / "model.json").read_text())  # what was written: the new weights' checksum
        if self.dir is None:
            self.dir = out
        return out

    def set_calibration(self, temperature: float, thresholds: list[float], operating_point: dict | None = None) -> None:
        """Store a temperature and operating points (in memory and, for a model folder, in its model.json)."""
        values = {"temperature": float(temperature), "thresholds": [float(t) for t in thresholds]}
        if operating_point is not None:
            values["operating_point"] = operating_point
        self.meta.update(values)
        if self.dir is not None and (self.dir / "model.json").is_file():
            import os

            stored = json.loads((self.dir / "model.json").read_text())
            stored.update(values)
            tmp = self.dir / f".model.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(stored, indent=2))
            os.replace(tmp, self.dir / "model.json")

    # ------------------------------------------------------------------ data
    def info(self) -> dict:
        """The cohort facts the dataset needs (task, label columns, classes)."""
        return {"task": self.task, "label_columns": self.label_columns, "classes": self.class_names}

    def dataset(self, rows: list[dict], *, check_input: bool = False, progress: bool = False) -> StudyDataset:
        """The model's dataset over cohort rows (or rows made by :meth:`row`), decoded lazily.

        Args:
            check_input: refuse images whose photometric interpretation does not fit the model
                (the model object's own inputs; cohort rows were checked when the cohort was built).
        """
        cfg = self.config
        if cfg.data.cache != "none":
            cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": "none"})})
        return StudyDataset(rows, self.info(), cfg, self.tokenizer, progress=progress,
                            photometrics=self.input.photometrics if check_input else None,
                            variables=self.variables)

    @property
    def variables(self):
        """The structured variables the model reads (a ``VariableSpec``; None when it reads none)."""
        net = self.network
        return net.variable_spec if getattr(net, "variables_encoder", None) is not None else None

    @property
    def groups(self) -> tuple[str, ...]:
        """The modality groups of the model: image, report[, variables]."""
        return self.network.group_names

    def row(self, study: Study | dict, *, screen: bool = True) -> dict:
        """A cohort-like row for one study: the images the cohort builder would choose, the report as
        the cohort builder would prepare it. With `screen` (and ``cohort.dicom.verify_pixels``) each chosen
        image is decoded first in a reading process, bounded in time and memory; a caller that has screened
        the images itself passes ``screen=False``.

        Raises:
            StudyInputError: the report is too long, or no source is a usable DICOM image.
        """
        s = Study.coerce(study)
        text = ""
        if isinstance(s.report, float) and math.isnan(s.report):  # a missing cell of a DataFrame
            s = Study(list(s.images), None, s.study_id)
        if s.report:
            if not isinstance(s.report, str):
                raise StudyInputError(f"{s.study_id}: the report must be text, not {type(s.report).__name__}")
            if len(s.report) > MAX_REPORT_CHARS:
                raise StudyInputError(f"{s.study_id}: report of {len(s.report):,} characters exceeds the limit of "
                                      f"{MAX_REPORT_CHARS:,}; send the report text only")
            text = prepare_report(s.report, self.config.cohort.reports)
        try:
            img = image_item(list(s.images), self.config.cohort.dicom,
                             screen=screen and self.config.cohort.dicom.verify_pixels)
        except StudyInputError as e:
            raise StudyInputError(f"{s.study_id}: {e}") from None
        if img["image_present"] and img["kind"] == "3d" and self.input.spatial_dims == 2:
            raise StudyInputError(f"{s.study_id}: a 3D series was given to a 2D model")
        variables = dict(s.variables or {})
        if variables:
            spec = self.variables
            if spec is None:
                raise StudyInputError(f"{s.study_id}: this model reads no structured variables; send images and "
                                      "report only")
            bad = spec.problems(variables)
            if bad:
                raise StudyInputError(f"{s.study_id}: variables the model cannot read: {', '.join(bad)} (it reads "
                                      f"numeric {list(spec.numeric)}, categorical {dict(spec.categorical)})")
        row = {"study_id": s.study_id, "patient_id": "", "split": "", "report": text, "report_present": bool(text),
               "modality": "", "n_images": len(img["image_paths"]), **img, "variables": variables}
        for c in self.label_columns:
            row[c] = 0
        return row

    def preprocess(self, study: Study | dict, *, screen: bool = True) -> dict:
        """One study -> the batch contract with a batch dimension of 1 (``image [1, C, *S]``, ...).

        Raises:
            StudyInputError / DicomReadError: the study cannot be read (the message says why).
        """
        try:
            item = self.dataset([self.row(study, screen=screen)], check_input=True)[0]
        except RuntimeError as e:  # MONAI wraps a transform's error
            inner = _clinfuse_cause(e)
            if inner is not None:
                raise inner from None
            raise
        _check_finite(item)
        return _collate([item])

    # ------------------------------------------------------------------ prediction
    def predict(self, studies, *, batch_size: int = 16, progress: bool = False, screen: bool = True) -> Predictions:
        """Predict studies (:class:`Study` objects, dicts or DICOM paths).

        A study that cannot be read (not DICOM, no pixels, non-finite values, a photometric the
        model does not read, a report over the size limit) gets ``status='error'`` and its reason;
        the others go on.
        """
        studies = [Study.coerce(s, i) for i, s in enumerate(studies)]
        results: list[Prediction | None] = [None] * len(studies)
        rows, where = [], []
        for i, s in enumerate(studies):
            try:
                rows.append(self.row(s, screen=screen))
                where.append(i)
            except ClinfuseError as e:
                results[i] = Prediction(s.study_id, "error", _one_line(e))
        for i, pred in zip(where, self.predict_rows(rows, batch_size=batch_size, progress=progress, check_input=True)):
            results[i] = pred
        return Predictions(results, self.output_names, self.groups)

    def predict_rows(self, rows: list[dict], *, batch_size: int = 16, progress: bool = False,
                     check_input: bool = False) -> Predictions:
        """Predict cohort rows (``read_cohort``) or rows made by :meth:`row`; per-study status as in :meth:`predict`."""
        from tqdm.auto import tqdm

        results: list[Prediction | None] = [None] * len(rows)
        ds = self.dataset(rows, check_input=check_input) if rows else None
        bar = tqdm(total=len(rows), desc="predict", unit="study", disable=None if progress else True)
        batch: list[tuple[int, dict]] = []
        for j in range(len(rows)):
            try:
                item = ds[j]
                _check_finite(item)
                batch.append((j, item))
            except Exception as e:  # noqa: BLE001 - a file pydicom or a decoder chokes on stops this study only
                results[j] = Prediction(rows[j]["study_id"], "error", _reason(e))
            if batch and (len(batch) == batch_size or j == len(rows) - 1):
                for (k, _), pred in zip(batch, self._predict_items([it for _, it in batch])):
                    results[k] = _note_set_aside(pred, rows[k])
                bar.update(len(batch))
                batch = []
        bar.close()
        return Predictions(results, self.output_names, self.groups)

    @torch.no_grad()
    def forward_batch(self, batch: dict, hide: str | None = None) -> dict:
        """Network outputs on a collated batch, with one group ('image', 'report', 'variables') hidden
        on purpose if asked; also ``logits_without_<group>`` for each group (features encoded once)
        and ``present`` per group."""
        net = self.network
        b = hide_modality(to_device(batch, self.device), hide)
        feats, present = net.encode(b["image"], b["image_present"], b["input_ids"], b["attention_mask"],
                                    b["text_present"], **study_kwargs(b))
        lex = net.lexical_logits(b["input_ids"], b["attention_mask"])
        out = net.fuse(feats, present, lex)
        out["present"] = net.group_presence(present)
        for g, name in enumerate(net.group_names):
            out[f"logits_without_{name}"] = net.fuse(feats, present & ~net.group_mask[g], lex)["logits"]
        return out

    def probabilities(self, logits) -> np.ndarray:
        """Calibrated probabilities (the stored temperature) from logits."""
        return probabilities(torch.as_tensor(logits).float().cpu(), self.task, self.temperature).numpy()

    def _predict_items(self, items: list[dict]) -> list[Prediction]:
        out = self.forward_batch(_collate(items))
        groups = self.groups
        probs = self.probabilities(out["logits"])
        without = {m: self.probabilities(out[f"logits_without_{m}"]) for m in groups}
        w = out["modality_weights"].float().cpu().numpy()
        tw = out["token_weights"].float().cpu().numpy()
        n_img = self.network.layout.n_images
        present = out["present"].cpu().numpy()
        names, th = self.output_names, self.thresholds
        preds = []
        for r, item in enumerate(items):
            shown = int(present[r].sum())
            preds.append(Prediction(
                item["study_id"], "ok", "",
                probabilities={n: float(probs[r, k]) for k, n in enumerate(names)},
                decisions={n: bool(probs[r, k] >= th[k]) for k, n in enumerate(names)},
                modality_weights={m: float(w[r, g]) for g, m in enumerate(groups)},
                p_without={m: ({n: float(without[m][r, k]) for k, n in enumerate(names)}
                               if present[r, g] and shown >= 2 else None) for g, m in enumerate(groups)},
                used={m: bool(present[r, g]) for g, m in enumerate(groups)},
                image_weights=[float(x) for x in tw[r, :n_img]] if n_img > 1 else []))
        return preds

    # ------------------------------------------------------------------ explanation
    def explain(self, study: Study | dict, *, method: str | None = None, steps: int | None = None,
                target: str | int | None = None, screen: bool = True):
        """Explain one study: a :class:`clinfuse.explain.Explanation` (``.to_json()``, ``.html()``, ``.save(dir)``).

        Args:
            method: image method 'ig', 'gradcam', 'occlusion' or 'auto' (default: the model's explain.image_method).
            steps: Integrated Gradients steps (default: explain.steps).
            target: output name or index to explain (default: the predicted one).
        """
        return self.explain_item(self.preprocess(study, screen=screen), method=method, steps=steps, target=target)

    def predict_and_explain(self, study: Study | dict, *, explain: bool = True, screen: bool = True,
                            method: str | None = None, steps: int | None = None, target: str | int | None = None):
        """Predict one study and explain it from the same preprocessed input: its files are read, screened
        and decoded once (:meth:`predict` then :meth:`explain` does that twice). Returns ``(prediction,
        explanation)``; the explanation is None when not asked for or when the study could not be read
        (the prediction then has ``status='error'`` and the reason)."""
        pred, exp, _ = self._predict_and_explain(Study.coerce(study), explain=explain, screen=screen,
                                                 method=method, steps=steps, target=target)
        return pred, exp

    def _predict_and_explain(self, study: Study, *, explain: bool, screen: bool, method=None, steps=None, target=None):
        """(prediction, explanation or None, the study's row or None)."""
        try:
            row = self.row(study, screen=screen)
            item = self.dataset([row], check_input=True)[0]
            _check_finite(item)
        except ClinfuseError as e:  # as predict: this study's error, with its reason
            return Prediction(study.study_id, "error", _one_line(e)), None, None
        except Exception as e:  # noqa: BLE001 - a file pydicom or a decoder chokes on
            return Prediction(study.study_id, "error", _reason(e)), None, None
        pred = _note_set_aside(self._predict_items([item])[0], row)
        exp = None
        if explain and pred.ok:
            exp = self.explain_item(_collate([item]), method=method, steps=steps, target=target)
        return pred, exp, row

    def explain_item(self, batch: dict, *, method: str | None = None, steps: int | None = None,
                     target: str | int | None = None):
        """Explain a study already in the batch contract (a batch of 1, e.g. from :meth:`preprocess`)."""
        from ..explain import build_explanation

        ecfg = self.config.explain
        return build_explanation(self.network, to_device(batch, self.device), task=self.task, tokenizer=self.tokenizer,
                                 output_names=self.output_names, thresholds=self.thresholds,
                                 temperature=self.temperature, method=method or ecfg.image_method,
                                 steps=steps or ecfg.steps, target=self._target_index(target), model_ref=self.ref,
                                 deletion_fill=ecfg.deletion_fill, occlusion_baseline=ecfg.occlusion_baseline)

    def _target_index(self, target: str | int | None) -> int | None:
        if target is None or isinstance(target, int):
            return target
        if target not in self.output_names:
            raise ClinfuseError(f"target '{target}' is not an output of this model (outputs: "
                                f"{', '.join(self.output_names)})")
        return self.output_names.index(target)


def _note_set_aside(pred: Prediction, row: dict) -> Prediction:
    """A study predicted from the other images says which were not read."""
    if row.get("set_aside"):
        pred.reason = "set aside: " + "; ".join(row["set_aside"])
    return pred


def _collate(items: list[dict]) -> dict:
    return torch.utils.data.default_collate(items)


def _check_finite(item: dict) -> None:
    if bool(item["image_present"].any()) and not torch.isfinite(item["image"]).all():
        raise StudyInputError(f"{item['study_id']}: the image holds non-finite values after scaling")


def _clinfuse_cause(e: BaseException) -> ClinfuseError | None:
    """The clinfuse error an exception is or wraps (MONAI's "applying transform" RuntimeError), if any."""
    inner = e
    while inner is not None and not isinstance(inner, ClinfuseError):
        inner = inner.__cause__ or inner.__context__
    return inner


def _reason(e: BaseException) -> str:
    """The one-line reason of a failed read: the clinfuse error inside MONAI's wrapper where there is
    one, else the exception's type and first line."""
    inner = _clinfuse_cause(e)
    if inner is not None:
        return _one_line(inner)
    return f"cannot read the image: {type(e).__name__}: {_one_line(e)[:300]}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
