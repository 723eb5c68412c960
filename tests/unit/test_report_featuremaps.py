"""The report's optional "Feature maps" section (cvlib.explain.samples.explain_feature_maps and
render_report(feature_maps=...)), the ReportConfig fields behind it and the CLI flags that set
them. A tiny random SimpleCNN on 32 px images, one thread."""

from __future__ import annotations

import base64
import dataclasses
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from cvlib.config import RetrainConfig
from cvlib.explain.featuremaps import UnknownLayerError, conv_layer_names, default_layers, top_channels
from cvlib.explain.options import ReportConfig
from cvlib.explain.render import render_report
from cvlib.explain.samples import explain_feature_maps, explain_files
from cvlib.models.factory import create_model
from tests.threads import one_torch_thread
from tests.unit.test_report import _dom

CLASSES = ["cat", "dog"]
PRE = {"image_size": 32, "resize_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
META = {"arch": "simple_cnn", "class_names": CLASSES, "preprocessing": PRE}
EVIL_LAYER = '<img src=x onerror=alert(1)>"'  # a module name may hold anything but a dot
EVIL_FILE = "<b>x</b>.png"

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16, dropout=0.0).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fm-images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(3):
            Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / c / f"{c}_{i}.png")
    (root / "<b>x<").mkdir()
    Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(root / "<b>x<" / "b>.png")
    return root


@pytest.fixture(scope="module")
def samples(model, folder):
    files = [f"{c}/{c}_{i}.png" for c in CLASSES for i in range(3)] + [EVIL_FILE]
    labels = [f.split("/")[0] for f in files[:-1]] + [None]
    samples, errors = explain_files(model, META, folder, files, labels=labels, faithfulness=False)
    assert not errors and len(samples) == 7
    return samples


def _crop(folder: Path, rel: str) -> torch.Tensor:
    from cvlib.data.imageio import load_rgb
    from cvlib.data.transforms import eval_preset_from

    return eval_preset_from(PRE)(load_rgb(folder / rel))


def _layer_figures(html: str) -> list[tuple[dict, list]]:
    return _dom(html).find("figure", class_="fm-layer")


# --------------------------------------------------------------------------------------------
# the maps
# --------------------------------------------------------------------------------------------


def test_first_images_in_report_order_default_layers_top_channels(model, folder, samples):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(a[1][0].shape[0]))
    try:
        fms = explain_feature_maps(model, META, folder, samples, images=3, channels=5)
    finally:
        handle.remove()
    assert calls == [3], "one forward for the three images"
    assert [fm.path for fm in fms] == [s.path for s in samples[:3]]  # misclassified first, as the report shows them
    assert [fm.original for fm in fms] == [s.original for s in samples[:3]]
    for fm in fms:
        assert [lm.layer for lm in fm.layers] == default_layers(model)
        for lm in fm.layers:
            # the channels shown are the most active ones of this image at the crop the model saw
            maps = _single(model, _crop(folder, fm.path), lm.layer)
            assert lm.channels == top_channels(maps, 5) and len(lm.channels) == 5
            assert lm.n_channels == maps.shape[0] and lm.size == tuple(maps.shape[1:])
            with Image.open(io.BytesIO(lm.png)) as im:
                assert im.format == "PNG"


def _single(model, crop, layer):
    from cvlib.explain.featuremaps import feature_maps

    return feature_maps(model, crop.unsqueeze(0), layer)


def test_named_layers_more_images_than_samples_and_more_channels_than_the_layer_has(model, folder, samples):
    fms = explain_feature_maps(model, META, folder, samples[:2], layers=["features.block3.relu", "features.block1"], images=5,
                               channels=40)
    assert len(fms) == 2
    assert [lm.layer for lm in fms[0].layers] == ["features.block3.relu", "features.block1"]
    assert [(len(lm.channels), lm.n_channels) for lm in fms[0].layers] == [(40, 128), (32, 32)]  # block1: all of them


def test_unreadable_image_is_skipped_and_the_next_takes_its_place(model, folder, samples):
    missing = dataclasses.replace(samples[0], path="cat/deleted_since.png")
    fms = explain_feature_maps(model, META, folder, [missing, *samples[1:3]], images=2)
    assert [fm.path for fm in fms] == [samples[1].path, samples[2].path]


def test_unknown_layer_is_a_clear_error_before_any_image_is_read(model, samples, tmp_path):
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UnknownLayerError) as info:  # a ValueError
            explain_feature_maps(model, META, tmp_path / "no-such-folder", samples, layers=["features.block1", "layer4.2.conv3"])
    finally:
        handle.remove()
    assert calls == []
    message = str(info.value)
    assert "'layer4.2.conv3'" in message
    assert all(name in message for name in conv_layer_names(model))
    assert isinstance(info.value, ValueError)


def test_hooks_removed_and_modes_restored_after_use_and_after_an_error(model, folder, samples):
    model.train()
    model.features.block2.bn.eval()
    before = {n: m.training for n, m in model.named_modules()}
    hooks = _hooks(model)
    explain_feature_maps(model, META, folder, samples, images=2)
    assert _hooks(model) == hooks and {n: m.training for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="not a spatial"):  # fc.1 is a Linear: its output is no map
        explain_feature_maps(model, META, folder, samples, layers=["features.block1.conv", "fc.1"], images=2)
    assert _hooks(model) == hooks and {n: m.training for n, m in model.named_modules()} == before
    model.eval()


# --------------------------------------------------------------------------------------------
# the section in the page
# --------------------------------------------------------------------------------------------


def test_section_present_with_one_block_per_image_and_one_figure_per_layer(model, folder, samples):
    fms = explain_feature_maps(model, META, folder, samples, images=2, channels=4)
    html = render_report(samples, title="t", class_names=CLASSES, feature_maps=fms)
    dom = _dom(html)
    (section, _), = dom.find("section", id="feature-maps")
    layers = default_layers(model)
    assert section["data-layers"] == " ".join(layers)
    images = dom.find("article", class_="fm-image")
    assert [a["data-path"] for a, _ in images] == [s.path for s in samples[:2]]
    figures = _layer_figures(html)
    assert len(figures) == 2 * len(layers)
    assert [a["data-layer"] for a, _ in figures] == layers * 2
    expected = [" ".join(map(str, lm.channels)) for fm in fms for lm in fm.layers]
    assert [a["data-channels"] for a, _ in figures] == expected
    for fm in fms:
        for lm in fm.layers:  # each grid embedded as it was drawn, nothing fetched
            assert f'src="data:image/png;base64,{base64.b64encode(lm.png).decode()}"' in html
    in_section = [a["src"] for a, anc in dom.find("img") if any(x[1].get("id") == "feature-maps" for x in anc)]
    assert len(in_section) == 2 * (1 + len(layers)) and all(src.startswith("data:image/png;base64,") for src in in_section)
    assert '<a href="#feature-maps">Feature maps</a>' in html
    assert "4 channels with the highest mean activation" in html
    # the section's blocks are not cards: the filters and the image count ignore them
    assert html.count('class="card sample"') == len(samples)


def test_section_absent_when_disabled(samples):
    html = render_report(samples, title="t", class_names=CLASSES)
    dom = _dom(html)
    assert not dom.find("section", id="feature-maps") and not dom.find("figure", class_="fm-layer")
    assert not dom.find("a", href="#feature-maps")
    assert "Feature maps" not in html and "fm-" not in html  # not even its CSS


def test_layer_names_and_paths_are_escaped(model, folder, samples):
    evil = create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16, dropout=0.0).eval()
    evil.load_state_dict(model.state_dict())
    evil.features.add_module(EVIL_LAYER, nn.Identity())  # runs after block3: a real (N, C, h, w) map
    name = f"features.{EVIL_LAYER}"
    fms = explain_feature_maps(evil, META, folder, [s for s in samples if s.path == EVIL_FILE], layers=[name], images=1)
    html = render_report(samples, title="t", class_names=CLASSES, feature_maps=fms)
    assert "<img src=x" not in html and "onerror=alert(1)>" not in html and "<b>x</b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    dom = _dom(html)
    assert not any("onerror" in a for _, a, _ in dom.elements)
    (figure, _), = _layer_figures(html)
    assert figure["data-layer"] == name  # the attribute holds the name, read back unescaped
    (block, _), = dom.find("article", class_="fm-image")
    assert block["data-path"] == EVIL_FILE
    assert name in "".join(dom.text)


def test_enabled_but_nothing_readable_says_so():
    html = render_report([], title="t", feature_maps=[])
    assert 'id="feature-maps"' in html and "No feature maps" in html


# --------------------------------------------------------------------------------------------
# configuration and CLI
# --------------------------------------------------------------------------------------------


def test_report_config_fields_default_off_and_validated():
    c = ReportConfig()
    assert c.feature_maps is False and c.feature_map_layers == [] and c.feature_map_images == 2 and c.feature_map_channels == 16
    assert ReportConfig(feature_map_layers=[" layer1 ", "layer1", "conv1"]).feature_map_layers == ["layer1", "conv1"]
    for bad in ({"feature_map_layers": [""]}, {"feature_map_images": 0}, {"feature_map_channels": 0}, {"feature_map_channels": 257}):
        with pytest.raises(ValidationError):
            ReportConfig(**bad)
    for name in ("feature_maps", "feature_map_layers", "feature_map_images", "feature_map_channels"):
        assert ReportConfig.model_fields[name].description  # the form in the Prefect UI says why


def test_retrain_config_json_turns_the_section_on(tmp_path):
    """``visionflow retrain --config FILE`` with ``report.feature_maps``: the rest stays default."""
    from cvlib.arguments import retrain_config
    from flows.cli import make_parser

    cfg = tmp_path / "c.json"
    cfg.write_text('{"report": {"feature_maps": true, "feature_map_layers": ["layer2"]}}')
    config = retrain_config(make_parser().parse_args(["retrain", "data", "--config", str(cfg)]))
    assert isinstance(config, RetrainConfig)
    assert config.report.feature_maps is True and config.report.feature_map_layers == ["layer2"]
    assert config.report.samples == ReportConfig().samples and config.report.feature_map_channels == 16


@pytest.fixture
def fake_explain_flow(monkeypatch):
    """flows.explain replaced by a recorder: the CLI's options, not the flow, are under test."""
    seen: dict = {}

    def explain(**kwargs):
        seen.update(kwargs)
        return kwargs["out"]

    monkeypatch.setitem(sys.modules, "flows.explain", types.SimpleNamespace(explain=explain))
    monkeypatch.setattr("flows.cli._use_prefect", lambda: None)
    return seen


@pytest.mark.parametrize(
    ("flags", "on", "layers"),
    [
        ([], False, []),
        (["--feature-maps"], True, []),
        (["--feature-map-layer", "layer1.0.conv1", "--feature-map-layer", "layer4"], True, ["layer1.0.conv1", "layer4"]),
    ],
)
def test_cli_explain_flags(fake_explain_flow, folder, tmp_path, flags, on, layers):
    from flows.cli import main

    ckpt = tmp_path / "m.pt"
    torch.save({}, ckpt)  # a checkpoint file; the fake flow never loads it
    assert main(["explain", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "r.html"), *flags]) == 0
    config = fake_explain_flow["config"]
    assert config.feature_maps is on and config.feature_map_layers == layers
    assert config == ReportConfig(feature_maps=on, feature_map_layers=layers)  # everything else: the config's defaults


def test_cli_explain_counts_and_bounds(fake_explain_flow, folder, tmp_path, capsys):
    from flows.cli import EXIT_USAGE, main

    ckpt = tmp_path / "m.pt"
    torch.save({}, ckpt)  # a checkpoint file; the fake flow never loads it
    base = ["explain", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "r.html"), "--feature-maps"]
    assert main([*base, "--feature-map-images", "3", "--feature-map-channels", "8", "--samples", "5", "--precision", "fp32"]) == 0
    config = fake_explain_flow["config"]
    assert (config.feature_map_images, config.feature_map_channels, config.samples) == (3, 8, 5)
    assert config.precision == "fp32"
    fake_explain_flow.clear()
    assert main([*base, "--feature-map-channels", "0"]) == EXIT_USAGE
    assert "--feature-map-channels" in capsys.readouterr().err and not fake_explain_flow  # the flag, as the user typed it


def test_cli_explain_takes_batch_size_and_device(fake_explain_flow, folder, tmp_path, capsys):
    from flows.cli import EXIT_USAGE, main

    ckpt = tmp_path / "m.pt"
    torch.save({}, ckpt)  # a checkpoint file; the fake flow never loads it
    base = ["explain", str(folder), "--model", str(ckpt), "--out", str(tmp_path / "r.html")]
    assert main([*base, "--batch-size", "4", "--device", "cpu"]) == 0
    config = fake_explain_flow["config"]
    assert (config.batch_size, config.device) == (4, "cpu")
    fake_explain_flow.clear()
    assert main(base) == 0 and fake_explain_flow["config"].batch_size is None  # the stages' own defaults
    fake_explain_flow.clear()
    assert main([*base, "--batch-size", "0"]) == EXIT_USAGE
    assert "--batch-size" in capsys.readouterr().err and not fake_explain_flow
