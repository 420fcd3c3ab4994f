"""``huge_pages=True``: a new segment on 2 MiB pages, for every process that maps it.

Where the kernel can (Linux 6.1+ with ``MADV_COLLAPSE``, a tmpfs, ``shmem_enabled`` not
``deny``), the creator and every attached process (spawn, fork) map every whole 2 MiB of the
segment with 2 MiB pages, as ``/proc/self/smaps`` reports them, and the rows are the rows. Where
it cannot (a directory on a disk filesystem), the create warns and the buffer works on ordinary
pages. A bad value is refused and creates nothing."""

from __future__ import annotations

import os
import subprocess
import warnings

import numpy as np
import pytest

from shmreplay import EpisodeBuffer, Prioritized, ReplayBuffer

import helpers

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def kernel_collapses_tmpfs() -> bool:
    """What the kernel and its settings allow, read independently of shmreplay."""
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            shmem = f.read()
    except OSError:
        return False
    return release >= (6, 1) and "[deny]" not in shmem


def huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 * MIB


HUGE = huge_page_size()


def whole_huge_pages(nbytes: int) -> int:
    return nbytes // HUGE * HUGE


def on_tmpfs(path: str | os.PathLike[str]) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() == "tmpfs"


def assert_huge(got: int | None, nbytes: int) -> None:
    """Some whole huge pages of the segment (all of them unless memory is too fragmented: the
    kernel's best effort), never more."""
    assert got is not None and 0 < got <= whole_huge_pages(nbytes) and got % HUGE == 0, (got, nbytes)


needs_collapse = pytest.mark.skipif(
    not kernel_collapses_tmpfs() or HUGE > 2 * MIB, reason="the kernel cannot collapse tmpfs pages (or its huge pages are too big here)"
)


@needs_collapse
def test_creator_and_attached_processes_map_the_segment_with_2mib_pages(shm_name, control_fields, mp_ctx):
    buf = ReplayBuffer.create(shm_name, capacity=60_000, fields=control_fields, huge_pages=True)
    try:
        assert buf.nbytes > 8 * MIB
        mine = buf.huge_page_bytes()
        assert_huge(mine, buf.nbytes)
        keys = list(range(60_000, 62_000))
        buf.extend(helpers.rows_for_keys(control_fields, keys))
        got = helpers.run_in_child(mp_ctx, helpers.child_huge_page_bytes, shm_name, None, control_fields, keys)
        assert got == mine
        helpers.assert_slots_hold_keys(buf, control_fields, keys)
    finally:
        buf.unlink()
        buf.close()


def test_ordinary_pages_unless_asked(shm_name, control_fields):
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            shmem = f.read()
    except OSError:
        pytest.skip("no transparent huge pages in this kernel")
    if "[never]" not in shmem:
        pytest.skip("this system's tmpfs may hand out huge pages by itself")
    with ReplayBuffer.create(shm_name, capacity=60_000, fields=control_fields) as buf:
        assert buf.huge_page_bytes() == 0


@needs_collapse
def test_prioritized_and_episode_buffers_too(name_factory, control_fields):
    prio = ReplayBuffer.create(name_factory(), capacity=60_000, fields=control_fields, sampler=Prioritized(), huge_pages=True)
    fields = {"obs": ((84, 84), np.uint8), "action": ((), np.int32), "reward": ((), np.float32)}
    eps = EpisodeBuffer.create(name_factory(), capacity=2_000, fields=fields, frame_stack=4, n_step=3, huge_pages=True)
    try:
        for b in (prio, eps):
            assert_huge(b.huge_page_bytes(), b.nbytes)
        w = eps.writer(num_envs=2)
        w.reset(obs=np.full((2, 84, 84), 7, np.uint8))
        for t in range(10):
            w.step(action=np.array([t, t], np.int32), reward=np.ones(2, np.float32), obs=np.full((2, 84, 84), t, np.uint8),
                   terminated=np.zeros(2, bool), truncated=np.zeros(2, bool))
        batch = eps.sample(8)
        assert batch["obs"].shape == (8, 4, 84, 84)
        prio.extend(helpers.rows_for_keys(control_fields, range(100)), priority=np.arange(100, dtype=np.float64))
        _, info = prio.sample(32, return_info=True)
        assert (info["priority"] > 0).all()
    finally:
        for b in (prio, eps):
            b.unlink()
            b.close()


def test_a_disk_filesystem_warns_and_works(shm_name, shm_dir, control_fields):
    if on_tmpfs(shm_dir):
        pytest.skip("the temporary directory is a tmpfs here: it gets huge pages")
    with pytest.warns(RuntimeWarning, match="no huge pages"):
        buf = ReplayBuffer.create(shm_name, capacity=60_000, fields=control_fields, path=shm_dir, huge_pages=True)
    try:
        assert buf.huge_page_bytes() == 0
        keys = list(range(500))
        buf.extend(helpers.rows_for_keys(control_fields, keys))
        helpers.assert_slots_hold_keys(buf, control_fields, keys)
    finally:
        buf.unlink()
        buf.close()


def test_a_warning_made_an_error_leaves_nothing_behind(shm_name, shm_dir, control_fields):
    if on_tmpfs(shm_dir):
        pytest.skip("the temporary directory is a tmpfs here: it gets huge pages")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):  # the name is free again after the first
            with pytest.raises(RuntimeWarning, match="no huge pages"):
                ReplayBuffer.create(shm_name, capacity=60_000, fields=control_fields, path=shm_dir, huge_pages=True)
    assert os.listdir(shm_dir) == []


def test_no_warning_when_smaps_cannot_tell(shm_name, shm_dir, control_fields, monkeypatch):
    monkeypatch.setattr(ReplayBuffer, "huge_page_bytes", lambda self: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buf = ReplayBuffer.create(shm_name, capacity=60_000, fields=control_fields, path=shm_dir, huge_pages=True)
    buf.unlink()
    buf.close()


def test_a_small_segment_does_not_warn(shm_name, control_fields):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields, huge_pages=True) as buf:
            assert buf.nbytes < 2 * MIB
            assert buf.huge_page_bytes() == 0


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_bad_values_are_refused_and_create_nothing(shm_name, control_fields, bad):
    with pytest.raises(TypeError, match="huge_pages"):
        ReplayBuffer.create(shm_name, capacity=100, fields=control_fields, huge_pages=bad)
    with pytest.raises(TypeError, match="huge_pages"):
        EpisodeBuffer.create(shm_name, capacity=100, fields={"obs": ((4,), np.float32), "reward": ((), np.float32)}, huge_pages=bad)
    assert not os.path.exists(helpers.segment_path(shm_name))


def test_closed_handle_refuses(shm_name, control_fields):
    buf = ReplayBuffer.create(shm_name, capacity=100, fields=control_fields)
    buf.unlink()
    buf.close()
    with pytest.raises(ValueError):
        buf.huge_page_bytes()
