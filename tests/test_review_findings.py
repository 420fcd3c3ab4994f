"""What the adversarial review of the hardened core found, each pinned by a test that failed
before its fix: a fork while another thread holds the handle, a batch too large for memory, a
forked child's ``with`` exit, a NUL byte in a path, and typing the README's example."""

from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import shmreplay
from helpers import PausedWriter, make_records, record_fields, run_forked
from shmreplay import ReplayBuffer

FRAME = (4, 16, 16)


def test_fork_while_a_thread_waits_inside_a_write_never_hangs_the_child(shm_name):
    """A parent thread waits inside ``add`` (on a slot a stopped writer holds) when the parent
    forks: in the child that thread does not exist, so the handle it held stays held there. The
    child's first write must end within the wait bound with ContendedError, not hang."""
    ctx = multiprocessing.get_context("fork")
    fields = record_fields(FRAME)
    with ReplayBuffer.create(shm_name, capacity=1, fields=fields) as buf:
        buf.extend(make_records(0, [0], FRAME))
        writer = PausedWriter(ctx, shm_name, None, make_records(1, [1], FRAME)).start()
        waiting = threading.Thread(target=lambda: _swallow(lambda: buf.extend(make_records(2, [2], FRAME))), daemon=True)
        try:
            writer.stop()
            waiting.start()
            time.sleep(0.5)  # the thread is now inside the write, holding the handle

            def child() -> str:
                started = time.monotonic()
                try:
                    buf.extend(make_records(3, [3], FRAME))
                    return f"wrote after {time.monotonic() - started:.1f} s"
                except shmreplay.ContendedError as e:
                    return f"ContendedError after {time.monotonic() - started:.1f} s: {e}"

            outcome = run_forked(child, timeout=40)
        finally:
            writer.kill()
            waiting.join(30)
        assert outcome.startswith("ContendedError"), outcome
        assert "inherited through fork" in outcome


def _swallow(call) -> None:
    try:
        call()
    except shmreplay.ShmReplayError:
        pass


def test_a_batch_too_large_for_memory_raises_memory_error_not_abort(shm_name):
    """``sample(n)`` whose index arrays cannot be allocated raises MemoryError (the process
    lives on and cleans up); it used to abort the interpreter."""

    def child() -> str:
        with ReplayBuffer.create(shm_name, capacity=4, fields={"a": ((), "i1")}) as buf:
            buf.add(a=1)
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            # Room for numpy's 1-byte-per-row output, not for 16 bytes a row of indices.
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (3 << 30), hard))
            try:
                buf.sample(1 << 30)
            except MemoryError as e:
                return f"MemoryError: {e}"
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return "no error"

    assert run_forked(child, timeout=60).startswith("MemoryError")


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_forked_child_with_block_leaves_the_buffer_to_its_creator(shm_name):
    """``is_owner`` belongs to the creating process: a forked worker's ``with buf:`` exit must
    not remove the buffer under everyone else (a spawned one already did not)."""
    buf = ReplayBuffer.create(shm_name, capacity=4, fields={"a": ((), "i1")})
    try:

        def child() -> bool:
            with buf:
                buf.add(a=1)
            return buf.is_owner

        assert run_forked(child) is False
        assert buf.is_owner
        assert os.path.exists(buf.path), "a forked child's with-exit removed the buffer"
        assert len(ReplayBuffer.attach(shm_name)) == 1
    finally:
        buf.close()
        buf.unlink()


@pytest.mark.parametrize("path", ["/dev/shm\x00", "\x00"])
def test_a_path_with_a_nul_byte_is_a_value_error(path):
    with pytest.raises(ValueError, match="path"):
        ReplayBuffer.create(capacity=2, fields={"a": ((), "i1")}, path=path)
    with pytest.raises(ValueError, match="path"):
        shmreplay.list_buffers(path)


def test_the_readme_example_type_checks(tmp_path):
    """The README's first example, unchanged, passes mypy against the package's stubs."""
    example = tmp_path / "example.py"
    example.write_text(
        "import numpy as np\nimport shmreplay\n"
        'fields = {"obs": ((4, 84, 84), np.uint8), "action": ((), np.int32), "reward": ((), "float32"),\n'
        '          "next_obs": ((4, 84, 84), np.uint8), "done": ((), np.bool_)}\n'
        'buf = shmreplay.ReplayBuffer.create("pong", capacity=100_000, fields=fields)\n'
        "flag: bool = bool(len(buf))\n"
        "got = buf.sample(4, return_info=flag)\n"
    )
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(example)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


_ = np
