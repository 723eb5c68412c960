"""Options of the scoring stage: the one record that says how to score (never what), and the
record that says how a model is exported to the OpenVINO engine (:class:`ExportConfig`).

The same object is the ``score`` flow's ``config`` parameter, what the CLI builds from its flags,
what :func:`cvlib.inference.predict.score_to_parts` and :func:`~cvlib.inference.predict.score_folder`
take, and what the part files record in their metadata.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cvlib.strict import Precision, StrictModel

# Which runtime runs the forward when scoring (cvlib.inference.engines).
Engine = Literal["auto", "torch", "openvino"]


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
    engine: Engine = Field(
        "auto", description="auto: the version's verified OpenVINO artifact on a CPU, PyTorch on CUDA (or without one); "
        "torch; openvino (the verified artifact, else an fp32 IR converted on the fly)."
    )
    ov_streams: int = Field(0, ge=0, description="OpenVINO inference streams (0: the throughput hint's choice).")


class ExportConfig(StrictModel):
    """OpenVINO export after the champion gate (and ``visionflow export``): convert, quantize to
    int8 with NNCF calibrated on training images, keep the result only when it agrees with the
    fp32 model on the validation split."""

    enabled: bool = Field(True, description="Export the registered version to OpenVINO IR after the gate.")
    int8: bool = Field(True, description="Quantize to int8 (NNCF post-training quantization); else export fp32 IR only.")
    calibration_images: int = Field(300, ge=1, description="Training images the int8 ranges are calibrated on (at most).")
    min_top1_agreement: float = Field(
        0.99, ge=0.0, le=1.0, description="Least top-1 agreement with the fp32 model on the validation split for an artifact to be used."
    )
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="NNCF preset: symmetric (performance) or asymmetric activations (mixed)."
    )
    fast_bias_correction: bool = Field(True, description="NNCF's fast bias correction (the slow one is more exact, much slower).")
    keep_stem_and_head: bool = Field(
        False, description="Leave the first convolution and the classifier head (its MatMuls) unquantized (NNCF ignored "
        "scope): the layers int8 hurts most, a few percent of the compute."
    )
    accuracy_control: bool = Field(
        True, description="nncf.quantize_with_accuracy_control: quantize, then return the quantized layers that cost most "
        "top-1 agreement with the fp32 model (on the validation split) to floating point, until the drop is at most "
        "1 - min_top1_agreement. When plain quantization already agrees it costs two passes over the validation split; "
        "when it does not, it is what lets an int8 model pass the gate at all (slower to export)."
    )
    batch_size: int = Field(32, ge=1, description="Images per forward while calibrating and measuring agreement.")
    num_workers: int = Field(0, ge=0, description="DataLoader workers for calibration and agreement (0: in this process).")
