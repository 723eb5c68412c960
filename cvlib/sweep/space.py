"""The search space: which retraining options a sweep varies, and over what values.

A space file (YAML or JSON) maps each option to a single value (fixed), a list (one of these), or
a range ``{low, high, log, step}``::

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    weight_decay: {low: 0.0, high: 0.1}
    label_smoothing: [0.0, 0.1]
    augment_strength: {low: 0.0, high: 1.0}
    image_size: [32, 48]
    arch: [simple_cnn, resnet18]
    epochs: {low: 2, high: 4}
    enqueue:                 # trials to run first, e.g. a baseline (values may lie outside the ranges)
      - {lr: 3.0e-3}

Options left out keep the base configuration's value. Everything is checked when the file is
read, so a wrong key or value fails before any work, in one line that names the key and the value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from cvlib.strict import StrictModel


class SpaceError(ValueError):
    """A search space the user can fix; its message is one line naming the key and the value."""


class Range(StrictModel):
    """Values between ``low`` and ``high`` (inclusive), log-uniform with ``log``, on a grid with ``step``."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low <= self.high:
            raise ValueError(f"low must not exceed high (got low={self.low:g}, high={self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got low={self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("a range cannot have both log and step")
        return self


Spec = Range | list[float | int | str] | float | int | str

# key -> (kind, smallest, largest, whether the upper bound itself is allowed)
FLOAT_KEYS: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, True),
    "label_smoothing": (0.0, 1.0, False),
    "augment_strength": (0.0, 1.0, True),
}
INT_KEYS: dict[str, int] = {"image_size": 16, "epochs": 1}
CATEGORICAL_KEYS = ("arch",)
KEYS = (*FLOAT_KEYS, *INT_KEYS, *CATEGORICAL_KEYS)


class SearchSpace(StrictModel):
    """What a sweep varies. ``None``: the base configuration's value."""

    lr: Spec | None = None
    weight_decay: Spec | None = None
    label_smoothing: Spec | None = None
    augment_strength: Spec | None = None
    image_size: Spec | None = None
    arch: Spec | None = None
    epochs: Spec | None = None
    enqueue: list[dict[str, float | int | str]] = Field(default_factory=list, description="Trials to run first.")

    @field_validator(*FLOAT_KEYS, *INT_KEYS, mode="before")
    @classmethod
    def _numbers(cls, spec: Any) -> Any:
        # YAML 1.1 reads 1e-4 (no dot) as a string: a number written so is still a number.
        if isinstance(spec, list):
            return [_number(v) for v in spec]
        return _number(spec)

    @field_validator(*KEYS)
    @classmethod
    def _in_bounds(cls, spec: Any, info) -> Any:
        if spec is not None:
            _check(info.field_name, spec)
        return spec

    @field_validator("enqueue")
    @classmethod
    def _known_keys(cls, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for trial in trials:
            for key, value in trial.items():
                if key not in KEYS:
                    raise ValueError(f"unknown key {key!r} (known: {', '.join(KEYS)})")
                _check_value(key, value)
        return trials

    @model_validator(mode="after")
    def _enqueued_are_searched(self) -> SearchSpace:
        searched = set(self.searched())
        for trial in self.enqueue:
            for key in trial:
                if key not in searched:
                    raise ValueError(f"enqueue: {key} is not searched (fixed or absent in the space), so it cannot be set per trial")
            for key, value in trial.items():
                spec = getattr(self, key)
                if isinstance(spec, list) and value not in spec:
                    raise ValueError(f"enqueue: {key} must be one of {spec} (got {value!r})")
        return self

    def searched(self) -> dict[str, Range | list]:
        """The options Optuna chooses: ranges and lists of more than one value."""
        return {k: v for k in KEYS if isinstance(v := getattr(self, k), Range) or (isinstance(v, list) and len(v) > 1)}

    def fixed(self) -> dict[str, Any]:
        """The options set to one value for every trial."""
        out = {}
        for key in KEYS:
            spec = getattr(self, key)
            if isinstance(spec, list) and len(spec) == 1:
                out[key] = spec[0]
            elif spec is not None and not isinstance(spec, (Range, list)):
                out[key] = spec
        return {k: _typed(k, v) for k, v in out.items()}

    def grid(self) -> dict[str, list]:
        """Every searched option's values, for Optuna's grid sampler; a continuous range without a
        step cannot be a grid (an error naming the key)."""
        out = {}
        for key, spec in self.searched().items():
            if isinstance(spec, list):
                out[key] = [_typed(key, v) for v in spec]
            elif key in INT_KEYS:
                out[key] = list(range(int(spec.low), int(spec.high) + 1, int(spec.step or 1)))
            elif spec.step is not None:
                n = int(math.floor((spec.high - spec.low) / spec.step + 1e-9))
                out[key] = [round(spec.low + i * spec.step, 12) for i in range(n + 1)]
            else:
                raise SpaceError(f"{key}: the grid sampler needs a list of values or a range with a step (got {_show(spec)})")
        return out

    def archs(self) -> list[str]:
        """Every architecture a trial may train (for checking weights before any work)."""
        spec = self.arch
        return [str(a) for a in (spec if isinstance(spec, list) else [spec])] if spec is not None else []


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _show(spec: Any) -> str:
    return repr(spec.model_dump(exclude_defaults=True)) if isinstance(spec, Range) else repr(spec)


def _check(key: str, spec: Any) -> None:
    """Raise a ValueError naming the bad value of ``key``'s spec."""
    if isinstance(spec, Range):
        if key in CATEGORICAL_KEYS:
            raise ValueError(f"takes a value or a list, not a range (got {_show(spec)})")
        if key in INT_KEYS:
            for name in ("low", "high", "step"):
                value = getattr(spec, name)
                if value is not None and value != int(value):
                    raise ValueError(f"{name} must be a whole number (got {value:g})")
            if spec.log and spec.low < 1:
                raise ValueError(f"a log range needs low >= 1 (got {spec.low:g})")
        _check_value(key, spec.low, "low")
        _check_value(key, spec.high, "high")
    elif isinstance(spec, list):
        if not spec:
            raise ValueError("an empty list leaves nothing to try")
        for value in spec:
            _check_value(key, value)
    else:
        _check_value(key, spec)


def _check_value(key: str, value: Any, name: str = "") -> None:
    where = f"{name} " if name else ""
    if key in CATEGORICAL_KEYS:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}must be a model name (got {value!r})")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}must be a number (got {value!r})")
    if key in INT_KEYS:
        if value != int(value) or value < INT_KEYS[key]:
            raise ValueError(f"{where}must be a whole number of at least {INT_KEYS[key]} (got {value!r})")
        return
    lo, hi, hi_ok = FLOAT_KEYS[key]
    ok = (value > lo if key == "lr" else value >= lo) and (value <= hi if hi_ok else value < hi)
    if not ok or not math.isfinite(value):
        bound = f"above {lo:g}" if key == "lr" else f"between {lo:g} and {hi:g}" + ("" if hi_ok else " (exclusive)")
        if math.isinf(hi) and key != "lr":
            bound = f"at least {lo:g}"
        raise ValueError(f"{where}must be {bound} (got {value!r})")


def _typed(key: str, value: Any) -> Any:
    if key in INT_KEYS:
        return int(value)
    if key in FLOAT_KEYS:
        return float(value)
    return str(value)


DEFAULT_SPACE = SearchSpace(
    lr=Range(low=1e-4, high=1e-2, log=True),
    weight_decay=Range(low=0.0, high=0.1),
    label_smoothing=Range(low=0.0, high=0.2),
)


def suggest(trial, space: SearchSpace) -> dict[str, Any]:
    """Draw the searched options for an Optuna trial (``trial.params`` for enqueued ones)."""
    params: dict[str, Any] = {}
    for key, spec in space.searched().items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, [_typed(key, v) for v in spec])
        elif key in INT_KEYS:
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)
    return params


def trial_config(base, params: dict[str, Any]):
    """The RetrainConfig one trial trains with: ``base`` with the trial's values (and the space's
    fixed ones) set. ``augment_strength`` s scales the geometric and colour augmentation from none
    (0) to strong (1): rotation 30*s degrees, colour jitter 0.4*s, crops down to 1-0.7*s of the area."""
    from cvlib.config import RetrainConfig
    from cvlib.models.names import CUSTOM_ARCH_NAMES

    data = base.model_dump()
    train, augment = data["train"], data["augment"]
    for key, field in (("lr", "lr"), ("weight_decay", "weight_decay"), ("label_smoothing", "label_smoothing"), ("epochs", "epochs")):
        if key in params:
            train[field] = _typed(key, params[key])
    if "arch" in params:
        train["arch"] = str(params["arch"])
        if train["arch"] in CUSTOM_ARCH_NAMES:
            train["weights"] = "none"  # no pretrained weights exist for visionflow's own models
    if "image_size" in params:
        augment["image_size"] = int(params["image_size"])
    if "augment_strength" in params:
        s = float(params["augment_strength"])
        augment.update(rotation=30.0 * s, color_jitter=0.4 * s, scale_min=max(1.0 - 0.7 * s, 0.05))
    return RetrainConfig.model_validate(data)


def load_space(path: str | Path | None) -> SearchSpace:
    """The space file at ``path`` (YAML or JSON), checked; :data:`DEFAULT_SPACE` without one."""
    if path is None:
        return DEFAULT_SPACE
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpaceError(f"space file {p} does not exist")
    try:
        text = p.read_text()
        if p.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:  # YAML and JSON parse errors, unreadable files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpaceError(f"space file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}") from None
    return parse_space(raw, f"space file {p}")


def parse_space(raw: Any, source: str = "space") -> SearchSpace:
    """A SearchSpace from a mapping; an error is one line: ``SOURCE: KEY: what is wrong (got VALUE)``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpaceError(f"{source} must be a mapping of option names to values, lists or ranges (got {type(raw).__name__})")
    unknown = [k for k in raw if k not in (*KEYS, "enqueue")]
    if unknown:
        raise SpaceError(f"{source}: unknown key {unknown[0]!r} (got {raw[unknown[0]]!r}); known keys: {', '.join(KEYS)}, enqueue")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as exc:
        raise SpaceError(f"{source}: {_describe(exc, raw)}") from None
    if not space.searched():
        raise SpaceError(f"{source}: nothing to search (every option is fixed); give at least one list or range")
    return space


def _describe(exc: ValidationError, raw: dict[str, Any]) -> str:
    """The first error per key; pydantic reports one per member of the ``Spec`` union: ours (a
    ValueError) says what is wrong, else the range's when a mapping was given, else the first."""
    by_key: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_key.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    parts = []
    for key, errs in by_key.items():
        given = raw.get(key)
        err = next((e for e in errs if e["type"] == "value_error"), None)
        if err is None and isinstance(given, (dict, list)):  # the union member of the shape given
            shape = "Range" if isinstance(given, dict) else "list["
            err = next((e for e in errs if len(e["loc"]) > 1 and shape in str(e["loc"][1])), None)
        err = err or errs[0]
        # For an option, loc[1] names the union member (an implementation detail), not a place.
        inner = [str(p) for p in err["loc"][2 if key in KEYS else 1:]]
        msg = err["msg"].removeprefix("Value error, ")
        msg = msg[0].lower() + msg[1:]
        got = "" if "(got" in msg else f" (got {given!r})"
        where = ": ".join(p for p in (key, ".".join(inner)) if p)
        parts.append(f"{where}: {msg}{got}" if where else f"{msg}{got}")
    return "; ".join(parts)
