"""Batches sampled ahead by a background thread, so that sampling overlaps the learner's step."""

from __future__ import annotations

import queue
import threading
import time
from types import TracebackType
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np

from ._errors import ContendedError, ShutdownError
from ._types import SampleInfo

Batch = dict[str, np.ndarray]
#: ``sample(out=..., timeout=...)`` of a buffer, with its other arguments bound.
SampleFn = Callable[[Union[Mapping[str, np.ndarray], None], Union[float, None]], "tuple[Batch, SampleInfo]"]

# How long the thread waits in one go (for flow control, or for a free batch): the bound on how
# long it takes to notice close().
_SLICE = 0.05


# Put in the free queue by close(): not a slot, a nudge.
_WAKE = -1


class _End:
    """Put in the ready queue when the buffer was shut down: the iteration ends."""


class Batches(Iterator["tuple[Batch, SampleInfo]"]):
    """An iterator of ``(batch, info)`` sampled ahead by a background thread.

    Made by :meth:`ReplayBuffer.batches` and :meth:`EpisodeBuffer.batches`. The thread samples
    (with the GIL released) into a ring of ``prefetch + 1`` reusable batches while the learner
    works on the one it was given. A batch stays valid until the next ``next()`` (then the
    thread refills its arrays); with ``copy=True`` every batch is fresh arrays instead.

    It ends cleanly when the loop is left (``break``: the iterator is dropped), on
    :meth:`close`, on ``shutdown()`` of the buffer (the iteration stops), or on Ctrl-C (the
    ``KeyboardInterrupt`` propagates): the thread stops within about 100 ms and never leaves a
    batch half-written. An error of a sample (``EmptyBufferError``, ``TimeoutError`` after
    ``timeout``) is raised by the ``next()`` that would have returned that batch, and ends the
    iteration.

    On a ``Queue()`` buffer the thread takes rows out of the queue ahead of the learner: the
    batches taken but not yet handed out when the iterator closes (at most ``prefetch + 1``)
    are lost, as for a consumer that dies.
    """

    def __init__(self, sample: SampleFn, prefetch: int, copy: bool, timeout: float | None) -> None:
        """Internal: use ``batches()`` of a buffer."""
        self._copy = copy
        self._slots: list[Batch | None] = [None] * (prefetch + 1)
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(prefetch + 1):
            self._free.put(slot)
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._held: int | None = None
        self._closed = False
        # The thread holds the queues and slots, never this object: dropping the iterator
        # (leaving a for loop) closes it.
        self._thread = threading.Thread(
            target=_fill,
            args=(sample, timeout, self._slots, self._free, self._ready, self._stop),
            name="shmreplay-batches",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[Batch, SampleInfo]:
        if self._held is not None:
            self._free.put(self._held)  # the learner is done with it: refill
            self._held = None
        if self._closed:
            raise StopIteration
        try:
            item = self._next_ready()
        except BaseException:
            self.close()
            raise
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        slot, info = item
        batch = self._slots[slot]
        assert batch is not None
        if self._copy:
            batch = {key: array.copy() for key, array in batch.items()}
            self._free.put(slot)
        else:
            self._held = slot
        return batch, info

    def _next_ready(self) -> Any:
        # Short waits, so that Ctrl-C is seen between them.
        while True:
            try:
                return self._ready.get(timeout=_SLICE)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._ready.get_nowait()
                    except queue.Empty:
                        return _End()

    def close(self) -> None:
        """Stops the thread (within about 100 ms) and ends the iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._free.put(_WAKE)  # a thread waiting for a free batch looks at the stop flag now
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Batches":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A for loop left with break drops the iterator: stop the thread.
        if not getattr(self, "_closed", True):
            self.close()


def _fill(
    sample: SampleFn,
    timeout: float | None,
    slots: list[Batch | None],
    free: queue.SimpleQueue[int],
    ready: queue.SimpleQueue[Any],
    stop: threading.Event,
) -> None:
    """The thread: takes a free slot, samples into it (waiting for flow control in slices so
    that ``stop`` is noticed), hands it over; until stopped, shut down, or a sample fails."""
    while not stop.is_set():
        try:
            slot = free.get(timeout=_SLICE)
        except queue.Empty:
            continue
        if slot == _WAKE:
            continue
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if stop.is_set():
                return
            wait = _SLICE if deadline is None else max(0.0, min(_SLICE, deadline - time.monotonic()))
            try:
                batch, info = sample(slots[slot], wait)
            except ContendedError as e:  # a TimeoutError, but not flow control's: give up
                ready.put(e)
                return
            except TimeoutError as e:
                if deadline is not None and time.monotonic() >= deadline:
                    ready.put(e)
                    return
                continue  # flow control still says wait: look at stop, then wait again
            except ShutdownError:
                ready.put(_End())
                return
            except BaseException as e:  # handed to the learner, raised by its next()
                ready.put(e)
                return
            break
        slots[slot] = batch
        ready.put((slot, info))
