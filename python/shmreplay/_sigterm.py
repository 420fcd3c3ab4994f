"""SIGTERM handled like leaving the creator's ``with`` block, for buffers created with
``cleanup_on_sigterm=True``: they are unlinked, then SIGTERM does what it did before.

The handler is a Python-level one (it runs in the main thread between bytecodes, or inside a
shmreplay call that waits, which polls for signals every 20 ms), installed by the first such
``create`` in the main thread. On SIGTERM it unlinks every such buffer this process created
(not those it attached, nor those a forked child inherited) and still has open, then:

* chains to the Python handler that was installed before it, if there was one;
* else (the default disposition) restores the default and sends itself SIGTERM again: the
  process dies of SIGTERM, as its parent expects (exit code -15 for ``multiprocessing``, 143
  in a shell).

A process that ignores SIGTERM keeps ignoring it (nothing is installed). A SIGTERM that arrives
while such a buffer is being created in the main thread takes effect once the create returns
(the new buffer is then unlinked too). A handler the program installs later replaces this one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from typing import Any, Callable, Iterator, Protocol, TypeVar, Union

Handler = Union[Callable[[int, Any], Any], int, None]


class _Owned(Protocol):
    @property
    def is_owner(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def unlink(self) -> None: ...


# The handles to unlink (weak: a handle dropped without unlink is left, as on normal exit).
_buffers: "weakref.WeakSet[Any]" = weakref.WeakSet()
# The disposition before ours, to chain to.
_previous: Handler = signal.SIG_DFL
# Creates in progress in the main thread, and a SIGTERM that arrived during one.
_creating = 0
_pending = False
_running = False


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def prepare() -> None:
    """Before a ``create(cleanup_on_sigterm=True)``: makes sure the handler is installed, or
    raises ``ValueError`` (nothing is created then) where it cannot be."""
    global _previous
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_sigterm or current == signal.SIG_IGN:
        return
    if not _in_main_thread():
        raise ValueError(
            "cleanup_on_sigterm=True installs a SIGTERM handler, which only the main thread can "
            "do: create the first such buffer of this process in the main thread"
        )
    _previous = current
    signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def creating() -> Iterator[None]:
    """Around the create and the registration of a buffer: a SIGTERM arriving in between waits
    until both are done (in the main thread, the only one where signal handlers run)."""
    global _creating, _pending
    counted = _in_main_thread()
    if counted:
        _creating += 1
    try:
        yield
    finally:
        if counted:
            _creating -= 1
            if _creating == 0 and _pending:
                _pending = False
                _on_sigterm(signal.SIGTERM, None)


B = TypeVar("B", bound=_Owned)


def created(make: Callable[[], B], cleanup: bool) -> B:
    """``make()`` (a buffer's create), registered for cleanup on SIGTERM if ``cleanup``."""
    if not cleanup:
        return make()
    prepare()
    with creating():
        buffer = make()
        _buffers.add(buffer)
    return buffer


def cleanup() -> None:
    """Unlinks every registered buffer this process created and still has open."""
    for buffer in list(_buffers):
        try:
            if buffer.is_owner and not buffer.closed:
                buffer.unlink()
        except Exception:  # noqa: BLE001 - removed already, or anything else: the others still go
            pass


def _on_sigterm(signum: int, frame: Any) -> None:
    global _pending, _running
    if _creating:
        _pending = True
        return
    if _running:  # re-entered (a chained handler that calls this one again)
        return
    _running = True
    try:
        cleanup()
    finally:
        _running = False
    previous = _previous
    if callable(previous):
        previous(signum, frame)
        return
    # The default disposition (or a handler installed outside Python, which cannot be called):
    # die of SIGTERM, as without this handler.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
