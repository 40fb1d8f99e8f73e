"""Config dataclasses share `to_dict`/`from_dict`; unknown keys warn instead of vanishing."""
from __future__ import annotations

import dataclasses
import warnings


class ConfigMixin:
    """Mix into a @dataclass to get dict round-trips that warn on unknown keys."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", UserWarning, stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})
