"""The Grad-CAM HTML report (cvlib.explain.screening, samples, summary, render). Escaping,
self-containment, one card per sample, misclassified first by loss, galleries per class,
faithfulness numbers, embedded figures, the whole-split confusions and the screening/sampling
that picks the images. A tiny random CNN on 32 px images, one thread: fast on a shared 2-core
machine."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvlib.explain.options import ReportConfig
from cvlib.explain.render import render_report, write_report
from cvlib.explain.samples import ReportSample, explain_files
from cvlib.explain.screening import choose_samples, screen_files
from cvlib.explain.summary import (
    FIGURES,
    confusions_from_matrix,
    faithfulness_summary,
    load_evaluation,
    metric_table,
    top_confusions,
)
from cvlib.models.factory import create_model
from tests.threads import one_torch_thread

EVIL_CLASS = "<script>alert(1)</script>"
EVIL_FILE = "<b>x</b>.png"  # a folder "<b>x<" holding "b>.png": a real file with this relative path
CLASSES = ["cat", "dog", EVIL_CLASS]
PRE = {"image_size": 32, "resize_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
META = {"arch": "simple_cnn", "class_names": CLASSES, "preprocessing": PRE}


_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("simple_cnn", len(CLASSES), weights="none", hidden_dim=16, dropout=0.0).eval()


def _png(rng: np.random.Generator, size: int = 40) -> bytes:
    """A blob on noise: something a CAM can point at."""
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    y, x = rng.integers(4, size - 16, 2)
    img[y : y + 12, x : x + 12] = rng.integers(120, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Four images per class folder (one of them the EVIL_CLASS folder), the evil file name at
    the top level (unlabelled) and one unreadable file."""
    root = tmp_path_factory.mktemp("report-images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c.replace("/", "_")).mkdir()
    for i in range(4):
        (root / "cat" / f"cat_{i}.png").write_bytes(_png(rng))
        (root / "dog" / f"dog_{i}.png").write_bytes(_png(rng))
        (root / EVIL_CLASS.replace("/", "_") / f"evil_{i}.png").write_bytes(_png(rng))
    (root / "<b>x<").mkdir()
    (root / "<b>x<" / "b>.png").write_bytes(_png(rng))
    (root / "cat" / "broken.png").write_bytes(b"not a png at all")
    return root


def _files_and_labels(root: Path) -> tuple[list[str], list[str | None]]:
    files, labels = [], []
    for c in CLASSES:
        d = root / c.replace("/", "_")
        for p in sorted(d.glob("*.png")):
            files.append(p.relative_to(root).as_posix())
            labels.append(c)
    files.append(EVIL_FILE)
    labels.append(None)
    return files, labels


@pytest.fixture(scope="module")
def explained(model, folder):
    """Labels chosen so that about half the labelled images are misclassified whatever the
    random model predicts: label = prediction for even indices, another class for odd ones."""
    files, _ = _files_and_labels(folder)
    readable = [f for f in files if not f.endswith("broken.png")]
    screening = screen_files(model, META, folder, readable)
    labels: list[str | None] = []
    for i, (f, p) in enumerate(zip(screening.files, screening.preds, strict=True)):
        if f == EVIL_FILE:
            labels.append(None)
        else:
            labels.append(CLASSES[p] if i % 2 == 0 else CLASSES[(p + 1 + i % 3 % 2) % len(CLASSES)])
    samples, errors = explain_files(model, META, folder, screening.files, labels=labels)
    assert not errors
    return samples


class _Dom(HTMLParser):
    """Just enough DOM: every element's attributes and its ancestors, the text, and scripts."""

    VOID = frozenset({"meta", "img", "input", "br", "hr", "link", "source"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict]] = []
        self.elements: list[tuple[str, dict, list[tuple[str, dict]]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.elements.append((tag, a, list(self.stack)))
        if tag not in self.VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self.stack and self.stack[-1][0] == "script":
            self.scripts.append(data)
        else:
            self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[tuple[dict, list]]:
        out = []
        for t, a, ancestors in self.elements:
            if t != tag:
                continue
            if all((k == "class_" and v in (a.get("class") or "").split()) or a.get(k) == v for k, v in attrs.items()):
                out.append((a, ancestors))
        return out


def _dom(html: str) -> _Dom:
    d = _Dom()
    d.feed(html)
    d.close()
    return d


def _figures() -> dict[str, bytes]:
    out = {}
    for i, name in enumerate(["confusion_matrix.png", "training_curves.png"]):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


@pytest.fixture(scope="module")
def html(explained) -> str:
    return render_report(
        explained,
        title=f"Report on {EVIL_CLASS}",
        summary={"model": "m", "data set": "/data/<i>d</i>"},
        metrics={"val_top1": 0.5, "val_loss": 1.25, "test_top1": 0.25},
        figures=_figures(),
        errors=[{"path": "cat/broken.png", "error": "not_an_image: <oops>"}],
        class_names=CLASSES,
    )


# --------------------------------------------------------------------------------------------
# escaping and self-containment
# --------------------------------------------------------------------------------------------


def test_file_names_and_labels_show_as_text_never_as_markup(html, explained):
    assert any(s.path == EVIL_FILE for s in explained)
    assert any(s.true == EVIL_CLASS or s.pred == EVIL_CLASS for s in explained)
    assert "<b>x</b>" not in html and "<i>d</i>" not in html and "<oops>" not in html
    assert "<script>alert(1)" not in html
    assert "&lt;b&gt;x&lt;/b&gt;.png" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    dom = _dom(html)
    text = "".join(dom.text)
    assert EVIL_FILE in text and EVIL_CLASS in text  # shown to the reader, as text
    # The only script element is the report's own; it holds no data from the report.
    assert len(dom.find("script")) == 1
    script = "".join(dom.scripts)
    assert "alert(1)" not in script and "x</b>" not in script and "cat_" not in script
    cards = dom.find("article", class_="sample")
    assert EVIL_FILE in {a["data-path"] for a, _ in cards}  # the script reads it back from here


def test_data_cannot_break_out_of_attributes():
    """Quotes and angle brackets in a label end up as entities inside attributes too."""
    evil = '"><img src=x onerror=alert(1)>'
    s = ReportSample(path=f"a/{evil}.png", true=evil, pred="dog", correct=False, loss=1.0, top5=[(evil, 0.6), ("dog", 0.4)],
                     original="AA==", heatmap="AA==", overlay="AA==", true_overlay="AA==", true_heatmap="AA==")
    html = render_report([s], title=evil, class_names=[evil, "dog"])
    assert "onerror=alert(1)>" not in html
    dom = _dom(html)
    assert all(a.get("src", "").startswith("data:") for a, _ in dom.find("img"))
    assert not any("onerror" in a for _, a, _ in dom.elements)
    (card, _), = dom.find("article", class_="sample")
    assert card["data-true"] == evil and card["data-path"] == f"a/{evil}.png"


def test_report_is_self_contained(html):
    dom = _dom(html)
    urls = [(t, k, v) for t, a, _ in dom.elements for k, v in a.items() if k in ("src", "href", "srcset", "poster", "action") and v]
    assert urls, "the report has images and links"
    for tag, key, value in urls:
        assert value.startswith(("data:image/png;base64,", "#")), f"<{tag} {key}={value[:60]!r}> is not embedded"
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    assert "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html
    csp = dom.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0][0]["content"]


def test_one_card_per_sample_and_misclassified_first_by_loss(html, explained):
    wrong = [s for s in explained if not s.correct]
    assert 2 <= len(wrong) < len(explained), "the fixture must give both kinds"
    # explain_files' order: misclassified first, highest loss first
    assert [s.correct for s in explained] == sorted(s.correct for s in explained)
    losses = [s.loss for s in wrong]
    assert losses == sorted(losses, reverse=True)
    assert html.count('class="card sample"') == len(explained)
    dom = _dom(html)
    cards = dom.find("article", class_="sample")
    assert [a["data-path"] for a, _ in cards][: len(wrong)] == [s.path for s in wrong]
    assert all(a["data-correct"] == "false" for a, _ in cards[: len(wrong)])
    assert all(a["data-correct"] == "true" for a, _ in cards[len(wrong) :])
    shown = [float(a["data-loss"]) for a, _ in cards[: len(wrong)]]
    assert shown == sorted(shown, reverse=True)
    assert all(any(anc[1].get("id") == "misclassified" for anc in ancestors) for _, ancestors in cards[: len(wrong)])


def test_misclassified_cards_show_the_cam_of_both_classes(html, explained):
    wrong = [s for s in explained if not s.correct]
    assert all(s.true_overlay and s.true_heatmap for s in wrong)
    assert all(s.true_overlay is None for s in explained if s.correct)
    dom = _dom(html)
    imgs = dom.find("img")
    per_card: dict[str, list[str]] = {}
    for a, ancestors in imgs:
        card = next((anc for anc in ancestors if anc[0] == "article"), None)
        if card:
            per_card.setdefault(card[1]["data-path"], []).append(a["alt"])
    for s in explained:
        alts = per_card[s.path]
        assert "model input" in alts and "overlay, predicted class" in alts and "Grad-CAM heat map, predicted class" in alts
        assert ("overlay, true class" in alts) == (not s.correct)


def test_galleries_per_class_hold_the_correct_images_of_that_class(html, explained):
    dom = _dom(html)
    galleries = dom.find("section", class_="gallery")
    groups = {s.group for s in explained}
    assert sorted(a["data-class"] for a, _ in galleries) == sorted(groups)
    for a, ancestors in dom.find("article", class_="sample"):
        if a["data-correct"] == "false":
            continue
        gallery = next(anc for anc in ancestors if anc[0] == "section" and "gallery" in anc[1].get("class", ""))
        assert gallery[1]["data-class"] == (a["data-true"] or a["data-pred"])
    # the class filter offers each gallery's class, escaped
    options = [a.get("value") for a, anc in dom.find("option") if any(x[1].get("id") == "class-filter" for x in anc)]
    assert options[0] == "" and sorted(options[1:]) == sorted(groups)


def test_faithfulness_in_summary_and_per_image(html, explained):
    assert all(s.cam_drop is not None and s.random_drop is not None for s in explained)
    faith = faithfulness_summary(explained)
    assert faith["n"] == len(explained)
    assert faith["cam_drop_mean"] == pytest.approx(np.mean([s.cam_drop for s in explained]))
    assert faith["random_drop_mean"] == pytest.approx(np.mean([s.random_drop for s in explained]))
    dom = _dom(html)
    (tile, _), = dom.find("div", id="faithfulness")
    assert float(tile["data-cam-drop"]) == pytest.approx(faith["cam_drop_mean"], abs=1e-4)
    assert float(tile["data-random-drop"]) == pytest.approx(faith["random_drop_mean"], abs=1e-4)
    by_path = {s.path: s for s in explained}
    for a, _ in dom.find("article", class_="sample"):
        s = by_path[a["data-path"]]
        assert float(a["data-cam-drop"]) == pytest.approx(s.cam_drop, abs=1e-4)
        assert float(a["data-random-drop"]) == pytest.approx(s.random_drop, abs=1e-4)
    assert "top 20% CAM pixels blurred" in html and "random 20%" in html


def test_figures_and_metrics_are_embedded(html):
    for name, data in _figures().items():
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html
        assert FIGURES[name] in html
    assert "validation" in html and "50.0%" in html and "1.250" in html and "25.0%" in html


def test_unreadable_files_are_listed(html):
    assert "cat/broken.png" in html and "not_an_image: &lt;oops&gt;" in html


def test_images_are_the_crop_the_model_saw_in_true_colours(model, folder):
    """The input thumbnail is the eval crop, denormalised: the file's own pixels at 32 px."""
    samples, _ = explain_files(model, META, folder, ["cat/cat_0.png"], labels=["cat"], faithfulness=False)
    (s,) = samples
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(s.original))))
    assert shown.shape == (32, 32, 3) and s.size == 32
    src = np.asarray(Image.open(folder / "cat" / "cat_0.png").convert("RGB").resize((32, 32), Image.BILINEAR)).astype(int)
    assert np.abs(shown.astype(int) - src).mean() < 12
    assert s.cam_drop is None


# --------------------------------------------------------------------------------------------
# confusions, screening and sampling
# --------------------------------------------------------------------------------------------


def test_confusions_come_from_the_whole_split_matrix():
    cm = [[50, 3, 7], [0, 40, 1], [9, 0, 30]]
    rows = confusions_from_matrix(cm, CLASSES, n=3)
    assert [(r["true"], r["pred"], r["count"]) for r in rows] == [(EVIL_CLASS, "cat", 9), ("cat", EVIL_CLASS, 7), ("cat", "dog", 3)]
    assert rows[0]["share"] == pytest.approx(9 / 39)
    s = ReportSample(path="p.png", true="cat", pred="dog", correct=False, loss=2.0, top5=[("dog", 0.9)], original="AA==", heatmap="AA==", overlay="AA==")
    html = render_report([s], title="t", confusions=rows, confusions_scope="over the whole validation split (140 images)")
    assert "over the whole validation split (140 images)" in html
    dom = _dom(html)
    table = [(a["data-true"], a["data-pred"]) for a, _ in dom.find("tr") if "data-true" in a]
    assert table == [(EVIL_CLASS, "cat"), ("cat", EVIL_CLASS), ("cat", "dog")]
    assert "show 1" in html  # the one sampled cat->dog image can be filtered to
    with pytest.raises(ValueError):
        confusions_from_matrix([[1, 2], [3, 4]], CLASSES)


def test_top_confusions_of_samples_count_pairs():
    mk = lambda t, p: ReportSample(path=f"{t}{p}", true=t, pred=p, correct=t == p, loss=1.0, top5=[], original="", heatmap="", overlay="")
    rows = top_confusions([mk("a", "b"), mk("a", "b"), mk("a", "a"), mk("b", "a")])
    assert rows[0] == {"true": "a", "pred": "b", "count": 2, "share": pytest.approx(2 / 3)}


def test_screening_reports_unreadable_files_and_keeps_order(model, folder):
    files, labels = _files_and_labels(folder)
    s = screen_files(model, META, folder, files, labels=labels, batch_size=4)
    assert [e["path"] for e in s.errors] == ["cat/broken.png"]
    assert s.files == [f for f in files if f != "cat/broken.png"]
    assert s.probs.shape == (len(s.files), len(CLASSES))
    np.testing.assert_allclose(s.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert s.true_idx[-1] == -1 and np.isnan(s.losses[-1])
    known = s.true_idx >= 0
    np.testing.assert_allclose(s.losses[known], -np.log(s.probs[known, s.true_idx[known]]), rtol=1e-5)


def test_screening_and_explaining_agree(model, folder, explained):
    """The cheap pass and the CAM pass run the same preprocessing and model: same prediction."""
    files = [s.path for s in explained]
    s = screen_files(model, META, folder, files)
    preds = dict(zip(s.files, (CLASSES[i] for i in s.preds), strict=True))
    assert all(preds[x.path] == x.pred for x in explained)


def test_choose_samples_puts_misclassified_first_and_stratifies():
    # 3 classes x 10 images; class 0 has 6 errors, class 1 has 1, class 2 none.
    true = np.repeat([0, 1, 2], 10)
    pred = true.copy()
    pred[:6] = 1
    pred[10] = 2
    loss = np.linspace(0.1, 3.0, 30)
    loss[10] = 9.0  # class 1's error is the worst
    picked = choose_samples(true, pred, loss, 8, seed=0)
    assert len(picked) == len(set(picked)) == 8
    wrong = [i for i in picked if true[i] != pred[i]]
    assert picked[: len(wrong)] == wrong and len(wrong) == 4  # half the budget
    assert wrong[0] == 10  # worst error first, then round-robin across classes
    assert wrong[1] == 5 and wrong[2:] == [4, 3]  # class 0 by loss, highest first
    rest = picked[4:]
    assert {int(true[i]) for i in rest} == {0, 1, 2}  # stratified
    assert choose_samples(true, pred, loss, 8, seed=0) == picked
    assert sorted(choose_samples(true, pred, loss, 100)) == list(range(30))
    assert choose_samples(true, pred, loss, 0) == []


def test_choose_samples_unlabelled_are_stratified_by_prediction():
    true = np.full(12, -1)
    pred = np.array([0] * 9 + [1, 2, 2])
    picked = choose_samples(true, pred, np.full(12, np.nan), 3, seed=1)
    assert sorted(int(pred[i]) for i in picked) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# evaluation folder, metrics, writing
# --------------------------------------------------------------------------------------------


def test_load_evaluation_reads_figures_and_val_metrics(tmp_path):
    ev, ck = tmp_path / "evaluation", tmp_path / "checkpoints"
    ev.mkdir()
    ck.mkdir()
    (ev / "confusion_matrix.png").write_bytes(b"cm")
    (ev / "training_curves.png").write_bytes(b"tc")
    (ck / "augmentation_preview.png").write_bytes(b"aug")
    (ev / "val_metrics.json").write_text(json.dumps({"confusion_matrix": [[1]], "class_names": ["a"]}))
    figures, metrics = load_evaluation(ev, ck, None)
    assert list(figures) == ["confusion_matrix.png", "training_curves.png", "augmentation_preview.png"]
    assert figures["augmentation_preview.png"] == b"aug"
    assert metrics["class_names"] == ["a"]
    assert load_evaluation(tmp_path / "missing") == ({}, None)


def test_metric_table_formats_splits():
    t = metric_table({"val_top1": 0.8123, "val_ece": 0.0412, "test_top1": float("nan"), "epoch": 3})
    assert t["columns"] == ["top-1", "ECE"]
    assert t["rows"] == [{"split": "validation", "values": ["81.2%", "0.041"]}, {"split": "test", "values": ["–", "–"]}]


def test_write_report_is_atomic_and_utf8(tmp_path, html):
    out = write_report(html, tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8") == html
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]


def test_labels_must_match_files(model, folder):
    with pytest.raises(ValueError, match="labels"):
        explain_files(model, META, folder, ["cat/cat_0.png"], labels=[])
    with pytest.raises(ValueError, match="labels"):
        screen_files(model, META, folder, ["cat/cat_0.png"], labels=["cat", "dog"])


def test_empty_and_unlabelled_reports_render():
    html = render_report([], title="nothing", errors=[{"path": "a.png", "error": "empty"}])
    assert "No image could be explained." in html and 'class="card sample"' not in html and "a.png" in html
    s = ReportSample(path="x.png", true=None, pred="dog", correct=True, loss=None, top5=[("dog", 0.7), ("cat", 0.3)],
                     original="AA==", heatmap="AA==", overlay="AA==", confidence=0.7)
    html = render_report([s], title="folder", class_names=CLASSES)
    dom = _dom(html)
    assert [a["data-class"] for a, _ in dom.find("section", class_="gallery")] == ["dog"]
    assert not dom.find("section", id="confusions") and not dom.find("section", id="misclassified")
    assert "by predicted class (no labels)" in html and "no label" in html


@pytest.mark.parametrize(
    ("cam", "rnd", "level"),
    [([0.30, 0.20, 0.25], [0.02, 0.05, 0.01], "ok"), ([0.05, 0.03], [0.04, 0.02], "meh"),
     ([0.001, 0.0], [0.0, 0.002], "meh"), ([0.05, 0.10], [0.20, 0.15], "warn")],
)
def test_faithfulness_verdict(cam, rnd, level):
    samples = [ReportSample(path=str(i), true=None, pred="a", correct=True, loss=None, top5=[], original="", heatmap="", overlay="",
                            cam_drop=c, random_drop=r) for i, (c, r) in enumerate(zip(cam, rnd, strict=True))]
    faith = faithfulness_summary(samples)
    assert faith["level"] == level and faith["verdict"]
    assert faith["beats_random"] == sum(c > r for c, r in zip(cam, rnd, strict=True))
    assert faithfulness_summary([]) is None


def test_explain_files_passes_its_precision_to_every_cam_and_deletion_pass(model, folder, explained, monkeypatch):
    """The report's trunk precision (ReportConfig.precision, "auto" by default) reaches the CAM
    of the predicted class, of the true class and the faithfulness forwards."""
    import cvlib.explain.samples as samples_mod

    seen: list[tuple[str, str]] = []
    real_explain, real_deletion = samples_mod.explain_batch, samples_mod.deletion_score

    def spy_explain(*a, precision="fp32", **k):
        seen.append(("cam", precision))
        return real_explain(*a, precision=precision, **k)

    def spy_deletion(*a, precision="fp32", **k):
        seen.append(("deletion", precision))
        return real_deletion(*a, precision=precision, **k)

    monkeypatch.setattr(samples_mod, "explain_batch", spy_explain)
    monkeypatch.setattr(samples_mod, "deletion_score", spy_deletion)
    files = [s.path for s in explained]
    labels = [s.true for s in explained]
    samples, _ = explain_files(model, META, folder, files, labels=labels, precision="bf16")
    assert {p for _, p in seen} == {"bf16"}
    assert {kind for kind, _ in seen} == {"cam", "deletion"}
    assert any(not s.correct for s in explained), "no misclassified image: the true-class CAM went untested"
    assert len([k for k, _ in seen if k == "cam"]) >= 2
    # Every chosen image is still explained.
    assert sorted(s.path for s in samples) == sorted(files)
    assert ReportConfig().precision == "auto"
