"""The sweep's search space and study (cvlib.sweep): a wrong space file fails before any work in
one line naming the key and the value; trials map onto RetrainConfig; a study continues across
runs and requeues the trials a killed sweep left running."""

from __future__ import annotations

import pytest

from cvlib.config import RetrainConfig
from cvlib.sweep import study as studies
from cvlib.sweep.options import SweepConfig
from cvlib.sweep.space import DEFAULT_SPACE, SpaceError, load_space, parse_space, suggest, trial_config

FULL = """\
lr: {low: 1e-4, high: 1.0e-2, log: true}
weight_decay: {low: 0.0, high: 0.1}
label_smoothing: [0.0, 0.1]
augment_strength: {low: 0.0, high: 1.0}
image_size: [32, 48]
arch: [simple_cnn, resnet18]
epochs: {low: 1, high: 3}
"""


def write(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_space_file_reads_every_option(tmp_path):
    space = load_space(write(tmp_path, FULL))
    assert set(space.searched()) == {"lr", "weight_decay", "label_smoothing", "augment_strength", "image_size", "arch", "epochs"}
    assert space.lr.low == pytest.approx(1e-4) and space.lr.log  # YAML's 1e-4 (a string in YAML 1.1) is a number
    assert space.archs() == ["simple_cnn", "resnet18"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lrr: {low: 0.1, high: 1}\n", "unknown key 'lrr' (got {'low': 0.1, 'high': 1})"),
        ("lr: -0.1\n", "lr: must be above 0 (got -0.1)"),
        ("lr: {low: 0, high: 0.1, log: true}\n", "lr: a log range needs low > 0 (got low=0)"),
        ("weight_decay: {low: 0.1, high: 0.01}\n", "weight_decay: low must not exceed high (got low=0.1, high=0.01)"),
        ("label_smoothing: [0.1, 1.5]\n", "label_smoothing: must be between 0 and 1 (exclusive) (got 1.5)"),
        ("image_size: [8, 32]\n", "image_size: must be a whole number of at least 16 (got 8)"),
        ("epochs: {low: 1.5, high: 3}\n", "epochs: low must be a whole number (got 1.5)"),
        ("arch: {low: 1, high: 2}\n", "arch: takes a value or a list, not a range"),
        ("lr: {low: 0.001, hi: 1}\n", "lr: high: field required (got {'low': 0.001, 'hi': 1})"),
        ("lr: fast\n", "lr: must be a number (got 'fast')"),
        ("lr: [0.001, 0.01]\nenqueue: [{lr: 0.5}]\n", "enqueue: lr must be one of [0.001, 0.01] (got 0.5)"),
        ("lr: [0.001, 0.01]\nenqueue: [{wd: 0.5}]\n", "enqueue: unknown key 'wd'"),
        ("lr: 0.01\n", "nothing to search (every option is fixed)"),
        ("- lr\n", "must be a mapping of option names"),
        ("lr: [0.1\n", "is not valid YAML"),
    ],
)
def test_wrong_space_file_is_one_line_naming_key_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    message = str(err.value)
    assert message.startswith(f"space file {path}") and expected in message and "\n" not in message, message


def test_missing_file_and_default_space(tmp_path):
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    assert load_space(None) is DEFAULT_SPACE
    assert set(DEFAULT_SPACE.searched()) == {"lr", "weight_decay", "label_smoothing"}
    assert load_space(write(tmp_path, '{"lr": [0.001, 0.01]}', "s.json")).searched() == {"lr": [0.001, 0.01]}


def test_grid_needs_lists_or_steps():
    with pytest.raises(SpaceError, match=r"lr: the grid sampler needs a list of values or a range with a step"):
        DEFAULT_SPACE.grid()
    grid = parse_space({"lr": [1e-3, 1e-2], "epochs": {"low": 1, "high": 3}, "weight_decay": {"low": 0, "high": 0.1, "step": 0.05}}).grid()
    assert grid == {"lr": [1e-3, 1e-2], "weight_decay": [0.0, 0.05, 0.1], "epochs": [1, 2, 3]}
    assert studies.trial_budget(SweepConfig(trials=50, sampler="grid"), parse_space({"lr": [1e-3, 1e-2], "epochs": [1, 2]})) == 4


def test_trial_config_sets_values_and_strength():
    base = RetrainConfig.model_validate({"train": {"arch": "resnet50", "weights": "DEFAULT"}, "augment": {"hflip": 0.0}})
    config = trial_config(base, {"lr": 0.02, "weight_decay": 0.01, "label_smoothing": 0.1, "epochs": 3, "arch": "simple_cnn",
                                 "image_size": 48, "augment_strength": 0.5})  # fmt: skip
    t, a = config.train, config.augment
    assert (t.lr, t.weight_decay, t.label_smoothing, t.epochs, t.arch) == (0.02, 0.01, 0.1, 3, "simple_cnn")
    assert t.weights == "none"  # no pretrained weights for visionflow's own model
    assert (a.image_size, a.rotation, a.color_jitter, a.scale_min, a.hflip) == (48, 15.0, 0.2, pytest.approx(0.65), 0.0)
    assert trial_config(base, {}) == base


def test_study_continues_and_requeues_running_trials(tmp_path):
    space = parse_space({"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "arch": ["simple_cnn", "resnet18"],
                         "enqueue": [{"lr": 0.5, "arch": "simple_cnn"}]})  # fmt: skip
    options = SweepConfig(trials=3)
    url, name = studies.storage_url(tmp_path, options), studies.study_name(tmp_path, options)
    assert url == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}" and name.startswith(tmp_path.name)
    study = studies.open_study(url, name, options, space)
    studies.enqueue_first(study, space)
    first = study.ask()
    assert suggest(first, space) == {"lr": 0.5, "arch": "simple_cnn"}  # the enqueued trial, out of range or not
    study.tell(first, 0.9)
    killed = study.ask()  # a sweep dies while this one runs
    params = suggest(killed, space)
    killed.set_user_attr(studies.RUN_ID, "run-of-killed")

    again = studies.open_study(url, name, options, space)  # the rerun
    studies.enqueue_first(again, space)  # not enqueued twice
    assert studies.recover(again) == [killed.number]
    assert studies.finished(again) == 1  # the failed-and-requeued one does not count
    resumed = again.ask()
    assert suggest(resumed, space) == params
    assert studies.checkpoint_key(resumed) == studies.checkpoint_key(killed) == f"trial-{killed.number:04d}"
    assert resumed.user_attrs[studies.RUN_ID] == "run-of-killed"
    again.tell(resumed, 0.8)
    assert [r["trial"] for r in studies.ranking(again)] == [first.number, resumed.number]


def test_figures_are_pngs(tmp_path):
    space = parse_space({"lr": {"low": 1e-3, "high": 1e-1, "log": True}, "weight_decay": {"low": 0.0, "high": 0.1}})
    options = SweepConfig(sampler="random")
    study = studies.open_study(f"sqlite:///{tmp_path / 'o.db'}", "s", options, space)
    for i in range(4):
        trial = study.ask()
        suggest(trial, space)
        study.tell(trial, 0.1 * i)
    written = studies.write_figures(study, tmp_path / "figures")
    assert set(written) == {"parallel_coordinate", "param_importances"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written.values())


def test_cli_rejects_a_wrong_space_before_any_work(tmp_path, capsys):
    from flows.cli import main

    data = tmp_path / "data"
    data.mkdir()
    path = write(tmp_path, "lr: {low: 0.1, high: 0.01}\n")
    assert main(["sweep", str(data), "--space", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: space file {path}: lr: low must not exceed high (got low=0.1, high=0.01)"
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(data), "--sampler", "grid"]) == 2
    assert "the grid sampler needs a list of values" in capsys.readouterr().err


@pytest.mark.postgres
def test_study_on_postgresql_continues(tmp_path):
    """With a PostgreSQL storage URL the study lives there (not in the sweep folder) and a second
    open continues it. Its own database: MLflow's test database has an alembic_version table too."""
    from tests import servers

    if not servers.postgres_available():
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    url = servers.create_postgres_database("visionflow_sweep")
    try:
        options = SweepConfig(storage=url, sampler="random")
        assert studies.storage_url(tmp_path, options) == url
        assert studies.shown_storage("postgresql+psycopg2://u:secret@h:5432/db") == "postgresql+psycopg2://u:***@h:5432/db"
        study = studies.open_study(url, studies.study_name(tmp_path, options), options, DEFAULT_SPACE)
        trial = study.ask()
        suggest(trial, DEFAULT_SPACE)
        study.tell(trial, 0.5)
        again = studies.open_study(url, studies.study_name(tmp_path, options), options, DEFAULT_SPACE)
        assert studies.finished(again) == 1 and not (tmp_path / "optuna.db").exists()  # dropped WITH (FORCE) below
    finally:
        servers.drop_postgres_database(url)
