"""The training dataset over cohort rows: the design's batch contract, MONAI transforms, caching.

Each item is a dict:

- ``image``: float32 ``[C, *image_size]`` in [0, 1]; zeros when the study has no image;
- ``image_present``: bool;

  or, for a model with several image slots (``model.image.max_images`` N > 1): ``image [N, C,
  *image_size]`` (the cohort's images in order, frontal views first; zeros for empty slots),
  ``image_present [N]`` and ``image_view [N]`` (long, :func:`clinfuse.config.view_id`);
- ``input_ids``, ``attention_mask``: long ``[K, L]`` (K chunks); padding when there is no report;
- ``text_present``: bool;
- ``label``: float ``[n_outputs]`` (binary, multi-label) or long scalar (multi-class);
- ``study_id``: str;
- ``variables``, ``variables_present``: float32 / bool ``[F]`` when the model reads structured
  variables (:class:`clinfuse.models.variables.VariableSpec`);

- ``index``: the position in the dataset (seeds the batch augmentation).

Decoding, intensity scaling and resizing (MONAI transforms) happen once: they are cached in memory
(MONAI's ``CacheDataset``) or on disk (``PersistentDataset``), so later epochs never decode DICOM
again. Tokenisation is done once, in the constructor. Training augmentation is not done here but on
whole batches on the training device (:mod:`clinfuse.data.augment`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config, DicomConfig
from ..errors import StudyInputError
from .dicom import DicomReadError, dcmread_robust, read_dicom
from .studies import _header_from, load_volume, select_images, selection_views, series_runs, whole_series
from .tokens import empty_tokens, tokenize_reports

__all__ = ["StudyDataset", "label_tensor", "n_outputs_for", "output_names_for", "study_transform", "image_item",
           "GREY_PHOTOMETRICS"]

GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def n_outputs_for(info: dict) -> int:
    """Number of model outputs for a cohort: 1 (binary), K labels (multi-label) or C classes."""
    return 1 if info["task"] == "binary" else len(info["classes"] if info["task"] == "multiclass"
                                                  else info["label_columns"])


def output_names_for(info: dict) -> list[str]:
    if info["task"] == "binary":
        return [info["classes"][1]]
    return list(info["classes"] if info["task"] == "multiclass" else info["label_columns"])


def label_tensor(rows: list[dict], info: dict) -> torch.Tensor:
    """Labels of `rows`: ``[N, K]`` float (binary, multi-label) or ``[N]`` long (multi-class)."""
    cols = info["label_columns"]
    if info["task"] == "multiclass":
        return torch.tensor([int(r[cols[0]]) for r in rows], dtype=torch.long)
    return torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float32)


def _transform_base():
    # MONAI's CacheDataset caches only up to the first object that is not a monai Transform.
    from monai.transforms import Transform

    return Transform


class _LoadStudyImage(_transform_base()):
    """Dict transform: read the study's image (2D: first chosen view; 3D: the volume).

    The item holds ``image_paths`` (file paths, or labels for in-memory files) and optionally
    ``image_data`` (the files' bytes, one per path, or None). With `photometrics`, an image of another
    PhotometricInterpretation is refused (the model object's check; the training dataset reads all).
    """

    def __init__(self, cfg: Config, photometrics: tuple[str, ...] | None = None):
        self.dicom = cfg.cohort.dicom
        self.channels = cfg.model.image.in_channels
        self.spatial_dims = cfg.model.image.spatial_dims
        self.photometrics = photometrics
        self.slots = cfg.model.image.slots

    def __call__(self, item: dict) -> dict:
        item = dict(item)
        if not item["image_present"]:
            item["image"] = None
            return item
        window = (self.dicom.window_center, self.dicom.window_width) if self.dicom.voi == "window" else None
        paths, data = item["image_paths"], item.get("image_data") or [None] * len(item["image_paths"])
        if self.spatial_dims == 3:  # one volume per series, the first `slots` of them: [1, Z, H, W] each
            arrs = [vol[None] for vol, _ in _volumes_from_paths(paths, self.dicom, data, self.slots)]
        else:
            arrs = [self._read_2d(p, d, window) for p, d in list(zip(paths, data))[: self.slots]]
        if self.slots > 1:  # one array per image or volume; sizes differ until resized
            item["image"] = arrs
            item.pop("image_data", None)
            return item
        arr = arrs[0]
        item["image"] = np.ascontiguousarray(arr, dtype=np.float32)
        item.pop("image_data", None)  # the decoded image is what is cached, not the file bytes
        return item

    def _read_2d(self, path, data, window) -> np.ndarray:
        img = read_dicom(path, voi=self.dicom.voi, window=window, channels=self.channels, data=data)
        if self.photometrics is not None and img.photometric not in self.photometrics:
            raise DicomReadError(path, f"PhotometricInterpretation {img.photometric} does not fit this model, "
                                 f"which reads {'/'.join(self.photometrics)} images; convert the image or send "
                                 "the grey series")
        px = img.pixels[0]
        arr = px[None] if px.ndim == 2 else np.moveaxis(px, -1, 0)  # [C, H, W]
        return np.ascontiguousarray(arr, dtype=np.float32)


def _volumes_from_paths(paths: list[str], dicom_cfg, data: list[bytes | None] | None = None,
                        limit: int | None = None) -> list:
    """The volumes of a 3D study's slices, one per series (:func:`series_runs`), at most `limit`:
    ``(volume [Z, H, W], spacing)`` each. `paths` are in the cohort's order (series together, slices sorted)."""
    import pydicom

    if data is not None and any(d is not None for d in data):  # in-memory slices: read them as files
        import tempfile

        with tempfile.TemporaryDirectory(prefix="clinfuse-volume-") as tmp:
            files = []
            for i, (p, d) in enumerate(zip(paths, data)):
                f = Path(tmp) / f"{i:05d}.dcm"
                f.write_bytes(d if d is not None else Path(p).read_bytes())
                files.append(str(f))
            return _volumes_from_paths(files, dicom_cfg, limit=limit)
    headers = [_header_from(pydicom.dcmread(p, stop_before_pixels=True, force=True), p) for p in paths]
    # each run is already in slice order (the cohort build or image_item sorted it)
    return [load_volume(run, dicom_cfg) for run in series_runs(headers)[:limit]]


def study_transform(cfg: Config, photometrics: tuple[str, ...] | None = None):
    """The deterministic image pipeline of one study (read DICOM -> scale to [0, 1] -> resize): the one
    code path of the training and validation datasets and of the model object's ``preprocess``."""
    from monai.transforms import Compose

    return Compose([_LoadStudyImage(cfg, photometrics), _ScaleResize(cfg)])


def image_item(sources: list, dicom_cfg: DicomConfig, screen: bool = True) -> dict:
    """A study's DICOM files -> the dataset's image item, with the images the cohort builder would choose.

    Args:
        sources: file paths, bytes of files, or pydicom datasets (any mix).
        dicom_cfg: ``cohort.dicom`` of the model's config (modalities, view policy).
        screen: decode each chosen image first in a reading process, within
            ``cohort.dicom.max_seconds_per_file`` and ``max_worker_mb`` (as the cohort build does), so that a
            hostile file costs its own reason and never hangs or exhausts this process.

    Returns:
        ``{"image_paths", "image_data", "image_present", "kind", "image_views", "set_aside"}``; no image when
        `sources` is empty. ``set_aside``: ``"<file>: <reason>"`` for each source that could not be used while
        others could (an unreadable header, pixels that do not decode).

    Raises:
        StudyInputError: no source is a usable DICOM image (each reason named).
    """

    if not sources:
        return {"image_paths": [], "image_data": [], "image_present": False, "kind": "2d", "image_views": [],
                "set_aside": []}
    headers, data_of, problems = [], {}, []
    for i, src in enumerate(sources):
        label, data = _source(src, i, dicom_cfg.max_file_mb)
        try:
            ds, _ = dcmread_robust(label, stop_before_pixels=True, data=data)
            headers.append(_header_from(ds, label))
            data_of[label] = data
        except DicomReadError as e:
            problems.append(f"{label}: {e.reason}")
    chosen, kind, set_aside = select_images(headers, dicom_cfg)
    if chosen and screen:
        from .studies import screen_pixels

        reasons = screen_pixels([(h.path, data_of[h.path]) for h in chosen], dicom_cfg)
        bad = [f"{h.path}: {r}" for h, r in zip(chosen, reasons) if r]
        if bad and kind == "3d":  # a slice left out would leave a gap in its volume: that series goes
            kept, dropped = whole_series(chosen, {h.path for h, r in zip(chosen, reasons) if r})
            if not kept:
                raise StudyInputError(f"{len(bad)} of {len(chosen)} slices of the series cannot be decoded: "
                                      + "; ".join(bad[:3]))
            n_series = len(dropped) + len(series_runs(kept))
            problems += bad[:3] + [f"{len(dropped)} of {n_series} series set aside: a slice cannot be decoded"]
            chosen = kept
        else:
            problems += bad
            chosen = [h for h, r in zip(chosen, reasons) if not r]
    # one view per image; per volume for 3D (its plane)
    views = selection_views(chosen, kind)
    if not chosen:
        problems += [f"{q.source}: {q.reason}" for q in set_aside]
        if not problems:
            problems = [f"no {'/'.join(dicom_cfg.frontal_views)} view among {len(headers)} image(s) "
                        "(cohort.dicom.view_policy: frontal)"]
        raise StudyInputError("; ".join(problems))
    paths = [h.path for h in chosen]
    return {"image_paths": paths, "image_data": [data_of[p] for p in paths], "image_present": True, "kind": kind,
            "image_views": views, "set_aside": problems}


def _read_bounded(p: Path, limit_mb: float) -> bytes:
    """The bytes of a file, read once (header and pixels are parsed from them), refused over the
    cohort build's own limit (``cohort.dicom.max_file_mb``)."""
    size = p.stat().st_size
    if size > limit_mb * 2**20:
        raise StudyInputError(f"{p}: file of {size / 2**20:,.0f} MB exceeds cohort.dicom.max_file_mb = {limit_mb:g}")
    return p.read_bytes()


def _source(src, i: int, limit_mb: float) -> tuple[str, bytes | None]:
    """(label, bytes or None) of one DICOM source: a path, the bytes of a file, or a pydicom Dataset."""
    import io

    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<dicom #{i + 1}>", bytes(src)
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise StudyInputError(f"{p}: DICOM file not found")
        return str(p), _read_bounded(p, limit_mb)
    import pydicom

    if isinstance(src, pydicom.Dataset):
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, src, enforce_file_format=False)
        return f"<dataset #{i + 1}>", buf.getvalue()
    raise StudyInputError(f"DICOM source #{i + 1}: a {type(src).__name__} is neither a path, bytes nor a pydicom Dataset")


class StudyDataset(torch.utils.data.Dataset):
    """Cohort rows of one split as tensors (see the module doc for the item layout).

    Args:
        rows: cohort rows (from ``read_cohort``).
        info: ``cohort.json`` content.
        cfg: the configuration (data, model.image, model.text, cohort.dicom).
        tokenizer: the text encoder's tokenizer (None for image-only models).
        cache_dir: folder for the disk cache (``data.cache='disk'``).
        progress: show a progress bar while filling the cache.
        photometrics: refuse images of any other PhotometricInterpretation (default: read all).
        variables: the variables the model reads (a ``VariableSpec``; None or empty: none), taken
            from each row's ``variables``.
    """

    def __init__(self, rows: list[dict], info: dict, cfg: Config, tokenizer=None,
                 cache_dir: str | Path | None = None, progress: bool = False,
                 photometrics: tuple[str, ...] | None = None, variables=None):
        from monai.data import CacheDataset, Dataset, PersistentDataset

        from ..config import view_id

        self.rows, self.info, self.cfg = rows, info, cfg
        self.labels = label_tensor(rows, info)
        tcfg = cfg.model.text
        texts = [r["report"] if r["report_present"] else "" for r in rows]
        if tokenizer is not None:
            self.input_ids, self.attention_mask = tokenize_reports(tokenizer, texts, tcfg)
        else:
            self.input_ids, self.attention_mask = empty_tokens(len(rows), tcfg)
        self.text_present = torch.tensor([bool(r["report_present"]) and bool(t.strip()) for r, t in zip(rows, texts)])
        self.image_present = torch.tensor([bool(r["image_present"]) for r in rows])
        self.image_shape = (cfg.model.image.in_channels, *cfg.data.image_size)
        self.slots = cfg.model.image.slots
        if self.slots > 1:
            views = torch.zeros(len(rows), self.slots, dtype=torch.long)
            for i, r in enumerate(rows):
                vs = list(r.get("image_views") or [])[: self.slots]
                views[i, : len(vs)] = torch.tensor([view_id(v) for v in vs], dtype=torch.long)
            self.image_view = views
        self.variable_spec = variables if variables is not None and variables.n_features else None
        if self.variable_spec is not None:
            feats = [self.variable_spec.features(r.get("variables")) for r in rows]
            f = self.variable_spec.n_features
            self.variables = torch.stack([x for x, _ in feats]) if feats else torch.zeros(0, f)
            self.variables_present = torch.stack([p for _, p in feats]) if feats else torch.zeros(0, f, dtype=torch.bool)

        det = study_transform(cfg, photometrics)
        items = [{"image_paths": r["image_paths"], "image_present": bool(r["image_present"]),
                  **({"image_data": r["image_data"]} if r.get("image_data") else {})} for r in rows]
        mode = cfg.data.cache
        if mode == "memory":
            import sys

            self.base = CacheDataset(items, transform=det, cache_rate=1.0, num_workers=0,
                                     progress=progress and sys.stderr.isatty(),
                                     copy_cache=False)
        elif mode == "disk":
            if cache_dir is None:
                raise ValueError("data.cache='disk' needs a cache folder")
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            self.base = PersistentDataset(items, transform=det, cache_dir=str(cache_dir))
        else:
            self.base = Dataset(items, transform=det)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        cached = self.base[i]
        img = cached["image"]
        extra = {}
        if self.slots > 1:
            image = torch.zeros((self.slots, *self.image_shape), dtype=torch.float32)
            present = torch.zeros(self.slots, dtype=torch.bool)
            for j, a in enumerate((img or [])[: self.slots]):
                image[j] = torch.as_tensor(a, dtype=torch.float32)
                present[j] = True
            extra["image_view"] = self.image_view[i] * present
        elif img is None:
            image, present = torch.zeros(self.image_shape, dtype=torch.float32), self.image_present[i]
        else:
            image, present = torch.as_tensor(img, dtype=torch.float32), self.image_present[i]
        if self.variable_spec is not None:
            extra["variables"], extra["variables_present"] = self.variables[i], self.variables_present[i]
        label = self.labels[i]
        return {
            "image": image,
            "image_present": present,
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "text_present": self.text_present[i],
            "label": label,
            "study_id": self.rows[i]["study_id"],
            "index": i,
            **extra,
        }


class _ScaleResize(_transform_base()):
    """Intensity scaling to [0, 1] and resizing (the cached, deterministic part)."""

    def __init__(self, cfg: Config):
        from monai.transforms import Resize, ScaleIntensity, ScaleIntensityRangePercentiles

        self.scale = (ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
                      if cfg.data.intensity == "percentile" else ScaleIntensity(minv=0.0, maxv=1.0))
        self.resize = Resize(spatial_size=tuple(cfg.data.image_size), mode="area")

    def __call__(self, item: dict) -> dict:
        if item.get("image") is None:
            return item
        if isinstance(item["image"], list):  # several images: each scaled and resized on its own
            item["image"] = [self._one(a) for a in item["image"]]
        else:
            item["image"] = self._one(item["image"])
        return item

    def _one(self, a) -> np.ndarray:
        x = self.resize(self.scale(torch.as_tensor(a)))
        return x.as_tensor().numpy() if hasattr(x, "as_tensor") else np.asarray(x)
