"""Options of the scoring stage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvlib.strict import StrictModel


class ScoreConfig(StrictModel):
    """Batch scoring."""

    batch_size: int = Field(64, ge=1)
    top_k: int = Field(5, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with native bf16, else fp32."
    )
