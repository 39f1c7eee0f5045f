"""Typed configs from plain dicts (YAML parameters, job files), failing loudly on unknown keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def config_from(cls, params: dict, **nested):
    """Build dataclass ``cls`` from ``params``; ``nested`` names fields that are dataclasses themselves."""
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - valid
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown parameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    values = dict(params)
    for name, nested_cls in nested.items():
        if isinstance(values.get(name), dict):
            values[name] = config_from(nested_cls, values[name])
    return cls(**values)


def digest(value: Any) -> str:
    """A short stable hash (16 hex digits of SHA-256) of ``value`` as sorted-key JSON (``str`` for anything JSON
    cannot write): what a stored result or checkpoint was made from."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
