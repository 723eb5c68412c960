"""cvlib.explain.featuremaps: forward hooks that capture layers' outputs (one layer of one image, or
several layers of a batch in one forward), always released, model state untouched; the default
layers, the most active channels, and the PNG grids they render into."""

from __future__ import annotations

import io
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cvlib.explain.featuremaps import (
    UnknownLayerError,
    choose_layers,
    conv_blocks,
    conv_layer_names,
    default_layers,
    feature_map_panels,
    feature_map_png,
    feature_maps,
    feature_maps_batch,
    render_feature_maps,
    top_channels,
)
from cvlib.models.factory import create_model
from cvlib.models.simple_cnn import SimpleCNN
from tests.threads import one_torch_thread

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def cnn() -> SimpleCNN:
    torch.manual_seed(0)
    return SimpleCNN(4, width=8, hidden_dim=16)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_conv_layer_names_in_order(cnn):
    assert conv_layer_names(cnn) == ["features.block1.conv", "features.block2.conv", "features.block3.conv"]


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        ("features.block1.conv", (8, 32, 32)),
        ("features.block1.relu", (8, 32, 32)),
        ("features.block1", (8, 16, 16)),  # after the block's max pool
        ("features.block2.conv", (16, 16, 16)),
        ("features.block3.relu", (32, 8, 8)),
    ],
)
def test_shapes(cnn, layer, shape):
    maps = feature_maps(cnn, torch.randn(1, 3, 32, 32), layer)
    assert tuple(maps.shape) == shape
    assert maps.dtype == torch.float32 and maps.device.type == "cpu" and not maps.requires_grad


def test_matches_the_layer_output_computed_by_hand(cnn):
    x = torch.randn(1, 3, 24, 24)
    cnn.eval()
    with torch.no_grad():
        expected = cnn.features.block1.relu(cnn.features.block1.bn(cnn.features.block1.conv(x)))[0]
    assert torch.allclose(feature_maps(cnn, x, "features.block1.relu"), expected)
    assert (feature_maps(cnn, x, "features.block1.relu") >= 0).all()


def test_a_3d_image_is_taken_as_one_image(cnn):
    assert feature_maps(cnn, torch.randn(3, 16, 16), "features.block1.conv").shape == (8, 16, 16)


def test_hook_removed_and_modes_restored_also_on_error(cnn):
    cnn.train()
    cnn.features.block2.bn.eval()  # a deliberate mix (frozen BN) must survive
    before = {n: m.training for n, m in cnn.named_modules()}
    hooks = _hooks(cnn)
    feature_maps(cnn, torch.randn(1, 3, 16, 16), "features.block2.conv")
    assert _hooks(cnn) == hooks
    assert {n: m.training for n, m in cnn.named_modules()} == before
    with pytest.raises(ValueError):
        feature_maps(cnn, torch.randn(1, 3, 4, 4), "features.block3.conv")  # too small: forward fails
    assert _hooks(cnn) == hooks
    assert {n: m.training for n, m in cnn.named_modules()} == before


def test_eval_mode_is_used_so_bn_running_stats_do_not_move(cnn):
    stats = cnn.features.block1.bn.running_mean.clone()
    cnn.train()
    feature_maps(cnn, 5 + torch.randn(1, 3, 16, 16), "features.block1.relu")
    assert torch.equal(cnn.features.block1.bn.running_mean, stats)


def test_forward_stops_at_the_layer(cnn):
    """Later layers do not run: asking for conv1 of a deep model costs only conv1."""
    calls = []
    handle = cnn.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        feature_maps(cnn, torch.randn(1, 3, 16, 16), "features.block1.conv")
    finally:
        handle.remove()
    assert calls == []


def test_unknown_layer_error_lists_the_conv_layers(cnn):
    with pytest.raises(ValueError) as info:
        feature_maps(cnn, torch.randn(1, 3, 16, 16), "conv1")
    message = str(info.value)
    assert "'conv1'" in message
    for name in conv_layer_names(cnn):
        assert name in message


def test_non_spatial_layer_is_refused(cnn):
    with pytest.raises(ValueError, match="not a spatial"):
        feature_maps(cnn, torch.randn(1, 3, 16, 16), "fc.1")


def test_batch_of_two_is_refused(cnn):
    with pytest.raises(ValueError, match="one image"):
        feature_maps(cnn, torch.randn(2, 3, 16, 16), "features.block1.conv")


def test_torchvision_resnet_layer_names():
    model = create_model("resnet18", 3, weights="none", hidden_dim=8)
    names = conv_layer_names(model)
    assert names[0] == "conv1" and "layer4.1.conv2" in names
    assert feature_maps(model, torch.randn(1, 3, 64, 64), "layer1.0.conv1").shape == (64, 16, 16)
    assert feature_maps(model, torch.randn(1, 3, 64, 64), "layer4").shape == (512, 2, 2)


def test_vit_tokens_are_laid_back_on_their_grid():
    model = create_model("vit_b_16", 2, weights="none", hidden_dim=8, image_size=64)
    assert feature_maps(model, torch.randn(1, 3, 64, 64), "conv_proj").shape == (768, 4, 4)
    # 1 class token + 16 patch tokens -> (768, 4, 4)
    assert feature_maps(model, torch.randn(1, 3, 64, 64), "encoder.layers.encoder_layer_0").shape == (768, 4, 4)


def _png_pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_render_writes_a_non_blank_grid(tmp_path, cnn):
    maps = feature_maps(cnn, torch.randn(1, 3, 32, 32), "features.block1.relu")
    out = render_feature_maps(maps, tmp_path / "sub" / "maps.png", max_maps=6, title="block1")
    assert out == tmp_path / "sub" / "maps.png" and out.is_file()
    pixels = _png_pixels(out)
    assert pixels.std() > 10  # drawn maps, not an empty white canvas
    assert not (pixels == 255).all()
    assert [p.name for p in out.parent.iterdir()] == ["maps.png"]  # no temp file left behind


def test_render_caps_the_number_of_maps(tmp_path):
    maps = torch.rand(40, 6, 6)
    small = _png_pixels(render_feature_maps(maps, tmp_path / "a.png", max_maps=4))
    large = _png_pixels(render_feature_maps(maps, tmp_path / "b.png", max_maps=32))
    assert small.shape[0] * small.shape[1] < large.shape[0] * large.shape[1]


def test_render_copes_with_constant_maps_and_rejects_bad_shapes(tmp_path):
    render_feature_maps(torch.zeros(3, 5, 5), tmp_path / "flat.png")  # dead ReLUs: no division by 0
    with pytest.raises(ValueError, match="C, h, w"):
        render_feature_maps(torch.zeros(1, 2, 3, 4), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="max_maps"):
        render_feature_maps(torch.zeros(2, 3, 3), tmp_path / "bad.png", max_maps=0)


# --------------------------------------------------------------------------- the CLI command


@pytest.fixture
def checkpoint_and_image(tmp_path):
    from cvlib.training.checkpoint import save_atomic

    torch.manual_seed(0)
    model = create_model("simple_cnn", 3, weights="none", hidden_dim=16)
    meta = {
        "arch": "simple_cnn",
        "class_names": ["a", "b", "c"],
        "head": {"hidden_dim": 16, "dropout": 0.3},
        "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    ckpt = save_atomic({"model": model.state_dict(), "meta": meta, "epoch": 1}, tmp_path / "best.pt")
    x = np.mgrid[0:40, 0:40][1]
    image = tmp_path / "img.png"
    Image.fromarray(((x * 6) % 256).astype(np.uint8), "L").save(image)
    return ckpt, image


def test_cli_featuremaps_writes_the_png(checkpoint_and_image, tmp_path, capsys):
    from flows.cli import main

    ckpt, image = checkpoint_and_image
    out = tmp_path / "fm.png"
    rc = main(["featuremaps", str(image), "--model", str(ckpt), "--layer", "features.block1.relu", "--out", str(out)])
    assert rc == 0 and out.is_file()
    assert _png_pixels(out).std() > 10
    assert str(out.resolve()) in capsys.readouterr().out


def test_cli_featuremaps_unknown_layer_is_one_line_with_the_names(checkpoint_and_image, tmp_path, capsys):
    from flows.cli import EXIT_USAGE, main

    ckpt, image = checkpoint_and_image
    rc = main(["featuremaps", str(image), "--model", str(ckpt), "--layer", "conv9", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert err.startswith("error: ") and "features.block2.conv" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_cli_featuremaps_on_a_file_does_not_import_prefect_or_mlflow(checkpoint_and_image, tmp_path):
    """The command must start fast: a checkpoint file needs neither Prefect nor MLflow."""
    import subprocess
    import sys
    from pathlib import Path

    ckpt, image = checkpoint_and_image
    script = (
        "import sys; from flows.cli import main; "
        f"rc = main(['featuremaps', {str(image)!r}, '--model', {str(ckpt)!r}, '--layer', 'features.block3.conv', "
        f"'--out', {str(tmp_path / 'fm.png')!r}]); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'mlflow'})); sys.exit(rc)"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------- several layers, one forward


def _count_forwards(model: nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda *a: calls.append(1))


def test_batch_captures_every_layer_in_one_forward_and_matches_one_by_one(cnn):
    x = torch.randn(3, 3, 32, 32)
    layers = ["features.block1.conv", "features.block2", "features.block3.relu"]
    calls, handle = _count_forwards(cnn)
    try:
        maps = feature_maps_batch(cnn, x, layers)
    finally:
        handle.remove()
    assert calls == [1]
    assert list(maps) == layers
    assert [tuple(m.shape) for m in maps.values()] == [(3, 8, 32, 32), (3, 16, 8, 8), (3, 32, 8, 8)]
    for name in layers:
        for i in range(3):
            assert torch.allclose(maps[name][i], feature_maps(cnn, x[i : i + 1], name), atol=1e-6)


def test_batch_keeps_what_an_inplace_relu_later_overwrites(cnn):
    """block1.bn's output is overwritten by the in-place ReLU after it: the copy must be taken."""
    maps = feature_maps_batch(cnn, torch.randn(2, 3, 16, 16), ["features.block1.bn", "features.block1.relu"])
    assert (maps["features.block1.bn"] < 0).any()
    assert torch.equal(maps["features.block1.relu"], maps["features.block1.bn"].clamp(min=0))


def test_batch_stops_once_the_last_layer_has_run(cnn):
    calls = []
    handle = cnn.features.block3.register_forward_hook(lambda *a: calls.append(1))
    try:
        feature_maps_batch(cnn, torch.randn(2, 3, 16, 16), ["features.block2.conv", "features.block1.conv"])
    finally:
        handle.remove()
    assert calls == []


def test_batch_hooks_removed_and_modes_restored_also_on_error(cnn):
    cnn.train()
    cnn.features.block2.bn.eval()
    before = {n: m.training for n, m in cnn.named_modules()}
    hooks = _hooks(cnn)
    feature_maps_batch(cnn, torch.randn(2, 3, 16, 16), ["features.block1.conv", "features.block3"])
    assert _hooks(cnn) == hooks and {n: m.training for n, m in cnn.named_modules()} == before
    with pytest.raises(ValueError, match="not a spatial"):  # raised inside a hook, mid-forward
        feature_maps_batch(cnn, torch.randn(2, 3, 16, 16), ["features.block1.conv", "fc.1"])
    assert _hooks(cnn) == hooks and {n: m.training for n, m in cnn.named_modules()} == before
    def boom(*_):
        raise RuntimeError("boom")

    failing = cnn.features.block2.register_forward_pre_hook(boom)  # the forward fails after block1 ran
    try:
        with pytest.raises(RuntimeError, match="boom"):
            feature_maps_batch(cnn, torch.randn(2, 3, 16, 16), ["features.block1.conv", "features.block3.conv"])
    finally:
        failing.remove()
    assert _hooks(cnn) == hooks and {n: m.training for n, m in cnn.named_modules()} == before
    cnn.eval()


def test_batch_unknown_layer_fails_before_any_forward(cnn):
    calls, handle = _count_forwards(cnn)
    try:
        with pytest.raises(UnknownLayerError) as info:
            feature_maps_batch(cnn, torch.randn(1, 3, 16, 16), ["features.block1.conv", "features.blok2"])
    finally:
        handle.remove()
    assert calls == []
    message = str(info.value)
    assert "'features.blok2'" in message and "features.block3.conv" in message
    assert "Did you mean 'features.block2'" in message
    assert isinstance(info.value, ValueError)


def test_a_layer_that_does_not_run_is_named(cnn):
    model = nn.Sequential(OrderedDict(used=nn.Conv2d(3, 2, 1), unused=nn.Conv2d(2, 2, 1)))
    model.forward = lambda x: model.used(x)  # noqa: E731 (a model that skips a registered layer)
    with pytest.raises(ValueError, match="'unused' did not run"):
        feature_maps_batch(model, torch.randn(1, 3, 4, 4), ["used", "unused"])
    assert _hooks(model) == 0


def test_top_channels_by_mean_activation():
    maps = torch.zeros(5, 2, 2)
    maps[3] = 2.0
    maps[1] = 1.0
    maps[4, 0, 0] = 4.0  # mean 1.0: ties with channel 1, the lower index first
    maps[0] = -1.0
    maps[2, 0, 0] = float("nan")
    assert top_channels(maps, 3) == [3, 1, 4]
    assert top_channels(maps, 10) == [3, 1, 4, 0, 2]  # NaN last
    with pytest.raises(ValueError):
        top_channels(maps, 0)


def test_default_layers_leave_out_auxiliary_heads_that_do_not_run_in_eval():
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False, num_classes=3).eval()
    layers = default_layers(net)
    assert layers and not any("aux" in name.lower() for name in layers)
    maps = feature_maps_batch(net, torch.randn(1, 3, 64, 64), layers)  # every default layer runs
    assert len(maps) == len(layers)


def test_default_layers_go_from_early_to_late(cnn):
    assert conv_blocks(cnn) == ["features.block1", "features.block2", "features.block3"]
    assert default_layers(cnn) == ["features.block1.conv", "features.block2", "features.block3"]
    resnet = create_model("resnet18", 3, weights="none", hidden_dim=8)
    assert conv_blocks(resnet) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert default_layers(resnet) == ["conv1", "layer2", "layer4"]
    maps = feature_maps_batch(resnet, torch.randn(1, 3, 64, 64), default_layers(resnet))
    assert [tuple(m.shape[1:]) for m in maps.values()] == [(64, 32, 32), (128, 8, 8), (512, 2, 2)]


def test_choose_layers_checks_given_names_and_defaults_otherwise(cnn):
    assert choose_layers(cnn) == default_layers(cnn)
    assert choose_layers(cnn, []) == default_layers(cnn)
    assert choose_layers(cnn, ["features.block3", "features.block1", "features.block3"]) == ["features.block3", "features.block1"]
    with pytest.raises(UnknownLayerError, match="'layer4'"):
        choose_layers(cnn, ["features.block1", "layer4"])
    with pytest.raises(ValueError, match="no Conv2d"):
        choose_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_feature_map_png_draws_the_chosen_channels(cnn):
    maps = feature_maps(cnn, torch.randn(1, 3, 32, 32), "features.block1.relu")
    png = feature_map_png(maps, [5, 0, 7])
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        three = np.asarray(im.convert("RGB"))
    with Image.open(io.BytesIO(feature_map_png(maps, range(8)))) as im:
        eight = np.asarray(im.convert("RGB"))
    assert three.std() > 10 and three.size < eight.size
    with pytest.raises(ValueError, match="out of range"):
        feature_map_png(maps, [8])
    with pytest.raises(ValueError, match="no channels"):
        feature_map_png(maps, [])


def test_feature_map_panels_one_forward_top_channels_per_image(cnn):
    x = torch.randn(2, 3, 32, 32)
    layers = ["features.block1.conv", "features.block3"]
    calls, handle = _count_forwards(cnn)
    try:
        panels = feature_map_panels(cnn, x, layers, channels=4)
    finally:
        handle.remove()
    assert calls == [1]
    assert len(panels) == 2 and all([p.layer for p in row] == layers for row in panels)
    for i, row in enumerate(panels):
        for panel in row:
            m = feature_maps(cnn, x[i : i + 1], panel.layer)
            assert panel.channels == top_channels(m, 4)
            assert panel.n_channels == m.shape[0] and panel.size == tuple(m.shape[1:])
            assert panel.png.startswith(b"\x89PNG")


def test_a_dollar_in_a_title_is_text_not_mathtext(tmp_path):
    """File names reach the title of ``visionflow featuremaps``; ``$x^$`` used to crash mathtext."""
    render_feature_maps(torch.rand(3, 4, 4), tmp_path / "t.png", title="img_$x^$.png")
    assert (tmp_path / "t.png").is_file()


class _Aliased(nn.Module):
    """One conv registered under two names: named_modules() lists only the first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.alias = self.conv
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_a_shared_module_is_found_by_its_second_name_too():
    torch.manual_seed(0)
    model, x = _Aliased().eval(), torch.randn(2, 3, 8, 8)
    assert "alias" not in dict(model.named_modules())
    assert choose_layers(model, ["alias"]) == ["alias"]
    maps = feature_maps_batch(model, x, ["alias", "conv"])
    assert torch.equal(maps["alias"], maps["conv"]) and maps["alias"].shape == (2, 4, 8, 8)
    with pytest.raises(UnknownLayerError, match="Did you mean 'conv'"):
        choose_layers(model, ["conv1"])
