"""Errors: the right exception, a message naming the culprit, and nothing written."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

import shmreplay
from shmreplay import EmptyBufferError, InsufficientSpaceError, ReplayBuffer

from helpers import (
    assert_row_equal,
    control_fields,
    expected_record_bytes,
    row_for_key,
    rows_for_keys,
    segment_path,
    snapshot_slots,
)

BAD_INPUT = (ValueError, TypeError)


# --------------------------------------------------------------------------- names


def test_create_existing_name_raises(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        buf.extend(rows_for_keys(control_fields, range(3)))
        with pytest.raises(FileExistsError):
            ReplayBuffer.create(shm_name, capacity=4, fields=control_fields)
        with pytest.raises(FileExistsError):  # even with another schema/capacity
            ReplayBuffer.create(shm_name, capacity=99, fields={"x": ((), "uint8")})
        # the existing buffer is untouched
        assert len(buf) == 3 and buf.capacity == 4
        assert buf.stats()["inserts"] == 3
        for k in range(3):
            assert_row_equal(buf[k], row_for_key(control_fields, k))
        other = ReplayBuffer.attach(shm_name)
        assert other.capacity == 4
        other.close()


def test_create_existing_name_in_path_dir(shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields, path=shm_dir):
        with pytest.raises(FileExistsError):
            ReplayBuffer.create(shm_name, capacity=4, fields=control_fields, path=shm_dir)
        # same name in another directory is a different buffer
        with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as b:
            assert b.path == segment_path(shm_name)


def test_attach_unknown_name(shm_name, shm_dir):
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(shm_name)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(shm_name, path=shm_dir)


@pytest.mark.parametrize("bad", ["a/b", "/abs", "a/", "", "..", "x" * 201, "y" * 1000])
def test_invalid_names(bad, control_fields, shm_dir):
    with pytest.raises(ValueError):
        ReplayBuffer.create(bad, capacity=4, fields=control_fields)
    with pytest.raises(ValueError):
        ReplayBuffer.create(bad, capacity=4, fields=control_fields, path=shm_dir)
    with pytest.raises(ValueError):
        ReplayBuffer.attach(bad)
    assert os.listdir(shm_dir) == []


def test_name_of_200_chars_is_valid(control_fields):
    from conftest import SESSION_PREFIX

    name = (SESSION_PREFIX + "y" * 200)[:200]
    with ReplayBuffer.create(name, capacity=2, fields=control_fields) as buf:
        assert buf.name == name
        assert os.path.exists(segment_path(name))


# --------------------------------------------------------------------------- create arguments


@pytest.mark.parametrize("cap", [0, -1, -(2**40)])
def test_capacity_must_be_positive(shm_name, control_fields, cap):
    with pytest.raises(ValueError):
        ReplayBuffer.create(shm_name, capacity=cap, fields=control_fields)
    assert not os.path.exists(segment_path(shm_name))


@pytest.mark.parametrize("cap", [1.5, 10.0, "10", None])
def test_capacity_must_be_int(shm_name, control_fields, cap):
    with pytest.raises(BAD_INPUT):
        ReplayBuffer.create(shm_name, capacity=cap, fields=control_fields)
    assert not os.path.exists(segment_path(shm_name))


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="no-fields"),
        pytest.param({"": ((), "float32")}, id="empty-field-name"),
        pytest.param({3: ((), "float32")}, id="non-str-field-name"),
        pytest.param({"x": ((), object)}, id="object"),
        pytest.param({"x": ((), "O")}, id="object-code"),
        pytest.param({"x": ((), str)}, id="str-type"),
        pytest.param({"x": ((), "U5")}, id="unicode"),
        pytest.param({"x": ((), "S3")}, id="bytes"),
        pytest.param({"x": ((), np.complex64)}, id="complex64"),
        pytest.param({"x": ((2,), "complex128")}, id="complex128"),
        pytest.param({"x": ((), "not-a-dtype")}, id="bogus-dtype"),
        pytest.param({"x": ((-1,), "float32")}, id="negative-dim"),
        pytest.param({"x": ((2.5,), "float32")}, id="float-dim"),
        pytest.param({"x": (("a",), "float32")}, id="str-dim"),
        pytest.param({"x": "float32"}, id="spec-not-a-pair"),
        pytest.param({"ok": ((), "float32"), "x": ((3,), "U2")}, id="second-field-bad"),
    ],
)
def test_invalid_field_specs(shm_name, fields):
    with pytest.raises(BAD_INPUT):
        ReplayBuffer.create(shm_name, capacity=4, fields=fields)
    assert not os.path.exists(segment_path(shm_name))


def test_schema_error_names_the_field(shm_name):
    with pytest.raises(BAD_INPUT, match="weird_field"):
        ReplayBuffer.create(shm_name, capacity=4, fields={"good": ((), "int8"), "weird_field": ((), "U3")})


# --------------------------------------------------------------------------- sample / empty


def test_sample_empty_buffer(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        with pytest.raises(EmptyBufferError):
            buf.sample(1)
        with pytest.raises(ValueError):  # EmptyBufferError is a ValueError
            buf.sample(32, return_info=True)
        other = ReplayBuffer.attach(shm_name)
        try:
            with pytest.raises(EmptyBufferError):
                other.sample(8)
        finally:
            other.close()
        assert buf.stats()["samples"] == 0
        buf.add(**row_for_key(control_fields, 0))
        assert buf.sample(2)["obs"].shape == (2, 17)


@pytest.mark.parametrize("bs", [0, -1])
def test_sample_batch_size_must_be_positive(shm_name, control_fields, bs):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        buf.extend(rows_for_keys(control_fields, range(4)))
        with pytest.raises(ValueError):
            buf.sample(bs)
        with pytest.raises(ValueError):
            buf.sample(bs, return_info=True)
        assert buf.stats()["samples"] == 0


# --------------------------------------------------------------------------- bad input writes nothing

FRAME = (4, 84, 84)
CAP = 8
PREFILL = 11  # wraps: every slot written, next write goes to slot 11 % 8 == 3


def _atari():
    return {
        "obs": (FRAME, np.uint8),
        "action": ((), np.int32),
        "reward": ((), np.float32),
        "next_obs": (FRAME, np.uint8),
        "done": ((), np.bool_),
    }


def _good_row(k=100):
    return row_for_key(_atari(), k)


def _good_batch(n=5, start=200):
    return rows_for_keys(_atari(), range(start, start + n))


def _bad_add_cases():
    g = _good_row
    cases = {}

    r = g(); del r["done"]
    cases["missing-field"] = (r, "done")
    r = g(); r["bogus"] = np.float32(1)
    cases["extra-field"] = (r, "bogus")
    r = g(); r["obs"] = np.zeros((4, 84, 83), np.uint8)
    cases["wrong-shape"] = (r, "obs")
    r = g(); r["next_obs"] = np.zeros((84, 84, 4), np.uint8)
    cases["transposed-shape"] = (r, "next_obs")
    r = g(); r["action"] = np.array([1, 2], np.int32)
    cases["scalar-field-given-vector"] = (r, "action")
    r = g(); r["obs"] = np.zeros((1, 4, 84, 84), np.uint8)
    cases["extra-leading-axis"] = (r, "obs")
    r = g(); r["obs"] = r["obs"].astype(np.float32)
    cases["float-into-uint8"] = (r, "obs")
    r = g(); r["action"] = 1.5
    cases["pyfloat-into-int32"] = (r, "action")
    r = g(); r["action"] = np.float64(2.0)
    cases["float64-into-int32"] = (r, "action")
    r = g(); r["reward"] = 1 + 2j
    cases["complex-into-float32"] = (r, "reward")
    r = g(); r["reward"] = np.complex64(1)
    cases["complex64-into-float32"] = (r, "reward")
    r = g(); r["done"] = "yes"
    cases["str-into-bool"] = (r, "done")
    r = g(); r["reward"] = None
    cases["none"] = (r, "reward")
    return cases


def _bad_extend_cases():
    g = _good_batch
    cases = {}

    b = g(); del b["reward"]
    cases["missing-field"] = (b, "reward")
    b = g(); b["bogus"] = np.zeros(5, np.float32)
    cases["extra-field"] = (b, "bogus")
    b = g(); b["done"] = b["done"][:4]
    cases["length-mismatch"] = (b, None)  # message must name one of the fields
    b = g(); b["obs"] = np.concatenate([b["obs"], b["obs"][:1]])
    cases["length-mismatch-first"] = (b, None)
    b = g(); b["obs"] = b["obs"][:, :, :, :80]
    cases["wrong-row-shape"] = (b, "obs")
    b = g(); b["action"] = np.int32(3)
    cases["0d-for-batch"] = (b, "action")
    b = g(); b["next_obs"] = b["next_obs"][0]
    cases["row-for-batch"] = (b, "next_obs")
    b = g(); b["action"] = b["action"].astype(np.float64)
    cases["float-into-int32"] = (b, "action")
    b = g(); b["done"] = b["done"].astype(np.complex128)  # the LAST field is the bad one
    cases["last-field-bad-dtype"] = (b, "done")
    b = g(); b["reward"] = b["reward"].astype(np.complex64)
    cases["complex-into-float"] = (b, "reward")
    b = g(); b["obs"] = b["obs"].astype(np.float16)
    cases["float16-into-uint8"] = (b, "obs")
    b = g(n=3 * CAP); b["done"] = b["done"].astype(np.float32)  # bigger than capacity
    cases["wrapping-batch-bad-last-field"] = (b, "done")
    b = g(n=3 * CAP); b["done"] = b["done"][:-1]
    cases["wrapping-batch-length-mismatch"] = (b, None)
    return cases


@pytest.fixture
def prefilled(shm_name):
    fields = _atari()
    buf = ReplayBuffer.create(shm_name, capacity=CAP, fields=fields)
    try:
        buf.extend(rows_for_keys(fields, range(PREFILL)))
        yield buf
    finally:
        buf.close()
        if os.path.exists(segment_path(shm_name)):
            shmreplay.remove(shm_name)


def _assert_nothing_written(buf, before_snapshot, before_len, before_inserts):
    assert len(buf) == before_len, f"len changed: {before_len} -> {len(buf)}"
    assert buf.stats()["inserts"] == before_inserts, "inserts changed"
    after = snapshot_slots(buf)
    assert after.keys() == before_snapshot.keys(), "set of readable slots changed"
    for i, row in before_snapshot.items():
        assert_row_equal(after[i], row, where=f"slot {i} after a rejected insert")


def _assert_next_insert_gets_next_ticket(buf, fields, expected_key):
    """The rejected call consumed no ticket: the next good row gets the next key."""
    before = buf.stats()["inserts"]
    buf.add(**row_for_key(fields, expected_key))
    assert buf.stats()["inserts"] == before + 1
    assert_row_equal(buf[expected_key % buf.capacity], row_for_key(fields, expected_key))
    _, info = buf.sample(200, return_info=True)
    assert int(info["key"].max()) == expected_key


def _check_message(exc, culprit, fields):
    msg = str(exc.value)
    if culprit is not None:
        assert culprit in msg, f"message does not name field {culprit!r}: {msg!r}"
    else:
        assert any(f in msg for f in fields), f"message names no field: {msg!r}"


@pytest.mark.parametrize("case", sorted(_bad_add_cases()))
def test_bad_add_writes_nothing(prefilled, case):
    buf = prefilled
    row, culprit = _bad_add_cases()[case]
    snap = snapshot_slots(buf)
    inserts = buf.stats()["inserts"]
    assert len(snap) == CAP
    with pytest.raises(BAD_INPUT) as exc:
        buf.add(**row)
    _check_message(exc, culprit, _atari())
    _assert_nothing_written(buf, snap, CAP, inserts)
    _assert_next_insert_gets_next_ticket(buf, _atari(), PREFILL)


@pytest.mark.parametrize("case", sorted(_bad_extend_cases()))
def test_bad_extend_writes_nothing(prefilled, case):
    buf = prefilled
    batch, culprit = _bad_extend_cases()[case]
    snap = snapshot_slots(buf)
    inserts = buf.stats()["inserts"]
    with pytest.raises(BAD_INPUT) as exc:
        buf.extend(batch)
    _check_message(exc, culprit, _atari())
    _assert_nothing_written(buf, snap, CAP, inserts)
    _assert_next_insert_gets_next_ticket(buf, _atari(), PREFILL)


def test_bad_input_on_empty_buffer_writes_nothing(shm_name):
    fields = _atari()
    with ReplayBuffer.create(shm_name, capacity=CAP, fields=fields) as buf:
        for case, (row, _) in sorted(_bad_add_cases().items()):
            with pytest.raises(BAD_INPUT):
                buf.add(**row)
        for case, (batch, _) in sorted(_bad_extend_cases().items()):
            with pytest.raises(BAD_INPUT):
                buf.extend(batch)
        assert len(buf) == 0
        assert buf.stats()["inserts"] == 0
        with pytest.raises(EmptyBufferError):
            buf.sample(1)
        for i in range(CAP):
            with pytest.raises(IndexError):
                buf[i]
        _assert_next_insert_gets_next_ticket(buf, fields, 0)


def test_extend_non_mapping_rejected(prefilled):
    snap = snapshot_slots(prefilled)
    inserts = prefilled.stats()["inserts"]
    for bad in ([1, 2, 3], None, 5):
        with pytest.raises(BAD_INPUT):
            prefilled.extend(bad)
    _assert_nothing_written(prefilled, snap, CAP, inserts)


# --------------------------------------------------------------------------- attach validation


def test_attach_foreign_file_is_a_clear_error(shm_name, shm_dir):
    path = segment_path(shm_name, shm_dir)
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 16))
    os.chmod(path, 0o600)
    with pytest.raises((ValueError, OSError)):
        ReplayBuffer.attach(shm_name, path=shm_dir)
    with open(path, "wb") as f:
        f.write(b"\0" * 100)  # too short for any header
    with pytest.raises((ValueError, OSError)):
        ReplayBuffer.attach(shm_name, path=shm_dir)


def test_attach_truncated_segment_is_a_clear_error(name_factory, shm_dir, control_fields):
    name = name_factory()
    with ReplayBuffer.create(name, capacity=1000, fields=control_fields, path=shm_dir) as buf:
        buf.extend(rows_for_keys(control_fields, range(10)))
        src = buf.path
        copy_name = name_factory()
        dst = segment_path(copy_name, shm_dir)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
        # an intact copy attaches (sanity check of the method), a truncated one must not
        good = ReplayBuffer.attach(copy_name, path=shm_dir)
        assert len(good) == 10
        good.close()
        os.truncate(dst, buf.nbytes // 2)
        with pytest.raises((ValueError, OSError)):
            ReplayBuffer.attach(copy_name, path=shm_dir)


# --------------------------------------------------------------------------- space reservation

FIX_HINTS = ("--shm-size", "shm-size", "emptyDir", "path=")


def _free_bytes(directory) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _check_space_error(err, directory, needed_at_least):
    assert isinstance(err, MemoryError)
    msg = str(err)
    low = msg.lower()
    assert "need" in low, msg
    assert "free" in low or "available" in low, msg
    assert re.search(r"\d", msg), msg
    assert any(h in msg for h in FIX_HINTS), f"message names no fix: {msg!r}"
    assert err.needed >= needed_at_least, (err.needed, needed_at_least)
    assert err.free < err.needed
    assert str(directory) in err.path, (err.path, str(directory))


def test_insufficient_space_small_tmpfs(small_tmpfs, shm_name):
    fields = control_fields()
    cap = 100_000  # ~18 MB > 8 MiB
    needed = cap * expected_record_bytes(fields)
    free_before = _free_bytes(small_tmpfs)
    with pytest.raises(InsufficientSpaceError) as exc:
        ReplayBuffer.create(shm_name, capacity=cap, fields=fields, path=small_tmpfs)
    _check_space_error(exc.value, small_tmpfs, needed)
    assert exc.value.free <= 8 * 2**20
    assert os.listdir(small_tmpfs) == [], "a file was left behind"
    assert _free_bytes(small_tmpfs) == free_before
    # a buffer that fits still works there
    with ReplayBuffer.create(shm_name, capacity=1000, fields=fields, path=small_tmpfs) as buf:
        buf.extend(rows_for_keys(fields, range(1000)))
        assert len(buf) == 1000


def test_insufficient_space_partially_full_tmpfs(small_tmpfs, shm_name):
    """Needs less than the tmpfs size but more than what is free: no partial reservation
    may survive the failure."""
    fields = control_fields()
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\1" * (6 * 2**20))
    cap = 20_000  # ~3.7 MB > ~2 MiB free
    needed = cap * expected_record_bytes(fields)
    free_before = _free_bytes(small_tmpfs)
    assert needed > free_before
    with pytest.raises(InsufficientSpaceError) as exc:
        ReplayBuffer.create(shm_name, capacity=cap, fields=fields, path=small_tmpfs)
    _check_space_error(exc.value, small_tmpfs, needed)
    assert sorted(os.listdir(small_tmpfs)) == ["filler"], "a file was left behind"
    assert _free_bytes(small_tmpfs) == free_before, "space leaked by the failed create"
    os.unlink(filler)
    with ReplayBuffer.create(shm_name, capacity=cap, fields=fields, path=small_tmpfs) as buf:
        # the full size is reserved up front
        st = os.stat(buf.path)
        assert st.st_blocks * 512 >= buf.nbytes
        buf.extend(rows_for_keys(fields, range(cap)))
        assert len(buf) == cap


def test_space_is_reserved_up_front(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=50_000, fields=control_fields) as buf:
        st = os.stat(buf.path)
        assert st.st_size == buf.nbytes
        assert st.st_blocks * 512 >= buf.nbytes, "tmpfs pages not reserved (sparse file)"


def test_insufficient_space_dev_shm(shm_name):
    fields = control_fields()
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    if total == 0:
        pytest.skip("/dev/shm has no size limit")
    # Far more than the whole filesystem: the kernel refuses it up front, nothing is touched.
    cap = 4 * max(total, _free_bytes("/dev/shm")) // expected_record_bytes(fields) + 1
    needed = cap * expected_record_bytes(fields)
    with pytest.raises(InsufficientSpaceError) as exc:
        ReplayBuffer.create(shm_name, capacity=cap, fields=fields)
    _check_space_error(exc.value, "/dev/shm", needed)
    assert not os.path.exists(segment_path(shm_name))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(shm_name)


# --------------------------------------------------------------------------- exception hierarchy

# (class, the built-in base it keeps, arguments of an instance like the ones the core raises)
HIERARCHY = [
    (shmreplay.InsufficientSpaceError, MemoryError, ("need 10 bytes, 3 free", 10, 3, "/dev/shm/shmreplay.x")),
    (shmreplay.EmptyBufferError, ValueError, ("the replay buffer is empty: nothing to sample yet",)),
    (shmreplay.CorruptSegmentError, ValueError, ("/dev/shm/shmreplay.x is not a usable shmreplay segment",)),
    (shmreplay.ContendedError, TimeoutError, ("slot 3 stayed busy for 5 s",)),
    (shmreplay.TooManyHandlesError, RuntimeError, ("all 1024 handle entries of this buffer are in use",)),
    (shmreplay.ShutdownError, RuntimeError, ("the replay buffer was shut down: calls that would wait fail",)),
]
HIERARCHY_IDS = [cls.__name__ for cls, _, _ in HIERARCHY]


def test_every_exception_is_exported():
    from shmreplay import _errors

    names = {cls.__name__ for cls, _, _ in HIERARCHY} | {"ShmReplayError"}
    assert names <= set(shmreplay.__all__)
    for name in names:
        assert getattr(shmreplay, name) is getattr(_errors, name)
        assert getattr(shmreplay, name).__module__ == "shmreplay._errors"
        assert getattr(shmreplay, name).__doc__, f"{name} has no docstring"
    # every exception class defined in _errors is in the hierarchy (and exported)
    defined = {n for n, v in vars(_errors).items() if isinstance(v, type) and issubclass(v, BaseException)}
    assert defined == names
    assert issubclass(shmreplay.ShmReplayError, Exception)
    assert not issubclass(shmreplay.ShmReplayError, (ValueError, OSError, MemoryError, RuntimeError))


@pytest.mark.parametrize("cls,builtin,args", HIERARCHY, ids=HIERARCHY_IDS)
def test_exception_has_both_bases(cls, builtin, args):
    assert issubclass(cls, shmreplay.ShmReplayError) and issubclass(cls, builtin)
    err = cls(*args)
    assert isinstance(err, shmreplay.ShmReplayError)
    assert isinstance(err, builtin)
    assert str(err) == args[0]
    # the same exception type is not derived from any other family by accident
    others = {MemoryError, ValueError, TimeoutError, RuntimeError} - {builtin}
    assert not any(isinstance(err, o) for o in others if not issubclass(builtin, o)), cls.__mro__


@pytest.mark.parametrize("cls,builtin,args", HIERARCHY, ids=HIERARCHY_IDS)
def test_except_clauses_catch_each(cls, builtin, args):
    with pytest.raises(cls):
        try:
            raise cls(*args)
        except shmreplay.ShmReplayError as caught:
            assert type(caught) is cls
            raise
    try:
        raise cls(*args)
    except builtin as caught:  # the built-in base still catches it
        assert type(caught) is cls


@pytest.mark.parametrize("cls,builtin,args", HIERARCHY, ids=HIERARCHY_IDS)
def test_exception_pickles(cls, builtin, args):
    import pickle

    err = cls(*args)
    err.add_note("raised in a child process")
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(err, protocol=protocol))
        assert type(copy) is cls
        assert str(copy) == str(err)
        assert copy.args == err.args
        assert copy.__notes__ == ["raised in a child process"]
    if cls is shmreplay.InsufficientSpaceError:
        assert (copy.needed, copy.free, copy.path) == (10, 3, "/dev/shm/shmreplay.x")


def _raise_in_child(index: int) -> None:
    cls, _, args = HIERARCHY[index]
    raise cls(*args)


def test_exceptions_cross_process_boundaries():
    """A ``concurrent.futures`` pool pickles the exception a child raised back to the parent."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        for i, (cls, builtin, args) in enumerate(HIERARCHY):
            with pytest.raises(cls) as exc:
                pool.submit(_raise_in_child, i).result(timeout=60)
            assert isinstance(exc.value, shmreplay.ShmReplayError) and isinstance(exc.value, builtin)
            assert str(exc.value) == args[0]


# --------------------------------------------------------------------------- raised by the core


def test_core_raises_the_hierarchy(shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        with pytest.raises(shmreplay.ShmReplayError) as exc:
            buf.sample(1)
        assert type(exc.value) is EmptyBufferError
    path = segment_path(shm_name, shm_dir)
    with open(path, "wb") as f:
        f.write(b"\0" * (1 << 16))
    os.chmod(path, 0o600)
    with pytest.raises(shmreplay.ShmReplayError) as exc:
        ReplayBuffer.attach(shm_name, path=shm_dir)
    assert isinstance(exc.value, shmreplay.CorruptSegmentError), repr(exc.value)


def test_too_many_handles(shm_name, control_fields):
    """Every handle takes one entry of the buffer's fixed table; once all are taken, the next
    attach raises TooManyHandlesError, and closing one makes room again."""
    handles = []
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        try:
            with pytest.raises(shmreplay.ShmReplayError) as exc:
                for _ in range(100_000):
                    handles.append(ReplayBuffer.attach(shm_name))
            err = exc.value
            assert type(err) is shmreplay.TooManyHandlesError, repr(err)
            assert isinstance(err, RuntimeError)
            assert "handle" in str(err)
            assert buf.stats()["attached"] == len(handles) + 1
            handles.pop().close()
            handles.append(ReplayBuffer.attach(shm_name))
        finally:
            for h in handles:
                h.close()
        assert buf.stats()["attached"] == 1


def _hold_slot_mid_copy(name, fields, conn) -> None:
    """Child: inserts one row and stops for good inside its copy, slot claimed, after telling
    the parent which slot it holds. It stays alive: a live writer, not a dead one."""
    import time

    import helpers

    buf = ReplayBuffer.attach(name)

    def pause(slot: int) -> None:
        conn.send(slot)
        while True:
            time.sleep(60)

    batch = rows_for_keys(fields, [1])
    if hasattr(helpers, "extend_pausing"):
        helpers.extend_pausing(buf, batch, pause, "copy")
    else:  # the hook of older builds
        buf._raw.extend_pausing(buf._columns(batch, (1,)), pause)


def test_contended_slot_raises_contended_error(shm_name, control_fields):
    """A live writer stopped inside its copy of the only slot of a ring: a reader of that slot
    (``buf[0]``) and the next writer of that slot (``add``) give up after their bound with
    ContendedError (a TimeoutError), neither hanging nor returning a torn row. Both wait at
    once, in two threads (the waits release the GIL), so the test waits the bound only once."""
    import concurrent.futures
    import multiprocessing
    import signal
    import time

    from helpers import wait_until

    with ReplayBuffer.create(shm_name, capacity=1, fields=control_fields) as buf:
        buf.add(**row_for_key(control_fields, 0))
        ctx = multiprocessing.get_context("fork")
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_hold_slot_mid_copy, args=(shm_name, control_fields, child_end), daemon=True)
        proc.start()
        writer = ReplayBuffer.attach(shm_name)
        try:
            assert wait_until(lambda: parent_end.poll() or not proc.is_alive(), timeout=60)
            assert parent_end.poll(), f"the writer never reached its copy (exit code {proc.exitcode})"
            assert parent_end.recv() == 0

            def outcome(call):
                started = time.monotonic()
                try:
                    call()
                except BaseException as e:  # noqa: BLE001 - reported below
                    return e, time.monotonic() - started
                return None, time.monotonic() - started

            with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                read = pool.submit(outcome, lambda: buf[0])
                add = pool.submit(outcome, lambda: writer.add(**row_for_key(control_fields, 2)))
                results = {"buf[0]": read.result(timeout=120), "add": add.result(timeout=120)}
            for what, (err, waited) in results.items():
                assert isinstance(err, shmreplay.ShmReplayError), (what, repr(err))
                assert type(err) is shmreplay.ContendedError, (what, repr(err))
                assert isinstance(err, TimeoutError)
                assert waited < 60, (what, waited)
            assert proc.is_alive(), "the stopped writer must still be alive for this test"
        finally:
            writer.close()
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(30)
