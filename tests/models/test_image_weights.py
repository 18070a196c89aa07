"""Pretrained image weights a hospital already has: torchvision's DenseNet121 and ResNet18 layouts (ImageNet
and most chest X-ray checkpoints) and MONAI's own, loaded into the MONAI encoders through a key map.

The torchvision state dicts are saved by torchvision's own model code (`densenet121(weights=None)`,
`resnet18(weights=None)`, nothing downloaded), run in a subprocess from the wheel's files that
`scripts/test.sh` keeps under .venv/share: the wheel's compiled part needs a CUDA torch, its models do not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clinfuse.config import ImageEncoderConfig
from clinfuse.errors import ClinfuseError
from clinfuse.models.image import ImageEncoder

TV = Path(os.environ.get("CLINFUSE_TORCHVISION_SRC", Path(__file__).resolve().parents[2] / ".venv/share/torchvision-0.28.0"))

SAVE = r"""
import sys, types, torch
pkg = types.ModuleType("torchvision"); pkg.__path__ = [sys.argv[1] + "/torchvision"]; sys.modules["torchvision"] = pkg
from torchvision.models import densenet, resnet
torch.manual_seed(0)
for name, net in (("densenet121", densenet.densenet121(weights=None)), ("resnet18", resnet.resnet18(weights=None))):
    net.eval()
    for m in net.modules():  # non-trivial batch-norm statistics, so that a wrong map shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1); m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 64, 64).repeat(1, 3, 1, 1)  # a grey image as RGB
    with torch.no_grad():
        feats = net.features(x) if name == "densenet121" else net.layer4(net.layer3(net.layer2(net.layer1(
            net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    torch.save({"module." + k: v for k, v in net.state_dict().items()} if name == "resnet18" else net.state_dict(),
               sys.argv[2] + f"/{name}.pt")
    torch.save({"x": x[:, :1].clone(), "features": feats}, sys.argv[2] + f"/{name}-features.pt")
"""


@pytest.fixture(scope="module")
def torchvision_files(tmp_path_factory):
    if not (TV / "torchvision" / "models" / "densenet.py").is_file():
        pytest.skip(f"torchvision's model code is not under {TV} (scripts/test.sh fetches the 0.28.0 wheel from PyPI)")
    d = tmp_path_factory.mktemp("tv")
    subprocess.run([sys.executable, "-c", SAVE, str(TV), str(d)], check=True, timeout=300)
    return d


def test_torchvision_densenet121_loads_into_the_monai_encoder_and_computes_the_same_features(torchvision_files):
    enc = ImageEncoder(ImageEncoderConfig(name="densenet121"), 32, (64, 64)).eval()
    rep = enc.load_local_weights(torchvision_files / "densenet121.pt")
    assert rep.layout == "torchvision DenseNet"
    assert rep.fraction == 1.0 and rep.missing == []
    assert rep.unused == ["classifier.bias", "classifier.weight"]  # ImageNet's 1000-class layer is not ours
    assert any("features.conv0.weight (3 -> 1 channels)" in a for a in rep.adapted)
    assert rep.summary().startswith("725 tensors (100.0% of the backbone) from the torchvision DenseNet layout")
    ref = torch.load(torchvision_files / "densenet121-features.pt")
    with torch.no_grad():
        torch.testing.assert_close(enc.net.features(ref["x"]), ref["features"], rtol=1e-4, atol=1e-4)


def test_torchvision_resnet18_under_a_wrapper_prefix_loads_and_computes_the_same_features(torchvision_files):
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18"), 32, (64, 64)).eval()
    rep = enc.load_local_weights(torchvision_files / "resnet18.pt")
    assert rep.fraction == 1.0
    assert rep.unused == ["module.fc.bias", "module.fc.weight"]
    # MONAI's shortcut convolutions have a bias that torchvision's lack: zero, as in the file's network
    assert sorted(a for a in rep.adapted if "zero" in a) == [f"layer{i}.0.downsample.0.bias (zero: no bias in the file)"
                                                          for i in (2, 3, 4)]
    ref = torch.load(torchvision_files / "resnet18-features.pt")
    n = enc.net
    with torch.no_grad():
        out = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.act(n.bn1(n.conv1(ref["x"]))))))))
    torch.testing.assert_close(out, ref["features"], rtol=1e-4, atol=1e-4)


def test_weights_of_another_network_are_refused_with_what_matched(torchvision_files):
    enc = ImageEncoder(ImageEncoderConfig(name="densenet121"), 32, (64, 64))
    before = {k: v.clone() for k, v in enc.net.state_dict().items()}
    with pytest.raises(ClinfuseError, match=r"resnet18\.pt: only 0% of the 'DenseNet121' encoder's backbone.*"
                                            r"model\.image\.name"):
        enc.load_local_weights(torchvision_files / "resnet18.pt")
    assert all(torch.equal(before[k], v) for k, v in enc.net.state_dict().items())  # nothing half-loaded


def test_monai_layout_with_another_head_and_three_channels_loads(tmp_path):
    from monai.networks.nets import DenseNet121

    src = DenseNet121(spatial_dims=2, in_channels=3, out_channels=14).eval()  # e.g. a 14-finding chest model
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "monai.ckpt")
    enc = ImageEncoder(ImageEncoderConfig(name="densenet121"), 32, (64, 64)).eval()
    rep = enc.load_local_weights(tmp_path / "monai.ckpt")
    assert rep.layout == "MONAI / as saved" and rep.fraction == 1.0
    assert rep.unused == ["model.class_layers.out.bias", "model.class_layers.out.weight"]
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc.net.features(x), src.features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_unreadable_and_empty_files_are_refused_in_one_line(tmp_path):
    enc = ImageEncoder(ImageEncoderConfig(name="densenet_tiny"), 16, (32, 32))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ClinfuseError, match=r"junk\.pt: not a safetensors file or a torch state dict"):
        enc.load_local_weights(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ClinfuseError, match=r"empty\.pt: holds no tensors"):
        enc.load_local_weights(tmp_path / "empty.pt")
