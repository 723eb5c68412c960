"""cvlib.models.simple_cnn and its registration in cvlib.models.factory: the notebook's CNN as an architecture
visionflow trains, packages and rebuilds like any torchvision one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvlib.models.factory import (
    NoPretrainedWeightsError,
    WeightsUnavailableError,
    check_weights,
    create_model,
)
from cvlib.models.simple_cnn import SimpleCNN
from cvlib.training.checkpoint import build_from_meta
from tests.threads import one_torch_thread

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32), (3, 64), (3, 37)])
def test_any_size_from_8_px_and_grey_or_rgb(channels, size):
    model = SimpleCNN(10, in_channels=channels).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, size, size)).shape == (2, 10)


def test_non_square_input():
    model = SimpleCNN(4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 48)).shape == (1, 4)


def test_too_small_or_wrong_channels_is_a_clear_error():
    model = SimpleCNN(3)
    with pytest.raises(ValueError, match="at least 8 px"):
        model(torch.randn(1, 3, 7, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))


def test_structure_blocks_width_and_head():
    model = SimpleCNN(5, width=8, hidden_dim=20, dropout=0.25)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]
    assert [type(m) for m in model.features.block1] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    linears = [m for m in model.fc.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 20), (20, 5)]
    assert all(m.p == pytest.approx(0.25) for m in model.fc.modules() if isinstance(m, nn.Dropout))


def test_hidden_dim_none_gives_a_plain_linear_head():
    model = SimpleCNN(3, hidden_dim=None)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 128


def test_create_model_builds_it_with_the_transfer_head():
    model = create_model("simple_cnn", 7, weights="none", hidden_dim=48, dropout=0.1)
    assert isinstance(model, SimpleCNN)
    assert model.fc[1].in_features == 128 and model.fc[1].out_features == 48 and model.fc[4].out_features == 7
    # Same keys and shapes as the class built directly: one architecture, however it is made.
    direct = SimpleCNN(7, hidden_dim=48, dropout=0.1).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in direct.items()}


def test_create_model_passes_model_kwargs():
    model = create_model("simple_cnn", 2, weights="none", hidden_dim=8, in_channels=1, width=4)
    assert model.features.block1.conv.in_channels == 1 and model.features.block3.conv.out_channels == 16


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = create_model("simple_cnn", 3, weights="none", hidden_dim=8, freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.1.weight", "fc.1.bias", "fc.4.weight", "fc.4.bias"}


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1"])
def test_named_weights_are_refused_with_a_clear_message(weights):
    with pytest.raises(ValueError, match="no pretrained weights exist for simple_cnn") as info:
        create_model("simple_cnn", 3, weights=weights)
    assert "--weights none" in str(info.value)
    # The CLI's preflight catches WeightsUnavailableError and prints it as one line.
    assert isinstance(info.value, (NoPretrainedWeightsError, WeightsUnavailableError))
    with pytest.raises(ValueError, match="simple_cnn"):
        check_weights("simple_cnn", weights)


def test_a_local_weights_file_loads(tmp_path):
    torch.manual_seed(3)
    trained = create_model("simple_cnn", 4, weights="none", hidden_dim=16)
    path = tmp_path / "simple.pt"
    torch.save({"model": trained.state_dict()}, path)
    assert check_weights("simple_cnn", str(path)) == f"weights file {path}"
    loaded = create_model("simple_cnn", 4, weights=str(path), hidden_dim=16)
    assert torch.equal(loaded.features.block2.conv.weight, trained.features.block2.conv.weight)


def test_checkpoint_meta_rebuilds_it_and_weights_fit():
    model = create_model("simple_cnn", 3, weights="none", hidden_dim=32, dropout=0.2).eval()
    rebuilt = build_from_meta({"arch": "simple_cnn", "class_names": ["a", "b", "c"], "head": {"hidden_dim": 32, "dropout": 0.2}})
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), model(x))


def test_it_learns_a_tiny_problem():
    """Two classes told apart by where the bright blob is: a few steps from scratch suffice.
    Guards against a head or pooling that blocks learning (e.g. features not reaching fc)."""
    torch.manual_seed(0)
    x = torch.zeros(32, 3, 16, 16)
    y = torch.arange(32) % 2
    x[y == 0, :, 2:6, 2:6] = 1.0
    x[y == 1, :, 10:14, 10:14] = 1.0
    x += 0.1 * torch.randn_like(x)
    model = create_model("simple_cnn", 2, weights="none", hidden_dim=16, dropout=0.0, width=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() == 1.0
