"""The base of every options record, and the field types several of them share."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict

# What a forward may run in: "auto" is decided per device by cvlib.models.precision.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a deployment's parameters must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False)
