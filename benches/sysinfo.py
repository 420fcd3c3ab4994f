"""What every result file records about the machine: the CPU and the copy kernels shmreplay uses.

Copy speed depends on the CPU model and a few of its features (``erms``/``fsrm``: fast
``rep movsb``; ``avx2``/``avx512*``: what memcpy and numpy use), and on which copy kernel
shmreplay chose (or was forced to use with ``SHMREPLAY_COPY_KERNEL``), so a figure without them
cannot be compared with another machine's.

* :func:`cpu_info`: ``/proc/cpuinfo`` of the first processor: model name, vendor, family,
  model, stepping and the flags in :data:`CPU_FLAGS`.
* :func:`kernels_info`: whatever ``shmreplay._core.kernels()`` returns, ``"unknown"`` if this
  build has no such function, or ``"unavailable: ..."`` if shmreplay cannot be imported.
* :func:`copy_kernel_env`: ``SHMREPLAY_COPY_KERNEL`` if set, else None.
"""

from __future__ import annotations

import os
import platform
from typing import Any

CPU_FLAGS = ("erms", "fsrm", "avx2", "avx512f", "avx512bw")
COPY_KERNEL_ENV = "SHMREPLAY_COPY_KERNEL"


def cpu_info() -> dict[str, Any]:
    """The first processor of ``/proc/cpuinfo`` (``flags``: True/False for each of
    :data:`CPU_FLAGS`; None where the file has no flags line, e.g. off x86)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # end of the first processor's block
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    have = set(fields["flags"].split()) if "flags" in fields else None
    return {
        "model_name": fields.get("model name") or fields.get("Model") or platform.processor() or "unknown",
        "vendor_id": fields.get("vendor_id") or fields.get("CPU implementer"),
        "cpu_family": fields.get("cpu family"),
        "model": fields.get("model") or fields.get("CPU part"),
        "stepping": fields.get("stepping") or fields.get("CPU revision"),
        "microcode": fields.get("microcode"),
        "machine": platform.machine(),
        "flags": {flag: (None if have is None else flag in have) for flag in CPU_FLAGS},
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return repr(x)


def kernels_info() -> Any:
    """What ``shmreplay._core.kernels()`` says in this process (JSON-safe), ``"unknown"`` if the
    build has no ``kernels``, ``"unavailable: <error>"`` if shmreplay cannot be imported."""
    try:
        from shmreplay import _core
    except Exception as e:  # noqa: BLE001 - not installed, or being rebuilt right now
        return f"unavailable: {type(e).__name__}: {e}"
    fn = getattr(_core, "kernels", None)
    if fn is None:
        return "unknown"
    try:
        return _jsonable(fn() if callable(fn) else fn)
    except Exception as e:  # noqa: BLE001
        return f"error: {type(e).__name__}: {e}"


def copy_kernel_env() -> str | None:
    return os.environ.get(COPY_KERNEL_ENV)


def describe_cpu(cpu: dict | str | None) -> str:
    """One line: ``Intel(R) Xeon(R) ... (GenuineIntel family 6 model 167 stepping 1; erms fsrm avx2 -avx512f ...)``."""
    if not isinstance(cpu, dict):
        return str(cpu or "unknown")
    ident = " ".join(
        str(v) for v in (
            cpu.get("vendor_id"),
            cpu.get("cpu_family") and f"family {cpu['cpu_family']}",
            cpu.get("model") and f"model {cpu['model']}",
            cpu.get("stepping") and f"stepping {cpu['stepping']}",
        ) if v
    )
    flags = cpu.get("flags") or {}
    shown = " ".join(f if on else f"-{f}" for f, on in flags.items() if on is not None)
    inside = "; ".join(x for x in (ident, shown and f"flags {shown}") if x)
    return f"{cpu.get('model_name', 'unknown')}" + (f" ({inside})" if inside else "")


def describe_kernels(kernels: Any, env: str | None) -> str:
    """One line for the copy kernels and the environment variable that can force one."""
    if isinstance(kernels, dict):
        parts = []
        for k, v in kernels.items():
            if isinstance(v, dict):
                v = "{" + ", ".join(f"{kk}: {vv}" for kk, vv in v.items()) + "}"
            elif isinstance(v, list):
                v = "[" + ", ".join(map(str, v)) + "]"
            parts.append(f"{k}={v}")
        text = ", ".join(parts)
    else:
        text = str(kernels)
    return text + f"; {COPY_KERNEL_ENV}=" + (repr(env) if env is not None else "(not set)")
