"""The plain MONAI 2D classification recipe, written with MONAI alone (no clinfuse), as a named baseline.

What a MONAI user runs first (the MONAI tutorial `2d_classification/mednist_tutorial`, with the image
size and schedule of issue #14): LoadImage -> EnsureChannelFirst -> ScaleIntensity -> Resize 128, and on
the training split RandRotate (+-15 degrees), RandFlip (axis 0) and RandZoom (0.9-1.1), each with
probability 0.5; DenseNet121 from scratch (2D, 1 channel, 2 outputs), cross-entropy, Adam 1e-4,
20 epochs, batch 32, the epoch with the best validation AUROC kept. It reads the original PNGs, not the
DICOM files the clinfuse path reads, as that user would.

`train_recipe(train, val, test, ...)` takes (png path, 0/1 label) lists (`test` may be empty) and returns the test
probabilities of the best epoch with the facts of the run (epochs, best epoch, validation AUROC, time);
`save=` keeps the best weights, which `predict_recipe` scores on other PNGs.
"""

from __future__ import annotations

import time

import numpy as np


def _transforms(size: int, train: bool):
    from monai.transforms import (Compose, EnsureChannelFirst, LoadImage, RandFlip, RandRotate, RandZoom, Resize,
                                  ScaleIntensity)

    base = [LoadImage(image_only=True), EnsureChannelFirst(), ScaleIntensity(), Resize((size, size))]
    if train:
        base += [RandRotate(range_x=np.pi / 12, prob=0.5, keep_size=True), RandFlip(spatial_axis=0, prob=0.5),
                 RandZoom(min_zoom=0.9, max_zoom=1.1, prob=0.5)]
    return Compose(base)


def _probs(model, loader) -> np.ndarray:
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for x, _ in loader:
            out.append(torch.softmax(model(x.float()), 1)[:, 1].numpy())
    return np.concatenate(out)


def train_recipe(train: list[tuple[str, int]], val: list[tuple[str, int]], test: list[tuple[str, int]], *,
                 size: int = 128, epochs: int = 20, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
                 log=print, save: str | None = None) -> dict:
    import torch
    from monai.data import DataLoader
    from monai.networks.nets import DenseNet121
    from monai.utils import set_determinism
    from sklearn.metrics import roc_auc_score

    set_determinism(seed=seed)

    class Images(torch.utils.data.Dataset):  # the tutorial's MedNISTDataset: (transform(path), label)
        def __init__(self, items, transform):
            self.items, self.transform = items, transform

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.transform(self.items[i][0]), self.items[i][1]

    def loader(items, is_train):
        return DataLoader(Images(items, _transforms(size, is_train)), batch_size=batch_size, shuffle=is_train,
                          num_workers=0)

    tr, va, te = loader(train, True), loader(val, False), loader(test, False)
    yv = np.array([y for _, y in val])
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    opt = torch.optim.Adam(model.parameters(), lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    best, best_state, best_epoch = -1.0, None, 0
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for x, y in tr:
            opt.zero_grad()
            loss = loss_fn(model(x.float()), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
        auc = float(roc_auc_score(yv, _probs(model, va)))
        if auc > best or best_state is None:
            best, best_epoch = auc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(f"monai recipe: epoch {epoch}/{epochs} loss {total / len(train):.4f} val AUROC {auc:.3f} "
            f"(best {best:.3f} at {best_epoch}) {time.time() - t0:.0f} s")
    model.load_state_dict(best_state)
    if save:
        torch.save(best_state, save)
    return {"p_test": _probs(model, te) if test else np.zeros(0), "p_val": _probs(model, va), "val_auroc": best,
            "best_epoch": best_epoch, "epochs": epochs, "seconds": time.time() - t0}


def predict_recipe(weights: str, paths: list[str], size: int = 128, batch_size: int = 32) -> np.ndarray:
    """p(class 1) of the recipe's saved best model on PNG files (the validation transforms)."""
    import torch
    from monai.data import DataLoader
    from monai.networks.nets import DenseNet121

    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    t = _transforms(size, False)
    loader = DataLoader([(t(p), 0) for p in paths], batch_size=batch_size, shuffle=False, num_workers=0)
    return _probs(model, loader)
