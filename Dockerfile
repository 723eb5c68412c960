# A worker image for visionflow: Prefect workers (docker / kubernetes work pools), Dask workers
# and torchrun nodes all run this one image. Minimal on purpose, and NOT built or tested on the
# development machines (no internet there): see docs/scaling.md.
#
#   docker build -t REGISTRY/visionflow:0.1.0 .
#   docker push REGISTRY/visionflow:0.1.0
#
# CPU image. For NVIDIA GPUs, start FROM an image with CUDA's runtime libraries, or install the
# torch/torchvision wheels of your CUDA version before `pip install .` (pip keeps them: the
# requirements are ranges).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    VISIONFLOW_HOME=/var/lib/visionflow \
    VISIONFLOW_ROOT=/opt/visionflow

WORKDIR /opt/visionflow
COPY pyproject.toml README.md ./
COPY cvlib ./cvlib
COPY tasks ./tasks
COPY flows ./flows
COPY deployments ./deployments
COPY configs ./configs
RUN pip install . && useradd --create-home --uid 1000 visionflow && mkdir -p "$VISIONFLOW_HOME" \
    && chown visionflow "$VISIONFLOW_HOME"
USER visionflow

# Flows run from /opt/visionflow (deployments/prefect.yaml's pull step uses VISIONFLOW_ROOT).
# Set PREFECT_API_URL and MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI) in the work pool or pod.
CMD ["visionflow", "--help"]
