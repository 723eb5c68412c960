"""The champion/challenger promotion rule.
"""

from __future__ import annotations

from pydantic import Field

from cvlib.strict import StrictModel


class GateConfig(StrictModel):
    """When a new version may replace the champion."""

    metric: str = Field("val_top1", description="Validation metric compared (higher is better).")
    margin: float = Field(0.0, ge=0.0, description="The challenger must beat the champion by more than this.")
    promote_on_class_change: bool = Field(
        False, description="Promote when the class list changed (the champion cannot be scored on the new labels)."
    )
