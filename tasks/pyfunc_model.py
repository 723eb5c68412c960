"""MLflow pyfunc wrapper (models-from-code): ``mlflow models serve`` and ``mlflow.pyfunc.load_model``
score a DataFrame of image paths or raw bytes into top-5 rows.

MLflow stores this file itself as the model's code, so loading the model unpickles nothing; the
weights come from the package's safetensors file. Only ``cvlib`` is needed beside it (logged with
the model through ``code_paths``).

When the package holds a verified OpenVINO artifact (``openvino/``, added by the export after
the champion gate) and there is no CUDA device, requests run on it (int8 where it agreed with
fp32), so ``mlflow models serve`` gets the CPU engine's speed; otherwise they run on PyTorch.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class VisionflowClassifier(PythonModel):
    def load_context(self, context) -> None:
        from cvlib.training.checkpoint import load_package

        self.model, self.meta = load_package(context.artifacts["package"])
        self.engine = "torch"
        try:
            import torch

            from cvlib.inference.engines import OpenVINOEngine, choose_engine

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            choice = choose_engine("auto", device, context.artifacts["package"])
            if choice.engine == "openvino":
                self.model = OpenVINOEngine(choice.xml, int8=choice.int8, precision_hint=choice.precision_hint)
                self.engine = f"openvino-{self.model.precision}"
        except ImportError:  # an environment without OpenVINO serves on PyTorch
            pass

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from cvlib.inference.predict import predict_sources

        if "path" in model_input.columns:
            sources = [str(p) for p in model_input["path"]]
        elif "image" in model_input.columns:
            # JSON requests carry bytes as base64 strings.
            sources = [v if isinstance(v, bytes) else base64.b64decode(v) for v in model_input["image"]]
        else:
            raise ValueError("input needs a 'path' column (file paths) or an 'image' column (bytes or base64)")
        top_k = int((params or {}).get("top_k", 5))
        return predict_sources(self.model, self.meta, sources, top_k=top_k)


mlflow.models.set_model(VisionflowClassifier())
