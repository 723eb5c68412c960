"""cvlib.training.checkpoint: atomic saves, loading that never runs pickled code, and model packages.

Models are resnet18 with a small head, scored on 16x16 inputs: enough to compare outputs
exactly, cheap enough to build several times.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from cvlib.models.factory import create_model
from cvlib.training.checkpoint import (
    PACKAGE_META,
    PACKAGE_WEIGHTS,
    build_from_meta,
    load_checkpoint,
    load_package,
    model_from_checkpoint,
    save_atomic,
    save_package,
)

CLASSES = ["cat", "dog", "eel"]


@pytest.fixture(scope="module")
def meta() -> dict:
    return {
        "arch": "resnet18",
        "class_names": CLASSES,
        "preprocessing": {"image_size": 16, "resize_size": 18, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "head": {"hidden_dim": 24, "dropout": 0.3},
        "config": {"train": {"epochs": 2}},
        "dataset_hash": "0" * 64,
    }


@pytest.fixture(scope="module")
def model(meta):
    """A trained-looking model: seeded init plus BatchNorm statistics moved away from their
    defaults, so a load that silently skipped buffers would change the outputs."""
    torch.manual_seed(3)
    m = create_model("resnet18", len(CLASSES), weights="none", hidden_dim=24, dropout=0.3)
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, 16, 16) * 2 + 1)  # updates running_mean / running_var
    return m.eval()


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _outputs(m, x):
    with torch.no_grad():
        return m.eval()(x)


# --------------------------------------------------------------------------- save_atomic


def test_save_atomic_then_load(tmp_path):
    state = {"epoch": 3, "weights": torch.arange(6.0).reshape(2, 3), "history": [{"loss": 0.5}], "name": "x"}
    path = save_atomic(state, tmp_path / "sub" / "last.pt")  # creates the folder
    assert path == tmp_path / "sub" / "last.pt"
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [{"loss": 0.5}] and loaded["name"] == "x"
    assert torch.equal(loaded["weights"], state["weights"])
    assert os.listdir(tmp_path / "sub") == ["last.pt"]


def test_save_atomic_replaces_an_existing_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    save_atomic({"epoch": 2}, path)
    assert load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["last.pt"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, error):
    """torch.save writes part of the file and dies: the previous checkpoint must still load and
    no temp file may be left behind (also for Ctrl-C, a BaseException)."""
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save
    written = []

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        written.append(True)
        raise error

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(type(error)):
        save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert written  # the fake really ran (and wrote bytes somewhere)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        save_atomic({"epoch": 1}, tmp_path / "last.pt")
    assert os.listdir(tmp_path) == []


def test_save_atomic_respects_the_umask(tmp_path):
    """An atomic write should end up with the permissions an ordinary write would have."""
    old = os.umask(0o022)
    try:
        path = save_atomic({"epoch": 1}, tmp_path / "last.pt")
        plain = tmp_path / "plain.pt"
        torch.save({"epoch": 1}, plain)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777) == 0o644


# --------------------------------------------------------------------------- load_checkpoint


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: stands in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "epoch": 1, "trap": _Payload(str(marker))}, path)
    assert not marker.exists()

    with pytest.raises(ValueError, match="not a loadable visionflow checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()

    # Control: the payload is live, so the refusal above is what kept it from running.
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_plain_pickle_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(ValueError):
        load_checkpoint(path)
    assert not marker.exists()


def test_garbage_and_missing_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- packages


def test_package_round_trip_gives_identical_outputs(tmp_path, model, meta, batch):
    out = save_package(model, meta, tmp_path / "pkg")
    assert sorted(os.listdir(out)) == sorted([PACKAGE_META, PACKAGE_WEIGHTS])
    assert json.loads((out / PACKAGE_META).read_text()) == meta
    loaded, loaded_meta = load_package(out)
    assert loaded_meta == meta
    assert not loaded.training  # ready to score
    assert torch.equal(_outputs(loaded, batch), _outputs(model, batch))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_package_weights_are_safetensors_not_pickle(tmp_path, model, meta):
    """Loading a package never unpickles: the weights file is a safetensors file."""
    from safetensors.torch import load_file

    out = save_package(model, meta, tmp_path / "pkg")
    tensors = load_file(str(out / PACKAGE_WEIGHTS))
    assert tensors.keys() == model.state_dict().keys()
    assert not (out / PACKAGE_WEIGHTS).read_bytes().startswith(b"PK")  # not a torch.save zip


def test_package_found_in_a_nested_artifact_folder(tmp_path, model, meta, batch):
    """MLflow downloads a model as <dir>/<artifact path>/...: the package is found below."""
    save_package(model, meta, tmp_path / "download" / "model" / "data")
    loaded, _ = load_package(tmp_path / "download")
    assert torch.equal(_outputs(loaded, batch), _outputs(model, batch))


def test_load_package_without_metadata_is_file_not_found(tmp_path):
    folder = tmp_path / "not_a_package"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=PACKAGE_META):
        load_package(folder)


def test_build_from_meta_uses_the_head_shape(meta):
    skeleton = build_from_meta(meta)
    assert skeleton.fc[1].out_features == 24 and skeleton.fc[4].out_features == len(CLASSES)


def test_model_from_checkpoint(tmp_path, model, meta, batch):
    """A best.pt written by training (plain dicts and tensors) loads straight into an eval model,
    also through load_package (which accepts a checkpoint file)."""
    path = save_atomic({"model": model.state_dict(), "meta": meta, "epoch": 2}, tmp_path / "best.pt")
    loaded, loaded_meta = model_from_checkpoint(path)
    assert loaded_meta == meta
    assert not loaded.training
    assert torch.equal(_outputs(loaded, batch), _outputs(model, batch))
    via_package, _ = load_package(path)
    assert torch.equal(_outputs(via_package, batch), _outputs(model, batch))


def test_model_from_checkpoint_rejects_mismatched_weights(tmp_path, model, meta):
    """Metadata and weights that disagree (a head for 5 classes, 3 class names) fail loudly
    rather than loading a partial model."""
    other = create_model("resnet18", 5, weights="none", hidden_dim=24)
    path = save_atomic({"model": other.state_dict(), "meta": meta, "epoch": 1}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="size mismatch"):
        model_from_checkpoint(path)
