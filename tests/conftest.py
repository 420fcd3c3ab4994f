"""Fixtures for the shmreplay test suite: unique names, a private ``path=`` directory,
schemas, and cleanup of every segment a test leaves in /dev/shm."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers  # noqa: E402

# A run started in the background of a shell without job control (`cmd &`) or under nohup
# inherits SIGINT or SIGHUP ignored, and so would every process the tests start: the Ctrl-C,
# SIGHUP and closed-terminal tests would then wait for an exit that never comes. Tests send
# these signals on purpose, so they get the default dispositions back.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)

# Every name this session hands out starts with this prefix, so cleanup never touches
# segments that belong to anybody else (other test runs, the demo, a user's buffers).
SESSION_PREFIX = f"pyt{os.getpid()}-{uuid.uuid4().hex[:6]}-"
_counter = itertools.count()


def new_name() -> str:
    return f"{SESSION_PREFIX}{next(_counter)}"


def _ours_in(directory: str) -> list[str]:
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [e for e in entries if e.startswith(helpers.SEGMENT_PREFIX + SESSION_PREFIX)]


def _remove_ours(directory: str) -> list[str]:
    removed = []
    for e in _ours_in(directory):
        try:
            os.unlink(os.path.join(directory, e))
            removed.append(e)
        except FileNotFoundError:
            pass
    return removed


@pytest.fixture(autouse=True)
def _cleanup_shm():
    """Remove whatever segment of ours a test left in /dev/shm (also after failures)."""
    yield
    _remove_ours(helpers.SHM_DIR)


@pytest.fixture
def shm_name() -> str:
    """A fresh, unique buffer name."""
    return new_name()


@pytest.fixture
def name_factory():
    """Call it for as many unique names as a test needs."""
    return new_name


@pytest.fixture
def shm_dir(tmp_path):
    """A private directory for ``path=`` (a normal filesystem; pytest removes it)."""
    d = tmp_path / "segments"
    d.mkdir()
    return d


@pytest.fixture
def atari_fields():
    return helpers.atari_fields()


@pytest.fixture
def control_fields():
    return helpers.control_fields()


@pytest.fixture(params=["spawn", "fork"])
def mp_ctx(request):
    import multiprocessing

    return multiprocessing.get_context(request.param)


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted under tmp_path (needs root; skipped otherwise)."""
    mnt = tmp_path / "tmpfs8m"
    mnt.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, text=True, timeout=30)


def pytest_sessionfinish(session, exitstatus):
    _remove_ours(helpers.SHM_DIR)
