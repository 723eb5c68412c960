"""cvlib.models.factory: the transfer head, freezing, and weight loading that fails with a message a user
can act on.

Downloads are cut off by monkeypatching ``torch.hub``'s downloader and ``TORCH_HOME`` points at a
temporary folder, so the tests mean the same thing online and offline. One test leaves torch's
real downloader in place, as a machine without internet has it, and skips where it succeeds.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cvlib.models.factory import (
    WeightsUnavailableError,
    check_weights,
    create_model,
    head_parameters,
    pick_device,
    resolve_weights,
    transfer_head,
)

R18_FILE = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME and a downloader that fails like a machine without internet."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # in case someone called set_dir

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: refusing to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    """A torchvision-layout resnet18 state dict with non-default values (seeded init, and BN
    buffers changed) so "loaded" can be told from "freshly initialised"."""
    torch.manual_seed(1234)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.bn1.running_mean.fill_(0.25)
        model.layer4[1].bn2.weight.fill_(1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_backbone_equals(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert len(backbone) > 100
    for key in backbone:
        assert torch.equal(own[key], state[key]), key


# --------------------------------------------------------------------------- the head


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_create_model_has_transfer_head(arch):
    model = create_model(arch, 7, weights="none", hidden_dim=64, dropout=0.25)
    fc = model.fc
    assert isinstance(fc, nn.Sequential)
    assert [type(m) for m in fc] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    in_features = 512 if arch == "resnet18" else 2048
    assert (fc[1].in_features, fc[1].out_features) == (in_features, 64)
    assert (fc[4].in_features, fc[4].out_features) == (64, 7)
    assert fc[0].p == fc[3].p == 0.25
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_transfer_head_defaults():
    head = transfer_head(10, 3)
    assert head[1].out_features == 512 and head[0].p == pytest.approx(0.3)


def test_head_parameters_are_the_new_head():
    """The helper exists to give an optimizer (or a freeze/unfreeze schedule) the head's
    parameters; it must work on the models visionflow builds."""
    model = create_model("resnet18", 4, weights="none", hidden_dim=8)
    assert {id(p) for p in head_parameters(model)} == {id(p) for p in model.fc.parameters()}


def test_freeze_backbone_leaves_only_head_trainable():
    model = create_model("resnet18", 3, weights="none", freeze_backbone=True, hidden_dim=16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"fc.{n}" for n, _ in model.fc.named_parameters()}
    assert trainable == {"fc.1.weight", "fc.1.bias", "fc.4.weight", "fc.4.bias"}
    # A backward pass leaves the backbone without gradients.
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.conv1.weight.grad is None
    assert model.fc[4].weight.grad is not None


def test_without_freeze_everything_trains():
    model = create_model("resnet18", 3, weights="none")
    assert all(p.requires_grad for p in model.parameters())


def test_random_init_follows_the_seed():
    torch.manual_seed(0)
    a = create_model("resnet18", 3, weights="none")
    torch.manual_seed(0)
    b = create_model("resnet18", 3, weights="none")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --------------------------------------------------------------------------- bad names


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="resnet_nope"):
        create_model("resnet_nope", 3, weights="none")


def test_unknown_architecture_with_pretrained_weights_is_named():
    with pytest.raises(ValueError, match="resnet_nope"):
        create_model("resnet_nope", 3, weights="DEFAULT")


def test_unknown_weights_name_is_named_with_choices():
    with pytest.raises(ValueError) as info:
        create_model("resnet18", 3, weights="IMAGENET1K_V9")
    message = str(info.value)
    assert "IMAGENET1K_V9" in message
    assert "IMAGENET1K_V1" in message  # the valid choices are listed
    assert not isinstance(info.value, WeightsUnavailableError)  # a typo, not a download problem


@pytest.mark.parametrize("value", [None, "none", "None", "NONE", ""])
def test_none_means_random_init(value):
    assert resolve_weights("resnet18", value) == (None, None)
    assert check_weights("resnet18", value) == "random initialisation"


def test_named_weights_resolve_to_the_enum():
    enum, path = resolve_weights("resnet18", "IMAGENET1K_V1")
    assert enum is torchvision.models.ResNet18_Weights.IMAGENET1K_V1 and path is None
    assert resolve_weights("resnet18", "DEFAULT")[0] is torchvision.models.ResNet18_Weights.DEFAULT


# --------------------------------------------------------------------------- pretrained, offline


def test_check_weights_offline_explains_the_remedy(offline_hub):
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights("resnet18", "DEFAULT")
    message = str(info.value)
    assert "--weights none" in message
    assert "--weights PATH" in message
    assert R18_FILE in message  # which file to fetch...
    assert str(offline_hub) in message  # ...and where to put it
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_create_model_offline_raises_weights_unavailable(offline_hub):
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        create_model("resnet18", 3, weights="DEFAULT")


def test_offline_failure_prints_nothing_but_the_error(offline_hub, capfd):
    """torch.hub announces 'Downloading: "https://..." to ...' before it tries; offline that line
    must not come before the one clear message (which the CLI prints from the exception)."""
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights("resnet18", "DEFAULT")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert "\n" not in str(info.value) and "--weights none" in str(info.value)


def test_a_machine_without_internet_prints_nothing_but_the_error(tmp_path, monkeypatch, capfd):
    """The same with torch's real downloader and an empty TORCH_HOME (as on a machine without
    internet; skipped where the download succeeds)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    try:
        check_weights("resnet18", "DEFAULT")
    except WeightsUnavailableError as exc:
        out, err = capfd.readouterr()
        assert (out, err) == ("", ""), (out, err)
        assert "\n" not in str(exc) and R18_FILE in str(exc)
    else:
        pytest.skip("this machine could download the weights")


def test_a_download_that_succeeds_still_says_where_it_went(offline_hub, r18_state, monkeypatch, capfd):
    """Held back while it runs, torch.hub's 'Downloading: ...' line is written once the weights are in."""

    def fake_download(url, dst, *args, **kwargs):
        torch.save(r18_state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    assert check_weights("resnet18", "DEFAULT").startswith("pretrained resnet18")
    out, err = capfd.readouterr()
    cached = offline_hub / "hub" / "checkpoints" / R18_FILE
    assert out == f'Downloading: "{torchvision.models.ResNet18_Weights.DEFAULT.url}" to {cached}\n' and err == ""
    assert cached.is_file()
    check_weights("resnet18", "DEFAULT")  # from the cache now: nothing to say
    assert capfd.readouterr() == ("", "")


def test_get_state_dict_failure_is_wrapped(monkeypatch):
    """Whatever the weights API raises (bad hash, HTTP error) becomes the same clear error."""

    def broken(self, *args, **kwargs):
        raise RuntimeError("invalid hash value")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", broken)
    with pytest.raises(WeightsUnavailableError, match="invalid hash value"):
        check_weights("resnet18", "IMAGENET1K_V1")


def test_pretrained_weights_come_from_the_torch_home_cache(offline_hub, r18_state):
    """An offline machine with the file in ``$TORCH_HOME/hub/checkpoints`` can use DEFAULT."""
    cache = offline_hub / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(r18_state, cache / R18_FILE)
    assert check_weights("resnet18", "DEFAULT").startswith("pretrained resnet18")
    model = create_model("resnet18", 3, weights="DEFAULT")
    _assert_backbone_equals(model, r18_state)
    assert model.fc[4].out_features == 3


# --------------------------------------------------------------------------- local files


def test_local_weights_file_is_loaded(tmp_path, r18_state):
    path = tmp_path / "r18.pth"
    torch.save(r18_state, path)
    assert check_weights("resnet18", str(path)) == f"weights file {path}"
    model = create_model("resnet18", 5, weights=str(path))
    _assert_backbone_equals(model, r18_state)
    assert model.fc[4].out_features == 5  # the head is new whatever the file's classifier was


def test_local_safetensors_file_is_loaded(tmp_path, r18_state):
    from safetensors.torch import save_file

    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in r18_state.items()}, str(path))
    _assert_backbone_equals(create_model("resnet18", 2, weights=str(path)), r18_state)


def test_visionflow_checkpoint_is_a_backbone_source(tmp_path):
    """A previous run's checkpoint (``{"model": ..., "meta": ...}``, transfer head inside) can
    seed a new run with a different number of classes."""
    torch.manual_seed(7)
    old = create_model("resnet18", 4, weights="none", hidden_dim=32)
    path = tmp_path / "best.pt"
    torch.save({"model": old.state_dict(), "meta": {"arch": "resnet18"}, "epoch": 3}, path)
    new = create_model("resnet18", 6, weights=str(path), hidden_dim=32)
    backbone = {k: v for k, v in old.state_dict().items() if not k.startswith("fc.")}
    _assert_backbone_equals(new, backbone)
    assert new.fc[4].out_features == 6


def test_missing_weights_file_is_weights_unavailable(tmp_path):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights("resnet18", str(missing))
    assert str(missing) in str(info.value) and "--weights none" in str(info.value)
    with pytest.raises(WeightsUnavailableError):
        create_model("resnet18", 3, weights=str(missing))


def test_file_with_no_matching_tensors_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(WeightsUnavailableError, match="no tensors that fit"):
        create_model("resnet18", 3, weights=str(path))


def test_corrupt_weights_file_is_weights_unavailable(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="--weights none"):
        create_model("resnet18", 3, weights=str(path))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(WeightsUnavailableError):
        create_model("resnet18", 3, weights=str(path))


# --------------------------------------------------------------------------- device


def test_pick_device_explicit_name_wins():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # named, not probed


def test_pick_device_auto():
    dev = pick_device("auto")
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")


def test_pick_device_auto_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
