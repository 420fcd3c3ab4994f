"""Number formatting shared by the CLI and the demo."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Decimal units, as throughput figures use them: ``5.65 GB``, ``113.0 MB``, ``512 B``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if scale >= 1e9 else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def printable(text: object) -> str:
    """``text`` with every non-printable character replaced by its ``repr`` escape.

    For text that comes from the filesystem (segment names in a shared directory such as
    /dev/shm, paths, reasons that quote them): control characters, terminal escape sequences,
    line and paragraph separators, bidirectional overrides and undecodable bytes (surrogate
    escapes) become ``\\n``, ``\\x1b``, ``\\u2028``, ``\\u202e``, ``\\udcff``..., so that such
    text can neither start a new output line nor drive the terminal. Printable text, including
    non-ASCII letters and spaces, is unchanged (backslashes too, so a reason that already
    quotes a name with escapes stays readable).
    """
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in s)
