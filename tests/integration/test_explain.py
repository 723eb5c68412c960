"""The report's "Feature maps" section through the real path on a real Prefect server: the
``visionflow explain`` command (its flags, the explain flow, the explain-folder task) and the
retrain flow's validation-report task (its config). A small random SimpleCNN checkpoint on the
32 px digits: seconds, not a training run."""

from __future__ import annotations

import base64
import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from cvlib.data.options import DataConfig
from cvlib.explain.options import ReportConfig

pytestmark = pytest.mark.store_agnostic  # the servers only record the runs (tests/conftest.py)


@pytest.fixture(scope="module")
def inputs(digits_dir, tmp_path_factory) -> Path:
    """Three real digits in each of three class folders."""
    root = tmp_path_factory.mktemp("explain-inputs")
    for digit in ("1", "4", "7"):
        (root / digit).mkdir()
        for src in sorted((digits_dir / digit).glob("*.png"))[:3]:
            (root / digit / src.name).write_bytes(src.read_bytes())
    return root


def _section(html: str) -> str:
    start = html.index('<section id="feature-maps"')
    return html[start : html.index("</section>", start)]


def _pngs(section: str) -> list[bytes]:
    out = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section):
        raw = base64.b64decode(data)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == "PNG" and im.size[0] > 8
        out.append(raw)
    return out


def test_cli_explain_with_feature_maps(on_prefect, inputs, checkpoint, tmp_path):
    from flows.cli import main

    out = tmp_path / "report.html"
    code = main(["explain", str(inputs), "--model", str(checkpoint), "--out", str(out), "--samples", "4",
                 "--feature-maps", "--feature-map-images", "2", "--feature-map-channels", "4"])
    assert code == 0
    html = out.read_text()
    assert html.count('class="card sample"') == 4
    section = _section(html)
    assert section.count('class="fm-image"') == 2
    layers = ["features.block1.conv", "features.block2", "features.block3"]  # the default: early to late
    assert re.findall(r'data-layer="([^"]+)"', section) == layers * 2
    assert all(len(c.split()) == 4 for c in re.findall(r'data-channels="([^"]*)"', section))
    assert len(_pngs(section)) == 2 * (1 + len(layers))  # each image's crop, then one grid per layer
    assert "http://" not in html and "https://" not in html


def test_cli_explain_without_the_flag_has_no_section(on_prefect, inputs, checkpoint, tmp_path):
    from flows.cli import main

    out = tmp_path / "report.html"
    assert main(["explain", str(inputs), "--model", str(checkpoint), "--out", str(out), "--samples", "2"]) == 0
    assert 'id="feature-maps"' not in out.read_text()


def test_cli_unknown_layer_fails_clearly_before_screening(on_prefect, inputs, checkpoint, tmp_path, monkeypatch):
    import cvlib.explain.screening
    from flows.cli import EXIT_USAGE, main

    screened = []
    real = cvlib.explain.screening.screen_files
    monkeypatch.setattr(cvlib.explain.screening, "screen_files", lambda *a, **k: screened.append(1) or real(*a, **k))
    out = tmp_path / "report.html"
    # Not capsys, to be safe in any test order: Prefect's console log handler keeps the stream
    # it first saw (tests/conftest.py imports prefect early for that reason).
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = main(["explain", str(inputs), "--model", str(checkpoint), "--out", str(out), "--feature-map-layer", "layer4"])
    err = buf.getvalue()
    assert code == EXIT_USAGE
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'layer4'" in last and "features.block2.conv" in last
    assert screened == [] and not out.exists()


def test_validation_report_gets_the_section_from_the_retrain_config(on_prefect, digits_dir, checkpoint, tmp_path):
    """The retrain flow hands ``config.report`` to the validation-report task: with
    ``report.feature_maps`` (as ``retrain --config`` JSON sets it) the report has the section."""
    from prefect import flow

    from tasks.explain import validation_report
    from tasks.ingest import ingest

    config = ReportConfig.model_validate({"samples": 3, "feature_maps": True, "feature_map_layers": ["features.block2.conv"],
                                          "feature_map_images": 1, "feature_map_channels": 3})

    @flow(name="validation-report-feature-maps")
    def run() -> str:
        data = ingest(str(digits_dir), str(tmp_path / "manifest.parquet"), DataConfig())
        return validation_report(data, str(checkpoint), str(tmp_path / "report.html"), config, summary={}, num_workers=0)

    html = Path(run()).read_text()
    assert html.count('class="card sample"') == 3
    section = _section(html)
    assert section.count('class="fm-image"') == 1
    assert re.findall(r'data-layer="([^"]+)"', section) == ["features.block2.conv"]
    assert re.findall(r'data-channels="([^"]*)"', section)[0].count(" ") == 2
    assert len(_pngs(section)) == 2


def test_retrain_preflight_rejects_a_layer_the_architecture_lacks():
    from cvlib.explain.featuremaps import UnknownLayerError
    from tasks.explain import check_feature_map_layers

    check_feature_map_layers("resnet18", ReportConfig(feature_maps=True, feature_map_layers=["layer3.1.conv2"]))
    check_feature_map_layers("resnet18", ReportConfig(feature_map_layers=["nope"]))  # section off: not checked
    with pytest.raises(UnknownLayerError, match="'features.block9'"):
        check_feature_map_layers("simple_cnn", ReportConfig(feature_maps=True, feature_map_layers=["features.block9"]))


def test_retrain_preflight_on_an_architecture_the_meta_device_cannot_build():
    """RegNet's constructor reads its own fresh weights, which meta tensors do not have: the
    check builds it on the CPU instead of failing a valid name."""
    from cvlib.explain.featuremaps import UnknownLayerError
    from tasks.explain import check_feature_map_layers

    check_feature_map_layers("regnet_y_400mf", ReportConfig(feature_maps=True, feature_map_layers=["stem"]))
    with pytest.raises(UnknownLayerError, match="'stemm'"):
        check_feature_map_layers("regnet_y_400mf", ReportConfig(feature_maps=True, feature_map_layers=["stemm"]))


def test_retrain_with_a_misspelt_layer_fails_before_ingesting(on_prefect, inputs, tmp_path):
    """The report comes after training: a typo in ``report.feature_map_layers`` must not cost a run."""
    from cvlib.config import RetrainConfig
    from cvlib.explain.featuremaps import UnknownLayerError
    from flows.retrain import retrain

    config = RetrainConfig.model_validate({"train": {"arch": "simple_cnn", "weights": "none"},
                                           "report": {"feature_maps": True, "feature_map_layers": ["features.blok2"]}})
    with pytest.raises(UnknownLayerError, match="Did you mean 'features.block2'"):
        retrain(data_dir=str(inputs), config=config, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
