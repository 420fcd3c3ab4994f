"""SIGTERM handled like the creator's normal exit (issue 13): buffers created with
``cleanup_on_sigterm=True`` are unlinked when their creator gets SIGTERM, which then does what it
did before (the process dies of SIGTERM, or a previously installed Python handler runs).

Real processes (spawn and fork) create buffers, say they are ready and get SIGTERM:

* the opted-in segments (a ring, an episode buffer, one created by another thread) are gone,
  the one created without the option stays, and so does one the process only attached; the
  process died of SIGTERM; ``shmreplay.gc()`` removes the leftover once its creator is dead;
* a creator blocked in a waiting call (``sample`` on a limiter with no data, ``timeout=None``)
  cleans up and dies promptly;
* a Python SIGTERM handler installed before runs after the cleanup; a process that ignores
  SIGTERM keeps ignoring it; a forked child of the creator (which inherits the handler) never
  removes its parent's buffers; a SIGTERM arriving while such a buffer is being created
  leaves nothing behind, and so does one in another thread creating in a loop;
* a handler installed later that chains to shmreplay's, followed by another opted-in create
  (which installs shmreplay's again on top of it), runs once: the process dies of SIGTERM
  instead of the two handlers calling each other until ``RecursionError``; a previous handler
  that returns lets the process go on, and a later SIGTERM cleans up again;
* the option is refused (before anything is made) where it cannot work: not a bool, or the
  first such create in a thread other than the main one.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import shmreplay
from shmreplay import EpisodeBuffer, MinSize, ReplayBuffer

import helpers

pytestmark = pytest.mark.timeout(120)

START_TIMEOUT = 60.0  # spawn children import numpy and shmreplay
FIELDS = {"x": ((4,), np.float32)}


def _segments(directory: Any) -> list[str]:
    return sorted(e[len(helpers.SEGMENT_PREFIX):] for e in os.listdir(directory) if e.startswith(helpers.SEGMENT_PREFIX))


def _everything(directory: Any) -> list[str]:
    return sorted(os.listdir(directory))


def _wait_until_empty(directory: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _segments(directory) and time.monotonic() < deadline:
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------
# Child bodies (module level: spawn pickles them by name). Each reports on a pipe.
# ---------------------------------------------------------------------------------------


def creator(path: str, held: str, conn: Any) -> None:
    """Creates an opted-in ring and episode buffer, one more opted-in ring from another thread,
    and a ring without the option; attaches ``held`` (which the test created); then waits."""
    keep: list[Any] = [ReplayBuffer.create("ring", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)]
    keep.append(
        EpisodeBuffer.create("episodes", capacity=8, fields={"obs": ((2,), np.uint8)}, reward=None, path=path, cleanup_on_sigterm=True)
    )
    keep.append(ReplayBuffer.create("plain", capacity=8, fields=FIELDS, path=path))
    keep.append(ReplayBuffer.attach(held, path=path))
    made: list[Any] = []
    t = threading.Thread(
        target=lambda: made.append(
            ReplayBuffer.create("threaded", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
        )
    )
    t.start()
    t.join()
    keep += made
    conn.send(("ready", os.getpid(), len(made)))
    time.sleep(100)


def waiting_creator(path: str, kind: str, conn: Any) -> None:
    """Creates an opted-in buffer with a MinSize limiter and samples it, which waits
    (``timeout=None``) for data that never comes."""
    if kind == "ring":
        buf: Any = ReplayBuffer.create("waiting", capacity=8, fields=FIELDS, path=path, limiter=MinSize(4), cleanup_on_sigterm=True)
    else:
        buf = EpisodeBuffer.create(
            "waiting", capacity=8, fields={"obs": ((2,), np.uint8)}, reward=None, path=path, limiter=MinSize(4), cleanup_on_sigterm=True
        )
    conn.send(("ready", os.getpid()))
    buf.sample(1, timeout=None)
    conn.send(("returned",))


def chained_creator(path: str, conn: Any) -> None:
    """Installs its own SIGTERM handler (which reports whether the segment was already gone and
    exits with status 7), then creates an opted-in buffer."""

    def handler(signum: int, frame: Any) -> None:
        conn.send(("handler", os.path.exists(os.path.join(path, helpers.SEGMENT_PREFIX + "chained"))))
        raise SystemExit(7)

    signal.signal(signal.SIGTERM, handler)
    buf = ReplayBuffer.create("chained", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    conn.send(("ready", os.getpid()))
    time.sleep(100)
    buf.close()


def ignoring_creator(path: str, conn: Any, release: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    buf = ReplayBuffer.create("ignoring", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    conn.send(("ready", os.getpid(), signal.getsignal(signal.SIGTERM) == signal.SIG_IGN))
    release.poll(60)
    conn.send(("alive", os.path.exists(buf.path)))
    buf.unlink()


def forking_creator(path: str, conn: Any) -> None:
    """Creates an opted-in buffer, forks a child that inherits the handler, reports its pid and
    sleeps; waits for it and reports how it ended."""
    buf = ReplayBuffer.create("forking", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the grandchild: holds the inherited handle until killed
        try:
            # Says so itself: a signal arriving before Python's after-fork code ran would be lost.
            conn.send(("ready", parent, os.getpid()))
            time.sleep(100)
        finally:
            os._exit(5)
    _, status = os.waitpid(pid, 0)
    conn.send(("child", os.WIFSIGNALED(status) and os.WTERMSIG(status), os.path.exists(buf.path)))
    time.sleep(100)


def slow_creator(path: str, conn: Any) -> None:
    """Says it is about to create an opted-in 256 MiB buffer (about 0.1 s on tmpfs), creates it,
    says so, and waits."""
    conn.send(("creating", os.getpid()))
    buf = ReplayBuffer.create("slow", capacity=256, fields={"x": ((1 << 20,), np.uint8)}, path=path, cleanup_on_sigterm=True)
    conn.send(("created",))
    time.sleep(100)
    buf.close()



def rechaining_creator(path: str, conn: Any) -> None:
    """Creates an opted-in buffer, installs a handler that chains to the one it replaces
    (shmreplay's), then creates another opted-in buffer (which installs shmreplay's on top):
    each handler then chains to the other."""
    keep = [ReplayBuffer.create("a", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)]
    old = signal.getsignal(signal.SIGTERM)
    assert callable(old)

    def mine(signum: int, frame: Any) -> None:
        conn.send(("mine",))
        old(signum, frame)

    signal.signal(signal.SIGTERM, mine)
    keep.append(ReplayBuffer.create("b", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True))
    conn.send(("ready", os.getpid()))
    try:
        time.sleep(100)
    except BaseException as e:  # noqa: BLE001 - RecursionError, before the fix
        conn.send(("escaped", type(e).__name__))
        raise


def returning_creator(path: str, conn: Any, release: Any) -> None:
    """A previous handler that returns: the process goes on after the cleanup; a buffer
    created afterwards is removed by the next SIGTERM, which the handler survives again."""
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    first = ReplayBuffer.create("first", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    conn.send(("ready", os.getpid()))
    release.poll(60)
    release.recv()
    conn.send(("after first", len(got), os.path.exists(first.path)))
    second = ReplayBuffer.create("second", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    conn.send(("second",))
    release.poll(60)
    release.recv()
    conn.send(("after second", len(got), os.path.exists(second.path)))


def looping_creator(path: str, conn: Any) -> None:
    """Creates an opted-in buffer in the main thread, then another thread creates opted-in
    buffers in a loop (keeping the last few, unlinking the older ones; at most 60 s), which is
    where SIGTERM finds it."""
    first = ReplayBuffer.create("first", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True)
    made = threading.Event()

    def loop() -> None:
        keep: list[Any] = []
        deadline = time.monotonic() + 60
        i = 0
        while time.monotonic() < deadline:
            keep.append(ReplayBuffer.create(f"t{i}", capacity=8, fields=FIELDS, path=path, cleanup_on_sigterm=True))
            i += 1
            if len(keep) > 4:
                keep.pop(0).unlink()
            if i == 20:
                made.set()

    threading.Thread(target=loop, daemon=True).start()
    made.wait(30)
    conn.send(("ready", os.getpid()))
    time.sleep(100)
    first.close()


def plain_creator(path: str, conn: Any) -> None:
    ReplayBuffer.create("leftover", capacity=8, fields=FIELDS, path=path)
    conn.send(("ready", os.getpid()))
    time.sleep(100)


# ---------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------


class Child:
    def __init__(self, ctx: Any, fn: Any, *args: Any, release: bool = False) -> None:
        self.conn, child_end = ctx.Pipe(duplex=False)
        extra: tuple[Any, ...] = ()
        if release:
            release_end, self.release = ctx.Pipe(duplex=False)
            extra = (release_end,)
        self.proc = ctx.Process(target=fn, args=(*args, child_end, *extra), daemon=True)

    def start(self) -> "Child":
        self.proc.start()
        return self

    def recv(self, timeout: float = START_TIMEOUT) -> tuple:
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.proc.pid} said nothing within {timeout}s (exit code {self.proc.exitcode})")
        return self.conn.recv()

    def term(self) -> float:
        """SIGTERM; returns how long the child took to die."""
        started = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.join(10)
        took = time.monotonic() - started
        assert not self.proc.is_alive(), f"child {self.proc.pid} survived SIGTERM for 10 s"
        return took

    def kill(self) -> None:
        helpers.kill_and_reap([self.proc])

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


@pytest.fixture
def shm_subdir():
    """A private directory on tmpfs (/dev/shm), removed afterwards."""
    d = Path(helpers.SHM_DIR) / f"shmreplay-sigterm-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_sigterm_removes_the_opted_in_buffers_of_the_creator(mp_ctx, tmp_path):
    path = str(tmp_path)
    with ReplayBuffer.create("held", capacity=8, fields=FIELDS, path=path) as held:
        with Child(mp_ctx, creator, path, "held").start() as child:
            msg = child.recv()
            assert msg[0] == "ready" and msg[2] == 1, msg
            assert _segments(path) == ["episodes", "held", "plain", "ring", "threaded"]
            took = child.term()
            assert child.proc.exitcode == -signal.SIGTERM, f"exit code {child.proc.exitcode}"
            assert took < 5
            # Opted in: gone. Created without the option, or only attached: still there.
            assert _segments(path) == ["held", "plain"]
            assert _everything(path) == [helpers.SEGMENT_PREFIX + n for n in ("held", "plain")]
            # The leftover is stale (its creator is dead), gc removes it and only it.
            stale = {b["name"]: b["stale"] for b in shmreplay.list_buffers(path)}
            assert stale == {"held": False, "plain": True}
            assert shmreplay.gc(path) == ["plain"]
            assert _segments(path) == ["held"]
            assert held.stats()["attached"] == 1


@pytest.mark.parametrize("kind", ["ring", "episodes"])
def test_sigterm_reaches_a_creator_waiting_in_sample(mp_ctx, kind, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, waiting_creator, path, kind).start() as child:
        assert child.recv()[0] == "ready"
        time.sleep(0.5)  # well inside sample()'s wait
        assert child.proc.is_alive() and not child.conn.poll(), "sample() did not wait"
        took = child.term()
        assert child.proc.exitcode == -signal.SIGTERM
        assert took < 2, f"the waiting creator took {took:.2f}s to die"
        assert _everything(path) == []


def test_a_python_handler_installed_before_runs_after_the_cleanup(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, chained_creator, path).start() as child:
        assert child.recv()[0] == "ready"
        child.term()
        assert child.recv(10) == ("handler", False)  # the segment was gone when it ran
        assert child.proc.exitcode == 7
        assert _everything(path) == []


def test_a_process_ignoring_sigterm_keeps_ignoring_it(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, ignoring_creator, path, release=True).start() as child:
        msg = child.recv()
        assert msg == ("ready", child.proc.pid, True)
        os.kill(child.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert child.proc.is_alive()
        assert _segments(path) == ["ignoring"]
        child.release.send("go")
        assert child.recv(10) == ("alive", True)
        child.proc.join(10)
        assert child.proc.exitcode == 0


def test_a_forked_child_never_removes_its_parents_buffers(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, forking_creator, path).start() as child:
        _, _, grandchild = child.recv()
        os.kill(grandchild, signal.SIGTERM)
        # The grandchild inherited the handler: it died of SIGTERM, the buffer stays.
        assert child.recv(10) == ("child", signal.SIGTERM, True)
        assert _segments(path) == ["forking"]
        child.term()
        assert child.proc.exitcode == -signal.SIGTERM
        assert _everything(path) == []


def test_sigterm_during_the_create_leaves_nothing(mp_ctx, shm_subdir):
    """SIGTERM at a random moment around the create of a 256 MiB opted-in buffer (it polls for
    signals while it reserves the memory): whenever it lands, nothing is left in the directory
    (no segment, no half-made hidden file)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(4):
        with Child(mp_ctx, slow_creator, str(shm_subdir)).start() as child:
            assert child.recv()[0] == "creating"
            time.sleep(float(rng.uniform(0.0, 0.12)))
            child.term()
            assert child.proc.exitcode == -signal.SIGTERM
            assert _everything(shm_subdir) == []


def test_a_later_handler_chaining_to_ours_then_another_create_does_not_recurse(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, rechaining_creator, path).start() as child:
        assert child.recv()[0] == "ready"
        assert _segments(path) == ["a", "b"]
        took = child.term()
        assert child.proc.exitcode == -signal.SIGTERM, f"exit code {child.proc.exitcode}"
        assert took < 5
        assert child.recv(10) == ("mine",)  # it ran, once, and nothing escaped
        with pytest.raises(EOFError):
            child.conn.recv()
        assert _everything(path) == []


def test_a_previous_handler_that_returns_lets_the_process_go_on(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, returning_creator, path, release=True).start() as child:
        assert child.recv()[0] == "ready"
        os.kill(child.proc.pid, signal.SIGTERM)
        _wait_until_empty(path)
        child.release.send("go")
        assert child.recv(10) == ("after first", 1, False)
        assert child.recv(10) == ("second",)
        assert _segments(path) == ["second"]
        os.kill(child.proc.pid, signal.SIGTERM)
        _wait_until_empty(path)
        child.release.send("go")
        assert child.recv(10) == ("after second", 2, False)
        child.proc.join(10)
        assert child.proc.exitcode == 0
        assert _everything(path) == []


def test_sigterm_while_another_thread_creates_in_a_loop_leaves_nothing(mp_ctx, shm_subdir):
    """Opted-in creates racing the handler in another thread: those under way finish and are
    unlinked, later ones are refused; the process dies of SIGTERM and nothing is left."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    for _ in range(3):
        with Child(mp_ctx, looping_creator, str(shm_subdir)).start() as child:
            assert child.recv()[0] == "ready"
            time.sleep(float(rng.uniform(0.0, 0.05)))
            took = child.term()
            assert child.proc.exitcode == -signal.SIGTERM, f"exit code {child.proc.exitcode}"
            assert took < 5
            assert _everything(shm_subdir) == []


def test_without_the_option_the_segment_stays_until_gc(mp_ctx, tmp_path):
    path = str(tmp_path)
    with Child(mp_ctx, plain_creator, path).start() as child:
        assert child.recv()[0] == "ready"
        child.term()
        assert child.proc.exitcode == -signal.SIGTERM
        assert _segments(path) == ["leftover"]
        (info,) = shmreplay.list_buffers(path)
        assert info["name"] == "leftover" and info["stale"]
        assert shmreplay.gc(path, dry_run=True) == ["leftover"]
        assert shmreplay.gc(path) == ["leftover"]
        assert _everything(path) == []


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_the_option_must_be_a_bool(bad, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TypeError, match="cleanup_on_sigterm"):
        ReplayBuffer.create("bad", capacity=8, fields=FIELDS, path=tmp_path, cleanup_on_sigterm=bad)
    with pytest.raises(TypeError, match="cleanup_on_sigterm"):
        EpisodeBuffer.create("bad", capacity=8, fields={"obs": ((), np.uint8)}, reward=None, path=tmp_path, cleanup_on_sigterm=bad)
    assert _everything(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_first_opted_in_create_outside_the_main_thread_is_refused(tmp_path):
    """The handler can only be installed from the main thread: a first opted-in create in
    another thread raises ValueError and creates nothing (this process has no handler yet)."""
    before = signal.getsignal(signal.SIGTERM)
    if callable(before) and getattr(before, "__module__", "").startswith("shmreplay"):
        pytest.skip("this process already has shmreplay's SIGTERM handler")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            for kind in (ReplayBuffer, EpisodeBuffer):
                fields = FIELDS if kind is ReplayBuffer else {"obs": ((), np.uint8)}
                kw = {} if kind is ReplayBuffer else {"reward": None}
                try:
                    kind.create("threaded", capacity=8, fields=fields, path=tmp_path, cleanup_on_sigterm=True, **kw)
                except ValueError as e:
                    assert "main thread" in str(e)
                else:
                    raise AssertionError(f"{kind.__name__}.create in a thread was not refused")
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert outcome == [None], outcome
    assert _everything(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before
