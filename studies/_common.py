"""Helpers the study scripts share: test-split predictions, bootstrap cells, table printing.

Kept out of the package on purpose: these are the studies' reading of results, not library API.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clinfuse.data.cohort import read_cohort, recount  # noqa: E402
from clinfuse.evaluation.metrics import auprc, auprc_ties_random, auroc, bootstrap_ci, recall_at_specificity  # noqa: E402
from clinfuse.inference import Model  # noqa: E402


def split_rows(cohort: Path, split: str) -> tuple[list[dict], dict]:
    rows, info = read_cohort(cohort)
    return [r for r in rows if r["split"] == split], info


def labels_of(rows: list[dict], info: dict) -> np.ndarray:
    """``[N, K]`` 0/1 labels of cohort rows (binary: K = 1)."""
    from clinfuse.data.dataset import label_tensor

    return label_tensor(rows, info).numpy().astype(int).reshape(len(rows), -1)


def model_predictions(model_dir, cohort: Path, split: str = "test", hide: str | None = None):
    """(y [N, K], p [N, K], patient ids, rows) for a saved model (a folder or a loaded Model) on a split,
    with its stored temperature."""
    from clinfuse.evaluation.evaluate import predict_split

    model = model_dir if isinstance(model_dir, Model) else Model.load(model_dir)
    rows, _ = split_rows(cohort, split)
    out = predict_split(model, cohort, split, batch_size=64, hide=hide, rows=rows)
    p = model.probabilities(out["logits"])
    y = out["labels"].reshape(len(p), -1).astype(int)
    return y, p, [r["patient_id"] for r in rows], rows


def cell(fn, y, p, groups, n_boot: int, seed: int = 0) -> str:
    """``0.912 [0.871, 0.944]``: the metric with a 95% bootstrap interval over patients."""
    if y.min() == y.max():
        return "n/a (one class)"
    lo, hi = bootstrap_ci(y, p, fn, n_boot, seed, groups)
    return f"{fn(y, p):.3f} [{lo:.3f}, {hi:.3f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# the image methods the explanation questions compare: name -> (explain method, explain.occlusion_baseline)
IMAGE_METHODS = {"ig": ("ig", "zero"), "gradcam": ("gradcam", "zero"), "occlusion": ("occlusion", "zero"),
                 "occlusion-blur": ("occlusion", "blur")}


def use_image_method(model: Model, name: str) -> str:
    """Set `model`'s Occlusion window for the IMAGE_METHODS entry `name`; returns the method to explain with."""
    method, model.config.explain.occlusion_baseline = IMAGE_METHODS[name]
    return method


DELETION_HEADER = ["better than every random order", "mean deletion area", "mean random area",
                   "faithfulness (random - deletion)", "p -> p after 10% removed at random", "s per image"]


def deletion_summary(f: list[dict], seconds: float) -> list[str]:
    """One table row (the cells of DELETION_HEADER) over the image faithfulness records `f` of one method and
    fill: how often the map beat every random order, the mean areas and gain, and how far removing 10% of the
    patches at random moves p (near 0: the removal itself is neutral)."""
    gain = np.array([x["faithfulness"] for x in f])
    return [f"{sum(bool(x['better_than_random']) for x in f)}/{len(f)}",
            f"{np.mean([x['deletion_area'] for x in f]):.3f}", f"{np.mean([x['random_area'] for x in f]):.3f}",
            f"{gain.mean():+.3f} (sd {gain.std():.3f})",
            f"{np.mean([x['curve'][0] for x in f]):.3f} -> "
            f"{np.mean([x['curve'][0] + x['random_first_step'] for x in f]):.3f}",
            f"{seconds / len(f):.1f}"]


def original_keys(base: Path) -> dict[str, str]:
    """study pseudonym -> original study key (the export's accession number or file key), from the cohort's
    private key map: what the studies order by where an order must survive a rebuild with another salt."""
    import csv

    with open(base / "private" / "key_map.csv", newline="", encoding="utf-8") as f:
        return {r[0]: r[1] for r in list(csv.reader(f))[1:]}


def patient_folds(rows: list[dict], positive, original: dict[str, str], k: int, seed: int = 0) -> dict[str, int]:
    """patient pseudonym -> fold (0..k-1): patient-level and stratified by whether any of the patient's
    studies is positive (``positive[i]`` for ``rows[i]``), so every fold gets its share of patients with
    and without the finding. Patients are ordered by their first original study key (`original`, from
    :func:`original_keys`) before a seeded shuffle, not by their pseudonyms: those come from a random salt
    drawn per cohort build, and an order by pseudonym gave other folds on every fresh --out."""
    pos: dict[str, int] = {}
    first: dict[str, str] = {}
    for r, y in zip(rows, positive):
        p, key = r["patient_id"], original[r["study_id"]]
        pos[p] = max(pos.get(p, 0), int(y))
        first[p] = min(first.get(p, key), key)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for stratum in (0, 1):
        ps = sorted((p for p, v in pos.items() if v == stratum), key=first.get)
        rng.shuffle(ps)
        fold_of.update({p: i % k for i, p in enumerate(ps)})
    return fold_of


def _derived_digest(base: Path, base_digest: str, mode: str, rows: list[dict]) -> str:
    """The fingerprint of a derived cohort: the base's (of its inputs), the derivation and the derived rows
    in terms that do not depend on where or when the base was built: each study by its original key (from
    the base's private key map) and each patient by its order of appearance instead of their salted
    pseudonyms, and image paths relative to the folder that holds them all. The same derivation of the
    same inputs in another --out has the same fingerprint (``clinfuse reproduce`` compares it)."""
    import hashlib
    import json
    import os

    original = original_keys(base)
    images = [json.loads(r.get("image_paths") or "[]") for r in rows]
    dirs = [os.path.dirname(p) for paths in images for p in paths]
    root = os.path.commonpath(dirs) if dirs else ""
    h = hashlib.sha256(f"{base_digest}\0{mode}\0".encode())
    patient_no: dict[str, int] = {}
    for r, paths in zip(rows, images):
        canon = {k: v for k, v in r.items() if k not in ("study_id", "patient_id", "image_paths")}
        canon["key"] = original[r["study_id"]]
        canon["patient"] = patient_no.setdefault(r["patient_id"], len(patient_no))  # the grouping, not the name
        canon["images"] = [os.path.relpath(p, root) for p in paths]
        h.update(json.dumps(canon, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def derived_cohort(base: Path, dst: Path, edit, mode: str) -> Path:
    """A copy of cohort `base` at `dst` whose ``cohort.csv`` rows pass through ``edit(rows)`` (it changes
    them in place, and may drop rows) and whose ``cohort.json`` is recounted from the new rows
    (:func:`clinfuse.data.cohort.recount`) and records the derivation `mode` in a new fingerprint (:func:`_derived_digest`:
    the same on every rerun) and the new table's hash, so that ``read_cohort`` accepts it.
    An existing `dst` is left as it is."""
    import csv
    import hashlib
    import json
    import shutil

    if (dst / "cohort.json").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.name not in ("cohort.csv", "cohort.json"):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, dst / item.name, **(
                {"dirs_exist_ok": True} if item.is_dir() else {}))
    with open(base / "cohort.csv", newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        fields, rows = rd.fieldnames, list(rd)
    edit(rows)
    with open(dst / "cohort.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    info = json.loads((base / "cohort.json").read_text())
    recount(info, rows)
    info["fingerprint"] = {"sha256": _derived_digest(base, info["fingerprint"]["sha256"], mode, rows),
                           "mode": f"derived: {mode}"}
    info["files"] = {"cohort.csv": hashlib.sha256((dst / "cohort.csv").read_bytes()).hexdigest()}  # read_cohort checks it
    (dst / "cohort.json").write_text(json.dumps(info, indent=2))
    return dst


__all__ = ["split_rows", "derived_cohort", "original_keys", "patient_folds", "labels_of", "model_predictions", "cell", "table", "auroc", "auprc", "auprc_ties_random", "recall_at_specificity",
           "bootstrap_ci"]
