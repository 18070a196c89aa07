"""The trainer on synthetic cohorts: learning, overfitting, resume, distributed, checks before work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from clinfuse.config import config_from_dict
from clinfuse.data.cohort import build_cohort
from clinfuse.data.synth import SynthSpec, synthesize
from clinfuse.models.model import load_model
from clinfuse.training.trainer import TrainingError, train

from ..conftest import synthetic_cohort, tiny_config


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return synthetic_cohort(tmp_path_factory.mktemp("train"), "cohort", studies=120, seed=11, size=48, lateral=0)


def _cfg(**train):
    return tiny_config(train={"epochs": 2, "batch_size": 8, **train})


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_overfits_32_studies(tmp_path):
    d = tmp_path
    synthesize(d / "e", SynthSpec(studies=32, seed=4, size=32, lateral=0, missing_image=0, missing_report=0,
                                  prevalence=0.5), progress=False)
    cfg = config_from_dict({"cohort": {"split": {"train": 1.0, "val": 0.0, "test": 0.0}}})
    build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", cfg, progress=False)
    c = _cfg(epochs=60, batch_size=32, lr_head=1e-2, lr_image=1e-2, lr_text=1e-2, warmup=0.0, grad_clip=0)
    data = c.model_dump(mode="json")
    data["data"]["augment"] = False
    data["model"]["fusion"]["modality_dropout"] = 0.0
    data["model"]["fusion"]["dropout"] = 0.0
    data["loss"]["class_weights"] = "none"
    r = train(d / "c", config_from_dict(data), d / "run", progress=False)
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_trains_saves_and_reloads(cohort, tmp_path):
    r = train(cohort, _cfg(), tmp_path / "run", progress=False)
    assert r.epochs_done == 2 and (tmp_path / "run/best/model.safetensors").is_file()
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if "epoch" in x]
    assert [x["epoch"] for x in epochs] == [1, 2] and all("val_auroc" in x and "lr_text" in x for x in epochs)
    model, meta, tok = load_model(tmp_path / "run/best")
    assert meta["output_names"] == ["positive"] and meta["task"] == "binary" and tok is not None
    # calibration is not the trainer's: the pipeline fits it on validation afterwards (tests/evaluation)
    assert not any("temperature" in x for x in lines) and meta["temperature"] == 1.0
    # the state file loads without running code
    st = torch.load(tmp_path / "run/state.pt", weights_only=True)
    assert st["epoch"] == 2 and st["batch"] == 0


def test_resume_after_interruption_mid_epoch_matches_uninterrupted(cohort, tmp_path):
    cfg = _cfg(epochs=2)
    full = train(cohort, cfg, tmp_path / "a", progress=False)
    steps_per_epoch = full.global_step // 2
    cut = steps_per_epoch + 2  # in the middle of the second epoch
    part = train(cohort, cfg, tmp_path / "b", max_steps=cut, progress=False)
    assert part.interrupted and part.global_step == cut
    done = train(cohort, cfg, tmp_path / "b", resume=True, progress=False)
    assert done.global_step == full.global_step
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_nothing_to_resume_and_3d_mismatch_fail_before_work(cohort, tmp_path):
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(cohort, _cfg(), tmp_path / "x", resume=True, progress=False)
    data = _cfg().model_dump(mode="json")
    data["data"]["image_size"] = [8, 32, 32]
    data["model"]["image"]["spatial_dims"] = 3
    with pytest.raises(TrainingError, match="2D images but model.image.spatial_dims is 3"):
        train(cohort, config_from_dict(data), tmp_path / "y", progress=False)


def test_resume_of_a_checkpoint_with_other_shapes_names_the_tensor(cohort, tmp_path):
    """A mid-training checkpoint written when the view embedding had 5 rows: --resume names the tensor and
    the way out, and leaves the checkpoint as it was."""
    cfg = _cfg().model_copy(deep=True)
    cfg.model.image.max_images = 2  # two image slots: the model has a view embedding
    part = train(cohort, cfg, tmp_path / "r", max_steps=2, progress=False)
    assert part.interrupted
    state = tmp_path / "r" / "state.pt"
    st = torch.load(state, weights_only=True)
    st["model"]["view_embed.weight"] = st["model"]["view_embed.weight"][:5].clone()
    torch.save(st, state)
    (tmp_path / "r" / "state.json").unlink()  # the checksum would refuse it first
    before = state.read_bytes()
    with pytest.raises(TrainingError, match=r"view_embed.weight \(5, \d+\) \(this model: \(8, \d+\)\).*train again"):
        train(cohort, cfg, tmp_path / "r", resume=True, progress=False)
    assert state.read_bytes() == before


@pytest.mark.parametrize("kind", ["concat", "mean_logits", "image_only", "text_only"])
def test_baselines_train(cohort, tmp_path, kind):
    data = _cfg(epochs=1).model_dump(mode="json")
    data["model"]["fusion"]["kind"] = kind
    r = train(cohort, config_from_dict(data), tmp_path / kind, progress=False)
    assert r.epochs_done == 1 and (tmp_path / kind / "last/model.json").is_file()


def test_auxiliary_unimodal_loss_trains_and_its_heads_reload(cohort, tmp_path):
    data = _cfg(epochs=2).model_dump(mode="json")
    data["model"]["fusion"]["aux_weight"] = 0.5
    r = train(cohort, config_from_dict(data), tmp_path / "aux", progress=False)
    assert r.epochs_done == 2
    plain = train(cohort, _cfg(epochs=2), tmp_path / "plain", progress=False)
    assert [h["train_loss"] for h in r.history] != [h["train_loss"] for h in plain.history]  # the term counts
    model, meta, _ = load_model(tmp_path / "aux" / "best")
    assert meta["config"]["model"]["fusion"]["aux_weight"] == 0.5 and model.aux_heads is not None
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "aux" / "best" / "model.safetensors"))
    assert torch.equal(saved["aux_heads.0.weight"], model.aux_heads[0].weight.detach())


@pytest.mark.slow
def test_ddp_two_processes_gloo_identical_weights(cohort, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    from clinfuse.config import dump_config

    cfg_file.write_text(dump_config(_cfg(epochs=1)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "-m", "clinfuse.cli", "train", "--cohort", str(cohort),
           "--config", str(cfg_file), "--out", str(tmp_path / "ddp"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((tmp_path / "ddp/ddp_check.json").read_text())
    assert len(check["checksums"]) == 2 and check["max_abs_diff"] == 0.0
    assert json.loads((tmp_path / "ddp/params.json").read_text())["world_size"] == 2
    assert (tmp_path / "ddp/last/model.safetensors").is_file()
    from mlflow import MlflowClient  # one MLflow run, written by rank 0 only

    c = MlflowClient(tracking_uri=uri)
    runs = c.search_runs([c.get_experiment_by_name("clinfuse").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["world_size"] == "2"


def test_early_stopping_and_accumulation(cohort, tmp_path, monkeypatch):
    from clinfuse.training import trainer as tr

    monkeypatch.setattr(tr, "_auroc", lambda *a, **k: 0.5)  # a validation score that never improves
    r = train(cohort, _cfg(epochs=5, patience=1, accumulate=2), tmp_path / "es", progress=False)
    assert r.stopped_early and r.epochs_done == 2
    import math

    n_train = json.loads((tmp_path / "es/params.json").read_text())["train_studies"]
    assert r.global_step == 2 * math.ceil(math.ceil(n_train / 8) / 2)  # two batches per optimizer step


def test_constant_schedule_keeps_the_learning_rate_after_warmup(cohort, tmp_path):
    """train.schedule=constant (MONAI's recipe) keeps each group's rate; the default cosine decays it."""
    from clinfuse.training.trainer import _schedule

    cos, const = _schedule(100, 0.1), _schedule(100, 0.1, "constant")
    assert [cos(s) for s in range(10)] == [const(s) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert all(const(s) == 1.0 for s in range(10, 100)) and cos(99) < 0.01 < cos(50) < cos(11) <= 1.0

    def lrs(schedule):
        train(cohort, _cfg(epochs=3, warmup=0.0, schedule=schedule), tmp_path / schedule, progress=False)
        lines = [json.loads(x) for x in (tmp_path / schedule / "metrics.jsonl").read_text().splitlines() if x.strip()]
        return [x["lr_image"] for x in lines if "lr_image" in x]

    assert lrs("constant") == [_cfg().train.lr_image] * 3
    assert lrs("cosine")[-1] < 0.5 * _cfg().train.lr_image


def test_inference_with_a_modality_hidden(cohort, tmp_path):
    from clinfuse.data.cohort import read_cohort
    from clinfuse.data.dataset import StudyDataset
    from clinfuse.inference import Model, run_inference

    train(cohort, _cfg(epochs=1), tmp_path / "r", progress=False)
    model, meta, tok = load_model(tmp_path / "r/best")
    from clinfuse.config import Config

    rows, info = read_cohort(cohort)
    ds = StudyDataset(rows, info, Config.model_validate(meta["config"]), tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    full = run_inference(model, loader, torch.device("cpu"))
    no_img = run_inference(model, loader, torch.device("cpu"), hide="image")
    no_txt = run_inference(model, loader, torch.device("cpu"), hide="report")
    assert (no_img["weights"][:, 0] == 0).all() and (no_txt["weights"][:, 1] == 0).all()
    both = full["image_present"] & full["text_present"]
    assert (no_img["logits"][both] != full["logits"][both]).any()
    only_txt = ~full["image_present"] & full["text_present"]
    assert torch.allclose(torch.from_numpy(no_img["logits"][only_txt]), torch.from_numpy(full["logits"][only_txt]))
    # the model object encodes once and fuses per pattern: the same logits as hiding before encoding
    m = Model.load(tmp_path / "r")
    batch = next(iter(loader))
    out = m.forward_batch(batch)
    n = len(batch["study_id"])
    torch.testing.assert_close(out["logits"], torch.from_numpy(full["logits"][:n]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits_without_image"], torch.from_numpy(no_img["logits"][:n]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits_without_report"], torch.from_numpy(no_txt["logits"][:n]), atol=1e-5, rtol=1e-5)


def test_mixed_precision_choice(monkeypatch):
    from clinfuse.training import trainer as tr

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert tr._amp(_cfg(amp="auto"), cuda) == (torch.bfloat16, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert tr._amp(_cfg(amp="auto"), cuda) == (torch.float16, True)
    assert tr._amp(_cfg(amp="bf16"), cuda) == (torch.bfloat16, False)
    assert tr._amp(_cfg(amp="off"), cuda) == (None, False)
    assert tr._amp(_cfg(amp="auto"), torch.device("cpu")) == (None, False)
