"""visionflow's pure library: data, models, training, scoring, explanations.

Importable from a notebook; it never imports Prefect or MLflow.
"""

__version__ = "0.1.0"
