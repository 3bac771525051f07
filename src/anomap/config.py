"""Dataclass configs <-> dicts/YAML, with strict ``a.b=v`` overrides (an unknown key is an error)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from anomap.errors import ConfigError


@dataclasses.dataclass
class MethodConfig:
    """Keys every method accepts, so any method can be run tiny or large.

    Attributes:
        preset: "cpu" (default, runs on 2 cores) or "paper" (the paper's scale, for GPUs).
        image_size: working resolution (square) the model sees.
        eval_size: resolution metrics are computed at.
        max_steps: stop training after this many optimiser steps (0 = from the epoch schedule).
        max_train_seconds: stop training after this many seconds (0 = no limit).
        seed: seeds splits, corruption, initialisation.
        device: "cpu", "cuda", "cuda:1", or "auto".
        val_fraction: share of train/good held out for calibration (at least ``min_heldout`` images).
        target_fpr: false-positive rate on held-out normals that sets the image threshold.
        select_on: "last" (the fixed schedule's last step) or "val_loss".
        checkpoint_every: write a resumable checkpoint every N steps (0 = only at the end).
    """

    preset: str = "cpu"
    image_size: int = 128
    eval_size: int = 256
    max_steps: int = 0
    max_train_seconds: float = 900.0
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    min_heldout: int = 5
    target_fpr: float = 0.05
    select_on: str = "last"
    checkpoint_every: int = 200
    num_threads: int = 0

    # Values a preset changes; subclasses fill these. {"paper": {"image_size": 256, ...}}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # Keys that change only how a trained model scores (not its weights): `anomap evaluate --set` may
    # change them on a saved model, which is then recalibrated on its held-out normal images.
    SCORING_KEYS: ClassVar[tuple[str, ...]] = ("target_fpr", "eval_size", "device", "num_threads")

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work."""
        if self.preset not in ("cpu", "paper"):
            raise ConfigError(f"preset={self.preset!r} is not known.", fix="use preset=cpu or preset=paper")
        if self.image_size < 32 or self.image_size % 16:
            raise ConfigError(
                f"image_size={self.image_size} is not usable.", fix="use a multiple of 16, at least 32"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1).")
        if not 0.0 < self.target_fpr < 1.0:
            raise ConfigError(f"target_fpr={self.target_fpr} must be in (0, 1).")
        if self.select_on not in ("last", "val_loss"):
            raise ConfigError(f"select_on={self.select_on!r} is not known.", fix="use last or val_loss")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = getattr(typ, "__origin__", None)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            (inner,) = set(typ.__args__) - {Ellipsis} or {Any}
            items = [_coerce(v, inner, key) if inner is not Any else v for v in value]
            return list(items) if origin is list else tuple(items)
        if origin is dict or typ is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}.") from None
    if str(typ).startswith("str | None") or str(typ).startswith("typing.Optional[str]"):
        return None if value in (None, "", "none", "None", "null") else str(value)
    return value


def fields_of(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(cls: type, values: dict[str, Any] | None = None) -> Any:
    """Defaults, then the chosen preset's values, then ``values``. Unknown keys raise ConfigError."""
    values = dict(values or {})
    known = fields_of(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)} for {cls.__name__}.",
            fix=f"known keys: {', '.join(sorted(known))}",
        )
    preset = str(values.get("preset", "cpu"))
    merged: dict[str, Any] = {}
    if preset not in ("cpu", "paper"):
        raise ConfigError(f"preset={preset!r} is not known.", fix="use preset=cpu or preset=paper")
    merged.update(getattr(cls, "PRESETS", {}).get(preset, {}))
    merged.update(values)
    kwargs = {k: _coerce(v, known[k], k) for k, v in merged.items()}
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str], prefix: str | None = None) -> dict[str, Any]:
    """Turn ``["a=1", "ssl_ae.width=64"]`` into ``{"a": 1, "width": 64}``.

    Keys may be prefixed by the method name (``ssl_ae.width``); a prefix of another method is an error.
    Any other dot spells a nested key: ``teacher.weights`` is ``teacher_weights``.
    Values are parsed as YAML scalars/lists (``true``, ``3``, ``[1, 2]``).
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not of the form key=value.", fix="write e.g. --set max_steps=500")
        key, raw = item.split("=", 1)
        key = key.strip()
        if "." in key:
            head, rest = key.split(".", 1)
            if head == prefix:
                key = rest
            elif _is_method_name(head):
                raise ConfigError(f"--set {key}: this key belongs to method {head!r}, not {prefix!r}.")
            else:  # a nested spelling: teacher.weights is the key teacher_weights
                key = key.replace(".", "_")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def _is_method_name(name: str) -> bool:
    from anomap.registry import list_methods

    return name in list_methods()


def load_yaml(path: str | Path, prefix: str | None = None) -> dict[str, Any]:
    """Read a YAML config: a flat mapping, optionally nested under the method's name."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config file not found.", path=p, fix="give an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML ({str(e).splitlines()[0]}).", path=p) from None
    if not isinstance(data, dict):
        raise ConfigError("a config file must hold a mapping of key: value.", path=p)
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and prefix is not None and k == prefix:
            out.update(v)
        elif k == "method":
            continue
        else:
            out[k] = v
    return out


def dumps(cfg: Any) -> str:
    return json.dumps(config_to_dict(cfg), sort_keys=True)
