"""What a person opens in a browser, rendered by headless Chromium.

The Grad-CAM report, from a file:// URL with the network off: the screenshot must not be blank,
the galleries must be in the rendered DOM, and the inline filter script must have run without
throwing (it marks <body> when done) and must actually filter (``#only-misclassified`` hides the
correct cards).

The Prefect UI behind a "View at http://127.0.0.1:PORT/runs/flow-run/..." link the CLI prints: the
page must show that flow run, not "Can't connect to Server API".

Skips, saying why, when no Chromium binary is installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EVIL_CLASS = "<script>alert(1)</script>"
CLASSES = ["circle", "square", EVIL_CLASS]
PRE = {"image_size": 48, "resize_size": 48, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _chromium() -> str | None:
    env = os.environ.get("VISIONFLOW_CHROMIUM")
    for c in ((env,) if env else ()) + CANDIDATES:
        path = c if os.path.isabs(c) else shutil.which(c)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (looked for /usr/bin/chromium, chromium, chromium-browser, google-chrome; "
    "set VISIONFLOW_CHROMIUM or apt-get install chromium)"
)


def _browser(args: list[str], url: str, profile: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", *args, url,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)


def _image(rng: np.random.Generator, shape: str) -> bytes:
    img = np.full((56, 56, 3), 235, np.uint8)
    img += (rng.random((56, 56, 1)) * 20).astype(np.uint8)
    yy, xx = np.mgrid[:56, :56]
    cy, cx = rng.integers(16, 40, 2)
    colour = rng.integers(0, 200, 3, dtype=np.uint8)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < 100 if shape == "circle" else (abs(yy - cy) < 9) & (abs(xx - cx) < 9)
    img[mask] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A real report: a tiny random CNN, screened and explained images, figures, confusions."""
    from cvlib.explain.render import render_report, write_report
    from cvlib.explain.samples import explain_feature_maps, explain_files
    from cvlib.explain.screening import choose_samples, screen_files
    from cvlib.explain.summary import confusions_from_matrix
    from cvlib.models.factory import create_model
    from cvlib.training.plots import confusion_matrix_png, training_curves_png

    root = tmp_path_factory.mktemp("browser-report")
    data = root / "images"
    rng = np.random.default_rng(1)
    files, labels = [], []
    for k, c in enumerate(CLASSES):
        d = data / f"class{k}"
        d.mkdir(parents=True)
        for i in range(6):
            (d / f"img_{i}.png").write_bytes(_image(rng, "circle" if k != 1 else "square"))
            files.append(f"class{k}/img_{i}.png")
            labels.append(c)
    (data / "<b>x<").mkdir()
    (data / "<b>x<" / "b>.png").write_bytes(_image(rng, "circle"))
    files.append("<b>x</b>.png")
    labels.append(None)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16, dropout=0.0).eval()
        meta = {"arch": "simple_cnn", "class_names": CLASSES, "preprocessing": PRE}
        s = screen_files(model, meta, data, files, labels=labels)
        picked = choose_samples(s.true_idx, s.preds, s.losses, 12, seed=0)
        samples, errors = explain_files(model, meta, data, [s.files[i] for i in picked], labels=[s.labels[i] for i in picked])
        feature_maps = explain_feature_maps(model, meta, data, samples, images=2, channels=8)
    finally:
        torch.set_num_threads(before)
    known = s.true_idx >= 0
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (s.true_idx[known], s.preds[known]), 1)
    assert any(not x.correct for x in samples) and any(x.correct for x in samples), "need both kinds of card"
    html = render_report(
        samples, title="Browser check", subtitle="simple_cnn", summary={"model": "tiny", "data set": str(data)},
        metrics={"val_top1": float((s.true_idx[known] == s.preds[known]).mean())},
        figures={"confusion_matrix.png": confusion_matrix_png(cm.tolist(), CLASSES),
                 "training_curves.png": training_curves_png([{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "train_top1": 0.4, "val_top1": 0.3},
                                                             {"epoch": 2, "train_loss": 0.8, "val_loss": 0.9, "train_top1": 0.5, "val_top1": 0.45}])},
        errors=errors, confusions=confusions_from_matrix(cm, CLASSES), confusions_scope="over all screened images",
        class_names=CLASSES, feature_maps=feature_maps,
    )
    return write_report(html, root / "report.html")


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "report.png"
    proc = _browser([f"--screenshot={shot}", "--window-size=1400,2000"], report.resolve().as_uri(), tmp_path / "profile")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-3000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2000, 1400)
    grey = img.mean(axis=2)
    assert grey.std() > 20, f"screenshot looks blank (grey std {grey.std():.1f}): {shot}"
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: {shot}"
    # The header band is dark and the page background light: the CSS was applied.
    assert img[10:40, :, :].mean() < 80 and img[-40:, :, :].mean() > 180
    # Heat maps (jet: saturated reds and blues) made it onto the page.
    r, g, b = (img[..., i].astype(int) for i in range(3))
    assert ((r > 200) & (g < 80) & (b < 80)).sum() > 50 or ((b > 150) & (r < 60) & (g < 60)).sum() > 200
    print(f"screenshot: {shot}")


def _dom(report: Path, tmp_path: Path, fragment: str = "") -> str:
    proc = _browser(["--dump-dom", "--virtual-time-budget=3000"], report.resolve().as_uri() + fragment, tmp_path / f"profile{len(fragment)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _cards(dom: str) -> list[str]:
    return re.findall(r'<article class="card sample"[^>]*>', dom)


def test_gallery_rendered_and_script_ran(report, tmp_path):
    dom = _dom(report, tmp_path)
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-report-ready="true"' in body, f"the filter script did not finish: {body}"
    assert "data-report-error" not in body
    cards = _cards(dom)
    assert len(cards) == report.read_text().count('class="card sample"') == 12
    assert not [c for c in cards if " hidden" in c], "nothing is filtered by default"
    galleries = re.findall(r'<section class="gallery[^"]*" id="class-\d+" data-class="([^"]*)"', dom)
    assert galleries and len(galleries) == len(set(galleries)), "one gallery per class"
    assert all(" hidden" not in g for g in re.findall(r'<section class="gallery[^>]*>', dom))
    assert f'data-shown="{len(cards)}"' in body
    # Escaped data stayed text in the live DOM: no element was created from it.
    assert "<b>x</b>" not in dom and "<script>alert(1)" not in dom
    # The optional feature-maps section rendered: 2 images x 3 default layers of PNG grids,
    # and it holds no cards, so the filters' counts above are untouched.
    section = re.search(r'<section id="feature-maps".*?</section>', dom, re.S)
    assert section, "the feature-maps section is missing from the rendered page"
    assert len(re.findall(r'<img alt="feature maps of [^"]+" src="data:image/png;base64,', section.group(0))) == 2 * 3
    assert len(re.findall(r'<article class="fm-image"', section.group(0))) == 2
    assert 'class="card' not in section.group(0)


def test_only_misclassified_filter_hides_correct_cards(report, tmp_path):
    dom = _dom(report, tmp_path, "#only-misclassified")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-report-ready="true"' in body
    cards = _cards(dom)
    wrong = [c for c in cards if 'data-correct="false"' in c]
    right = [c for c in cards if 'data-correct="true"' in c]
    assert wrong and right
    assert all(re.search(r"\shidden(=\"\")?[\s>]", c) for c in right), "correct cards must be hidden"
    assert not any(re.search(r"\shidden(=\"\")?[\s>]", c) for c in wrong)
    assert f'data-shown="{len(wrong)}"' in body
    # galleries left with no visible card fold away
    assert any(re.search(r"\shidden(=\"\")?[\s>]", g) for g in re.findall(r'<section class="gallery[^>]*>', dom))
    assert re.search(r'id="only-wrong"[^>]*', dom)


# --------------------------------------------------------------------------- the Prefect UI

VISIONFLOW = str(Path(sys.executable).parent / "visionflow")


def _cli(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([VISIONFLOW, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def flow_run_link(tmp_path_factory):
    """(link, flow run name, CLI output) of a real `visionflow score` run on the local Prefect
    server the CLI starts; the server is stopped afterwards."""
    root = tmp_path_factory.mktemp("prefect-ui")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "VISIONFLOW_PREFECT")}
    # A UI URL in the environment (here Prefect's default) must not reach the local server's UI.
    env.update(VISIONFLOW_HOME=str(root / "home"), PREFECT_UI_API_URL="http://127.0.0.1:4200/api")
    try:
        proc = _cli("demo-data", str(root / "digits"), "--per-class", "1", "--image-size", "32", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = _cli("score", str(root / "digits"), "--model", "torchvision/resnet18", "--weights", "none",
                    "--out", str(root / "pred.parquet"), env=env)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        found = re.search(r"Flow run '([^']+)' - View at (http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36})", output)
        assert found, f"no flow-run link in the output: {output[-3000:]}"
        yield found.group(2), found.group(1), output
    finally:
        _cli("server", "stop", env=env, timeout=60)


def test_ui_settings_name_the_servers_own_api(flow_run_link):
    link = flow_run_link[0]
    origin = re.match(r"http://[^/]+", link).group(0)
    with urllib.request.urlopen(f"{origin}/ui-settings", timeout=10) as resp:
        settings = json.loads(resp.read())
    assert settings["api_url"] == f"{origin}/api", settings
    assert f"Prefect API: {origin}/api" in flow_run_link[2]


def test_printed_flow_run_link_renders_the_run(flow_run_link, tmp_path):
    link, name, _ = flow_run_link
    proc = _browser(["--dump-dom", "--virtual-time-budget=10000"], link, tmp_path / "profile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dom = proc.stdout
    assert "Can't connect" not in dom, re.findall(r"Can't connect[^<]*<[^>]*>", dom)
    assert re.search(rf">\s*{re.escape(name)}\s*<", dom), f"flow run {name!r} is not on the rendered page: {dom[-3000:]}"
