"""Prefect flows (retrain, score, explain) and the ``visionflow`` command line."""
