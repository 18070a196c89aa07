"""Training throughput: studies/second, data loading vs compute, and peak memory.

Baseline: the same model's optimizer steps on batches already in memory ("pure step"), timed in the
same run. Reported ratio: epoch-2 wall time / pure-step time for the same batches (target < 1.2:
after the first epoch, data loading must not be the bottleneck).

Usage: python benchmarks/train_throughput.py [--config configs/tiny.yaml] [--studies 400] [--size 128]
           [--workers 0] [--views 1|2] [--variables N] [--set key=value ...]

`--views 2` makes every imaged study a frontal and a lateral view (`synth --views 2`), builds the
cohort with `view_policy: all` and trains with `model.image.max_images=2` (both images through the
one encoder); `--variables N` adds N structured variables and the variables token.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from clinfuse.config import load_config  # noqa: E402
from clinfuse.data.augment import BatchAugment, augment_seeds  # noqa: E402
from clinfuse.data.cohort import build_cohort, read_cohort  # noqa: E402
from clinfuse.data.dataset import StudyDataset, label_tensor, n_outputs_for  # noqa: E402
from clinfuse.data.synth import SynthSpec, synthesize  # noqa: E402
from clinfuse.models.model import build_model  # noqa: E402
from clinfuse.models.text import load_tokenizer, text_config_for  # noqa: E402
from clinfuse.training.losses import build_loss  # noqa: E402
from clinfuse.inference.run import to_device  # noqa: E402
from clinfuse.training.trainer import _amp, _device, _forward, _param_groups, train  # noqa: E402


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    ap.add_argument("--studies", type=int, default=400)
    ap.add_argument("--size", type=int, default=128, help="size of the synthetic DICOM images")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--views", type=int, choices=[1, 2], default=1, help="images per study (2: frontal + lateral)")
    ap.add_argument("--variables", type=int, default=0, help="structured variables per study")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    study = ["cohort.dicom.view_policy=all", "model.image.max_images=2"] if args.views == 2 else []
    cfg = load_config(args.config, study + args.overrides + ["train.epochs=2", "train.patience=0",
                                                             f"data.num_workers={args.workers}"])
    device = _device(cfg, 0)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        synthesize(d / "e", SynthSpec(studies=args.studies, size=args.size, seed=0, views=args.views,
                                      variables=args.variables), progress=False)
        build_cohort(d / "e/dicom", d / "e/reports.csv", d / "e/labels.csv", d / "c", cfg, progress=False,
                     variables=d / "e/variables.csv" if args.variables else None)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = train(d / "c", cfg, d / "run", progress=False)
        t_total = time.perf_counter() - t
        e1, e2 = r.history[0]["train_seconds"], r.history[1]["train_seconds"]
        v2 = r.history[1].get("val_seconds", float("nan"))
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

        # Pure steps: the same model and batches, preloaded, no data loading at all.
        rows, info = read_cohort(d / "c")
        tr = [x for x in rows if x["split"] == "train"]
        tok = load_tokenizer(cfg.model.text, corpus=[x["report"] for x in tr if x["report_present"]]) \
            if cfg.model.fusion.kind != "image_only" else None
        hf = text_config_for(cfg.model.text, tok) if tok is not None else None
        model = build_model(cfg, n_outputs_for(info), hf, info.get("variables")).to(device).train()
        ds = StudyDataset(tr, info, cfg, tok, variables=model.variable_spec if model.variables_encoder else None)
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False,
                                             num_workers=args.workers)
        t = time.perf_counter()
        batches = [to_device(b, device) for b in loader]
        t_data = time.perf_counter() - t  # one pass of data loading alone (cache already filled)
        loss_fn = build_loss(cfg.loss, info["task"], label_tensor(tr, info), n_outputs_for(info)).to(device)
        opt = torch.optim.AdamW(_param_groups(model, cfg))
        amp_dtype, _ = _amp(cfg, device)

        augment = BatchAugment(cfg) if cfg.data.augment else None

        def step(b):
            if augment is not None:  # part of the training step, as in the trainer
                b = {**b, "image": augment(b["image"], b["image_present"], augment_seeds(0, 1, b["index"]))}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(_forward(model, b)["logits"], b["label"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches:
            step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_pure = time.perf_counter() - t

    n = len(tr)
    n_img = sum(min(int(x["n_images"]), cfg.model.image.max_images) for x in tr if x["image_present"])
    print(f"config {Path(args.config).name} {' '.join(study + args.overrides)} | device {device} | "
          f"{args.studies} studies ({n} train, {n_img} images read, {args.variables} variables) at {args.size} px -> "
          f"{cfg.data.image_size} | workers {args.workers} | torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44} {'seconds':>8} {'studies/s':>10}")
    for name, s in (("epoch 1 training loop", e1), ("epoch 2 training loop", e2),
                    ("data loading alone, one pass", t_data), ("baseline: pure steps on preloaded batches", t_pure)):
        print(f"{name:<44} {s:>8.2f} {n / s:>10.1f}")
    print(f"epoch 2 validation: {v2:.2f} s; whole run incl. cohort cache and model build: {t_total:.1f} s")
    print(f"data loading share (data pass / (data pass + pure steps)): {t_data / (t_data + t_pure):.0%}")
    print(f"ratio epoch-2 training loop / pure steps: {e2 / t_pure:.2f} (target < 1.2)")
    print(f"peak process RSS: {_peak_rss_mib():.0f} MiB" + (f"; peak GPU memory: {gpu_peak:.0f} MiB" if gpu_peak else ""))
    if not math.isfinite(e2):
        sys.exit(1)


if __name__ == "__main__":
    main()
