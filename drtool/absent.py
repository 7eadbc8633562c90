"""Absent values are null in --json, never "" (see docs/json.md)."""

from __future__ import annotations


def absent_is_none(record: object, *names: str) -> None:
    """In a (frozen) dataclass's __post_init__: each named field holding "" becomes None."""
    for name in names:
        if getattr(record, name) == "":
            object.__setattr__(record, name, None)
