"""Building a cohort: DICOM + reports + labels -> cohort.csv, quarantine.csv, cohort.json.

The output folder holds:

- ``cohort.csv``: one row per study (see :data:`COHORT_COLUMNS` and ``docs/cohort.md``).
- ``quarantine.csv``: every file or record set aside, with the reason.
- ``cohort.json``: counts, prevalence per split, missingness, decoders, fingerprint. No paths,
  no identifiers: it is safe to log.
- ``config.yaml``: the resolved cohort configuration.
- ``private/``: the salt, the map from study_id to the original key and the identifying values
  (names, IDs, birth dates, UIDs, accession numbers) that the PHI guard screens for. Never share it.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..config import CohortConfig, Config, dump_config
from ..phi import PhiGuard, replace_spans
from .dicom import decoder_report
from .labels import load_labels
from .buildstore import BuildStore
from .quarantine import CohortInputError, QuarantineEntry, QuarantineFile
from .reports import load_reports
from .variables import load_variables
from .studies import scan_into, select_images, selection_views, whole_series
from ..progress import progress as progress_of

__all__ = ["build_cohort", "assign_splits", "read_cohort", "format_summary", "CohortSummary", "COHORT_COLUMNS",
           "SPLITS"]

SPLITS = ("train", "val", "test")
COHORT_COLUMNS = ["study_id", "patient_id", "split", "image_present", "report_present", "modality", "kind",
                  "n_images", "image_paths", "image_views", "report", "variables"]


@dataclass
class CohortSummary:
    out_dir: Path
    n_studies: int
    n_quarantined: int
    info: dict


def _salt(private: Path) -> bytes:
    env = os.environ.get("CLINFUSE_SALT")
    if env:
        return env.encode()
    f = private / "salt"
    if f.is_file():
        return f.read_text().strip().encode()
    value = secrets.token_hex(32)
    f.write_text(value)
    os.chmod(f, 0o600)
    return value.encode()


def _pseudonym(salt: bytes, prefix: str, value: str) -> str:
    return f"{prefix}{hmac.new(salt, f'{prefix}{value}'.encode(), hashlib.sha256).hexdigest()[:12]}"


def assign_splits(
    patient_of: dict[str, str], strata_of: dict[str, str], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Patient-level, stratified, seeded split assignment.

    Each patient gets the stratum of its rarest study stratum; within a stratum the patients are
    shuffled (seeded) and cut by the fractions with largest-remainder rounding. All studies of a
    patient share its split, so no patient is in two splits. (A cohort build makes the same assignment
    from its store's tables, :func:`_assign_stored`, without holding the studies in memory.)

    Args:
        patient_of: study -> patient.
        strata_of: study -> stratum label (e.g. the class).
        fractions: split name -> fraction (sums to 1).
        seed: shuffling seed.
    """
    rank = _stratum_rank(Counter(strata_of.values()))
    by_patient: dict[str, list[str]] = defaultdict(list)
    for study, patient in patient_of.items():
        by_patient[patient].append(study)
    patient_stratum = {p: min((strata_of[s] for s in studies), key=rank.__getitem__)
                       for p, studies in by_patient.items()}
    rng = np.random.default_rng(seed)
    names = list(fractions)
    out: dict[str, str] = {}
    for stratum in sorted(set(patient_stratum.values())):
        patients = sorted(p for p, s in patient_stratum.items() if s == stratum)
        for p, c in zip(patients, _cut(len(patients), fractions, rng)):
            for s in by_patient[p]:
                out[s] = names[c]
    return out


def _stratum_rank(freq: Counter) -> dict[str, int]:
    """Strata from rarest to commonest (ties by name): a patient takes the first of its studies'."""
    return {s: i for i, s in enumerate(sorted(freq, key=lambda x: (freq[x], x)))}


def _cut(n: int, fractions: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """The split (index into `fractions`) of each of a stratum's `n` patients in sorted order: the order
    shuffled by `rng`, then cut by the fractions with largest-remainder rounding. An index array is
    shuffled, not the patients: numpy's shuffle makes the same permutation of a list and of an array of
    the same length (tests hold it), so the splits are those of shuffling the sorted patients themselves."""
    order = np.arange(n)
    rng.shuffle(order)
    exact = [f * n for f in fractions.values()]
    counts = [int(np.floor(x)) for x in exact]
    for i in sorted(range(len(counts)), key=lambda i: -(exact[i] - counts[i]))[: n - sum(counts)]:
        counts[i] += 1
    out = np.empty(n, dtype=np.int8)
    start = 0
    for i, c in enumerate(counts):
        out[order[start:start + c]] = i
        start += c
    return out


def _assign_stored(store: BuildStore, fractions: dict[str, float], seed: int) -> None:
    """:func:`assign_splits` on the build store's rows (the same splits), written to its ``patients`` table."""
    rng = np.random.default_rng(seed)
    names = list(fractions)
    for stratum, n in store.patients(_stratum_rank(Counter(store.strata_counts()))):
        store.set_splits(stratum, (names[c] for c in _cut(n, fractions, rng)))


def _label_header(cfg: CohortConfig) -> list[str]:
    return list(cfg.labels.columns)


def _stratum(vec: list[int], task: str) -> str:
    if task == "multilabel":
        return "".join(str(v) for v in vec)
    return str(vec[0])


def build_cohort(
    dicom_dir: str | Path | None,
    reports: str | Path | None,
    labels: str | Path,
    out_dir: str | Path,
    config: Config | CohortConfig | None = None,
    progress: bool = True,
    variables: str | Path | None = None,
) -> CohortSummary:
    """Build a cohort from a hospital export.

    Args:
        dicom_dir: folder of DICOM files (any layout), or None for a report-only cohort.
        reports: reports CSV / JSON lines / folder of ``<key>.txt``, or None for an image-only cohort.
        labels: labels CSV with the key column and the label column(s).
        out_dir: where cohort.csv, quarantine.csv, cohort.json, config.yaml and private/ go.
        config: the configuration (its ``cohort`` section is used).
        progress: show progress bars.
        variables: structured clinical variables CSV (key column + one column per variable; see
            :mod:`clinfuse.data.variables`), or None.

    Raises:
        CohortInputError: an input is wholly unusable (missing, no DICOM, a key column missing).

    Example:
        >>> build_cohort("export/dicom", "export/reports.csv", "export/labels.csv", "cohort/")
    """

    cfg = config.cohort if isinstance(config, Config) else (config or CohortConfig())
    if dicom_dir is None and reports is None:
        raise CohortInputError("need at least one of --dicom and --reports")
    out = Path(out_dir)
    private = out / "private"
    try:
        private.mkdir(parents=True, exist_ok=True)
        os.chmod(private, 0o700)
    except OSError as e:
        raise CohortInputError(f"{out}: cannot write the cohort folder ({e.strerror or e}); choose another --out") from None
    _remove_stale(private, ".build.*.sqlite")  # a killed build's scratch store (it holds identifiers)
    for name in ("cohort.csv", "cohort.json", "quarantine.csv"):
        _remove_stale(out, f".{name}.*.tmp")
    quarantine = QuarantineFile(out / "quarantine.csv")
    # per file and per study facts go to disk as they are made, so memory does not grow with the export
    store = BuildStore(private / f".build.{os.getpid()}.sqlite")
    try:
        summary = _build(store, quarantine, dicom_dir, reports, labels, variables, out, config, cfg, progress)
    except BaseException:
        quarantine.discard()
        raise
    finally:
        store.close()
    return summary


def _remove_stale(folder: Path, pattern: str) -> None:
    """Delete the files of `pattern` (``.NAME.<pid>.EXT``) that a build which is no longer running left."""
    for f in folder.glob(pattern):
        try:
            pid = int(f.name.split(".")[-2])
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, OSError):
            continue  # not ours to judge: not a pid, or another user's live process (PermissionError)


_HEADER_IDENTIFIERS = ("patient_id", "patient_name", "birth_date", "study_uid", "series_uid", "sop_uid", "accession")
# The PHI guard is built over at most this many cost units at once (BuildStore.identifiers): about 90 MiB;
# each chunk rescans every report, so a smaller budget trades time for memory (160,000 doubled the build's
# time at 200,000 studies to save 32 MiB)
_GUARD_BUDGET = 2_000_000


def _build(store: BuildStore, quarantine: QuarantineFile, dicom_dir, reports, labels, variables, out: Path,
           config, cfg: CohortConfig, progress: bool) -> CohortSummary:
    private = out / "private"
    key = cfg.key
    warnings: list[str] = []
    digest = hashlib.sha256()

    # Cheap, whole-input checks first: labels and reports fail fast on a missing column.
    # each loader feeds the fingerprint the bytes it parsed (read once: what is hashed is what was read)
    # labels, reports and variables are kept in the build store, not in memory (a hospital's reports are gigabytes)
    # what they set aside is written to quarantine.csv as it comes (a file of a million bad rows is not held)
    label_table = load_labels(labels, cfg.labels.key_column or key, cfg.labels, digest, store, quarantine)
    warnings += label_table.warnings
    report_table = None
    if reports is not None:
        report_table = load_reports(reports, cfg.reports.key_column or key, cfg.reports, digest, store, quarantine)
        warnings += report_table.warnings

    var_table = None
    if variables is not None:
        var_table = load_variables(variables, cfg.variables.key_column or key, cfg.variables, digest, store,
                                   quarantine)
        warnings += var_table.warnings
        if var_table.inferred:  # the cohort's config records what was inferred: training reads it from there
            cfg = cfg.model_copy(update={"variables": var_table.declared})
            if isinstance(config, Config):
                config = config.model_copy(update={"cohort": cfg})

    n_files = 0
    if dicom_dir is not None:
        walk_problems, n_files, _ = scan_into(store, dicom_dir, cfg, progress)
        quarantine += walk_problems
        quarantine += store.scan_quarantine()
        for rel, d in store.digests():  # by relative path, as bytes
            digest.update(b"dicom\0" + rel + b"\0" + d.encode())
        quarantine += store.keyless(key)

    reports_by_key = report_table.reports if report_table else {}
    vars_by_key = var_table.values if var_table else {}
    n_keys = store.collect_keys(("label", "report"))  # the loaders' record kinds

    salt = _salt(private)
    n_unknown_patient = 0
    for k in progress_of(store.keys(), "join studies", "study", enabled=progress, total=n_keys):
        label = label_table.labels.get(k)
        files = store.headers(k) if dicom_dir is not None else []
        rep = reports_by_key.get(k)
        if label is None:
            if files or rep:
                src = files[0].path if files else rep.source
                quarantine.append(QuarantineEntry("study", src, f"no valid label for this {key} in the labels file"))
            continue
        selected, kind, q = select_images(files, cfg.dicom) if files else ([], "2d", [])
        quarantine += q
        n_unreadable = 0
        if cfg.dicom.verify_pixels and selected:
            good = []
            for h in selected:
                # decoded at the scan, in a worker with a deadline (studies._decode_wanted foresees the selection)
                reason = h.pixel_reason if h.pixels_checked else "pixels not checked at the scan (a clinfuse bug)"
                if reason is None:
                    good.append(h)
                else:
                    quarantine.append(QuarantineEntry("dicom", h.path, reason))
                    n_unreadable += 1
            if kind == "3d" and len(good) != len(selected):  # a series with a gap goes; the study's others stay
                ok = {h.path for h in good}
                good, dropped = whole_series(selected, {h.path for h in selected} - ok)
                quarantine += [QuarantineEntry("dicom", h.path, "another slice of its series is unreadable")
                               for run in dropped for h in run if h.path in ok]
            selected = good
        if files and not selected and not q and not n_unreadable:
            quarantine.append(QuarantineEntry("study", files[0].path, "no image of the study was selected "
                                              f"(views {sorted({h.view or '?' for h in files})}, policy "
                                              f"'{cfg.dicom.view_policy}')"))
        study_vars = vars_by_key.get(k) or {}
        if not selected and rep is None and not study_vars:
            if files:
                quarantine.append(QuarantineEntry("study", files[0].path, "no usable image and no report"))
            else:
                quarantine.append(QuarantineEntry("label", label_table.sources[k],
                                                  f"no image and no report for this {key}"))
            continue
        pid = next((h.patient_id for h in files if h.patient_id), "") or (rep.patient if rep else None) \
            or label_table.patients.get(k) or ""
        if not pid:
            n_unknown_patient += 1
            pid = f"__study__{k}"  # unknown patient: the study stands alone
        study_id = _pseudonym(salt, "s-", k)
        patient_id = _pseudonym(salt, "p-", pid)
        row = {
            "study_id": study_id, "patient_id": patient_id, "split": "",
            "image_present": int(bool(selected)), "report_present": int(rep is not None),
            "modality": selected[0].modality if selected else "", "kind": kind if selected else "",
            "n_images": len(selected), "image_paths": json.dumps([str(Path(h.path).resolve()) for h in selected]),
            "image_views": json.dumps(selection_views(selected, kind)),  # one per image; per volume for 3D
            "report": rep.text if rep else "",
            "variables": json.dumps(study_vars, sort_keys=True),
        }
        for col, v in zip(_label_header(cfg), label if cfg.labels.task == "multilabel" else [label[0]]):
            row[col] = v
        store.add_row(k, row, pid, _stratum(label, cfg.labels.task))
        ids = {(name, v) for h in files for name in _HEADER_IDENTIFIERS if (v := getattr(h, name))}
        ids.add(("key", k))
        if not pid.startswith("__study__"):
            ids.add(("patient_id", pid))
        store.add_identifiers(ids)

    # a study needs a label: these join nothing
    for k in (k for k in vars_by_key if k not in label_table.labels):  # in key order (a stored map)
        quarantine.append(QuarantineEntry("variable", var_table.sources[k], f"no valid label for this {key}; "
                                          "its variables join no study"))
    if not store.n_rows:
        if not label_table.labels:
            reasons = Counter({r.removeprefix("label: "): n for r, n in quarantine.reasons.items()
                               if r.startswith("label: ")}).most_common(2)
            raise CohortInputError(
                f"{labels}: none of its {label_table.n_records} label rows is usable"
                + (f" ({'; '.join(f'{n}x {r}' for r, n in reasons)})" if reasons else "")
                + "; check --label-columns, --task and --classes")
        raise CohortInputError(
            f"no study could be joined: {store.n_image_studies()} image studies, {len(reports_by_key)} reports and "
            f"{len(label_table.labels)} labels share no {key}; check --key and the key columns"
        )
    if shared := store.shared_pseudonyms():  # 48-bit pseudonyms: about one build in 560 at a million studies
        fix = "set another CLINFUSE_SALT" if os.environ.get("CLINFUSE_SALT") else f"delete {private / 'salt'}"
        raise CohortInputError(f"{shared} pseudonym(s) stand for more than one study or patient (a chance collision "
                               f"of the salted hash); {fix} to draw a new salt and build again")
    # No identifier typed in a report (an MRN, a birth date, a name in either order, of any patient of the
    # export) stays in the text the model reads, and so in its vocabulary or an explanation. The guard sees
    # every identifier before any report is written; on a large export it is built a chunk at a time, each
    # chunk's hits kept as spans of the original text and replaced together below.
    for chunk in store.identifiers(_GUARD_BUDGET):
        guard = PhiGuard(chunk)
        for seq, text in store.reports():
            store.add_hits(seq, guard.spans(text))
        del guard
    _assign_stored(store, {"train": cfg.split.train, "val": cfg.split.val, "test": cfg.split.test}, cfg.split.seed)

    # ---- write: cohort.json goes first out and last in, with the digest of cohort.csv, so that a folder left
    # by an interrupted build is never read as a cohort (read_cohort checks the digest)
    (out / "cohort.json").unlink(missing_ok=True)
    columns = COHORT_COLUMNS + _label_header(cfg)
    tmp_csv = out / f".cohort.csv.{os.getpid()}.tmp"
    tally = _Tally(cfg.labels.task, _label_header(cfg), vars_by_key if var_table is not None else None,
                   [*cfg.variables.numeric, *cfg.variables.categorical])
    n_redacted = 0
    with open(tmp_csv, "w", newline="", encoding="utf-8") as f, \
            open(private / "key_map.csv", "w", newline="", encoding="utf-8") as km:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        kw = csv.writer(km)
        kw.writerow(["study_id", key])
        for k, row, spans in store.rows():
            if spans:
                row["report"], n = replace_spans(row["report"], spans)
                n_redacted += n
            w.writerow(row)
            kw.writerow([row["study_id"], k])
            tally.add(k, row)
    with open(tmp_csv, "rb") as f:
        csv_digest = hashlib.file_digest(f, "sha256").hexdigest()
    os.replace(tmp_csv, out / "cohort.csv")
    tally.patients, by_split = store.patient_counts()
    for split, n in by_split.items():
        tally.split[split]["patients"] = n
    quarantine.close()
    store.write_identifiers(private / "identifiers.json")
    full_cfg = config if isinstance(config, Config) else Config(cohort=cfg)
    (out / "config.yaml").write_text(dump_config(full_cfg))

    info = _summary(tally, quarantine, cfg, digest.hexdigest(), n_files,
                    report_table.n_records if report_table else 0, label_table.n_records,
                    n_unknown_patient, warnings)
    info["counts"]["identifiers_redacted_in_reports"] = n_redacted
    if var_table is not None:
        info["variables"] = {
            "numeric": sorted(cfg.variables.numeric), "categorical": dict(sorted(cfg.variables.categorical.items())),
            "inferred": var_table.inferred, "records": var_table.n_records,
            "studies_with_any": tally.var_any,
            "missing_share": {name: round(tally.var_missing[name] / tally.n, 4)
                              for name in [*sorted(cfg.variables.numeric), *sorted(cfg.variables.categorical)]},
        }
    info["files"] = {"cohort.csv": csv_digest}
    tmp = out / f".cohort.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / "cohort.json")
    return CohortSummary(out, tally.n, len(quarantine), info)


class _Tally:
    """What cohort.json counts, gathered row by row as cohort.csv is written."""

    def __init__(self, task: str, cols: list[str], vars_by_key: dict | None = None, variables: list[str] = ()):
        self.task, self.cols, self.vars_by_key, self.variables = task, cols, vars_by_key, list(variables)
        self.n = self.images = self.var_any = 0
        self.patients = 0  # counted in the build store at the end (a set of every patient would grow)
        self.missing: Counter = Counter()
        self.var_missing: Counter = Counter()
        self.split = {s: {"n": 0, "patients": 0, "positive": Counter(), "missing": Counter()} for s in SPLITS}

    def add(self, key: str, row: dict) -> None:
        s = self.split[row["split"]]
        m = (int(row["image_present"]), int(row["report_present"]))
        self.n += 1
        self.images += int(row["n_images"])
        self.missing[m] += 1
        s["n"] += 1
        s["missing"][m] += 1
        if self.task == "multilabel":
            for c in self.cols:
                s["positive"][c] += int(row[c])
        else:
            s["positive"][int(row[self.cols[0]])] += 1
        if self.vars_by_key is not None:
            v = self.vars_by_key.get(key) or {}
            self.var_any += bool(v)
            for name in self.variables:
                self.var_missing[name] += name not in v

    def by_split(self, classes: list[str]) -> dict[str, dict]:
        """cohort.json's ``splits``: studies, patients, prevalence and missingness of each split."""
        out = {}
        for split in SPLITS:
            s = self.split[split]
            n = s["n"]
            if self.task == "multilabel":
                prev = {c: (s["positive"][c] / n if n else None) for c in self.cols}
            else:
                prev = {classes[i]: (s["positive"].get(i, 0) / n if n else None) for i in range(len(classes))}
            out[split] = {"studies": n, "patients": s["patients"], "prevalence": prev,
                          "missingness": _missing(s["missing"])}
        return out


def recount(info: dict, rows: list[dict]) -> None:
    """Recount cohort.json's studies, patients, images, per-split counts, prevalence and missingness (`info`,
    in place) from `rows` of cohort.csv, as the build counts them: for a cohort derived from another by
    editing its rows (a study's folds), so that its summary and MLflow dataset describe it, not its base."""
    tally = _Tally(info["task"], info["label_columns"])
    patients: dict[str, set] = {s: set() for s in SPLITS}
    for r in rows:
        tally.add(r.get("study_id", ""), r)
        patients[r["split"]].add(r["patient_id"])
    for split, ids in patients.items():
        tally.split[split]["patients"] = len(ids)
    info["splits"] = tally.by_split(info["classes"])
    info["counts"].update(studies=tally.n, patients=len(set().union(*patients.values())), images=tally.images)
    info["missingness"] = _missing(tally.missing)


def _summary(tally: _Tally, quarantine: QuarantineFile, cfg: CohortConfig, fingerprint: str, n_files: int,
             n_reports: int, n_labels: int, n_unknown_patient: int, warnings: list[str]) -> dict:
    classes = cfg.labels.class_names
    cols = _label_header(cfg)
    by_split = tally.by_split(classes)
    return {
        "format": "clinfuse-cohort/1",
        "clinfuse_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": cfg.key,
        "task": cfg.labels.task,
        "label_columns": cols,
        "classes": classes,
        "counts": {
            "studies": tally.n,
            "patients": tally.patients,
            "images": tally.images,
            "dicom_files_scanned": n_files,
            "report_records": n_reports,
            "label_records": n_labels,
            "quarantined": len(quarantine),
            "studies_without_patient_id": n_unknown_patient,
        },
        "splits": by_split,
        "missingness": _missing(tally.missing),
        "quarantine_reasons": dict(sorted(quarantine.reasons.items())),
        "decoders": decoder_report(),
        "fingerprint": {"sha256": fingerprint, "mode": cfg.fingerprint},
        "n_warnings": len(warnings),
    }


def _missing(c: Counter) -> dict[str, int]:
    """(image present, report present) counts as cohort.json's missingness."""
    return {"both": c.get((1, 1), 0), "image_only": c.get((1, 0), 0), "report_only": c.get((0, 1), 0)}


def read_cohort(cohort_dir: str | Path) -> tuple[list[dict], dict]:
    """Read ``cohort.csv`` (image paths parsed, flags as bool) and ``cohort.json``.

    Raises:
        CohortInputError: the folder is not a cohort.
    """
    d = Path(cohort_dir)
    if not (d / "cohort.csv").is_file() or not (d / "cohort.json").is_file():
        raise CohortInputError(f"{d}: not a cohort folder, or one whose build did not finish (needs cohort.csv "
                               "and cohort.json; make one with `clinfuse cohort build`)")
    info = json.loads((d / "cohort.json").read_text())
    want = (info.get("files") or {}).get("cohort.csv")
    if want is not None and hashlib.sha256((d / "cohort.csv").read_bytes()).hexdigest() != want:
        raise CohortInputError(f"{d}: cohort.csv does not match cohort.json (an interrupted or edited build); "
                               "rebuild the cohort with `clinfuse cohort build`")
    rows = []
    with open(d / "cohort.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            r["image_paths"] = json.loads(r["image_paths"])
            r["image_present"] = r["image_present"] == "1"
            r["report_present"] = r["report_present"] == "1"
            r["n_images"] = int(r["n_images"])
            r["image_views"] = json.loads(r.get("image_views") or "[]") or [""] * len(r["image_paths"])
            r["variables"] = json.loads(r.get("variables") or "{}")
            for c in info["label_columns"]:
                r[c] = int(r[c])
            rows.append(r)
    return rows, info


def format_summary(info: dict) -> str:
    """The `cohort inspect` table."""
    c = info["counts"]
    lines = [f"cohort  key={info['key']}  task={info['task']}  classes={', '.join(info['classes'])}",
             f"studies {c['studies']}  patients {c['patients']}  images {c['images']}  "
             f"quarantined {c['quarantined']}  fingerprint {info['fingerprint']['sha256'][:16]}",
             ""]
    classes = list(next(iter(info["splits"].values()))["prevalence"])
    head = f"{'split':<6} {'studies':>7} {'patients':>8} {'both':>6} {'img only':>8} {'rep only':>8}  " + \
        "  ".join(f"{c[:12]:>12}" for c in classes)
    lines += [head, "-" * len(head)]
    for name, s in info["splits"].items():
        m = s["missingness"]
        prev = "  ".join(f"{(v if v is not None else float('nan')):>12.3f}" for v in s["prevalence"].values())
        lines.append(f"{name:<6} {s['studies']:>7} {s['patients']:>8} {m['both']:>6} {m['image_only']:>8} "
                     f"{m['report_only']:>8}  {prev}")
    lines.append("(prevalence columns: share of studies with that class)")
    v = info.get("variables")
    if v:
        lines += ["", f"variables ({'inferred from the file' if v['inferred'] else 'declared'}): numeric "
                  f"{', '.join(v['numeric']) or '-'}; categorical {', '.join(v['categorical']) or '-'}; "
                  f"{v['studies_with_any']} studies with any; missing share "
                  + ", ".join(f"{k} {x:.0%}" for k, x in v["missing_share"].items())]
    if info.get("quarantine_reasons"):
        lines += ["", "set aside:"] + [f"  {n:>5}  {r}" for r, n in info["quarantine_reasons"].items()]
    return "\n".join(lines)
