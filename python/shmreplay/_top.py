"""``shmreplay top``: a live view of the replay buffers in a directory.

Each refresh scans the directory (``_core.scan``), opens every buffer shown with
:meth:`ReplayBuffer.inspect` (which neither attaches nor prefaults) for its counters and
attached pids, and closes it again, so a buffer created, removed or replaced under the same
name between two refreshes is simply picked up or dropped. Rates are differences of the
counters between two readings of the same buffer over the monotonic time between them; a
buffer seen for the first time has none yet (``–`` in the table, ``null`` in JSON).

Modes (see :func:`run`):

* live, when stdout is a terminal: a ``rich.live.Live`` table redrawn in place every
  interval; ``q`` quits (exit 0) when stdin is a terminal too (it is put in cbreak mode while
  ``top`` runs and restored on every way out), Ctrl-C quits with exit code 130.
* plain, when stdout is not a terminal (``top > file``, a pipe): the same frames printed one
  after another, without cursor control, every interval, until ``--count`` or Ctrl-C.
* ``--json``: one JSON object per refresh and line (JSON Lines), flushed after each line;
  ``q`` quits too when stdin is a terminal.
* ``--once``: one frame (table or JSON) whose rates are measured: two readings one interval
  apart, then the frame.

While ``top`` has the terminal changed (the live view, or keys read in cbreak mode), SIGTERM
and SIGHUP (``kill``, a closed terminal window) restore it like ``q`` does, then ``top`` exits
with 128 + the signal number (143, 129); the previous handlers are put back before it returns.
A stdout closed early (``top | head -1``) ends it with exit code 0, as the other commands.
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Optional

from ._format import printable

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["Reading", "Snapshot", "read", "frame_json", "render", "run"]

# A wait is added to the counters when it ends (timeouts and interrupts included), so a
# process blocked for 5 s shows up as 5 s of waiting in the refresh during which it woke.
WAIT_NOTE = "WAIT: s/s blocked by flow control, all processes; a wait counts when it ends"


@dataclass
class Reading:
    """One buffer at one moment."""

    name: str
    kind: str
    sampler: str
    capacity: int
    size: int
    stale: bool
    creator_pid: int
    inserts: int
    samples: int
    retries: int
    insert_wait_s: float
    sample_wait_s: float
    priority_total: Optional[float]
    pids: list[int]
    at: float
    """``time.monotonic()`` of the reading."""

    @property
    def key(self) -> tuple[str, int, int]:
        """What identifies the same buffer across refreshes: a buffer removed and created again
        under its name (by another process, or with another capacity) starts over."""
        return (self.name, self.creator_pid, self.capacity)


@dataclass
class Snapshot:
    """Every buffer shown, at one refresh."""

    readings: list[Reading]
    unreadable: list[dict[str, str]] = field(default_factory=list)
    """``{"name", "reason"}`` of the segments that could not be read (corrupt, no access)."""
    time: float = 0.0
    """Unix time of the refresh."""


def _sampler_kind(sampler: Any) -> str:
    """``uniform``, ``queue`` or ``prioritized`` of the core's ``None``, ``"queue"`` or tuple."""
    if sampler is None:
        return "uniform"
    if isinstance(sampler, str):
        return sampler
    return "prioritized"


def read(path: Optional[str], names: Sequence[str] = ()) -> Snapshot:
    """The buffers in ``path`` (all of them, or those of ``names``), read now.

    A buffer removed between the scan and its reading is left out; one that cannot be opened
    (corrupt, another user's) is listed in ``unreadable``.
    """
    import shmreplay

    from . import _core

    buffers, unreadable = _core.scan(path)
    wanted = set(names)
    snapshot = Snapshot(
        readings=[],
        unreadable=[
            {"name": str(u["name"]), "reason": str(u["reason"])}
            for u in unreadable
            if not wanted or u["name"] in wanted
        ],
        time=time.time(),
    )
    for b in sorted(buffers, key=lambda b: str(b["name"])):
        name = str(b["name"])
        if wanted and name not in wanted:
            continue
        try:
            handle = shmreplay.ReplayBuffer.inspect(name, path=path)
        except FileNotFoundError:
            continue  # removed since the scan
        except (OSError, ValueError, shmreplay.ShmReplayError) as exc:
            snapshot.unreadable.append({"name": name, "reason": " ".join(str(exc).split())})
            continue
        try:
            stats = handle.stats()
            pids = sorted(handle.processes())
            at = time.monotonic()
        finally:
            handle.close()
        priority_total = stats.get("priority_total")
        snapshot.readings.append(
            Reading(
                name=name,
                kind=str(b["kind"]),
                sampler=_sampler_kind(b["sampler"]),
                capacity=int(stats["capacity"]),
                size=int(stats["size"]),
                stale=bool(b["stale"]),
                creator_pid=int(b["creator_pid"]),
                inserts=int(stats["inserts"]),
                samples=int(stats["samples"]),
                retries=int(stats["retries"]),
                insert_wait_s=float(stats["insert_wait_s"]),
                sample_wait_s=float(stats["sample_wait_s"]),
                priority_total=None if priority_total is None else float(priority_total),
                pids=pids,
                at=at,
            )
        )
    return snapshot


# --------------------------------------------------------------------------------------------
# Rates
# --------------------------------------------------------------------------------------------

RATES = ("inserts", "samples", "retries", "insert_wait_s", "sample_wait_s")


def rates(current: Reading, previous: Optional[Reading]) -> dict[str, Optional[float]]:
    """Per second, of each counter in :data:`RATES` since ``previous`` (``None`` each without a
    previous reading of the same buffer, or if a counter went backwards)."""
    if previous is None or previous.key != current.key or current.at <= previous.at:
        return {k: None for k in RATES}
    dt = current.at - previous.at
    out: dict[str, Optional[float]] = {}
    for k in RATES:
        delta = getattr(current, k) - getattr(previous, k)
        out[k] = delta / dt if delta >= 0 else None
    return out


def _by_key(snapshot: Optional[Snapshot]) -> dict[tuple[str, int, int], Reading]:
    return {} if snapshot is None else {r.key: r for r in snapshot.readings}


# --------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------


def frame_json(snapshot: Snapshot, previous: Optional[Snapshot], directory: str) -> dict[str, Any]:
    """One JSON Lines object: the schema is documented in the README (``shmreplay top``)."""
    before = _by_key(previous)
    buffers = []
    for r in snapshot.readings:
        rate = rates(r, before.get(r.key))
        buffers.append(
            {
                "name": r.name,
                "kind": r.kind,
                "sampler": r.sampler,
                "capacity": r.capacity,
                "size": r.size,
                "fill": r.size / r.capacity if r.capacity else 0.0,
                "stale": r.stale,
                "inserts": r.inserts,
                "samples": r.samples,
                "retries": r.retries,
                "insert_wait_s": r.insert_wait_s,
                "sample_wait_s": r.sample_wait_s,
                "inserts_per_s": rate["inserts"],
                "samples_per_s": rate["samples"],
                "retries_per_s": rate["retries"],
                "insert_wait_s_per_s": rate["insert_wait_s"],
                "sample_wait_s_per_s": rate["sample_wait_s"],
                "priority_total": r.priority_total,
                "pids": r.pids,
            }
        )
    return {"time": snapshot.time, "path": directory, "buffers": buffers, "unreadable": snapshot.unreadable}


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def _compact(n: float) -> str:
    """``999``, ``12.3k``, ``4.19M``, ``1.07G``."""
    for unit, scale, start in (("G", 1e9, 1e9), ("M", 1e6, 1e6), ("k", 1e3, 1e4)):
        if n >= start:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n:,.0f}"


def _amount(value: float) -> str:
    """A priority total: ``0.5``, ``12.3``, ``4,096``, ``12.3k``, ``4.19M``."""
    if value >= 10_000:
        return _compact(value)
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _rate(value: Optional[float]) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    if value >= 10_000:
        return _compact(value)
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _pids(pids: Sequence[int], shown: int = 6) -> str:
    text = " ".join(str(p) for p in pids[:shown])
    return text + (f" +{len(pids) - shown}" if len(pids) > shown else "") if pids else "none"


# (header, kind): numbers are right-aligned and never wrapped, nor are the short words of KIND
# and SAMPLER; a long name or pid list folds onto more lines when the terminal is narrow.
COLUMNS = (
    ("NAME", "fold"),
    ("KIND", "word"),
    ("SAMPLER", "word"),
    ("SIZE", "number"),
    ("FILL", "number"),
    ("INS/S", "number"),
    ("SMP/S", "number"),
    ("RETRY/S", "number"),
    ("WAIT\nINS", "number"),
    ("WAIT\nSMP", "number"),
    ("PRIO\nTOTAL", "number"),
    ("PIDS", "fold"),
)
NARROW = 100
"""Below this many columns the SIZE column is left out (FILL stays; ``--json`` has both)."""


def render(
    snapshot: Snapshot,
    previous: Optional[Snapshot],
    directory: str,
    interval: float,
    keys: bool,
    width: int = NARROW,
) -> RenderableType:
    """The frame of ``snapshot`` for a terminal ``width`` columns wide: a rich renderable
    (title line, table, notes)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    before = _by_key(previous)
    title = Text()
    title.append("shmreplay top", style="bold")
    title.append(f"  {printable(directory)}  {time.strftime('%H:%M:%S', time.localtime(snapshot.time))}")
    title.append(f"  every {interval:g} s")
    if keys:
        title.append("  q quits", style="dim")
    parts: list[RenderableType] = [title]

    if snapshot.readings:
        columns = [(h, k) for h, k in COLUMNS if width >= NARROW or h != "SIZE"]
        table = Table(
            box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False, show_edge=False, header_style="bold"
        )
        for header, kind in columns:
            if kind == "fold":
                table.add_column(header, overflow="fold", min_width=4)
            else:
                table.add_column(header, justify="right" if kind == "number" else "left", no_wrap=True)
        for r in snapshot.readings:
            rate = rates(r, before.get(r.key))
            # Text, not markup: a name like "[bold]x" is shown as it is.
            name = Text(printable(r.name))
            if r.stale:
                name.append(" stale", style="bold red")
            fill = 100.0 * r.size / r.capacity if r.capacity else 0.0
            cells: dict[str, RenderableType] = {
                "NAME": name,
                "KIND": r.kind,
                "SAMPLER": "prio" if r.sampler == "prioritized" else r.sampler,
                "SIZE": f"{_compact(r.size)}/{_compact(r.capacity)}",
                "FILL": f"{fill:.1f}%",
                "INS/S": _rate(rate["inserts"]),
                "SMP/S": _rate(rate["samples"]),
                "RETRY/S": _rate(rate["retries"]),
                "WAIT\nINS": _rate(rate["insert_wait_s"]),
                "WAIT\nSMP": _rate(rate["sample_wait_s"]),
                "PRIO\nTOTAL": "" if r.priority_total is None else _amount(r.priority_total),
                "PIDS": _pids(r.pids),
            }
            table.add_row(*(cells[h] for h, _ in columns), style="dim" if r.stale else None)
        parts.append(table)
        stale = sum(1 for r in snapshot.readings if r.stale)
        summary = f"{len(snapshot.readings)} buffer{'s' if len(snapshot.readings) != 1 else ''}"
        if stale:
            summary += f", {stale} stale (`shmreplay gc` removes them)"
        parts.append(Text(summary))
        parts.append(Text(WAIT_NOTE, style="dim"))
    else:
        parts.append(Text(f"No shmreplay buffers in {printable(directory)}."))
    if snapshot.unreadable:
        names = ", ".join(printable(u["name"]) for u in snapshot.unreadable)
        parts.append(Text(f"unreadable (see `shmreplay ls`): {names}", style="yellow"))
    return Group(*parts)


# --------------------------------------------------------------------------------------------
# Keys and the terminal
# --------------------------------------------------------------------------------------------


def _key_fd(stream: IO[str]) -> Optional[int]:
    """The descriptor to read keys from: stdin when it is a terminal, unless it is the
    controlling terminal of another (foreground) process group: a background ``top &`` must
    not touch the terminal. ``None``: no keys (Ctrl-C still quits)."""
    try:
        fd = stream.fileno()
        if not os.isatty(fd):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    try:
        foreground = os.tcgetpgrp(fd)
    except OSError:  # not our controlling terminal: no job control to respect
        return fd
    return fd if foreground == os.getpgrp() else None


@contextmanager
def _cbreak(fd: Optional[int]) -> Iterator[None]:
    """Keys without Enter and without echo on ``fd`` while inside; the terminal's settings are
    restored however the block is left (return, ``q``, Ctrl-C, an error)."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd, termios.TCSANOW)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:  # the terminal hung up: nothing left to restore
            pass


class _Terminated(BaseException):
    """Raised by the SIGTERM and SIGHUP handlers of :func:`_quit_on_signals` (a BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` on the way stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


QUIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _quit_on_signals() -> Iterator[list[int]]:
    """SIGTERM and SIGHUP leave the block as an exception (so that the ``with`` blocks inside
    restore the terminal) instead of killing the process; yields the list the signals caught
    are appended to: non-empty afterwards means "exit with 128 + its first signal".

    Only the first signal raises; one that arrives while the terminal is being restored is just
    recorded. An error while unwinding after a signal (writing to a terminal that hung up) is
    dropped: the signal decides the exit code. A signal that is ignored (``nohup``) stays
    ignored; outside the main thread nothing is installed. The previous handlers are restored
    on the way out."""
    caught: list[int] = []
    armed = True

    def handler(signum: int, _frame: Any) -> None:
        nonlocal armed
        caught.append(signum)
        if armed:
            armed = False
            raise _Terminated(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in QUIT_SIGNALS:
            current = signal.getsignal(sig)
            if current == signal.SIG_IGN or current is None:  # None: set outside Python, keep it
                continue
            previous[sig] = current
            signal.signal(sig, handler)
    try:
        yield caught
    except _Terminated:
        pass
    except Exception:
        if not caught:
            raise
    finally:
        armed = False
        for signum, old in previous.items():
            signal.signal(signum, old)


def _wait(fd: Optional[int], seconds: float) -> bool:
    """Sleeps ``seconds``, or less if ``q`` is typed on ``fd``: returns True to quit."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            continue
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 1024)
            if not data:  # the terminal hung up: nothing more to read, just sleep
                fd = None
            elif b"q" in data or b"Q" in data:
                return True


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def run(
    path: Optional[str],
    names: Sequence[str],
    directory: str,
    *,
    interval: float,
    once: bool = False,
    as_json: bool = False,
    count: Optional[int] = None,
    stdout: Optional[IO[str]] = None,
    stdin: Optional[IO[str]] = None,
) -> int:
    """Runs ``shmreplay top`` until ``q``, ``count`` refreshes, or (``once``) one frame;
    returns the exit code (128 + the signal after SIGTERM or SIGHUP while the terminal is in
    use, see :func:`_quit_on_signals`). Ctrl-C propagates as ``KeyboardInterrupt`` once the
    terminal is restored (the CLI turns it into exit code 130), a closed stdout as
    ``BrokenPipeError`` (the CLI: exit code 0)."""
    out = sys.stdout if stdout is None else stdout
    inp = sys.stdin if stdin is None else stdin

    if once:
        first = read(path, names)
        time.sleep(interval)
        second = read(path, names)
        if as_json:
            _print_json(out, frame_json(second, first, directory))
        else:
            console = _console(out)
            console.print(render(second, first, directory, interval, keys=False, width=console.width))
        return 0

    if as_json:
        fd = _key_fd(inp)
        if fd is None:  # the terminal is left as it is: SIGTERM and SIGHUP do what they do
            _json_lines(out, _snapshots(None, path, names, interval, count), directory)
            return 0
        with _quit_on_signals() as caught, _cbreak(fd):
            _json_lines(out, _snapshots(fd, path, names, interval, count), directory)
        return 128 + caught[0] if caught else 0

    console = _console(out)
    if not console.is_terminal:
        return _plain(console, _snapshots(None, path, names, interval, count), directory, interval)
    fd = _key_fd(inp)
    with _quit_on_signals() as caught:
        _live(console, _snapshots(fd, path, names, interval, count), fd, directory, interval)
    return 128 + caught[0] if caught else 0


Frames = Iterator[tuple[Snapshot, Optional[Snapshot]]]


def _json_lines(out: IO[str], frames: Frames, directory: str) -> None:
    """One JSON object per refresh and line."""
    for snapshot, previous in frames:
        _print_json(out, frame_json(snapshot, previous, directory))


def _snapshots(
    fd: Optional[int], path: Optional[str], names: Sequence[str], interval: float, count: Optional[int]
) -> Frames:
    """``(snapshot, the one before)`` every ``interval``, until ``count`` of them or ``q`` on
    ``fd``. The wait comes after each one is handed out, so a caller's context (the terminal
    in cbreak mode) holds while it waits."""
    previous: Optional[Snapshot] = None
    frames = 0
    while True:
        snapshot = read(path, names)
        yield snapshot, previous
        previous, frames = snapshot, frames + 1
        if count is not None and frames >= count:
            return
        if _wait(fd, interval):
            return


def _console(out: IO[str]) -> Console:
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            # rich's default raises SystemExit(1); `top | head -1` exits 0 as `ls | head -1`
            # does: the CLI catches BrokenPipeError.
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    # Not a terminal (a file, a pipe): as wide as the frame needs, unless COLUMNS says.
    wide = None if "COLUMNS" in os.environ or out.isatty() else 160
    return _Console(file=out, highlight=False, emoji=False, width=wide)


def _print_json(out: IO[str], obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _plain(console: Console, frames: Frames, directory: str, interval: float) -> int:
    """Frames one after another, separated by a blank line: for a file or a pipe."""
    for n, (snapshot, previous) in enumerate(frames):
        if n:
            console.print()
        console.print(render(snapshot, previous, directory, interval, keys=False, width=console.width))
        console.file.flush()
    return 0


def _live(console: Console, frames: Frames, fd: Optional[int], directory: str, interval: float) -> None:
    """The table redrawn in place; ``q`` on the terminal ``fd`` (the one ``frames`` waits on)
    quits."""
    from rich.live import Live

    def frame(snapshot: Snapshot, previous: Optional[Snapshot]) -> RenderableType:
        return render(snapshot, previous, directory, interval, keys=fd is not None, width=console.width)

    snapshot, _ = next(frames)
    with _cbreak(fd), Live(
        frame(snapshot, None),
        console=console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        for snapshot, previous in frames:
            live.update(frame(snapshot, previous), refresh=True)


def parse_interval(text: str) -> float:
    """``--interval``: seconds, a finite number > 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 86400):
        raise ValueError(f"must be a number of seconds > 0 (at most 86400), got {text!r}")
    return value
