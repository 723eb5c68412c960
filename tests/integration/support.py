"""Helpers for the integration tests."""

from __future__ import annotations

from cvlib.config import RetrainConfig
from cvlib.data.options import AugmentConfig
from cvlib.explain.options import ReportConfig
from cvlib.inference.options import ExportConfig
from cvlib.training.options import TrainConfig


def small_config(model_name: str, arch: str = "resnet50") -> RetrainConfig:
    return RetrainConfig(
        model_name=model_name,
        augment=AugmentConfig(image_size=32, resize_ratio=1.0, hflip=0.0),
        train=TrainConfig(arch=arch, weights="none", epochs=1, batch_size=16, num_workers=0, progress=False),
        report=ReportConfig(samples=6),
        export=ExportConfig(calibration_images=32),  # the export after the gate, at a test's size
    )
