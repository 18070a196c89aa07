"""The training loop.

``train(cohort_dir, cfg, out_dir)`` writes a run folder:

- ``best/`` and ``last/``: model folders (``model.safetensors``, ``model.json``, ``text/``) that
  ``clinfuse.Model.load`` rebuilds without the YAML (uncalibrated: ``clinfuse.pipeline.train_and_audit``
  fits the temperature and operating points on validation afterwards);
- ``state.pt``: the resumable state (weights, optimizer, schedule, scaler, RNG, position in the
  epoch), loaded with ``torch.load(weights_only=True)``;
- ``config.yaml``, ``params.json``, ``metrics.jsonl`` (through the tracker).

Under ``torchrun`` it runs DistributedDataParallel (NCCL on CUDA, gloo on CPU); only rank 0 logs
and saves. Mixed precision on CUDA: bf16 where supported, else fp16 with a gradient scaler.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config, dump_config
from ..errors import ClinfuseError
from ..data.augment import BatchAugment, augment_seeds
from ..data.cohort import read_cohort
from ..data.dataset import StudyDataset, label_tensor, n_outputs_for, output_names_for
from ..inference.run import run_inference, to_device
from ..models.model import FusionModel, build_model, probabilities, recover_folder, save_model, study_kwargs
from ..models.text import load_pretrained_text_weights, load_tokenizer, text_config_for
from ..tracking import LocalTracker, NullTracker
from .losses import build_loss
from .sampler import EpochSampler, balanced_weights

__all__ = ["train", "TrainResult", "TrainingError", "check_resumable"]


class TrainingError(ClinfuseError):
    """A configuration or cohort that cannot be trained on; the message says why and what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    best_dir: Path | None
    last_dir: Path
    best_score: float
    epochs_done: int
    global_step: int
    stopped_early: bool = False
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- environment


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_resumable(out: Path) -> None:
    """Refuse --resume of a run folder with nothing to resume, or whose training already ended.

    Raises:
        TrainingError: saying which, and changing nothing.
    """
    out = Path(out)
    if not (out / "state.pt").is_file():
        raise TrainingError(f"{out}: nothing to resume (no state.pt); run without --resume")
    res = out / "result.json"
    if res.is_file():
        try:
            done = not json.loads(res.read_text()).get("interrupted", False)
        except (OSError, ValueError):
            done = False
        if done:
            raise TrainingError(f"{out}: this training already finished (result.json); nothing to resume and "
                                "nothing was changed. Train into a new --out to train again")


def _load_checkpoint_weights(model: nn.Module, saved: dict, state_file: Path) -> None:
    """The checkpoint's weights into `model`, or a TrainingError naming the tensors that differ (a checkpoint
    written by a clinfuse whose network had other shapes, e.g. before the view embedding grew to 8 rows)."""
    own = model.state_dict()
    differ = [f"{k} {tuple(v.shape)} (this model: {tuple(own[k].shape)})" for k, v in saved.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if differ or missing or extra:
        what = "; ".join(differ[:3] + ([f"missing {', '.join(missing[:3])}"] if missing else [])
                         + ([f"not in this model: {', '.join(extra[:3])}"] if extra else []))
        raise TrainingError(f"{state_file}: the checkpoint's network does not fit this model ({what}); it was written by "
                            "another clinfuse version or config: resume it with that version, or train again into a "
                            "new --out")
    model.load_state_dict(saved)


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _device(cfg: Config, local_rank: int) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"train.device '{cfg.train.device}' asks for CUDA but none is available; use 'auto' or 'cpu'")
        if want == "cuda":
            want = f"cuda:{local_rank}"
    return torch.device(want)


def _amp(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a gradient scaler)."""
    if device.type != "cuda" or cfg.train.amp == "off":
        return None, False
    if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _determinism(t, device: torch.device) -> None:
    """Pin what decides the result beyond the seed: the thread count and deterministic kernels."""
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def determinism_record(t) -> dict:
    """What the run records about its determinism (params of the MLflow run)."""
    return {"torch_threads": torch.get_num_threads(), "deterministic": bool(t.deterministic),
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- inference


def aux_loss(loss_fn, out: dict, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the modality groups of the loss of each one's own head on the rows where it is present.

    A group absent from the whole batch adds a zero that still touches its head, so every parameter
    is in the graph (DistributedDataParallel needs that)."""
    terms = []
    for m in range(out["present"].shape[1]):
        rows = out["present"][:, m]
        aux = out["aux_logits"][:, m]
        terms.append(loss_fn(aux[rows], labels[rows]) if rows.any() else aux.sum() * 0.0)
    return torch.stack(terms).mean()


def _forward(model, batch: dict) -> dict:
    return model(batch["image"], batch["image_present"], batch["input_ids"], batch["attention_mask"],
                 batch["text_present"], **study_kwargs(batch))


def _auroc(labels: np.ndarray, logits: np.ndarray, task: str) -> float:
    from sklearn.metrics import roc_auc_score

    try:
        if task == "multiclass":
            p = probabilities(logits, task).numpy()
            return float(roc_auc_score(labels, p, multi_class="ovr", average="macro"))
        scores = [roc_auc_score(labels[:, j], logits[:, j]) for j in range(labels.shape[1])
                  if 0 < labels[:, j].sum() < len(labels)]
        return float(np.mean(scores)) if scores else float("nan")
    except ValueError:
        return float("nan")


# --------------------------------------------------------------------------- training


def _param_groups(model: FusionModel, cfg: Config) -> list[dict]:
    t = cfg.train
    groups = {"image": [], "text": [], "head": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "image" if name.startswith("image_encoder.") else "text" if name.startswith("text_encoder.bert.") else "head"
        groups[key].append(p)
    lrs = {"image": t.lr_image, "text": t.lr_text, "head": t.lr_head}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps and lrs[k] > 0]


def _schedule(total_steps: int, warmup: float, kind: str = "cosine"):
    """The learning-rate factor of each step: linear warm-up over `warmup` of the steps, then cosine decay
    to 0 or constant (`kind`)."""
    warm = max(1, int(round(total_steps * warmup))) if warmup > 0 else 0

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _check(cfg: Config, rows: list[dict], info: dict) -> None:
    """Checks before any long work: the cohort and the config must fit each other."""
    kinds = {r["kind"] for r in rows if r["image_present"]}
    if "3d" in kinds and cfg.model.image.spatial_dims == 2:
        raise TrainingError("the cohort holds 3D volumes but model.image.spatial_dims is 2; "
                            "set model.image.spatial_dims: 3 and a 3-value data.image_size")
    if kinds == {"2d"} and cfg.model.image.spatial_dims == 3:
        raise TrainingError("the cohort holds 2D images but model.image.spatial_dims is 3")
    if not any(r["split"] == "train" for r in rows):
        raise TrainingError("the cohort has no training studies (split 'train')")


def _meta(cfg: Config, info: dict, epoch: int, val: dict) -> dict:
    n = n_outputs_for(info)
    return {
        "config": cfg.model_dump(mode="json"),
        "task": info["task"],
        "output_names": output_names_for(info),
        "class_names": info["classes"],
        "label_columns": info["label_columns"],
        "thresholds": [0.5] * n,
        "temperature": 1.0,
        "input": {"image_size": cfg.data.image_size, "in_channels": cfg.model.image.in_channels,
                  "spatial_dims": cfg.model.image.spatial_dims, "max_length": cfg.model.text.max_length,
                  "long_text": cfg.model.text.long_text, "max_chunks": cfg.model.text.max_chunks},
        "cohort_fingerprint": info["fingerprint"]["sha256"],
        "epoch": epoch,
        "validation": val,
    }


def train(cohort_dir: str | Path, cfg: Config, out_dir: str | Path, *, resume: bool = False,
          max_steps: int | None = None, progress: bool = True, tracker=None) -> TrainResult:
    """Train a model on a cohort.

    Args:
        cohort_dir: a folder made by ``clinfuse cohort build``.
        cfg: the configuration (``data``, ``model``, ``loss``, ``train``; ``cohort.dicom`` for reading).
        out_dir: the run folder.
        resume: continue from ``out_dir/state.pt`` (same config): ends with the same weights as an
            uninterrupted run.
        max_steps: stop after this many optimizer steps in total, saving a resumable state first.
        progress: show progress bars (rank 0).
        tracker: where metrics go (default: ``LocalTracker(out_dir)`` on rank 0).

    Raises:
        TrainingError: the cohort and the config do not fit, or there is nothing to resume.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    rank, world, local_rank = _dist_env()
    distributed = world > 1
    out = Path(out_dir)
    state_file = out / "state.pt"
    if resume:
        check_resumable(out)
    device = _device(cfg, local_rank)
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    is_main = rank == 0
    t = cfg.train
    _determinism(t, device)
    _seed_all(t.seed)

    rows, info = read_cohort(cohort_dir)
    _check(cfg, rows, info)
    if is_main and cfg.model.image.slots > 1 and not any(len(r["image_views"]) > 1 for r in rows):
        # image_views: one per image the model reads (per series for CT); n_images counts the files
        print(f"train: note: model.image.max_images is {cfg.model.image.max_images} but no study of {cohort_dir} has "
              "more than one image (a cohort built with cohort.dicom.view_policy: frontal keeps one per study, the frontal "
              "view or a CT study's largest series; rebuild it with view_policy: all to give the model the other views "
              "or series)", file=sys.stderr, flush=True)
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    task = info["task"]
    n_out = n_outputs_for(info)

    tokenizer, hf_cfg = None, None
    if cfg.model.fusion.kind != "image_only":
        corpus = [r["report"] for r in train_rows if r["report_present"]]
        tokenizer = load_tokenizer(cfg.model.text, corpus=corpus)
        hf_cfg = text_config_for(cfg.model.text, tokenizer)
    model = build_model(cfg, n_out, hf_cfg, info.get("variables"))
    if model.text_encoder is not None and not resume:
        load_pretrained_text_weights(model.text_encoder, cfg.model.text)
    if model.image_encoder is not None and cfg.model.image.weights and not resume:
        rep = model.image_encoder.load_local_weights(cfg.model.image.weights)
        if is_main:
            print(f"train: image weights {cfg.model.image.weights}: {rep.summary()}", flush=True)
    model.to(device)

    cache_root = out / "cache"
    spec = model.variable_spec if model.variables_encoder is not None else None
    train_ds = StudyDataset(train_rows, info, cfg, tokenizer, cache_dir=cache_root / "train",
                            progress=progress and is_main, variables=spec)
    val_ds = StudyDataset(val_rows, info, cfg, tokenizer, cache_dir=cache_root / "val",
                          progress=progress and is_main, variables=spec) if val_rows else None
    if spec is not None and not resume:  # standardisation from the training split, kept in the weights
        model.variables_encoder.fit_standardisation(train_ds.variables, train_ds.variables_present)
        model.variables_encoder.to(device)
    augment = BatchAugment(cfg) if cfg.data.augment else None
    train_labels = label_tensor(train_rows, info)
    loss_fn = build_loss(cfg.loss, task, train_labels, n_out).to(device)
    weights = balanced_weights(train_labels if task == "multiclass" else train_labels.long(), task) \
        if cfg.loss.sampler == "balanced" else None
    sampler = EpochSampler(len(train_ds), seed=t.seed, rank=rank, world_size=world, weights=weights)
    gen = torch.Generator().manual_seed(t.seed)  # keeps the DataLoader off the global RNG (exact resume)
    loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", generator=gen)
    val_loader = DataLoader(val_ds, batch_size=t.batch_size, shuffle=False, num_workers=cfg.data.num_workers) \
        if val_ds is not None else None

    batches_per_epoch = math.ceil(sampler.per_rank / t.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.accumulate)
    total_steps = steps_per_epoch * t.epochs
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, t.warmup, t.schedule))
    amp_dtype, use_scaler = _amp(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, start_batch, global_step, best, bad_epochs = 0, 0, 0, -float("inf"), 0
    history: list[dict] = []
    if resume:
        want = state_file.with_suffix(".json")
        sums = json.loads(want.read_text()) if want.is_file() else None
        if sums is not None and _sha256(state_file) not in (sums.get("sha256"), sums.get("previous")):
            raise TrainingError(f"{state_file} does not match its checksum in state.json (damaged or replaced); "
                                "train again into a new --out")
        try:
            st = torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or damaged file: one line, nothing changed
            raise TrainingError(f"{state_file}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                                "the checkpoint is damaged: train again into a new --out") from None
        _load_checkpoint_weights(model, st["model"], state_file)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in st:
            torch.cuda.set_rng_state(st["rng_cuda"], device)
        start_epoch, start_batch, global_step = int(st["epoch"]), int(st["batch"]), int(st["global_step"])
        best, bad_epochs = float(st["best"]), int(st["bad_epochs"])
    ddp_model = model
    if distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    own_tracker = tracker is None  # a tracker handed in is closed by its owner (the pipeline logs after training)
    tracker = tracker if tracker is not None else (LocalTracker(out, resume=resume) if is_main else NullTracker())
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        tracker.log_params({"cohort_fingerprint": info["fingerprint"]["sha256"], "task": task, "n_outputs": n_out,
                            "train_studies": len(train_rows), "val_studies": len(val_rows), "world_size": world,
                            "device": str(device), "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
                            **determinism_record(t),
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})

    saved: dict = {}  # the digest of the state.pt on disk, once known

    def save_state(epoch: int, batch: int) -> None:
        if not is_main:
            return
        st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
              "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(), "epoch": epoch, "batch": batch,
              "global_step": global_step, "best": best, "bad_epochs": bad_epochs}
        if device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(device)
        tmp = state_file.with_suffix(".tmp")
        torch.save(st, tmp)
        digest = _sha256(tmp)
        # state.json (what loading verifies) names the new checkpoint and the one it replaces, and is
        # written first: a kill between the two renames leaves the old state.pt, still accepted
        side = state_file.with_suffix(".json.tmp")
        previous = saved.get("digest") or (_sha256(state_file) if state_file.is_file() else None)
        side.write_text(json.dumps({"sha256": digest, "previous": previous}))
        os.replace(side, state_file.with_suffix(".json"))
        os.replace(tmp, state_file)
        saved["digest"] = digest

    stopped_early = interrupted = False
    for folder in ("best", "last"):  # a save killed half-way: the previous folder comes back
        recover_folder(out / folder)
    best_dir = out / "best" if (out / "best" / "model.json").is_file() else None
    last_dir = out / "last"
    epoch = start_epoch
    for epoch in range(start_epoch, t.epochs):
        ddp_model.train()
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, start=first * t.batch_size)
        t0, seen, loss_sum, n_loss = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch", initial=first,
                   total=batches_per_epoch, disable=None if (progress and is_main) else True, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar, start=first):
            batch = to_device(batch, device)
            if augment is not None:
                batch["image"] = augment(batch["image"], batch["image_present"],
                                         augment_seeds(t.seed, epoch, batch["index"]))
            boundary = (i + 1) % t.accumulate == 0 or i + 1 == batches_per_epoch
            sync = ddp_model.no_sync() if distributed and not boundary else _null()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    res = _forward(ddp_model, batch)
                loss = loss_fn(res["logits"], batch["label"])
                if "aux_logits" in res:
                    loss = loss + cfg.model.fusion.aux_weight * aux_loss(loss_fn, res, batch["label"])
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"epoch {epoch + 1}, batch {i + 1}: the loss is {float(loss.detach())} (not finite); training stopped "
                        "with no model saved from this epoch. Check the inputs (a non-finite pixel or label) and "
                        "lower the learning rates (train.lr_*) or turn on train.grad_clip")
                scaler.scale(loss / t.accumulate).backward()
            loss_sum += float(loss.detach())
            n_loss += 1
            seen += len(batch["study_id"])
            if not boundary:
                continue
            if t.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if global_step == 1 and distributed:
                _replica_check(model, out, is_main)
            bar.set_postfix(loss=f"{loss_sum / n_loss:.4f}")
            if t.save_every and global_step % t.save_every == 0:
                save_state(epoch, i + 1)
            if max_steps is not None and global_step >= max_steps:
                save_state(epoch, i + 1)
                interrupted = True
                break
        bar.close()
        if interrupted:
            break
        secs = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_loss, 1), "train_seconds": secs,
                   "studies_per_second": seen * world / secs if secs > 0 else float("nan")}
        for g in optimizer.param_groups:
            metrics[f"lr_{g['name']}"] = g["lr"]
        score = -metrics["train_loss"]
        if val_loader is not None:
            tv = time.perf_counter()
            v = run_inference(model, val_loader, device, amp_dtype)
            vl = torch.from_numpy(v["labels"])
            metrics["val_loss"] = float(loss_fn(torch.from_numpy(v["logits"]).to(device), vl.to(device)))
            metrics["val_auroc"] = _auroc(v["labels"] if task == "multiclass" else v["labels"].reshape(len(vl), -1),
                                          v["logits"], task)
            score = metrics["val_auroc"] if t.early_stop_metric == "auroc" and not math.isnan(metrics["val_auroc"]) \
                else -metrics["val_loss"]
            metrics["val_seconds"] = time.perf_counter() - tv
        history.append(metrics)
        tracker.log_metrics(metrics, step=global_step)
        if progress and is_main and not _tty():  # a log file (CI, a scheduler, nohup) sees one line per epoch
            vals = "  ".join(f"{k} {metrics[k]:.4f}" for k in ("train_loss", "val_loss", "val_auroc") if k in metrics)
            print(f"train: epoch {epoch + 1}/{t.epochs}  {vals}  ({secs:.0f} s, {metrics['studies_per_second']:.1f} "
                  "studies/s)", flush=True)
        val_summary = {k: metrics[k] for k in ("val_loss", "val_auroc") if k in metrics}
        if score > best:
            best, bad_epochs = score, 0
            if is_main:
                best_dir = save_model(model, out / "best", _meta(cfg, info, epoch + 1, val_summary), tokenizer, hf_cfg)
        else:
            bad_epochs += 1
        if is_main:
            save_model(model, last_dir, _meta(cfg, info, epoch + 1, val_summary), tokenizer, hf_cfg)
        save_state(epoch + 1, 0)
        if t.patience and bad_epochs >= t.patience:
            stopped_early = True
            break

    result = TrainResult(out, best_dir, last_dir, best, epoch + 1 if not interrupted else epoch, global_step,
                         stopped_early, interrupted, history)
    if is_main:
        (out / "result.json").write_text(json.dumps(
            {"best_score": best, "epochs_done": result.epochs_done, "global_step": global_step,
             "stopped_early": stopped_early, "interrupted": interrupted}, indent=2))
    if own_tracker:
        tracker.close()
    if distributed:
        # This ending avoids ranks aborting at exit under torchrun (docs/training.md, "torchrun").
        del ddp_model, optimizer, loader, sampler
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _replica_check(model: nn.Module, out: Path, is_main: bool) -> None:
    """After the first step, compare a weight checksum across ranks and record it (ddp_check.json)."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    mine = torch.tensor([flat.sum().item(), flat.abs().sum().item(), float(flat.numel())], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ddp_check.json").write_text(json.dumps(
            {"checksums": [g.tolist() for g in gathered],
             "max_abs_diff": max(float((g - gathered[0]).abs().max()) for g in gathered)}, indent=2))
