"""Search-space files: dotted config keys mapped to distributions, validated against the config.

Format (YAML), one entry per searched key::

    loss.alpha: {uniform: [1.0, 3.0]}
    train.lr: {loguniform: [1.0e-3, 6.0e-3]}
    targets.min_overlap: {quniform: [0.3, 0.9, 0.05]}
    targets.formula: {choice: [cornernet, exact]}
    train.batch_size: {randint: [8, 33]}        # upper bound excluded
    loss.off_weight: {grid: [0.5, 1.0]}        # every value, for each sample (random search only)
    train.epochs: 4                            # a plain value: fixed for every trial

Any config key can be searched. Every bound and choice is checked against the config's own
validation when the file is read, so a typo or an out-of-range bound fails before any trial starts.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from centernet_ray.config import Config, ConfigError, config_from_dict
from centernet_ray.config.loading import read_yaml_text
from centernet_ray.data.coco import finite_number
from centernet_ray.data.identity import DATA_LOCATION_KEYS

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}


@dataclass(frozen=True)
class Dimension:
    """One searched key: ``kind`` is a key of :data:`DISTRIBUTIONS` or ``"fixed"``."""

    key: str
    kind: str
    args: tuple

    def to_tune(self) -> Any:
        """The Ray Tune domain (or the fixed value)."""
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def describe(self) -> str:
        return f"{self.args[0]!r}" if self.kind == "fixed" else f"{self.kind}{list(self.args)}"


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    text: str  # the file as it was read: what the sweep logs, whatever becomes of the file meanwhile

    @property
    def searched(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dimensions if d.kind != "fixed")

    def to_tune(self) -> dict[str, Any]:
        """Tune's ``param_space``: dotted keys to domains."""
        return {d.key: d.to_tune() for d in self.dimensions}

    def defaults(self, config: Config) -> dict[str, Any]:
        """The "default config" trial: the base config's own value of every searched key, and the
        fixed value of every fixed one (Tune would let a preset override a fixed value)."""
        flat = config.flatten()
        return {d.key: d.args[0] if d.kind == "fixed" else flat[d.key] for d in self.dimensions}

    def with_fixed(self, config: Config) -> Config:
        """``config`` with the space's fixed values applied: what every trial trains, so what the
        scheduler and the trials' statuses count epochs against."""
        return apply_params(config, {d.key: d.args[0] for d in self.dimensions if d.kind == "fixed"})

    def has_grid(self) -> bool:
        return any(d.kind == "grid" for d in self.dimensions)


def load_search_space(path: str | Path, base: Config) -> SearchSpace:
    """Read and validate a search-space file against ``base`` (the trials' base config). Read once:
    the sweep logs the text it parsed, not what the file holds later (edited while the sweep runs,
    or a relative path no longer found from the folder the command runs in)."""
    text, raw = read_yaml_text(path, "search space file")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path} must map config keys to distributions, e.g. 'loss.alpha: {{uniform: [1.0, 3.0]}}'")
    space = SearchSpace(tuple(parse_dimension(str(key), spec, base, path) for key, spec in raw.items()), text)
    _check_together(space, base, path)
    return space


MAX_COMBINATIONS_CHECKED = 512


def _check_together(space: SearchSpace, base: Config, source: str | Path) -> None:
    """Every combination of the dimensions' probe values (their bounds, choices) is a valid config:
    keys valid one by one can be invalid together (``model.backbone: {choice: [resnet18, dla34]}``
    with ``model.width`` searched: width applies to ResNets only), which a trial would find inside
    Ray, after the sweep's start. Beyond ``MAX_COMBINATIONS_CHECKED``, a seeded sample of them."""
    probes = [[(d.key, value) for value in _probe_values(d)] for d in space.dimensions]
    combinations = itertools.product(*probes)
    if math.prod(len(p) for p in probes) > MAX_COMBINATIONS_CHECKED:
        chosen = random.Random(0)
        combinations = (tuple(chosen.choice(p) for p in probes) for _ in range(MAX_COMBINATIONS_CHECKED))
    for combination in combinations:
        try:
            apply_params(base, dict(combination))
        except ConfigError as exc:
            values = ", ".join(f"{key}={value!r}" for key, value in combination)
            raise ConfigError(f"{source}: a trial may train {values}, which is not valid: {exc}") from None


UNSEARCHABLE_SECTIONS = ("tune", "serve")  # the sweep's own settings and the endpoint's: no trial reads them


def parse_dimension(key: str, spec: Any, base: Config, source: str | Path = "search space") -> Dimension:
    where = f"{source}: {key}"
    if key.partition(".")[0] in UNSEARCHABLE_SECTIONS:
        raise ConfigError(f"{where}: a trial trains, and reads no {key.partition('.')[0]}.* setting: set it in the "
                          f"config or as an override (centernet-ray tune {key}=...)")
    if key in (*DATA_LOCATION_KEYS, "data.parquet_dir", "data.shard_size"):
        raise ConfigError(f"{where}: a sweep ingests its dataset once, before its trials, which all train on it: "
                          "sweep one dataset at a time (one tune.name each)")
    if not isinstance(spec, dict):
        dimension = Dimension(key, "fixed", (spec,))
    else:
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where} must be a plain value or one of {{{', '.join(DISTRIBUTIONS)}}}: [...]; got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} takes a non-empty list, e.g. {{{kind}: [1, 2]}}; got {args!r}")
        arity = DISTRIBUTIONS[kind]
        if arity is not None and len(args) != arity:
            raise ConfigError(f"{where}: {kind} takes {arity} numbers; got {args!r}")
        if arity is not None:
            args = [_number(where, value) for value in args]
            low, high = args[0], args[1]
            if not low < high:
                raise ConfigError(f"{where}: {kind} needs low < high; got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0; got {args!r}")
            if kind == "randint" and not all(float(v).is_integer() for v in args):
                raise ConfigError(f"{where}: randint takes integers [low, high) ; got {args!r}")
            if kind == "randint":
                args = [int(v) for v in args]
            if kind == "quniform" and args[2] <= 0:
                raise ConfigError(f"{where}: quniform's step must be > 0; got {args!r}")
        dimension = Dimension(key, kind, tuple(args))
        try:
            dimension.to_tune()
        except ValueError as exc:  # Ray's own rules, e.g. quniform bounds that are not multiples of the step
            raise ConfigError(f"{where}: {exc}") from None
    for value in _probe_values(dimension):
        _check_value(key, value, base, where)
    if dimension.kind in ("uniform", "loguniform", "quniform"):  # they sample floats, e.g. 13.7
        low, high = dimension.args[0], dimension.args[1]
        try:
            _check_value(key, low + 0.37 * (high - low), base, where)
        except ConfigError:
            raise ConfigError(f"{where}: {dimension.kind} samples fractional values, which this key does not take; "
                              f"search integers with randint: [low, high)") from None
    return dimension


def _number(where: str, value: Any) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not finite_number(value):  # an integer of hundreds of digits was an OverflowError here
        raise ConfigError(f"{where}: bounds must be finite numbers; got {value!r:.40}")
    if abs(value) >= 2 ** 63:  # numpy's samplers draw int64
        raise ConfigError(f"{where}: bounds must be below 2**63 in magnitude; got {value!r}")
    return value


def _probe_values(dimension: Dimension) -> list[Any]:
    if dimension.kind in ("fixed", "choice", "grid"):
        return list(dimension.args)
    if dimension.kind == "randint":
        return [dimension.args[0], dimension.args[1] - 1]
    return [dimension.args[0], dimension.args[1]]


def _check_value(key: str, value: Any, base: Config, where: str) -> None:
    section, _, name = key.partition(".")
    data = base.to_dict()
    if section not in data or not name or name not in data[section]:
        valid = ", ".join(sorted(base.flatten()))
        raise ConfigError(f"{where}: unknown config key; valid keys: {valid}")
    data[section][name] = value
    try:
        config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: value {value!r} is not valid: {exc}") from exc


def apply_params(base: Config, params: dict[str, Any]) -> Config:
    """``base`` with the dotted ``params`` of one trial applied (validated like any override)."""
    data = base.to_dict()
    for key, value in params.items():
        section, _, name = key.partition(".")
        data[section][name] = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
    return config_from_dict(data)
