"""CT studies with several series: every series a volume and an image token under view_policy 'all', its
plane as its view; the largest series alone under 'frontal' (issue #13's "all series of a CT study")."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clinfuse.config import config_from_dict, view_id

# slice normal -> (ImageOrientationPatient, the axis ImagePositionPatient steps along)
PLANES = {"axial": ([1, 0, 0, 0, 1, 0], 2), "coronal": ([1, 0, 0, 0, 0, -1], 1), "sagittal": ([0, 1, 0, 0, 0, -1], 0)}


def write_series(folder: Path, study_uid: str, plane: str, n: int, *, patient: str = "P1", value: float = 0.0,
                 size: int = 16, seed: int = 0) -> list[Path]:
    """`n` CT slices of one series (16x16 int16 HU) in `plane`, written in shuffled order; `value` is added
    to a central blob (the planted finding)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(seed)
    series_uid = generate_uid()
    orient, axis = PLANES[plane]
    paths = []
    for i in rng.permutation(n):
        px = rng.normal(-700, 30, (size, size))
        px[size // 4: 3 * size // 4, size // 4: 3 * size // 4] += value
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = fm
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, fm.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient, "DOE^JANE", "A" + patient
        ds.Modality, ds.SeriesDescription, ds.InstanceNumber = "CT", f"CHEST {plane.upper()}", int(i) + 1
        pos = [0.0, 0.0, 0.0]
        pos[axis] = 2.5 * float(i)
        ds.ImageOrientationPatient, ds.ImagePositionPatient = orient, pos
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.clip(px, -1024, 3000).astype(np.int16).tobytes()
        p = folder / patient / plane / f"{int(i):03d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _config(policy="all", max_images=2, **sections):
    data = {"cohort": {"dicom": {"modalities": ["CT"], "view_policy": policy}},
            "data": {"image_size": [16, 32, 32]},
            "model": {"image": {"name": "densenet_tiny", "spatial_dims": 3, "max_images": max_images},
                      "text": {"name_or_path": "tiny", "max_length": 16}, "fusion": {"dim": 16, "heads": 2}}}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return config_from_dict(data)


def _export(d: Path, n_studies: int = 1) -> tuple[Path, Path, list[str]]:
    from pydicom.uid import generate_uid

    uids = []
    for s in range(n_studies):
        uid = generate_uid()
        uids.append(uid)
        found = s % 2
        write_series(d / "dicom", uid, "axial", 6, patient=f"P{s}", value=400.0 * found, seed=2 * s)
        write_series(d / "dicom", uid, "coronal", 4, patient=f"P{s}", value=400.0 * found, seed=2 * s + 1)
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "label"])
        w.writerows([u, i % 2] for i, u in enumerate(uids))
    return d / "dicom", d / "labels.csv", uids


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_view_policy_all_keeps_every_series_as_a_volume_and_frontal_the_largest(tmp_path):
    import pydicom

    from clinfuse.data.cohort import build_cohort, read_cohort

    dicom, labels, _ = _export(tmp_path)
    one = {"split": {"train": 1.0, "val": 0.0, "test": 0.0}}
    build_cohort(dicom, None, labels, tmp_path / "all", _config("all", cohort=one), progress=False)
    build_cohort(dicom, None, labels, tmp_path / "frontal", _config("frontal", cohort=one), progress=False)
    (row,), _ = read_cohort(tmp_path / "all")
    assert row["kind"] == "3d" and row["n_images"] == 10 and row["image_views"] == ["axial", "coronal"]
    planes = [Path(p).parent.name for p in row["image_paths"]]
    assert planes == ["axial"] * 6 + ["coronal"] * 4  # the largest series first, each series together
    axial = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in row["image_paths"][:6]]
    coronal = [float(pydicom.dcmread(p).ImagePositionPatient[1]) for p in row["image_paths"][6:]]
    assert axial == sorted(axial) and coronal == sorted(coronal)  # each in slice order
    (row,), _ = read_cohort(tmp_path / "frontal")
    assert row["n_images"] == 6 and row["image_views"] == ["axial"]
    assert {Path(p).parent.name for p in row["image_paths"]} == {"axial"}


def test_a_series_with_an_unreadable_slice_is_set_aside_and_the_other_series_kept(tmp_path):
    from clinfuse.data.cohort import build_cohort, read_cohort

    dicom, labels, _ = _export(tmp_path)
    bad = sorted((dicom / "P0" / "coronal").glob("*.dcm"))[1]
    bad.write_bytes(bad.read_bytes()[:-300])  # truncated pixel data
    cfg = _config("all", cohort={"split": {"train": 1.0, "val": 0.0, "test": 0.0}})
    build_cohort(dicom, None, labels, tmp_path / "c", cfg, progress=False)
    (row,), _ = read_cohort(tmp_path / "c")
    assert row["image_views"] == ["axial"] and row["n_images"] == 6
    q = {r["source"]: r["reason"] for r in _rows(tmp_path / "c" / "quarantine.csv")}
    coronal = {str(p) for p in (dicom / "P0" / "coronal").glob("*.dcm")}
    assert set(q) == coronal  # the bad slice with its own reason, its three siblings with theirs
    assert sum(r == "another slice of its series is unreadable" for r in q.values()) == 3


def test_dataset_gives_one_volume_per_slot_with_its_plane(tmp_path):
    from clinfuse.data.cohort import build_cohort, read_cohort
    from clinfuse.data.dataset import StudyDataset

    dicom, labels, _ = _export(tmp_path)
    cfg = _config("all", cohort={"split": {"train": 1.0, "val": 0.0, "test": 0.0}}, data={"image_size": [16, 32, 32],
                                                                                          "cache": "none"})
    build_cohort(dicom, None, labels, tmp_path / "c", cfg, progress=False)
    rows, info = read_cohort(tmp_path / "c")
    item = StudyDataset(rows, info, cfg)[0]
    assert item["image"].shape == (2, 1, 16, 32, 32) and item["image_present"].tolist() == [True, True]
    assert item["image_view"].tolist() == [view_id("axial"), view_id("coronal")] == [5, 6]
    assert not torch.equal(item["image"][0], item["image"][1])
    one = _config("all", max_images=1, data={"image_size": [16, 32, 32], "cache": "none"})
    single = StudyDataset(rows, info, one)[0]
    assert single["image"].shape == (1, 16, 32, 32)
    torch.testing.assert_close(single["image"], item["image"][0])  # the largest series


def test_trainer_notes_a_frontal_ct_cohort_gives_a_two_image_model_one_volume(tmp_path, capsys):
    """Under view_policy frontal every CT study keeps one series (six slice files): the model with two image
    slots gets one volume per study, and the trainer says so (it counted files, so it never did)."""
    from clinfuse.data.cohort import build_cohort
    from clinfuse.training.trainer import train

    dicom, labels, _ = _export(tmp_path, n_studies=4)
    for policy in ("frontal", "all"):
        cfg = _config(policy, train={"epochs": 1, "batch_size": 4}, data={"image_size": [16, 32, 32], "cache": "none"},
                      cohort={"split": {"train": 1.0, "val": 0.0, "test": 0.0}}, model={"fusion": {"kind": "image_only"}})
        build_cohort(dicom, None, labels, tmp_path / policy, cfg, progress=False)
        capsys.readouterr()
        train(tmp_path / policy, cfg, tmp_path / f"run-{policy}", progress=False, max_steps=1)
        err = capsys.readouterr().err
        assert ("no study of" in err and "more than one image" in err) == (policy == "frontal"), (policy, err)


def test_trained_ct_model_predicts_and_explains_every_series_from_files(tmp_path):
    """cohort build -> train -> Model.predict_and_explain on a study's files: one map per series."""
    from clinfuse.data.cohort import build_cohort
    from clinfuse.inference import Model, Study
    from clinfuse.pipeline import train_and_audit

    dicom, labels, uids = _export(tmp_path, n_studies=12)
    reports = tmp_path / "reports.csv"
    with open(reports, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["StudyInstanceUID", "report"])
        w.writerows([u, "FINDINGS: nodule." if i % 2 else "FINDINGS: clear."] for i, u in enumerate(uids))
    cfg = _config("all", train={"epochs": 1, "batch_size": 4}, eval={"bootstrap": 0}, tracking={"enabled": False},
                  cohort={"split": {"train": 0.6, "val": 0.2, "test": 0.2}})
    build_cohort(dicom, reports, labels, tmp_path / "c", cfg, progress=False)
    train_and_audit(tmp_path / "c", cfg, tmp_path / "run", progress=False, log=lambda m: None)
    model = Model.load(tmp_path / "run")
    assert model.network.layout.n_images == 2 and model.network.view_embed.num_embeddings == 8
    files = sorted(str(p) for p in (dicom / "P1").rglob("*.dcm"))
    pred, exp = model.predict_and_explain(Study(files, "FINDINGS: nodule.", "one"))
    assert pred.status == "ok" and not pred.reason and 0 <= pred.probabilities[model.output_names[0]] <= 1
    assert len(pred.image_weights) == 2 and all(w > 0 for w in pred.image_weights)  # both series were read
    images = exp["images"]
    assert [i["view"] for i in images] == ["axial", "coronal"]
    assert all(i["faithfulness"] is not None for i in images)  # each map deletion-tested
    assert sorted(exp.image_maps) == [0, 1]
    assert all(m.shape == (16, 32, 32) and np.isfinite(m).all() for m in exp.image_maps.values())
    exp.save(tmp_path / "page")
    assert {"overlay_0.png", "overlay_1.png"} <= {p.name for p in (tmp_path / "page").rglob("*.png")}


def test_a_model_saved_with_five_view_rows_loads_and_reads_a_plane_as_other(tmp_path):
    """Models saved before the series planes have a 5-row view embedding: they load, and a plane (an index
    they have no row for) reads as 'other'."""
    from clinfuse.models.model import build_model, load_model, save_model
    from clinfuse.models.text import build_tiny_tokenizer, tiny_bert_config

    cfg = _config("all")
    tok = build_tiny_tokenizer(["FINDINGS: nodule.", "FINDINGS: clear."])
    torch.manual_seed(0)
    old = build_model(cfg, 1, tiny_bert_config(len(tok)), n_views=5)
    with torch.no_grad():
        old.view_embed.weight.normal_()
    save_model(old, tmp_path / "m", {"config": cfg.model_dump(mode="json"), "output_names": ["y"]}, tok,
               tiny_bert_config(len(tok)))
    m, _, _ = load_model(tmp_path / "m")
    assert m.view_embed.num_embeddings == 5
    x = (torch.rand(1, 2, 1, 16, 32, 32), torch.tensor([[True, True]]), torch.zeros(1, 1, 16, dtype=torch.long),
         torch.ones(1, 1, 16, dtype=torch.long), torch.tensor([False]))
    plane = m(*x, image_view=torch.tensor([[5, 6]]))["logits"]
    other = m(*x, image_view=torch.tensor([[4, 4]]))["logits"]
    torch.testing.assert_close(plane, other)
    assert not torch.allclose(plane, m(*x, image_view=torch.tensor([[1, 3]]))["logits"])


def test_a_study_given_as_files_keeps_its_whole_series_when_one_has_a_bad_slice(tmp_path):
    """The model object's path (image_item): the series with an undecodable slice is set aside and named,
    the other series is the study's image; with every series broken the study is refused."""
    from clinfuse.data.dataset import image_item
    from clinfuse.errors import StudyInputError

    dicom, _, _ = _export(tmp_path)
    bad = sorted((dicom / "P0" / "coronal").glob("*.dcm"))[1]
    bad.write_bytes(bad.read_bytes()[:-300])
    files = sorted(str(p) for p in dicom.rglob("*.dcm"))
    item = image_item(files, _config("all").cohort.dicom)
    assert item["kind"] == "3d" and item["image_views"] == ["axial"] and len(item["image_paths"]) == 6
    assert any(str(bad) in s for s in item["set_aside"]) and "1 of 2 series set aside" in item["set_aside"][-1]
    with pytest.raises(StudyInputError, match="slices of the series cannot be decoded"):
        image_item([str(p) for p in sorted((dicom / "P0" / "coronal").glob("*.dcm"))], _config("all").cohort.dicom)
