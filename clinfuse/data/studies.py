"""Scanning a DICOM tree (headers only) and grouping files into studies and series.

A 2D study (CR/DX and other projection modalities) yields its images, the frontal ones by default.
A CT/MR/PT series yields a 3D volume sorted along the slice normal with its spacing: the series with the
most slices by default, every series (one volume each, the largest first) under ``view_policy: all``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import CohortConfig, DicomConfig
from .dicom import DicomReadError, check_dicom, dcmread_robust, read_dicom
from .quarantine import CohortInputError, QuarantineEntry
from .workers import Failed, bounded_map
from ..progress import progress as progress_of

__all__ = ["DicomHeader", "FileFacts", "ScanResult", "scan_dicom", "scan_into", "examine_file", "select_images", "load_volume",
           "VOLUME_MODALITIES", "series_runs", "volume_view", "whole_series", "selection_views"]

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
_HEADER_BYTES = 64 * 1024  # fingerprint='header' reads this much of each file (more only if the header is longer)


@dataclass
class DicomHeader:
    """The header facts the cohort needs from one file (read with stop_before_pixels)."""

    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    accession: str
    patient_id: str
    patient_name: str
    birth_date: str
    modality: str
    view: str
    frames: int
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, float] | None
    slice_thickness: float | None
    pixel_reason: str | None = None  # set by the scan: why the pixels cannot be used (None: fine or unchecked)
    pixels_checked: bool = False  # set by the scan: the pixels were decoded there


@dataclass
class ScanResult:
    headers: list[DicomHeader]
    quarantine: list[QuarantineEntry]
    digests: dict[str, str]  # relative path -> sha256 (content or header mode)
    n_files: int
    n_skipped: int  # files whose extension is not scanned
    notes: list[str] = field(default_factory=list)


def _floats(v, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _header_from(ds, path: str) -> DicomHeader:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's VR validation warnings; real problems are quarantined
        return _header_fields(ds, path)


def _header_fields(ds, path: str) -> DicomHeader:
    def s(kw: str) -> str:
        v = ds.get(kw)
        return str(v).strip() if v is not None else ""

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise DicomReadError(path, f"invalid NumberOfFrames: {ds.get('NumberOfFrames')!r}") from None
    try:
        inst = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    st = ds.get("SliceThickness")
    try:
        st_f = float(st) if st not in (None, "") else None
    except (TypeError, ValueError):
        st_f = None
    view = s("ViewPosition")
    if not view and "ViewCodeSequence" in ds and len(ds.ViewCodeSequence):
        meaning = str(ds.ViewCodeSequence[0].get("CodeMeaning", "")).lower()
        view = "PA" if "postero-anterior" in meaning else "AP" if "antero-posterior" in meaning else \
            "LL" if "lateral" in meaning else ""
    return DicomHeader(
        path=path, study_uid=s("StudyInstanceUID"), series_uid=s("SeriesInstanceUID"), sop_uid=s("SOPInstanceUID"),
        accession=s("AccessionNumber"), patient_id=s("PatientID"), patient_name=s("PatientName"),
        birth_date=s("PatientBirthDate"), modality=s("Modality").upper(), view=view.upper(), frames=frames,
        instance_number=inst, position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6), spacing=_floats(ps, 2) if ps else None,
        slice_thickness=st_f,
    )


def _iter_files(root: Path, extensions: list[str], problems: list[QuarantineEntry]):
    """Candidate files under `root` (sorted, hidden ones skipped). Folders that cannot be listed and
    folders that are symbolic links (not followed: they could loop or leave the export) are named in
    `problems`, so their images are never lost in silence."""
    def unreadable(err: OSError) -> None:
        problems.append(QuarantineEntry("dicom", str(err.filename), f"cannot list folder: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if (Path(dirpath) / d).is_symlink():
                problems.append(QuarantineEntry("dicom", str(Path(dirpath) / d), "folder is a symbolic link; not "
                                                "followed (point --dicom at its target, or copy it in)"))
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            yield p, (p.suffix.lower() in extensions)


@dataclass
class FileFacts:
    """What one worker learned about one file (see :func:`examine_file`)."""

    digest: str | None  # sha256 of the content (or header block + size); None when the file was not read
    header: DicomHeader | None  # None when the file is set aside at the scan (its pixel_reason, pixels_checked set)
    reason: str | None = None  # why the file is set aside at the scan


def _decode_wanted(h: DicomHeader, d: DicomConfig) -> bool:
    """Whether a file can be selected by :func:`select_images`, so that its pixels are checked at the scan:
    an allowed modality and, under the frontal policy, a frontal view or none stated."""
    if h.modality not in {m.upper() for m in d.modalities}:
        return False
    if h.modality in VOLUME_MODALITIES or d.view_policy != "frontal" or not h.view:
        return True
    return h.view in {v.upper() for v in d.frontal_views}


def examine_file(path: str, cfg_json: str) -> FileFacts:
    """Everything the build needs from one file, read once: type and size checks, the fingerprint, the
    header and (with ``verify_pixels``) a full decode of a file that can be selected. Runs in a worker
    process (:mod:`clinfuse.data.workers`) with a deadline and a memory cap."""
    cfg = _config_from(cfg_json)
    p = Path(path)
    limit = int(cfg.dicom.max_file_mb * 2**20)
    try:
        st = p.stat()  # follows a file link: a link to /dev/zero is a character device, not a file
        if not stat.S_ISREG(st.st_mode):
            return FileFacts(None, None, "not a regular file (a FIFO, device or socket)")
        size = st.st_size
        if size > limit:
            return FileFacts(None, None, f"file of {size / 2**20:,.0f} MB exceeds cohort.dicom.max_file_mb = "
                             f"{cfg.dicom.max_file_mb:g}")
        whole = cfg.fingerprint == "content" or cfg.dicom.verify_pixels
        with open(p, "rb") as fh:
            data = fh.read(size) if whole else fh.read(_HEADER_BYTES)
            grew = whole and fh.read(1)
    except OSError as e:
        return FileFacts(None, None, f"cannot read file: {e.strerror or e}")
    if grew:
        return FileFacts(None, None, "file changed size while it was read (still being written?)")
    # content: every byte; header: the first block and the size (blind to later pixel-only edits)
    digest = hashlib.sha256(data if cfg.fingerprint == "content" else data[:_HEADER_BYTES] + str(size).encode())
    parsed, parse_error = None, None
    if cfg.dicom.verify_pixels and len(data) == size:
        # one parse serves the header and the pixels; a file it fails on takes the careful path below
        try:
            parsed = dcmread_robust(p, data=data)
        except DicomReadError as e:
            parse_error = e
    try:
        try:
            ds, _ = parsed if parsed is not None else dcmread_robust(p, stop_before_pixels=True, data=data)
            h = _header_from(ds, path)
        except DicomReadError:
            if len(data) == size:
                raise
            data = p.read_bytes()  # the header is longer than the first block: read it all
            ds, _ = dcmread_robust(p, stop_before_pixels=True, data=data)
            h = _header_from(ds, path)
    except DicomReadError as e:
        return FileFacts(digest.hexdigest(), None, e.reason)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a header value pydicom cannot convert stops this file only
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return FileFacts(digest.hexdigest(), None, f"unreadable DICOM header: {type(e).__name__}: {first}"[:300])
    if cfg.dicom.verify_pixels and _decode_wanted(h, cfg.dicom):
        d = cfg.dicom
        window = (d.window_center, d.window_width) if d.voi == "window" else None
        try:
            if parse_error is not None:  # the header parses, the whole file does not
                raise parse_error
            check_dicom(p, voi=d.voi, window=window, channels=d.channels,
                        dataset=parsed if parsed is not None else dcmread_robust(p, data=data))
        except DicomReadError as e:
            h.pixel_reason = e.reason
        except MemoryError:
            h.pixel_reason = (f"decoding needs more memory than a reading process may use "
                              f"(cohort.dicom.max_worker_mb = {d.max_worker_mb:g})")
        h.pixels_checked = True
    return FileFacts(digest.hexdigest(), h)


def check_pixels(label: str, data: bytes, voi: str, window, channels: int, max_worker_mb: float) -> str | None:
    """The build's decode check for one DICOM given as bytes (a model object's input): None when
    :func:`read_dicom` would read it, else the reason. Runs in a worker process, like :func:`examine_file`."""
    try:
        check_dicom(label, voi=voi, window=tuple(window) if window else None, channels=channels,
                    dataset=dcmread_robust(label, data=data))
    except DicomReadError as e:
        return e.reason
    except MemoryError:
        return (f"decoding needs more memory than a reading process may use (cohort.dicom.max_worker_mb = "
                f"{max_worker_mb:g})")
    return None


def screen_pixels(sources: list[tuple[str, bytes]], d: DicomConfig) -> list[str | None]:
    """:func:`check_pixels` for each (label, bytes) in the reading processes, within
    ``cohort.dicom.max_seconds_per_file`` and ``max_worker_mb`` each: what the cohort build does to a file
    before anything decodes it in this process."""
    window = (d.window_center, d.window_width) if d.voi == "window" else None
    out: list[str | None] = [None] * len(sources)
    tasks = [(label, data, d.voi, window, d.channels, d.max_worker_mb) for label, data in sources]
    for i, r in bounded_map("clinfuse.data.studies:check_pixels", tasks, seconds=d.max_seconds_per_file,
                            memory_mb=d.max_worker_mb,
                            what=lambda t: f"decoding took longer than {t:g} s (cohort.dicom.max_seconds_per_file): "
                                           "a damaged or hostile file, or raise the limit"):
        out[i] = r.reason if isinstance(r, Failed) else r
    return out


_CONFIGS: dict[str, CohortConfig] = {}


def _config_from(cfg_json: str) -> CohortConfig:
    cfg = _CONFIGS.get(cfg_json)
    if cfg is None:
        cfg = _CONFIGS[cfg_json] = CohortConfig.model_validate_json(cfg_json)
    return cfg


def scan_dicom(root: str | Path, cfg: CohortConfig, progress: bool = True) -> ScanResult:
    """Read the header of every candidate file under `root`; set aside what cannot be used.

    Each file is read once, in worker processes on every usable core (``cohort.workers``), within
    ``cohort.dicom.max_seconds_per_file`` and ``cohort.dicom.max_worker_mb``: a file past either is set
    aside with the reason. With ``verify_pixels`` the pixels of every file that can be selected are
    decoded there too (:attr:`DicomHeader.pixel_reason` says why they cannot be used). The result is held
    in memory; the cohort build uses :func:`scan_into`, which keeps it on disk.

    Raises:
        CohortInputError: `root` is missing or holds no readable DICOM file.
    """
    import tempfile

    from .buildstore import BuildStore

    with tempfile.TemporaryDirectory(prefix="clinfuse-scan-") as tmp:
        store = BuildStore(Path(tmp) / "scan.sqlite")
        try:
            walk_problems, n_files, skipped = scan_into(store, root, cfg, progress)
            quarantine = walk_problems + list(store.scan_quarantine())
            headers = store.headers()
            digests = {rel.decode("utf-8", "surrogateescape"): d for rel, d in store.digests()}
        finally:
            store.close()
    return ScanResult(headers, quarantine, digests, n_files, skipped)


def scan_into(store, root: str | Path, cfg: CohortConfig, progress: bool = True
              ) -> tuple[list[QuarantineEntry], int, int]:
    """:func:`scan_dicom` into a :class:`~clinfuse.data.buildstore.BuildStore`: each file's facts are written
    there as its reading process returns them, so nothing per file stays in this process.

    Returns:
        (folders that could not be walked, number of candidate files, number of files skipped by ending)

    Raises:
        CohortInputError: `root` is missing or holds no readable DICOM file.
    """
    root = Path(root)
    if not root.is_dir():
        raise CohortInputError(f"{root}: DICOM folder not found")
    skipped = 0
    quarantine: list[QuarantineEntry] = []

    def wanted_files():
        nonlocal skipped
        for p, wanted in _iter_files(root, cfg.dicom_extensions, quarantine):
            if wanted:
                yield str(p)
            else:
                skipped += 1

    store.add_files(wanted_files())
    n = store.n_files
    in_flight: dict[int, str] = {}  # index -> path of the files handed to a reading process, not yet back

    def tasks():
        for i, p in enumerate(store.files()):
            in_flight[i] = p
            # absolute paths: a reading process started earlier in this session may have another working directory
            yield os.path.abspath(p), cfg_json

    cfg_json = cfg.model_dump_json()
    seconds = cfg.dicom.max_seconds_per_file
    attr = "study_uid" if cfg.key == "StudyInstanceUID" else "accession"
    results = bounded_map("clinfuse.data.studies:examine_file", tasks(),
                          workers=cfg.workers or None, seconds=seconds, memory_mb=cfg.dicom.max_worker_mb,
                          what=lambda s: f"reading took longer than {s:g} s (cohort.dicom.max_seconds_per_file): "
                                         "a damaged or hostile file, or raise the limit")
    for i, r in progress_of(results, "scan DICOM", "file", enabled=progress, total=n):
        f = FileFacts(None, None, r.reason) if isinstance(r, Failed) else r
        p = in_flight.pop(i)
        if f.header is not None:
            f.header.path = p  # as the caller named it
        store.add_fact(i, Path(p).relative_to(root).as_posix(), f.digest,
                       getattr(f.header, attr) or None if f.header is not None else None, f.header,
                       None if f.header is not None else (f.reason or "unreadable"))
    store.flush()
    if not store.n_headers():
        where = f"{n} candidate file(s), none readable" if n else "no candidate files"
        raise CohortInputError(
            f"{root}: no DICOM found ({where}; scanned endings {cfg.dicom_extensions}); "
            "check --dicom or cohort.dicom_extensions"
        )
    return quarantine, n, skipped


def select_images(files: list[DicomHeader], cfg: DicomConfig) -> tuple[list[DicomHeader], str, list[QuarantineEntry]]:
    """Choose what one study contributes: 2D images (views) or the slices of its 3D series (the largest
    series; every series under ``view_policy: all``, each a run of sorted slices, see :func:`series_runs`).

    Returns:
        (selected headers in order, "2d" or "3d", entries for files set aside)
    """
    allowed = {m.upper() for m in cfg.modalities}
    quarantine = []
    keep = []
    for h in files:
        if h.modality not in allowed:
            quarantine.append(QuarantineEntry(
                # the value after the colon: the reason kind that cohort.json counts carries no header value
                "dicom", h.path, f"modality not in cohort.dicom.modalities {sorted(allowed)}: '{h.modality or 'none'}'"))
        else:
            keep.append(h)
    if not keep:
        return [], "2d", quarantine
    if keep[0].modality in VOLUME_MODALITIES:
        series: dict[str, list[DicomHeader]] = defaultdict(list)
        for h in keep:
            series[h.series_uid].append(h)
        # The series with the most slices (ties: the first by UID) comes first and is the volume of a one-volume
        # policy; under 'all' every series follows, one run of sorted slices each (see series_runs).
        ordered = [v for _, v in sorted(series.items(), key=lambda kv: (-sum(x.frames for x in kv[1]), kv[0]))]
        if cfg.view_policy != "all":
            ordered = ordered[:1]
        return [h for v in ordered for h in sort_slices(v)], "3d", quarantine
    frontal = {v.upper() for v in cfg.frontal_views}
    # frontal views first (the image a one-image model reads), then by series and instance
    keep.sort(key=lambda h: (h.view not in frontal, h.series_uid, h.instance_number or 0, h.path))
    if cfg.view_policy == "frontal":
        if any(h.view for h in keep):
            chosen = [h for h in keep if h.view in frontal]
            return chosen, "2d", quarantine
    return keep, "2d", quarantine


def series_runs(slices: list) -> list[list]:
    """The volumes of a 3D selection: consecutive runs of one SeriesInstanceUID (``select_images`` puts each
    series' slices together, the largest series first). Items are headers or anything with ``series_uid``."""
    runs: list[list] = []
    for h in slices:
        if runs and runs[-1][0].series_uid == h.series_uid:
            runs[-1].append(h)
        else:
            runs.append([h])
    return runs


def whole_series(slices: list, bad: set[str]) -> tuple[list, list[list]]:
    """Split a 3D selection by :func:`series_runs` into the slices of the series none of whose paths is in
    `bad` (kept, in order) and the runs of the others (a slice left out would leave a gap in its volume)."""
    kept, dropped = [], []
    for run in series_runs(slices):
        if any(h.path in bad for h in run):
            dropped.append(run)
        else:
            kept.extend(run)
    return kept, dropped


def selection_views(selected: list, kind: str) -> list[str]:
    """The views of a selection, one per image token: each image's ViewPosition (2D), each series' plane (3D)."""
    return [volume_view(run[0]) for run in series_runs(selected)] if kind == "3d" else [h.view for h in selected]


def volume_view(h: DicomHeader) -> str:
    """The plane of a CT/MR series, its 'view' for the view embedding: 'axial', 'coronal' or 'sagittal' from
    the slice normal of ImageOrientationPatient (the axis it is closest to); '' when the file states none."""
    n = _normal(h)
    if n is None:
        return ""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(n)))]


def _normal(h: DicomHeader) -> np.ndarray | None:
    if h.orientation is None:
        return None
    r, c = np.array(h.orientation[:3]), np.array(h.orientation[3:])
    n = np.cross(r, c)
    return n / (np.linalg.norm(n) or 1.0)


def sort_slices(slices: list[DicomHeader]) -> list[DicomHeader]:
    """Order slices along the normal of ImageOrientationPatient; InstanceNumber when geometry is absent."""
    n = _normal(slices[0])
    if n is not None and all(h.position is not None for h in slices):
        return sorted(slices, key=lambda h: float(np.dot(n, h.position)))
    return sorted(slices, key=lambda h: (h.instance_number or 0, h.path))


def load_volume(slices: list[DicomHeader], cfg: DicomConfig | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Stack sorted slices into ``(Z, rows, cols)`` float32 and return spacing ``(z, row, col)`` in mm.

    A single multi-frame file is returned as is. Slice spacing comes from the positions along the
    normal (median gap), else SliceThickness, else 1.0.

    Raises:
        DicomReadError: a slice cannot be decoded or its size differs from the first.
    """
    cfg = cfg or DicomConfig()
    window = (cfg.window_center, cfg.window_width) if cfg.voi == "window" else None
    arrays = []
    for h in slices:
        img = read_dicom(h.path, voi=cfg.voi, window=window, channels=1)
        if arrays and img.pixels.shape[1:] != arrays[0].shape[1:]:
            raise DicomReadError(h.path, f"slice size {img.pixels.shape[1:]} differs from {arrays[0].shape[1:]}")
        arrays.append(img.pixels)
    vol = np.concatenate(arrays, axis=0)
    row_col = slices[0].spacing or (1.0, 1.0)
    z = None
    n = _normal(slices[0])
    if n is not None and len(slices) > 1 and all(h.position is not None for h in slices):
        d = np.diff([float(np.dot(n, h.position)) for h in slices])
        if len(d) and np.all(d > 0):
            z = float(np.median(d))
        else:
            warnings.warn(f"{slices[0].path}: duplicate or unordered slice positions; using SliceThickness")
    if z is None:
        z = slices[0].slice_thickness or 1.0
    return vol.astype(np.float32), (z, row_col[0], row_col[1])
