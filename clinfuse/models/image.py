"""Image encoders: MONAI networks chosen by name, projecting to the common width d."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ImageEncoderConfig
from ..errors import ClinfuseError

__all__ = ["ImageEncoder", "list_image_encoders", "register_image_encoder"]

_REGISTRY: dict[str, Callable[[ImageEncoderConfig, int, tuple[int, ...]], nn.Module]] = {}


def register_image_encoder(name: str):
    """Decorator: register a builder ``(cfg, out_dim, image_size) -> nn.Module`` mapping images to ``[B, out_dim]``."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def list_image_encoders() -> list[str]:
    """Names accepted by ``model.image.name``."""
    return sorted(_REGISTRY)


@register_image_encoder("densenet121")
def _densenet121(cfg, d, size):
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, out_channels=d,
                       dropout_prob=cfg.dropout)


@register_image_encoder("densenet_tiny")
def _densenet_tiny(cfg, d, size):
    # A real MONAI DenseNet, small enough for tests and CPU demos (~10k parameters).
    from monai.networks.nets import DenseNet

    return DenseNet(spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, out_channels=d, init_features=8,
                    growth_rate=8, block_config=(2, 2, 2), bn_size=2, dropout_prob=cfg.dropout)


@register_image_encoder("resnet18")
def _resnet18(cfg, d, size):
    from monai.networks.nets import resnet18

    # conv1_t_stride=2 downsamples like torchvision's (MONAI's default 1 does not).
    return resnet18(spatial_dims=cfg.spatial_dims, n_input_channels=cfg.in_channels, num_classes=d,
                    conv1_t_stride=2, conv1_t_size=7)


@register_image_encoder("resnet10")
def _resnet10(cfg, d, size):
    from monai.networks.nets import resnet10

    return resnet10(spatial_dims=cfg.spatial_dims, n_input_channels=cfg.in_channels, num_classes=d,
                    conv1_t_stride=2, conv1_t_size=7)


@register_image_encoder("efficientnet-b0")
def _efficientnet(cfg, d, size):
    from monai.networks.nets import EfficientNetBN

    return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=cfg.spatial_dims,
                          in_channels=cfg.in_channels, num_classes=d)


class _ViTFeatures(nn.Module):
    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        return self.vit(x)[0]  # MONAI's ViT returns (logits, hidden states)


@register_image_encoder("vit")
def _vit(cfg, d, size):
    from monai.networks.nets import ViT

    patch = tuple(max(1, s // 8) for s in size)
    return _ViTFeatures(ViT(in_channels=cfg.in_channels, img_size=tuple(size), patch_size=patch,
                            spatial_dims=cfg.spatial_dims, classification=True, num_classes=d, hidden_size=192,
                            mlp_dim=768, num_layers=6, num_heads=6, dropout_rate=cfg.dropout,
                            post_activation=None))


class ImageEncoder(nn.Module):
    """A MONAI backbone whose classification layer outputs the common width d.

    Args:
        cfg: encoder settings (name, spatial dims, channels, local weights).
        out_dim: the common width d.
        image_size: input size (used by ViT).

    The network is reachable as ``.net`` (Grad-CAM targets e.g. ``net.features.denseblock4``).
    """

    def __init__(self, cfg: ImageEncoderConfig, out_dim: int, image_size: tuple[int, ...]):
        super().__init__()
        if cfg.name not in _REGISTRY:
            raise ClinfuseError(f"model.image.name {cfg.name!r} is not a registered image encoder; registered: "
                                f"{', '.join(list_image_encoders())} (add one with clinfuse.models.register_image_encoder)")
        self.net = _REGISTRY[cfg.name](cfg, out_dim, tuple(image_size))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, *spatial] -> [B, d]
        return self.net(x)

    def load_local_weights(self, path: str | Path) -> list[str]:
        """Load weights from a local safetensors file or torch state dict (never executes code).

        Keys of the classification layer may differ in shape and are skipped. Returns the skipped keys.
        """
        path = Path(path)
        if not path.is_file():
            raise ClinfuseError(f"{path}: image encoder weights not found (model.image.weights)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = self.net.state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(state) - set(usable))
        if not usable:
            raise ClinfuseError(f"{path}: no parameter matches the '{type(self.net).__name__}' encoder")
        self.net.load_state_dict(usable, strict=False)
        return skipped
