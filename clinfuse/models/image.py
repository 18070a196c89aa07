"""Image encoders: MONAI networks chosen by name, projecting to the common width d."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..config import ImageEncoderConfig
from ..errors import ClinfuseError

__all__ = ["ImageEncoder", "WeightsReport", "list_image_encoders", "match_weights", "register_image_encoder"]

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
    """A MONAI backbone whose classification layer outputs the common width d (with ``project: false`` that
    layer is dropped and the pooled features, of width d, are the output).

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
        self.projected = cfg.project  # false: the classification layer is dropped (_drop_projection)
        if not cfg.project:
            self._drop_projection(cfg.name, out_dim)

    def _drop_projection(self, name: str, out_dim: int) -> None:
        """Replace the network's last linear layer (its classification layer) by the identity: the pooled
        features become the output, whose width must be the fusion width."""
        last = _last_linear(self.net)
        if last is None:
            raise ClinfuseError(f"model.image.project false: image encoder {name!r} has no linear classification "
                                "layer to drop; set model.image.project true")
        width = self.net.get_submodule(last).in_features
        if width != out_dim:
            raise ClinfuseError(f"model.image.project false: {name!r} gives {width} pooled features but "
                                f"model.fusion.dim is {out_dim}; set model.fusion.dim={width}")
        self.net.set_submodule(last, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, *spatial] -> [B, d]
        return self.net(x)

    def load_local_weights(self, path: str | Path, min_fraction: float = 0.9) -> "WeightsReport":
        """Load a local safetensors file or torch state dict into the encoder (never executes code).

        Reads the layouts hospitals have: MONAI's own (a saved MONAI network or a clinfuse encoder), and
        torchvision's DenseNet and ResNet (the layout of ImageNet and most chest X-ray checkpoints, e.g.
        torchxrayvision's), under any wrapper prefix (``module.``, ``model.``, ``backbone.``, ...). The
        classification layer is loaded only where its shape fits (it projects to the fusion width); a stem
        convolution for 3 channels is summed over its channels for a 1-channel encoder (and spread over 3 the
        other way), which keeps its response to a grey image; a convolution bias that the file's network has
        no slot for (MONAI's ResNet shortcut) is set to zero, as in the file's network.

        Raises:
            ClinfuseError: the file is missing or unreadable, or less than `min_fraction` of the encoder's
                backbone parameters (by element count, classification layer excluded) found a tensor of the
                right shape in it; the message says how much matched and names keys on both sides.
        """
        path = Path(path)
        if not path.is_file():
            raise ClinfuseError(f"{path}: image encoder weights not found (model.image.weights)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same refusal
            raise ClinfuseError(f"{path}: not a safetensors file or a torch state dict ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''}); model.image.weights") from None
        state = _unwrap_state(state)
        if not state:
            raise ClinfuseError(f"{path}: holds no tensors (model.image.weights wants a state dict)")
        report = match_weights(self.net, state, has_head=self.projected)
        if report.fraction < min_fraction:
            raise ClinfuseError(
                f"{path}: only {report.fraction:.0%} of the '{type(self.net).__name__}' encoder's backbone "
                f"({report.loaded_elements:,} of {report.total_elements:,} parameters) matches a tensor in the file "
                f"(best layout: {report.layout}; at least {min_fraction:.0%} needed); encoder keys without a match, "
                f"e.g. {', '.join(report.missing[:3]) or '-'}; file keys unused, e.g. "
                f"{', '.join(report.unused[:3]) or '-'}. Is it weights for another network (model.image.name)?")
        own = self.net.state_dict()
        own.update(report.tensors)
        self.net.load_state_dict(own)
        return report


class WeightsReport:
    """What `ImageEncoder.load_local_weights` took from a file: ``layout`` (the key map that matched best),
    ``loaded`` (encoder keys filled), ``missing`` (encoder keys left as initialised), ``unused`` (file keys not
    taken), ``adapted`` (keys changed to fit: channel sum, zero bias), ``fraction`` of backbone elements loaded."""

    def __init__(self, layout, tensors, missing, unused, adapted, loaded_elements, total_elements):
        self.layout, self.tensors, self.missing, self.unused, self.adapted = layout, tensors, missing, unused, adapted
        self.loaded = sorted(tensors)
        self.loaded_elements, self.total_elements = loaded_elements, total_elements
        self.fraction = loaded_elements / max(total_elements, 1)

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors ({self.fraction:.1%} of the backbone) from the {self.layout} layout; "
                f"{len(self.missing)} left as initialised, {len(self.unused)} file keys unused"
                + (f", adapted: {', '.join(self.adapted[:4])}" if self.adapted else ""))


_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "network", "weights")


def _unwrap_state(state) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: a bare state dict, or one under a usual key (Lightning's
    ``state_dict``, ``model``, ...)."""
    for _ in range(3):
        if isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), dict)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, dict):
        return {}
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _torchvision_densenet(key: str) -> str:
    import re

    # torchvision: denselayer1.norm1 (and the old denselayer1.norm.1); MONAI: denselayer1.layers.norm1
    return re.sub(r"(denselayer\d+)\.(norm|relu|conv)\.?(\d)", r"\1.layers.\2\3", key)


_LAYOUTS = {"MONAI / as saved": lambda k: k, "torchvision DenseNet": _torchvision_densenet}


def _last_linear(net: nn.Module) -> str | None:
    """The name of the network's last linear layer (its classification layer), or None."""
    last = None
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last


def _head_keys(net: nn.Module) -> set[str]:
    """State keys of the network's last linear layer: the classification layer that projects to d."""
    last = _last_linear(net)
    return {f"{last}.{p}" for p, _ in net.get_submodule(last).named_parameters()} if last is not None else set()


def match_weights(net: nn.Module, state: dict[str, torch.Tensor], has_head: bool = True) -> WeightsReport:
    """The best fit of `state` to `net` over the known key layouts and wrapper prefixes (see
    `ImageEncoder.load_local_weights`). `has_head`: the net's last linear layer is its classification layer
    (left out of the coverage); false for an encoder whose classification layer was dropped
    (``model.image.project: false``), where a last linear layer is part of the backbone (ViT's MLP)."""
    own = net.state_dict()
    head = _head_keys(net) if has_head else set()
    counted = [k for k, v in own.items() if k not in head and v.is_floating_point()]
    total = sum(own[k].numel() for k in counted)
    stem = next((k for k, v in own.items() if v.ndim >= 3), None)
    best = None
    for layout, fn in _LAYOUTS.items():
        mapped = {fn(k): k for k in state}
        for prefix in _prefixes(mapped, own):
            tensors, adapted = {}, []
            for mk, fk in mapped.items():
                if not mk.startswith(prefix):
                    continue
                k, v = mk[len(prefix):], state[fk]
                if k not in own:
                    continue
                if own[k].shape != v.shape and k == stem and v.ndim == own[k].ndim and v.shape[0] == own[k].shape[0] \
                        and v.shape[2:] == own[k].shape[2:]:
                    v = _adapt_channels(v, own[k].shape[1])
                    adapted.append(f"{k} ({state[fk].shape[1]} -> {own[k].shape[1]} channels)")
                if own[k].shape == v.shape:
                    tensors[k] = v.to(own[k].dtype)
            for k in list(own):  # a conv bias the file's network lacks: zero, as a bias-free conv
                if k.endswith(".bias") and k not in tensors and k[:-5] + ".weight" in tensors and own[k].ndim == 1 \
                        and own[k[:-5] + ".weight"].ndim >= 3:
                    tensors[k] = torch.zeros_like(own[k])
                    adapted.append(f"{k} (zero: no bias in the file)")
            loaded = sum(own[k].numel() for k in tensors if k in counted)
            if best is None or loaded > best[0]:
                used = {prefix + k for k in tensors}
                best = (loaded, layout, tensors, adapted,
                        sorted(k for k in counted if k not in tensors),
                        sorted(fk for mk, fk in mapped.items() if mk not in used))
    loaded, layout, tensors, adapted, missing, unused = best
    return WeightsReport(layout, tensors, missing, unused, adapted, loaded, total)


def _prefixes(mapped: dict[str, str], own: dict) -> list[str]:
    """Wrapper prefixes to try: none, and each prefix that turns a file key into an encoder key."""
    out = {""}
    probe = [k for k in own][:4]
    for mk in mapped:
        for k in probe:
            if mk.endswith("." + k):
                out.add(mk[: -len(k)])
    return sorted(out, key=len)[:12]


def _adapt_channels(w: torch.Tensor, channels: int) -> torch.Tensor:
    """A stem convolution for another number of input channels: 3 -> 1 sums (a grey image replicated to RGB gives
    the same response), 1 -> C spreads the kernel over C channels equally."""
    if channels == 1:
        return w.sum(1, keepdim=True)
    if w.shape[1] == 1:
        return w.repeat(1, channels, *([1] * (w.ndim - 2))) / channels
    return w.mean(1, keepdim=True).repeat(1, channels, *([1] * (w.ndim - 2)))
