"""Options of the data stage: how a folder becomes a manifest, and how images are augmented and
preprocessed.
"""

from __future__ import annotations

from pydantic import Field

from cvlib.strict import StrictModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class DataConfig(StrictModel):
    """How an image folder becomes a manifest and splits."""

    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of each class held out for validation.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Share of each class held out for testing.")
    min_images_per_class: int = Field(2, ge=1, description="Fewer images than this in a class is an error.")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Decompression-bomb limit (Pillow's default); larger images are quarantined."
    )
    split_salt: str = Field("visionflow", description="Salt for the hash-based split; change it to reshuffle.")
    near_duplicates: bool = Field(True, description="Group re-encoded/resized copies (perceptual hash) so they share a split.")
    near_duplicate_distance: int = Field(
        4, ge=0, le=16, description="Largest pHash Hamming distance (of 64 bits) treated as a near-duplicate."
    )


class AugmentConfig(StrictModel):
    """Training-time augmentation and the evaluation preprocessing derived from it."""

    image_size: int = Field(224, ge=16, description="Side of the square crop the model sees.")
    resize_ratio: float = Field(
        256 / 224, ge=1.0, description="Eval resize side = image_size * resize_ratio, then a centre crop."
    )
    scale_min: float = Field(0.5, gt=0.0, le=1.0, description="RandomResizedCrop's smallest area fraction.")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="Probability of a horizontal flip.")
    rotation: float = Field(15.0, ge=0.0, le=180.0, description="Largest random rotation in degrees.")
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="Brightness/contrast/saturation jitter strength.")
    trivial_augment: bool = Field(
        False, description="TrivialAugmentWide (one random op of random strength per image), torchvision's recipe."
    )
    random_erase: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of erasing a random rectangle (RandomErasing); 0 disables it."
    )
    mixup_alpha: float = Field(
        0.0, ge=0.0, description="MixUp Beta(alpha, alpha) on training batches (e.g. 0.2); 0 disables it."
    )
    cutmix_alpha: float = Field(
        0.0, ge=0.0, description="CutMix Beta(alpha, alpha) on training batches (e.g. 1.0); 0 disables it. "
        "With both alphas set, each batch gets one of the two at random."
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
