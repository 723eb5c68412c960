"""The training stage: :func:`cvlib.training.fit.fit` and its parts (steps, phases, schedule, EMA,
early stopping, checkpoints, distributed), validation and its metrics. Options:
:mod:`cvlib.training.options`."""
