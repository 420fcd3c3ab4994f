"""Typed public API of shmreplay.

The Python modules carry their own annotations; this stub re-exports them so that type checkers
see exactly the public names. ``_core.pyi`` types the Rust extension. Both are checked against
the runtime by ``mypy.stubtest`` in ``make test``.
"""

import os

from ._batches import Batches as Batches
from ._buffer import ReplayBuffer as ReplayBuffer
from ._episodes import EpisodeBuffer as EpisodeBuffer
from ._episodes import EpisodeWriter as EpisodeWriter
from ._errors import ContendedError as ContendedError
from ._errors import CorruptSegmentError as CorruptSegmentError
from ._errors import EmptyBufferError as EmptyBufferError
from ._errors import InsufficientSpaceError as InsufficientSpaceError
from ._errors import ShmReplayError as ShmReplayError
from ._errors import ShutdownError as ShutdownError
from ._errors import TooManyHandlesError as TooManyHandlesError
from ._limiters import Limiter as Limiter
from ._limiters import MinSize as MinSize
from ._limiters import SampleToInsertRatio as SampleToInsertRatio
from ._samplers import Prioritized as Prioritized
from ._samplers import Queue as Queue
from ._samplers import Sampler as Sampler
from ._samplers import Uniform as Uniform
from ._types import BufferInfo as BufferInfo
from ._types import DTypeLike as DTypeLike
from ._types import FieldSpec as FieldSpec
from ._types import LimiterInfo as LimiterInfo
from ._types import PathLike as PathLike
from ._types import SampleInfo as SampleInfo
from ._types import Shape as Shape
from ._types import Stats as Stats

__version__: str
DEFAULT_DIR: str

def list_buffers(path: PathLike | None = None) -> list[BufferInfo]:
    """The buffers of this user in ``path`` (default ``/dev/shm``), sorted by name."""

def remove(name: str, *, path: PathLike | None = None) -> None:
    """Removes buffer ``name``; raises ``FileNotFoundError`` if there is none."""

def gc(path: PathLike | None = None, *, dry_run: bool = False) -> list[str]:
    """Removes this user's stale buffers in ``path`` (default ``/dev/shm``); returns their names."""
