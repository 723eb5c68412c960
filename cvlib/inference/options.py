"""Options of the scoring stage: the one record that says how to score (never what).

The same object is the ``score`` flow's ``config`` parameter, what the CLI builds from its flags,
what :func:`cvlib.inference.predict.score_to_parts` and :func:`~cvlib.inference.predict.score_folder`
take, and what the part files record in their metadata.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvlib.strict import Precision, StrictModel


class ScoreConfig(StrictModel):
    """Batch scoring: batching, devices, precision, decoding, the model's form, output granularity."""

    batch_size: int = Field(64, ge=1, description="Images per forward.")
    top_k: int = Field(5, ge=1, description="Classes per row (at most the model's number of classes).")
    num_workers: int = Field(2, ge=0, description="Decoding workers (0: decode in the scoring thread).")
    device: str = Field("auto", description="auto (CUDA, then MPS, then CPU), or a torch device name.")
    precision: Precision = Field(
        "auto", description="auto: bf16 on CUDA and on CPUs with native bf16, else fp32."
    )
    compile: bool = Field(False, description="torch.compile the model (slow start, faster steady state on GPUs).")
    fuse: bool = Field(True, description="Fold BatchNorm into the preceding convolutions (the same function, faster).")
    gpu_decode: Literal["auto", "on", "off"] = Field("auto", description="Decode JPEGs with nvJPEG on CUDA (auto: when CUDA is used).")
    loader: Literal["auto", "processes", "threads"] = Field(
        "auto", description="Decoding workers: processes (DataLoader) or threads (auto: threads where the process may not fork)."
    )
    part_size: int = Field(4096, ge=1, description="Rows per Parquet part file.")
    part_seconds: float = Field(300.0, gt=0, description="Close a part at least this often (bounds the work a kill loses).")
