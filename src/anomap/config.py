"""Dataclass configs <-> dicts/YAML, with strict ``a.b=v`` overrides (an unknown key is an error)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from anomap.errors import ConfigError

PRESET_NAMES = ("cpu", "paper")
# Config keys added after model files were written, with the values that reproduce what those files do
LEGACY_KEYS: dict[str, Any] = {"aspect": "square", "work_shape": [], "calibration_groups": 0}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(name: Any) -> str:
    """``name`` if it is a device anomap knows (auto, cpu, cuda, cuda:N, mps), else ConfigError.

    Only the spelling is checked here; whether CUDA is present is checked when the device is used.
    """
    text = str(name).strip().lower()
    if not _DEVICE_RE.fullmatch(text):
        raise ConfigError(f"device={name!r} is not a device name.", fix=f"use device={DEVICE_CHOICES}")
    return text


def _in_range(key: str, value: float, lo: float | None, hi: float | None, *, lo_open: bool = False,
              hi_open: bool = False, example: str = "") -> None:
    """Raise ConfigError naming the valid range when ``value`` is outside it."""
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "any" if lo is None else f"{'(' if lo_open else '['}{lo:g}"
        right = "any" if hi is None else f"{hi:g}{')' if hi_open else ']'}"
        where = f"in {left}, {right}" if lo is not None and hi is not None else (
            f">{'' if lo_open else '='} {lo:g}" if lo is not None else f"<{'' if hi_open else '='} {hi:g}")
        raise ConfigError(f"{key}={value!r} is out of range: it must be {where}.",
                          fix=f"e.g. {key}={example}" if example else None)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    """ConfigError unless ``value`` (of config key ``key``) is one of ``allowed``."""
    if value not in allowed:
        options = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        raise ConfigError(f"{key}={value!r} is not known.", fix=f"use {options}")


def check_image_score(kind: str, fraction: float, allowed: tuple[str, ...]) -> None:
    """ConfigError unless ``image_score`` is one of ``allowed`` and ``topk_fraction`` is in (0, 1]."""
    if kind not in allowed:
        raise ConfigError(f"image_score={kind!r} is not known.", fix=f"use {' or '.join(allowed)}")
    _in_range("topk_fraction", fraction, 0.0, 1.0, lo_open=True, example="0.01")


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
        aspect: "square" (every image is resized to image_size x image_size) or "fit": when the fit
            images share one aspect ratio, ``fit`` sets ``work_shape`` to it at image_size**2 pixels
            (:func:`anomap.data.aspect.fit_shape`); only for methods whose model reads any shape.
        work_shape: [height, width] the model sees, set by ``fit`` (aspect=fit); [] = image_size square.
        calibration_groups: > 0: the threshold also reads the fit images, each scored by a model fitted
            without its group (the fit images in this many k-means groups of their look): normal images
            unlike the rest, as a line sees from a new position or product, then count in the promise
            (docs/protocol.md). 0: the held-out normals alone. Only for models fitted without training.
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
    aspect: str = "square"
    work_shape: list[int] = dataclasses.field(default_factory=list)
    calibration_groups: int = 0

    # Values a preset changes; subclasses fill these. {"paper": {"image_size": 256, ...}}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # Keys that change only how a trained model scores (not its weights): `anomap evaluate --set` may
    # change them on a saved model, which is then recalibrated on its held-out normal images.
    SCORING_KEYS: ClassVar[tuple[str, ...]] = ("target_fpr", "eval_size", "device", "num_threads",
                                               "calibration_groups")
    # work_shape's sides are multiples of this (the model's coarsest stride)
    SIZE_MULTIPLE: ClassVar[int] = 16

    @property
    def work_hw(self) -> tuple[int, int]:
        """(height, width) of the images the model sees: ``work_shape``, or image_size square."""
        return (self.work_shape[0], self.work_shape[1]) if self.work_shape else (self.image_size, self.image_size)

    def aspect_problem(self) -> str | None:
        """Why this model cannot read non-square images (None: it can); subclasses that can say so."""
        return "its model reads square images only"

    def calibration_groups_problem(self) -> str | None:
        """Why this model cannot be refitted without each group of fit images (None: it can)."""
        return "its model is trained, and refitting it once per group would multiply the training time"

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work, naming the valid choices or range."""
        if self.preset not in PRESET_NAMES:
            raise ConfigError(f"preset={self.preset!r} is not known.", fix="use preset=cpu or preset=paper")
        if self.image_size < 32 or self.image_size % 16:
            raise ConfigError(
                f"image_size={self.image_size} is not usable.", fix="use a multiple of 16, at least 32"
            )
        _in_range("eval_size", self.eval_size, 16, 4096, example="256")
        _in_range("max_steps", self.max_steps, 0, None, example="500 (0 = the schedule's length)")
        _in_range("max_train_seconds", self.max_train_seconds, 0, None, example="900 (0 = no limit)")
        _in_range("seed", self.seed, 0, 2**63 - 1, example="0")
        check_device(self.device)
        _in_range("val_fraction", self.val_fraction, 0, 1, lo_open=True, hi_open=True, example="0.1")
        _in_range("min_heldout", self.min_heldout, 1, None, example="5")
        _in_range("target_fpr", self.target_fpr, 0, 1, lo_open=True, hi_open=True, example="0.05")
        if self.select_on not in ("last", "val_loss"):
            raise ConfigError(f"select_on={self.select_on!r} is not known.", fix="use last or val_loss")
        _in_range("checkpoint_every", self.checkpoint_every, 0, None, example="200 (0 = only at the end)")
        _in_range("num_threads", self.num_threads, 0, None, example="0 (all cores) or 2")
        self._validate_aspect()
        _in_range("calibration_groups", self.calibration_groups, 0, 64, example="8 (0 = the held-out normals alone)")
        if self.calibration_groups == 1:
            raise ConfigError("calibration_groups=1 leaves no other group to fit without it.",
                              fix="use calibration_groups=0 (off) or at least 2, e.g. 8")
        problem = self.calibration_groups_problem() if self.calibration_groups else None
        if problem:
            raise ConfigError(f"calibration_groups={self.calibration_groups} is not available: {problem}.",
                              fix="use calibration_groups=0")

    def _validate_aspect(self) -> None:
        check_choice("aspect", self.aspect, ("square", "fit"))
        problem = self.aspect_problem() if self.aspect != "square" else None
        if problem:
            raise ConfigError(f"aspect={self.aspect} is not available: {problem}.", fix="use aspect=square")
        m = self.SIZE_MULTIPLE
        if self.work_shape and (self.aspect == "square" or len(self.work_shape) != 2
                                or any(v < 2 * m or v % m for v in self.work_shape)):
            raise ConfigError(f"work_shape={self.work_shape} is not usable.",
                              fix=f"leave it to fit (aspect=fit sets it), or give [height, width], multiples of {m}, "
                                  f"at least {2 * m}, with aspect=fit")


_EXPECT = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a text value",
           list: "a list such as [1, 2]", tuple: "a list such as [1, 2]", dict: "a mapping such as {a: 1}"}


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise TypeError(value)
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, (bool, list, tuple, dict)) or value is None:
        raise TypeError(value)
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(value)
    return out


def _to_str(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)) or value is None:
        raise TypeError(value)
    return str(value)


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _to_container(value: Any, typ: Any, origin: Any, key: str) -> Any:
    """A list, tuple or dict field; a string is read as YAML first (``--set sizes=[1,2]``)."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if origin is dict or typ is dict:
        if not isinstance(value, dict):
            raise ValueError(value)
        return dict(value)
    if not isinstance(value, (list, tuple)):
        raise ValueError(value)
    (inner,) = set(typ.__args__) - {Ellipsis} or {Any}
    items = [_coerce(v, inner, key) if inner is not Any else v for v in value]
    return list(items) if origin is list else tuple(items)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key and the type."""
    origin = getattr(typ, "__origin__", None)
    try:
        if typ in _SCALARS:
            return _SCALARS[typ](value)
        if origin in (list, tuple, dict) or typ is dict:
            return _to_container(value, typ, origin, key)
    except (TypeError, ValueError, OverflowError, yaml.YAMLError):
        name = getattr(typ, "__name__", str(typ))
        expect = _EXPECT.get(origin or typ)
        raise ConfigError(f"{key}={value!r} is not a valid {name}.",
                          fix=f"give {expect}" if expect else None) from None
    if str(typ).startswith("str | None") or str(typ).startswith("typing.Optional[str]"):
        if isinstance(value, (list, tuple, dict)):
            raise ConfigError(f"{key}={value!r} is not a valid str.", fix="give a text value (or none)")
        return None if value in (None, "", "none", "None", "null") else str(value)
    return value


def fields_of(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def build_config(cls: type, values: dict[str, Any] | None = None) -> Any:
    """Defaults, then the chosen preset's values, then ``values``. Unknown keys raise ConfigError."""
    values = dict(values or {})
    known = fields_of(cls)
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            if close:
                hints.append(f"{close[0]} instead of {key}")
        guess = f"did you mean {', '.join(hints)}? " if hints else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(map(str, unknown))} for {cls.__name__}.",
            fix=f"{guess}known keys: {', '.join(sorted(known))}",
        )
    preset = str(values.get("preset", "cpu"))
    merged: dict[str, Any] = {}
    if preset not in PRESET_NAMES:
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
