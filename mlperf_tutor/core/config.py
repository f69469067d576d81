"""Base for workload configs: one frozen dataclass per workload, presets plus field overrides."""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen hyperparameters of one workload, shared by all frameworks.

    Subclasses declare fields with defaults and a ``PRESETS`` mapping of preset name to field
    overrides. ``MyConfig.preset("tiny", num_layers=3)`` builds one, validating names.
    """

    PRESETS: ClassVar[dict[str, dict]] = {}

    @classmethod
    def preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(
                f"unknown preset {name!r} for {cls.__name__}; choose one of {sorted(cls.PRESETS)}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(
                f"unknown config field(s) {bad} for {cls.__name__}; valid fields: {sorted(fields)}"
            )
        return cls(**{**cls.PRESETS[name], **overrides})

    def replace(self, **overrides):
        """A copy with some fields changed (same validation as :meth:`preset`)."""
        fields = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown config field(s) {bad}; valid fields: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
