"""The sweep stage: a hyper-parameter search over retraining runs, on Optuna.

:mod:`cvlib.sweep.space` reads and checks a search-space file and turns a trial's values into a
:class:`~cvlib.config.RetrainConfig`; :mod:`cvlib.sweep.study` opens (or continues) the Optuna
study with its sampler, pruner and storage, recovers trials a killed sweep left running, ranks
trials and draws Optuna's figures. Options: :mod:`cvlib.sweep.options`. Prefect and MLflow stay
out: the tasks and the flow live in ``tasks/sweep.py`` and ``flows/sweep.py``.
"""
