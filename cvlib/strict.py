"""The base of every options record."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a deployment's parameters must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=False)
