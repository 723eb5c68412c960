"""Options of the explain stage: the Grad-CAM report.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from cvlib.strict import Precision, StrictModel


class ReportConfig(StrictModel):
    """Grad-CAM report."""

    samples: int = Field(24, ge=1, description="How many images the report explains.")
    seed: int = 0
    feature_maps: bool = Field(
        False, description="Add a 'Feature maps' section: what a few layers respond to in the first explained images. "
        "Off by default: it costs one more forward over those images and adds a PNG per image and layer to the page."
    )
    feature_map_layers: list[str] = Field(
        default_factory=list, description="Dotted module names (model.named_modules(), e.g. layer1.0.conv1 or "
        "features.block2); a name the model lacks fails before any image is explained. Empty: the first conv, the "
        "middle stage and the last conv-bearing stage, chosen from the model."
    )
    feature_map_images: int = Field(
        2, ge=1, description="How many explained images get feature maps (the first ones: misclassified first)."
    )
    feature_map_channels: int = Field(
        16, ge=1, le=256, description="Channels drawn per layer and image: those with the highest mean activation."
    )
    batch_size: int | None = Field(
        None, ge=1, description="Images per forward, for screening and for the CAMs. None: 64 for screening (the "
        "training batch size in retrain) and 16 for the CAMs, which keep activations and gradients."
    )
    device: str = Field("auto", description="'auto' (CUDA, then MPS, then CPU), 'cuda', 'mps', 'cpu' or a torch device string.")
    precision: Precision = Field(
        "auto", description="What the report's forwards run in (the explained activation, its gradient and the "
        "maps are always fp32). auto: bf16 on CUDA and on CPUs with native bf16 (about twice as fast, maps within "
        "Pearson r 0.999 of fp32), else fp32."
    )

    @field_validator("feature_map_layers")
    @classmethod
    def _layer_names(cls, layers: list[str]) -> list[str]:
        names = [name.strip() for name in layers]
        if any(not name for name in names):
            raise ValueError("layer names must not be empty")
        return list(dict.fromkeys(names))
