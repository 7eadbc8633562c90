"""Sizes and rates for people."""

from __future__ import annotations


def human_size(n: int | float | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds; ValueError with the reason otherwise."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _DURATION_UNITS else ""
    number = value[: len(value) - len(unit)]
    try:
        seconds = float(number) * _DURATION_UNITS.get(unit, 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 15m, 2h, 1d") from None
    if seconds < 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return seconds


def parse_size(text: str) -> int:
    """'65536', '64K', '1M', '1MiB', '2G' -> bytes; ValueError with the reason otherwise."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and value[-1:] else ""
    try:
        size = int(value[: len(value) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size: use e.g. 1M, 64K, 2G") from None
    if size < 0:
        raise ValueError(f"{text!r}: a size cannot be negative")
    return size
