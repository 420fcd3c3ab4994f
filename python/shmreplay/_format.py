"""Number formatting shared by the CLI and the demo."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Decimal units, as throughput figures use them: ``5.65 GB``, ``113.0 MB``, ``512 B``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if scale >= 1e9 else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
