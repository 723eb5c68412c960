"""Prefect tasks: thin wrappers around cvlib, one module per pipeline stage."""
