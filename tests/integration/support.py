"""Helpers for the integration tests."""

from __future__ import annotations

from pathlib import Path

from cvlib.config import RetrainConfig
from cvlib.data.options import AugmentConfig
from cvlib.explain.options import ReportConfig
from cvlib.inference.options import ExportConfig
from cvlib.training.options import TrainConfig


# SimpleCNN unless a test needs a torchvision backbone: the integration suite runs on both
# backends, and the flows' mechanics do not depend on the network. ResNet-50 itself goes through
# the whole CLI in tests/e2e (the defaults), ResNet-18 through the
# killed-and-resumed retrain here (test_failures.py).
def small_config(model_name: str, arch: str = "simple_cnn") -> RetrainConfig:
    return RetrainConfig(
        model_name=model_name,
        augment=AugmentConfig(image_size=32, resize_ratio=1.0, hflip=0.0),
        train=TrainConfig(arch=arch, weights="none", epochs=1, batch_size=16, num_workers=0, progress=False),
        report=ReportConfig(samples=6),
        export=ExportConfig(calibration_images=32),  # the export after the gate, at a test's size
    )


def scoring_inputs(digits_dir: Path, root: Path, *, every: int, count: int) -> Path:
    """``count`` real digits (every ``every``-th, names made unique) in class sub-folders of
    ``root``, plus a text file that claims to be a JPEG: one row with an error."""
    for i, src in enumerate(sorted(digits_dir.rglob("*.png"))[::every][:count]):
        dest = root / src.parent.name / f"{i:02d}_{src.name}"
        dest.parent.mkdir(exist_ok=True)
        dest.write_bytes(src.read_bytes())
    (root / "broken.jpg").write_text("not an image")
    return root
