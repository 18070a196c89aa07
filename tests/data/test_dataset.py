"""The dataset: batch contract, missing modalities as zeros + flags, caching, seeded augmentation."""

from __future__ import annotations

import pytest
import torch

from clinfuse.config import config_from_dict
from clinfuse.data.cohort import build_cohort, read_cohort
from clinfuse.data.dataset import StudyDataset
from clinfuse.models.text import build_tiny_tokenizer


@pytest.fixture(scope="module")
def cohort(small_export, tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    build_cohort(small_export / "dicom", small_export / "reports.csv", small_export / "labels.csv", d, progress=False)
    return read_cohort(d)


def _cfg(cache="memory", **data):
    return config_from_dict({"data": {"image_size": [32, 32], "cache": cache, **data},
                             "model": {"text": {"name_or_path": "tiny", "max_length": 24}}})


def test_batch_contract_and_missing_modalities(cohort):
    rows, info = cohort
    tok = build_tiny_tokenizer([r["report"] for r in rows])
    ds = StudyDataset(rows, info, _cfg(), tok)
    assert len(ds) == len(rows)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (len(rows), 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["input_ids"].shape == (len(rows), 1, 24) and batch["label"].shape == (len(rows), 1)
    ip = torch.tensor([r["image_present"] for r in rows])
    tp = torch.tensor([r["report_present"] for r in rows])
    assert torch.equal(batch["image_present"], ip) and torch.equal(batch["text_present"], tp)
    assert (batch["image"][~ip] == 0).all() and batch["image"][ip].amax(dim=(1, 2, 3)).min() > 0
    assert (batch["attention_mask"][~tp] == 0).all() and (batch["attention_mask"][tp][:, 0, 0] == 1).all()
    assert batch["study_id"] == [r["study_id"] for r in rows]
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_second_epoch_does_not_decode_dicom(cohort, tmp_path, monkeypatch, cache):
    rows, info = cohort
    import clinfuse.data.dataset as dsmod

    calls = {"n": 0}
    real = dsmod.read_dicom

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(dsmod, "read_dicom", counting)
    ds = StudyDataset(rows, info, _cfg(cache), None, cache_dir=tmp_path / "cache")
    [ds[i] for i in range(len(ds))]
    first = calls["n"]
    assert first == sum(r["image_present"] for r in rows)
    [ds[i] for i in range(len(ds))]
    assert calls["n"] == first, "the second epoch decoded DICOM again"
    if cache == "disk":  # a new dataset over the same cache folder reads the disk cache
        ds2 = StudyDataset(rows, info, _cfg(cache), None, cache_dir=tmp_path / "cache")
        [ds2[i] for i in range(len(ds2))]
        assert calls["n"] == first


def test_batch_augmentation_is_seeded_per_sample_and_spares_absent_images(cohort):
    from clinfuse.data.augment import BatchAugment, augment_seeds

    rows, info = cohort
    cfg = _cfg()
    ds = StudyDataset(rows, info, cfg, None)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    aug = BatchAugment(cfg)
    img, present, idx = batch["image"], batch["image_present"], batch["index"]
    a = aug(img, present, augment_seeds(0, 0, idx))
    b = aug(img, present, augment_seeds(0, 0, idx))
    assert torch.equal(a, b), "same seed, same augmentation"
    assert not torch.equal(a, aug(img, present, augment_seeds(0, 1, idx))), "a new epoch changes it"
    # a sample's augmentation does not depend on its batch
    k = int(present.nonzero()[0])
    alone = aug(img[k : k + 1], present[k : k + 1], augment_seeds(0, 0, idx[k : k + 1]))
    torch.testing.assert_close(alone[0], a[k])
    assert (a[~present] == 0).all() and 0 <= a.min() and a.max() <= 1
    assert (a[present] - img[present]).abs().mean() > 0.01


def test_batch_augmentation_3d_shapes():
    from clinfuse.data.augment import BatchAugment

    cfg = config_from_dict({"data": {"image_size": [8, 16, 16]}, "model": {"image": {"spatial_dims": 3}}})
    x = torch.rand(3, 1, 8, 16, 16)
    y = BatchAugment(cfg)(x, torch.tensor([True, True, False]), [1, 2, 3])
    assert y.shape == x.shape and torch.equal(y[2], x[2])


def test_batch_augmentation_flip_and_contrast_probabilities():
    """data.flip mirrors the last axis with its probability; data.contrast=0 turns the random gamma off, so
    with rotation, zoom and noise off too an unflipped image comes back unchanged."""
    from clinfuse.data.augment import BatchAugment

    def aug(**data):
        cfg = config_from_dict({"data": {"image_size": [16, 16], "rotate_degrees": 0, "scale": 0,
                                         "noise_std": 0, **data}})
        return BatchAugment(cfg)

    x = torch.rand(64, 1, 16, 16)
    present, seeds = torch.ones(64, dtype=torch.bool), list(range(64))
    plain = aug(contrast=0.0)(x, present, seeds)
    torch.testing.assert_close(plain, x)
    flipped = aug(contrast=0.0, flip=1.0)(x, present, seeds)
    torch.testing.assert_close(flipped, x.flip(-1))
    half = aug(contrast=0.0, flip=0.5)(x, present, seeds)
    mirrored = torch.tensor([torch.allclose(h, f, atol=1e-5) for h, f in zip(half, x.flip(-1))])
    kept = torch.tensor([torch.allclose(h, o, atol=1e-5) for h, o in zip(half, x)])
    assert (mirrored ^ kept).all() and 16 < int(mirrored.sum()) < 48
    # the default keeps its random gamma (p=0.3): some images change, some do not
    changed = torch.tensor([not torch.allclose(a, o, atol=1e-5) for a, o in zip(aug()(x, present, seeds), x)])
    assert 5 < int(changed.sum()) < 40


def test_batch_augmentation_independent_rotation_and_zoom_with_border():
    """data.affine=independent draws a rotation (p 0.5) and a zoom (p 0.5) on their own, from the same angle
    and zoom the joint default draws, which keeps its draws; data.padding=border fills with edge pixels."""
    from clinfuse.data.augment import BatchAugment

    def aug(**data):
        return BatchAugment(config_from_dict({"data": {"image_size": [16, 16], "rotate_degrees": 15, "scale": 0.1,
                                                       **data}}))

    seeds = list(range(400))
    joint, indep = aug().params(seeds), aug(affine="independent").params(seeds)
    for k in ("gamma_on", "gamma", "noise_on", "flip"):  # the other draws are the joint default's
        assert torch.equal(joint[k], indep[k]), k
    kinds = []
    for jt, it in zip(joint["theta"], indep["theta"]):
        m, r = jt[:, :2], it[:, :2]
        zoom = 1 / float(torch.linalg.det(m)) ** 0.5
        rot = m * zoom
        options = {"none": torch.eye(2), "rotate": rot, "zoom": torch.eye(2) / zoom, "both": m}
        kinds.append(next(k for k, v in options.items() if torch.allclose(r, v, atol=1e-6)))
    counts = {k: kinds.count(k) for k in ("none", "rotate", "zoom", "both")}
    assert all(60 < c < 140 for c in counts.values()), counts  # about 100 each of 400
    assert torch.equal(indep["affine"], torch.tensor([k != "none" for k in kinds]))
    assert 0.75 < float(joint["affine"].float().mean()) < 0.85  # the joint default's p 0.8, unchanged

    flat = torch.full((400, 1, 16, 16), 0.7)
    present = torch.ones(400, dtype=torch.bool)
    plain = dict(noise_std=0, contrast=0.0, affine="independent")
    zeros, border = aug(**plain)(flat, present, seeds), aug(padding="border", **plain)(flat, present, seeds)
    turned = torch.tensor([k != "none" for k in kinds])
    darker = zeros.amin(dim=(1, 2, 3)) < 0.69  # a rotation or a zoom out blackens corners or rims
    assert int(darker.sum()) > 200 and not darker[~turned].any()
    torch.testing.assert_close(border, flat)  # edge pixels fill them: a flat image stays flat
