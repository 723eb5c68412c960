"""Architectures by name: every one the retrain flow offers builds through create_model (random
init, no download), trains a step, scores, and is rebuilt from a package's metadata so its
weights load back.

Sizes are the smallest at which each architecture trains sanely, the optimizer is plain SGD (no
state) and the rebuild happens on the meta device, so the file stays well under a minute on 2
CPU cores even with VGG-16 (138M parameters) in it.
ViT-B/16 is built at ``image_size=32`` (2x2 patches) through create_model's ``model_kwargs``: at
its native 224 px one training step alone takes ~15 s here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cvlib.explain.gradcam import grad_cam
from cvlib.models.factory import _head_attr, create_model
from cvlib.training.checkpoint import build_from_meta
from tests.threads import one_torch_thread

CLASSES = ["cat", "dog", "fox"]
HEAD = {"hidden_dim": 16, "dropout": 0.1}

# arch -> (input size for the test, constructor kwargs). The smallest size at which a batch of 2
# trains sanely: a network that downsamples 32x and uses BatchNorm (ResNet, EfficientNet,
# MobileNet) gets a 1x1 map at 32 px, where its last BN normalises two values and the first
# gradient explodes (|g| ~ 1e5); at 64 px it has 2x2 maps. VGG (no BN) and ConvNeXt (LayerNorm)
# are fine at 32 px; SimpleCNN's minimum is 8 px.
ARCHS = {
    "simple_cnn": (8, {}),
    "resnet18": (64, {}),
    "resnet34": (64, {}),
    "resnet101": (64, {}),
    "efficientnet_b0": (64, {}),
    "mobilenet_v3_large": (64, {}),
    "vgg16": (32, {}),
    "convnext_tiny": (32, {}),
    "vit_b_16": (32, {"image_size": 32}),
}


one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _train_one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step as fit() takes it (gradient clipping included): finite loss and gradients,
    the head moves, and no parameter becomes NaN."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    head = [p for p in model.parameters() if p.requires_grad][-2]  # the last Linear's weight
    before = head.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    assert not torch.equal(head.detach(), before), "the optimizer step did not move the head"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_builds_trains_scores_and_rebuilds_from_meta(arch):
    size, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    model = create_model(arch, len(CLASSES), weights="none", **HEAD, **kwargs)

    # The transfer head replaced the original classifier (not stacked beside it).
    heads = [m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 5
             and isinstance(m[1], nn.Linear) and m[1].out_features == HEAD["hidden_dim"]
             and isinstance(m[4], nn.Linear) and m[4].out_features == len(CLASSES)]
    assert len(heads) == 1
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())
    if arch == "vit_b_16":  # heads.head replaced in place, no second child appended
        assert list(dict(model.heads.named_children())) == ["head"]

    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    _train_one_step(model, x, y)

    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    assert probs.shape == (2, len(CLASSES))
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)

    # Grad-CAM finds a layer by itself (ViT: tokens reshaped to the patch grid) and explains.
    maps = grad_cam(model, x)
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0

    # Rebuilt on the meta device: the skeleton's keys and shapes without paying for a second
    # random init (VGG-16 and ConvNeXt take ~4 s each to initialise here); ``assign=True`` then
    # puts the trained tensors in, with load_state_dict's usual strict key and shape checks.
    with torch.device("meta"):
        rebuilt = build_from_meta({"arch": arch, "class_names": CLASSES, "head": HEAD})
    if kwargs:
        # A package records no constructor kwargs: the rebuilt ViT has the default 224 px
        # position embedding. Everything else must line up exactly.
        own, new = model.state_dict(), rebuilt.state_dict()
        assert own.keys() == new.keys()
        differ = {k for k in own if own[k].shape != new[k].shape}
        assert differ == {"encoder.pos_embedding"}
        return
    rebuilt.load_state_dict(model.state_dict(), assign=True)  # strict: every key and shape fits
    assert not any(t.is_meta for t in [*rebuilt.parameters(), *rebuilt.buffers()])
    with torch.no_grad():
        assert torch.allclose(torch.softmax(rebuilt.eval()(x), dim=1), probs, atol=1e-5)

def test_vit_classifier_is_found_by_name():
    """torchvision's ViT names its classifier ``heads.head``; replacing it by index ("0")
    appended a second head and the model could not run."""
    parent, attr, in_features = _head_attr(torchvision.models.vit_b_16(image_size=32))
    assert parent is not None and attr == "head" and in_features == 768


def test_a_bad_model_kwarg_is_not_reported_as_an_unknown_architecture():
    with pytest.raises(Exception, match="indivisible by patch size") as info:
        create_model("vit_b_16", 2, weights="none", image_size=30)  # not a multiple of 16
    assert "unknown architecture" not in str(info.value)
