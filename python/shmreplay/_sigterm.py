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

A process that ignores SIGTERM keeps ignoring it (nothing is installed). A handler the program
installs later replaces this one; if it chains to this one and another such ``create`` then
installs this one again on top of it, the two would call each other: this handler, entered
again while it chains, restores the default disposition and the process dies of SIGTERM.

Creates racing the handler:

* a SIGTERM that arrives while such a buffer is being created in the main thread takes effect
  once the create returns (the new buffer is then unlinked too);
* the handler first waits (at most ``_INFLIGHT_WAIT`` seconds) for the creates under way in
  other threads, then unlinks; a create that starts after that (in any thread) is refused
  before it makes anything, and in a thread other than the main one, waits until the handler
  is done (the process dies meanwhile, unless a chained Python handler lets it go on) and
  then raises ``RuntimeError``;
* a second SIGTERM while the handler unlinks is absorbed by the one under way.

Nothing here holds a lock across a point where the handler can run in the main thread while
the lock is held by the code it interrupted: the main thread's own creates defer the handler
(``_creating``), and the lock is reentrant, for a second SIGTERM that lands while the handler
holds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import weakref
from typing import Any, Callable, Iterator, NoReturn, Protocol, TypeVar, Union

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
# Creates in progress in the main thread, and a SIGTERM that arrived during one (main thread
# only: that is where the handler runs).
_creating = 0
_pending = False

# What the handler is doing: nothing, unlinking, or running the previous handler.
_IDLE, _CLEANING, _CHAINING = 0, 1, 2
_phase = _IDLE
# Guards _phase, _inflight and _buffers between the threads that create and the handler.
# Reentrant: a second SIGTERM can run the handler again, in the main thread, while the first
# run holds it.
_lock = threading.RLock()
_changed = threading.Condition(_lock)
# Opted-in creates under way (make() called, the buffer not yet registered or unlinked).
_inflight = 0
# How long the handler waits for creates under way in other threads before it unlinks.
_INFLIGHT_WAIT = 5.0


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


def _refuse() -> NoReturn:
    """An opted-in create while SIGTERM is being handled (nothing is left of it): in a thread
    other than the main one, waits for the end of the handler (normally the process dies
    meanwhile); then raises."""
    if not _in_main_thread():
        with _lock:
            while _phase != _IDLE:
                _changed.wait()
    raise RuntimeError(
        "cleanup_on_sigterm=True: this process got SIGTERM while the buffer was being created; "
        "it was not kept"
    )


def created(make: Callable[[], B], cleanup: bool) -> B:
    """``make()`` (a buffer's create), registered for cleanup on SIGTERM if ``cleanup``."""
    global _inflight
    if not cleanup:
        return make()
    prepare()
    with creating():
        with _lock:
            if _phase != _IDLE:
                refused = True
            else:
                refused = False
                _inflight += 1
        if refused:
            _refuse()
        try:
            buffer = make()
            with _lock:
                kept = _phase == _IDLE
                if kept:
                    _buffers.add(buffer)
            if not kept:  # the handler gave up waiting for this create: it unlinks its own
                with contextlib.suppress(Exception):
                    buffer.unlink()
        finally:
            with _lock:
                _inflight -= 1
                _changed.notify_all()
        if not kept:
            _refuse()
    return buffer


def cleanup(buffers: "list[Any] | None" = None) -> None:
    """Unlinks every registered buffer (or those given) this process created and still has
    open."""
    for buffer in list(_buffers) if buffers is None else buffers:
        try:
            if buffer.is_owner and not buffer.closed:
                buffer.unlink()
        except Exception:  # noqa: BLE001 - removed already, or anything else: the others still go
            pass


def _die() -> None:
    """Dies of SIGTERM, as without any handler."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _pending, _phase
    if _creating:
        _pending = True
        return
    with _lock:
        phase = _phase
        if phase == _IDLE:
            _phase = _CLEANING
            _changed.notify_all()
            # Creates under way in other threads finish first (registered, so unlinked below);
            # later ones are refused. wait() lets them take the lock meanwhile.
            _changed.wait_for(lambda: _inflight == 0, _INFLIGHT_WAIT)
            snapshot = list(_buffers)
    if phase == _CLEANING:  # a second SIGTERM during the cleanup: the first one finishes it
        return
    if phase == _CHAINING:  # a chained handler called this one again: end the recursion
        _die()
        return
    cleanup(snapshot)
    previous = _previous
    if not callable(previous):
        # The default disposition (or a handler installed outside Python, which cannot be
        # called): die of SIGTERM, as without this handler. _phase stays set: creates in other
        # threads are refused until the end.
        _die()
        return
    _phase = _CHAINING  # kept while it runs: it may call this handler again
    try:
        previous(signum, frame)
    finally:
        # The previous handler returned or raised: the program goes on (or exits) as it decides;
        # a later SIGTERM is handled afresh.
        with _lock:
            _phase = _IDLE
            _changed.notify_all()
