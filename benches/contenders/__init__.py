"""The contenders: one module each, all with the interface of :class:`base.Contender`.

``CONTENDERS`` maps a key to ``(module, class, label, required modules)``. Modules are imported
only inside the process that measures them, so a missing optional peer costs nothing and a heavy
import (torch) is paid only by its own processes.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

CONTENDERS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "shmreplay": ("shmreplay_buffer", "ShmReplay", "shmreplay", ("shmreplay",)),
    "limit": ("limit", "Limit", "limit (numpy, no sync)", ()),
    "locks1000": ("locks1000", "Locks1000", "SharedMemory + 1000 Locks", ()),
    "numpy_lock": ("numpy_lock", "NumpyLock", "numpy ring + 1 Lock", ()),
    "mp_queue": ("mp_queue", "MpQueue", "mp.Queue -> learner", ()),
    "cpprb": ("cpprb_mp", "Cpprb", "cpprb MPReplayBuffer", ("cpprb",)),
    "torchrl": ("torchrl_shared", "TorchRL", "TorchRL LazyMemmapStorage", ("torch", "tensordict", "torchrl")),
}
ORDER = list(CONTENDERS)


def label(key: str) -> str:
    return CONTENDERS[key][2]


def missing(key: str) -> str | None:
    """Why ``key`` cannot run here (a module that is not installed), or None."""
    for mod in CONTENDERS[key][3]:
        if importlib.util.find_spec(mod) is None:
            return f"not installed (no module {mod!r}; see benches/requirements.txt)"
    return None


def module_name(key: str) -> str:
    return f"contenders.{CONTENDERS[key][0]}"


def load(key: str) -> Any:
    return getattr(importlib.import_module(module_name(key)), CONTENDERS[key][1])
