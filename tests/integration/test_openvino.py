"""The OpenVINO export on the real servers: the retrain flow exports after its gate (files with
the version, figures as tags), the pyfunc model serves from the artifact, and ``score`` picks the
engine per version (auto -> OpenVINO on this CPU) and keeps each engine's rows apart."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("openvino")


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_TRACKING_URI"])


def test_retrain_exports_after_the_gate_and_tags_the_version(retrained, on_servers):
    result = retrained["result"]
    assert result.openvino in ("verified", "rejected")
    tags = _client().get_model_version(retrained["name"], result.version).tags
    assert tags["visionflow.openvino.status"] == result.openvino
    assert float(tags["visionflow.openvino.val_top1_fp32"]) >= 0.0
    assert tags["visionflow.openvino.int8_top1_agreement"]  # int8 was measured, whatever the decision
    assert tags["visionflow.openvino.min_top1_agreement"] == "0.9900"
    assert "int8: top-1 agreement" in tags["visionflow.openvino.reason"]
    if result.openvino == "verified":
        assert float(tags["visionflow.openvino.top1_agreement"]) >= 0.99
        assert tags["visionflow.openvino.precision"] in ("int8", "bf16", "fp32")


@pytest.mark.store_agnostic
def test_pyfunc_serves_from_the_openvino_artifact(retrained, on_servers, digits_dir):
    """``mlflow.pyfunc.load_model`` on the version: the OpenVINO artifact runs the requests, and
    its top-1 is PyTorch's."""
    import mlflow
    import pandas as pd

    from cvlib.inference.predict import predict_sources
    from cvlib.training.checkpoint import load_package
    from tasks.registry import resolve_model

    result = retrained["result"]
    if result.openvino != "verified":
        pytest.skip(f"the export was {result.openvino}: nothing for the pyfunc model to use")
    paths = sorted(str(p) for p in digits_dir.rglob("*.png"))[:40]
    served = mlflow.pyfunc.load_model(f"models:/{retrained['name']}/{result.version}")
    assert served.unwrap_python_model().engine.startswith("openvino-")
    got = served.predict(pd.DataFrame({"path": paths}))
    model, meta = load_package(resolve_model(f"models:/{retrained['name']}/{result.version}")[0])
    expected = predict_sources(model, meta, paths)
    assert list(got["status"]) == ["ok"] * len(paths)
    assert (got["top1_label"] == expected["top1_label"]).mean() >= 0.95


@pytest.mark.store_agnostic
def test_score_auto_uses_the_artifact_and_engines_never_mix(retrained, on_servers, digits_dir, tmp_path):
    from cvlib.inference.options import ScoreConfig
    from cvlib.inference.output import read_predictions
    from flows.score import score

    result = retrained["result"]
    uri = f"models:/{retrained['name']}/{result.version}"
    out = tmp_path / "preds"
    config = ScoreConfig(num_workers=0, batch_size=32)
    first = score(input_dir=str(digits_dir), model_uri=uri, out=str(out), config=config)
    auto_engine = "openvino" if result.openvino == "verified" else "torch"
    rows = read_predictions(out, result.version)
    assert set(rows["engine"]) == {auto_engine} and len(rows) == first.files
    other = "torch" if auto_engine == "openvino" else "openvino"
    second = score(input_dir=str(digits_dir), model_uri=uri, out=str(out), config=config, engine=other)  # the string form
    assert second.skipped == 0 and second.processed == first.files  # another engine: scored again
    rows = read_predictions(out, result.version)
    assert len(rows) == 2 * first.files
    assert set(rows["engine"]) == {"torch", "openvino"}
    assert rows.groupby("engine")["path"].nunique().to_dict() == {"torch": first.files, "openvino": first.files}
    third = score(input_dir=str(digits_dir), model_uri=uri, out=str(out), config=config.model_copy(update={"engine": other}))
    assert third.skipped == first.files and third.processed == 0
