"""The OpenVINO engine: export and quantization, the agreement gate, the engine choice, and
scoring across engines into one output (resume treats another engine as another model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from cvlib.data.ingest import build_manifest
from cvlib.inference.engines import EXPORT_RECORD, OpenVINOEngine, choose_engine, openvino_dir, read_export_record
from cvlib.inference.export import (
    FP32_FILE,
    INT8_FILE,
    calibration_loader,
    export_openvino,
    export_package,
    quantize_ir,
    stem_and_head,
    validation_loader,
)
from cvlib.inference.options import ExportConfig, ScoreConfig
from cvlib.inference.output import PART_GLOB, finalize_dataset, output_layout, read_predictions
from cvlib.inference.predict import score_to_parts
from cvlib.inference.resume import read_done
from cvlib.models.factory import create_model
from cvlib.training.checkpoint import save_package

pytest.importorskip("openvino")
pytest.importorskip("nncf")

CLASSES = [str(d) for d in range(10)]
META = {
    "arch": "simple_cnn", "class_names": CLASSES, "head": {"hidden_dim": 32, "dropout": 0.0},
    "model_kwargs": {"width": 8}, "preprocessing": {"image_size": 32, "resize_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
}  # fmt: skip


@pytest.fixture(scope="module")
def manifest(digits_dir):
    return build_manifest(digits_dir)[0]


@pytest.fixture(scope="module")
def trained():
    """A narrow SimpleCNN, random init, its last layer scaled up: logits with clear margins, as a
    trained model's are (raw random logits are near ties that any rounding flips), at a cost a
    unit test can pay on two shared cores."""
    torch.manual_seed(0)
    model = create_model("simple_cnn", 10, weights="none", hidden_dim=32, dropout=0.0, width=8)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory, trained, digits_dir, manifest):
    """A package with an int8 artifact verified at a threshold any int8 model passes: the
    export machinery, not this small model's int8 accuracy, is under test here."""
    pkg = save_package(trained, META, tmp_path_factory.mktemp("pkg") / "package")
    record = export_package(trained, META, digits_dir, manifest, pkg / "openvino", ExportConfig(calibration_images=16, min_top1_agreement=0.0))
    return pkg, record


def test_export_writes_the_ir_and_a_verified_int8_record(package):
    pkg, record = package
    folder = openvino_dir(pkg)
    assert folder == pkg / "openvino"
    for name in ("model_fp32.xml", "model_fp32.bin", "model_int8.xml", "model_int8.bin", EXPORT_RECORD):
        assert (folder / name).is_file(), name
    saved = read_export_record(pkg)
    assert saved["status"] == "verified" and saved["precision"] == "int8" and saved["file"] == INT8_FILE
    assert saved["calibration_images"] == 16 and saved["val_images"] > 0
    assert saved["quantization"]["calibration_images"] == 16 and set(saved["quantization"]) >= {"accuracy_control", "keep_stem_and_head"}
    int8 = saved["candidates"][0]
    assert int8["precision"] == "int8" and int8["passed"] and 0.0 <= int8["top1_agreement"] <= 1.0
    assert 0.0 <= saved["val_top1_fp32"] <= 1.0 and saved["seconds"] > 0
    assert record.reason.startswith("int8: top-1 agreement")
    # The int8 IR really holds quantized operations.
    assert "FakeQuantize" in (folder / INT8_FILE).read_text() or "FakeConvert" in (folder / INT8_FILE).read_text()


def test_openvino_fp32_agrees_with_torch(package, trained, digits_dir, manifest):
    pkg, _ = package
    engine = OpenVINOEngine(pkg / "openvino" / "model_fp32.xml", precision_hint="f32")
    assert engine.precision == "fp32" and engine.engine == "openvino"
    images, _ = next(iter(validation_loader(META, digits_dir, manifest, batch_size=8)))
    with torch.inference_mode():
        expected = trained(images)
    got = engine(images)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def test_broken_quantization_is_rejected_and_the_reason_recorded(trained, digits_dir, manifest, tmp_path):
    """Calibrated on one blank image, the int8 ranges fit nothing real: the gate refuses the int8
    model, says why, and falls back to an IR that agrees (or to PyTorch)."""
    val = validation_loader(META, digits_dir, manifest, batch_size=16)
    blank = [torch.zeros(1, 3, 32, 32)]
    record = export_openvino(
        trained, META, tmp_path / "openvino", validation=val, calibration=blank, calibration_size=1,
        config=ExportConfig(min_top1_agreement=0.99, accuracy_control=False, keep_stem_and_head=False),
    )  # fmt: skip
    int8 = record.candidate("int8")
    assert int8 is not None and not int8.passed and int8.top1_agreement < 0.99
    assert "int8: top-1 agreement" in record.reason and "not used" in record.reason.split(";")[0]
    assert record.precision != "int8"
    if record.verified:  # bf16 or fp32 IR took over
        assert record.candidates[-1].passed and record.file == "model_fp32.xml"
    else:
        assert record.reason.endswith("PyTorch is kept")
    saved = json.loads((tmp_path / "openvino" / EXPORT_RECORD).read_text())
    assert saved["candidates"][0]["passed"] is False and saved["reason"] == record.reason


def _first_conv_input(xml) -> str:
    """The type of the op that feeds the first convolution of an IR (FakeQuantize when quantized)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    conv = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
    return conv.input_value(0).get_node().get_type_name()


def test_stem_and_head_stay_in_floating_point_when_asked(package, digits_dir, manifest, tmp_path):
    import openvino as ov

    pkg, _ = package
    fp32 = ov.Core().read_model(str(pkg / "openvino" / FP32_FILE))
    names = stem_and_head(fp32)
    kinds = {op.get_friendly_name(): op.get_type_name() for op in fp32.get_ordered_ops()}
    assert [kinds[n] for n in names] == ["Convolution", "MatMul", "MatMul"]  # SimpleCNN: a conv stem, a two-layer head
    assert _first_conv_input(pkg / "openvino" / INT8_FILE) == "FakeQuantize"  # by default the stem is quantized
    calib = calibration_loader(META, digits_dir, manifest, 8)
    quantize_ir(fp32, calib, len(calib), tmp_path / "kept.xml", ExportConfig(keep_stem_and_head=True, accuracy_control=False))
    assert _first_conv_input(tmp_path / "kept.xml") != "FakeQuantize"
    kept = ov.Core().read_model(str(tmp_path / "kept.xml"))
    assert any(op.get_type_name() == "FakeQuantize" for op in kept.get_ordered_ops())  # the rest is int8


def test_accuracy_control_restores_what_a_broken_calibration_breaks(trained, digits_dir, manifest, tmp_path):
    """The blank calibration of the test below, with NNCF's accuracy control: layers go back to
    floating point until the int8 model agrees with fp32 again, and the gate verifies it."""
    val = validation_loader(META, digits_dir, manifest, batch_size=16)
    blank = [torch.zeros(1, 3, 32, 32)]
    config = ExportConfig(min_top1_agreement=0.99, accuracy_control=True)
    record = export_openvino(trained, META, tmp_path / "openvino", validation=val, calibration=blank, calibration_size=1, config=config)
    int8 = record.candidate("int8")
    assert int8 is not None and int8.passed and int8.top1_agreement >= 0.99
    assert record.precision == "int8" and record.quantization["accuracy_control"] is True
    with pytest.raises(ValueError, match="validation split"):
        quantize_ir(None, blank, 1, tmp_path / "x.xml", config)


def test_engine_choice(tmp_path, package):
    pkg, _ = package
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_engine("auto", cpu, pkg).engine == "openvino"
    assert choose_engine("auto", cpu, pkg).int8
    assert choose_engine("auto", cuda, pkg).engine == "torch"  # CUDA stays on PyTorch
    assert choose_engine("torch", cpu, pkg).engine == "torch"
    bare = tmp_path / "bare"
    bare.mkdir()
    assert choose_engine("auto", cpu, bare).engine == "torch"
    assert choose_engine("openvino", cpu, bare).xml is None  # converted on the fly
    rejected = tmp_path / "rejected" / "openvino"
    rejected.mkdir(parents=True)
    (rejected / EXPORT_RECORD).write_text(json.dumps({"status": "rejected", "reason": "int8: too far", "fp32_file": "model_fp32.xml"}))
    choice = choose_engine("auto", cpu, rejected.parent)
    assert choice.engine == "torch" and "int8: too far" in choice.reason
    assert choose_engine("openvino", cpu, rejected.parent).xml.endswith("model_fp32.xml")
    with pytest.raises(ValueError, match="CPU"):
        choose_engine("openvino", cuda, rejected.parent)
    with pytest.raises(ValueError):
        ScoreConfig(engine="tensorrt")


def test_resume_across_engines_rescores_and_never_mixes(package, trained, digits_dir, tmp_path):
    """torch, then openvino into the same output: the second run scores every file again (another
    engine is another model); a rerun of either skips all; each engine's rows stay its own."""
    pkg, _ = package
    files = sorted(p.relative_to(digits_dir).as_posix() for p in Path(digits_dir).rglob("*.png"))[:24]
    out = tmp_path / "preds"
    config = ScoreConfig(num_workers=0, batch_size=8, precision="fp32")
    engine = OpenVINOEngine(pkg / "openvino" / INT8_FILE, int8=True)
    first = score_to_parts(trained, META, digits_dir, files, out, model_version="1", config=config)
    assert (first.scored, first.skipped, first.engine, first.precision) == (24, 0, "torch", "fp32")
    second = score_to_parts(engine, META, digits_dir, files, out, model_version="1", config=config)
    assert (second.scored, second.skipped, second.engine, second.precision) == (24, 0, "openvino", "int8")
    again = score_to_parts(engine, META, digits_dir, files, out, model_version="1", config=config)
    assert (again.scored, again.skipped) == (0, 24)
    assert len(read_done(sorted(out.glob(PART_GLOB)), "1", files, engine="torch")) == 24
    layout = output_layout(out)
    for name, precision in (("torch", "fp32"), ("openvino", "int8")):
        df, dropped = finalize_dataset(layout, "1", files, name)
        assert len(df) == 24 and dropped == 0
        rows = read_predictions(out, "1", engine=name)
        assert len(rows) == 24 and set(rows["engine"]) == {name} and set(rows["precision"]) == {precision}
    both = read_predictions(out, "1")
    assert len(both) == 48
    torch_top1 = read_predictions(out, "1", engine="torch").set_index("path")["top1_index"]
    ov_top1 = read_predictions(out, "1", engine="openvino").set_index("path")["top1_index"]
    assert (torch_top1 == ov_top1).mean() >= 0.75  # the same model, quantized


def test_parts_written_before_the_engine_columns_read_as_torch(trained, digits_dir, tmp_path):
    files = sorted(p.relative_to(digits_dir).as_posix() for p in Path(digits_dir).rglob("*.png"))[:4]
    out = tmp_path / "old"
    score_to_parts(trained, META, digits_dir, files, out, model_version="3", config=ScoreConfig(num_workers=0))
    for part in out.glob(PART_GLOB):  # as round one wrote them
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["engine", "precision"]), part)
    parts = sorted(out.glob(PART_GLOB))
    assert len(read_done(parts, "3", files)) == 4
    assert read_done(parts, "3", files, engine="openvino") == {}
    assert set(read_predictions(out, "3")["engine"]) == {"torch"}
