"""Base for workload configs: one frozen dataclass per workload, presets plus field overrides.

Every field is checked when a config is made (a preset, an override, :meth:`Config.replace`, a
config built from a Hugging Face ``config.json``), before anything is built from it:

- its type, from its annotation: an ``int`` field takes an integer (not ``"2"``, not ``2.0``,
  not ``True``), a ``float`` field a finite number (an integer is converted), a ``bool`` field
  ``True`` or ``False``, a ``tuple[int, ...]`` field a tuple or list of integers (stored as a
  tuple), ``X | None`` also ``None``;
- its range, from the class's ``RANGES`` (default: integers in [1, 2**31 - 1], floats > 0;
  no integer leaves int32, the dtype of token ids and positions in every framework);
- a ``str`` field's value, from the class's ``CHOICES``.

Then the subclass's :meth:`Config.check` checks the relations between fields. A bad value raises
:class:`ConfigError` naming the field. :class:`ConfigSource` reads a foreign config (a
``config.json``) into fields with the same rules, naming the file and its key.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

INT32_MAX = 2**31 - 1
MAX_ITEMS = 1024  # entries of a tuple field (levels, tables, MLP layers)
MAX_LAYERS = 4096  # repeated blocks: their count bounds the tensors a config names


class ConfigError(ValueError):
    """A config field of the wrong type, out of its range, or inconsistent with another field.

    Attributes:
        field: the offending field (None when the problem is not one field's).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of numbers; ``None`` is unbounded, ``*_open`` excludes the bound."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None:
            return value < self.high if self.high_open else value <= self.high
        return True

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{low}, {high}{right}"


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


ANY = Range()
POSITIVE = Range(0, low_open=True)  # default of float fields: widths of eps, rates, stds
NON_NEGATIVE = Range(0)  # steps that may be 0, weight decay
AT_LEAST_ONE = Range(1)  # default of int fields: sizes, counts, steps
RATE = Range(0, 1, high_open=True)  # dropout, probabilities, Adam's betas
LAYERS = Range(1, MAX_LAYERS)
ITEMS = Range(1, MAX_ITEMS)  # default length of a tuple field


class Invalid(Exception):
    """A value outside its rule (the reason, without the field's name)."""


def _shown(value) -> str:
    """``value`` for a message, short: huge integers and long strings are summarised."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, numbers.Integral) and abs(int(value)) > 10**30:
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _kind_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _got(value) -> str:
    return f"got {_shown(value)} ({_kind_name(value)})"


def check_int(value, limit: Range = AT_LEAST_ONE) -> int:
    """``value`` as an int, or :class:`Invalid`: an integer (not a bool, float or string) in
    ``limit`` and in int32."""
    low = -INT32_MAX - 1 if limit.low is None else max(limit.low, -INT32_MAX - 1)
    high = INT32_MAX if limit.high is None else min(limit.high, INT32_MAX)
    bound = dataclasses.replace(limit, low=low, high=high)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise Invalid(f"must be an integer in {bound}, {_got(value)}")
    value = int(value)
    if value not in bound:
        raise Invalid(f"must be an integer in {bound}, got {_shown(value)}")
    return value


def check_float(value, limit: Range = POSITIVE) -> float:
    """``value`` as a float, or :class:`Invalid`: a finite number (not a bool or string) in
    ``limit``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise Invalid(f"must be in {limit} (a finite number), {_got(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise Invalid(f"must be in {limit} (a finite number), got {_shown(value)}") from None
    if not math.isfinite(number) or number not in limit:
        raise Invalid(f"must be in {limit} (a finite number), got {_shown(value)}")
    return number


def check_bool(value) -> bool:
    if value is not True and value is not False:
        raise Invalid(f"must be true or false, {_got(value)}")
    return value


def check_str(value, choices: tuple | None) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, {_got(value)}")
    if choices is not None and value not in choices:
        raise Invalid(f"must be one of {list(choices)}, got {_shown(value)}")
    return value


def check_ints(value, limit: Range = AT_LEAST_ONE, length: Range = ITEMS) -> tuple[int, ...]:
    """``value`` as a tuple of ints: a list or tuple of ``length`` integers, each in ``limit``."""
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"must be a list of integers, {_got(value)}")
    if len(value) not in length:
        raise Invalid(f"must have a length in {length}, got {len(value)} entries")
    items = []
    for i, item in enumerate(value):
        try:
            items.append(check_int(item, limit))
        except Invalid as e:
            raise Invalid(f"entry {i} {e}") from None
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one field is checked: its kind (from the annotation), range, choices, length."""

    kind: type | str  # int, float, bool, str, or "ints" (tuple[int, ...])
    optional: bool
    limit: Range | None
    choices: tuple | None
    length: Range

    def check(self, value):
        if value is None and self.optional:
            return None
        if self.kind is int:
            return check_int(value, self.limit)
        if self.kind is float:
            return check_float(value, self.limit)
        if self.kind is bool:
            return check_bool(value)
        if self.kind is str:
            return check_str(value, self.choices)
        return check_ints(value, self.limit, self.length)


_RULES: dict[type, dict[str, _Rule]] = {}


def _rules(cls: type[Config]) -> dict[str, _Rule]:
    """field -> rule of a config class, from its annotations, RANGES, CHOICES and LENGTHS."""
    if cls in _RULES:
        return _RULES[cls]
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for table in ("RANGES", "CHOICES", "LENGTHS"):
        stray = sorted(set(getattr(cls, table)) - names)
        if stray:
            raise TypeError(f"{cls.__name__}.{table} names no field: {stray}")
    rules = {}
    for field in dataclasses.fields(cls):
        hint, optional = hints[field.name], False
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = args[0], len(args) < len(typing.get_args(hint))
        if hint in (int, float, bool, str):
            kind = hint
        elif typing.get_origin(hint) is tuple and typing.get_args(hint) == (int, Ellipsis):
            kind = "ints"
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no check for a {hint} field")
        if kind is str and field.name not in cls.CHOICES:
            raise TypeError(f"{cls.__name__}.{field.name}: a str field needs its CHOICES")
        default = POSITIVE if kind is float else AT_LEAST_ONE
        rules[field.name] = _Rule(
            kind,
            optional,
            cls.RANGES.get(field.name, default),
            cls.CHOICES.get(field.name),
            cls.LENGTHS.get(field.name, ITEMS),
        )
    _RULES[cls] = rules
    return rules


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen hyperparameters of one workload, shared by all frameworks.

    Subclasses declare fields with defaults, a ``PRESETS`` mapping of preset name to field
    overrides, the ranges of fields that differ from the defaults (``RANGES``), the values of
    their ``str`` fields (``CHOICES``), and the relations between fields in :meth:`check`.
    ``MyConfig.preset("tiny", num_layers=3)`` builds one.
    """

    PRESETS: ClassVar[dict[str, dict]] = {}
    RANGES: ClassVar[dict[str, Range]] = {}
    CHOICES: ClassVar[dict[str, tuple]] = {}
    LENGTHS: ClassVar[dict[str, Range]] = {}

    def __post_init__(self):
        name = type(self).__name__
        for field, rule in _rules(type(self)).items():
            value = getattr(self, field)
            try:
                checked = rule.check(value)
            except Invalid as e:
                raise ConfigError(f"{name}.{field} {e}", field) from None
            if checked is not value:
                object.__setattr__(self, field, checked)
        try:
            self.check()
        except ConfigError:
            raise
        except ValueError as e:  # a layer spec's check (heads, rotary dims, ...)
            raise ConfigError(f"{name}: {e}") from None

    def check(self) -> None:
        """Raise :class:`ConfigError` (naming the field) when fields contradict each other."""

    @classmethod
    def preset(cls, name: str, **overrides):
        if not isinstance(name, str) or name not in cls.PRESETS:
            raise ConfigError(
                f"unknown preset {name!r} for {cls.__name__}; choose one of {sorted(cls.PRESETS)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ConfigError(
                f"unknown config field(s) {bad} for {cls.__name__}; valid fields: {sorted(fields)}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **overrides):
        """A copy with some fields changed (same validation as :meth:`preset`)."""
        fields = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ConfigError(f"unknown config field(s) {bad}; valid fields: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_REQUIRED = object()


class ConfigSource:
    """A foreign config (a transformers or diffusers ``config.json``, its dict) read into the
    fields of a :class:`Config`, each value checked before it is used.

    A key that becomes a field is checked by that field's rule (:meth:`field`); other keys by
    an explicit one (:meth:`integer`, :meth:`integers`, :meth:`string`, ...). Errors are ``error``
    (:class:`ConfigError` for a config in memory, the caller's ``CheckpointError`` for a file)
    and name ``where`` and the key.

    Args:
        cls: the config class the fields are for.
        data: the parsed config.
        where: what ``data`` is, for messages (the file's path).
        error: the exception class to raise.
    """

    def __init__(
        self,
        cls: type[Config],
        data: Mapping[str, Any],
        where: str,
        error: type[Exception] = ConfigError,
    ):
        self.cls, self.data, self.where, self.error = cls, data, str(where), error
        self.keys: dict[str, str] = {}  # field -> the key it came from

    def fail(self, message: str):
        """Raise ``error`` with ``message`` after the source's name."""
        raise self.error(f"{self.where}: {message}")

    def get(self, key: str, default, check):
        """``check(value)`` of ``key`` (``default`` when absent, or this error when ``default``
        is required); ``check`` raises :class:`Invalid` with the reason."""
        if key not in self.data:
            if default is _REQUIRED:
                self.fail(f"has no {key!r}; it is required")
            return default
        try:
            return check(self.data[key])
        except Invalid as e:
            raise self.error(f"{self.where}: {key} {e}") from None

    def field(self, key: str, field: str, default: Any = _REQUIRED):
        """The value of ``key`` checked as ``field`` of the config class (``default`` when the
        key is absent; a default is trusted)."""
        rule = _rules(self.cls)[field]
        self.keys[field] = key

        def check(value):
            try:
                return rule.check(value)
            except Invalid as e:
                raise Invalid(f"({self.cls.__name__}.{field}) {e}") from None

        return self.get(key, default, check)

    def integer(self, key: str, default: Any = _REQUIRED, limit: Range = AT_LEAST_ONE, none=False):
        return self.get(key, default, lambda v: None if none and v is None else check_int(v, limit))

    def number(self, key: str, default: Any = _REQUIRED, limit: Range = POSITIVE):
        return self.get(key, default, lambda v: check_float(v, limit))

    def flag(self, key: str, default: Any = _REQUIRED):
        return self.get(key, default, check_bool)

    def string(self, key: str, default: Any = _REQUIRED, choices: tuple | None = None):
        return self.get(key, default, lambda v: check_str(v, choices))

    def integers(self, key: str, default: Any = _REQUIRED, limit: Range = AT_LEAST_ONE):
        return self.get(key, default, lambda v: list(check_ints(v, limit)))

    def strings(self, key: str, default: Any = _REQUIRED) -> list[str]:
        def check(value):
            if not isinstance(value, (list, tuple)) or len(value) not in ITEMS:
                raise Invalid(f"must be a list of 1 to {MAX_ITEMS} strings, {_got(value)}")
            return [check_str(v, None) for v in value]

        return self.get(key, default, check)

    def mapping(self, key: str, default: Any = _REQUIRED) -> dict:
        def check(value):
            if not isinstance(value, dict):
                raise Invalid(f"must be a JSON object, {_got(value)}")
            return value

        return self.get(key, default, check)

    def require(self, key: str, want, message: str):
        """Fail with ``message`` (formatted with ``key``, ``got``, ``want``) unless ``key`` is
        absent or equal to ``want``, a boolean only to a boolean (``1`` is not ``True``)."""
        got = self.data.get(key, want)
        if got != want or isinstance(got, bool) != isinstance(want, bool):
            self.fail(message.format(key=key, got=_shown(got), want=want))

    def sizes(self, cfg: Config) -> str:
        """The integer fields of ``cfg`` read from the source, under the source's keys (for a
        message about the model's size)."""
        rules = _rules(self.cls)
        return ", ".join(
            f"{key}={getattr(cfg, field)}"
            for field, key in self.keys.items()
            if rules[field].kind in (int, "ints")
        )

    def build(self, preset: str, fields: Mapping[str, Any], overrides: Mapping[str, Any]):
        """``cls.preset(preset, **fields, **overrides)``: a bad value read from the source
        raises ``error`` naming its key; a bad override, :class:`ConfigError` naming the field."""
        known = {f.name for f in dataclasses.fields(self.cls)}
        if set(overrides) - known:
            raise ConfigError(
                f"unknown config field(s) {sorted(set(overrides) - known)} for "
                f"{self.cls.__name__}; valid fields: {sorted(known)}"
            )
        try:
            return self.cls.preset(preset, **{**fields, **overrides})
        except ConfigError as e:
            if e.field in overrides:
                raise ConfigError(
                    f"{e} (an override of the config of {self.where})", e.field
                ) from None
            key = self.keys.get(e.field)
            if key is not None:
                raise self.error(f"{self.where}: {key} ({e})") from None
            raise self.error(f"{self.where}: {e}") from None
