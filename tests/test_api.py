"""The public API, in one process: create/attach, add/extend/sample/getitem, stats,
properties, the context manager, unlink, pickle."""

from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest

import shmreplay
from shmreplay import ReplayBuffer

import helpers
from helpers import (
    SUPPORTED_DTYPES,
    assert_row_equal,
    assert_slots_hold_keys,
    expected_record_bytes,
    normalize_fields,
    row_for_key,
    rows_for_keys,
    segment_path,
    take_row,
)

STATS_KEYS = {"capacity", "size", "inserts", "samples", "retries", "recovered", "superseded", "lost", "attached"}


# --------------------------------------------------------------------------- create / attach


def test_module_surface():
    assert isinstance(shmreplay.__version__, str) and shmreplay.__version__
    assert issubclass(shmreplay.InsufficientSpaceError, MemoryError)
    assert issubclass(shmreplay.EmptyBufferError, ValueError)
    assert shmreplay.DEFAULT_DIR == "/dev/shm"


def test_create_properties(shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=64, fields=atari_fields) as buf:
        assert buf.name == shm_name
        assert buf.path == segment_path(shm_name)
        assert os.path.isfile(buf.path)
        mode = stat.S_IMODE(os.stat(buf.path).st_mode)
        assert mode == 0o600, oct(mode)
        assert buf.capacity == 64
        assert buf.fields == normalize_fields(atari_fields)
        for shape, dtype in buf.fields.values():
            assert isinstance(shape, tuple)
            assert isinstance(dtype, np.dtype)
        assert buf.record_bytes == expected_record_bytes(atari_fields)
        assert buf.record_bytes % 8 == 0
        assert buf.nbytes == os.path.getsize(buf.path)
        assert buf.nbytes >= buf.capacity * buf.record_bytes
        assert buf.is_owner is True
        assert buf.closed is False
        assert len(buf) == 0
        assert os.getpid() in buf.processes()


def test_record_bytes_pads_each_field_to_8():
    fields = {"a": ((), np.bool_), "b": ((3,), np.uint8), "c": ((5,), np.float16), "d": ((), np.float64)}
    with ReplayBuffer.create(capacity=4, fields=fields) as buf:
        assert buf.record_bytes == 8 + 8 + 16 + 8


def test_create_without_name_gives_unique_names(control_fields):
    with ReplayBuffer.create(capacity=8, fields=control_fields) as a, ReplayBuffer.create(
        None, capacity=8, fields=control_fields
    ) as b:
        assert isinstance(a.name, str) and a.name
        assert a.name != b.name
        assert os.path.exists(a.path) and os.path.exists(b.path)
        other = ReplayBuffer.attach(a.name)
        try:
            assert other.capacity == 8
        finally:
            other.close()
        paths = (a.path, b.path)
    for p in paths:
        assert not os.path.exists(p)


def test_field_spec_forms_are_normalised(shm_name):
    fields = {
        "a": (5, "float32"),  # int shape, string dtype
        "b": ((), np.int16),  # numpy scalar type
        "c": ((2, 3), np.dtype("uint64")),  # np.dtype
        "d": ((4,), "bool"),  # string dtype
        "e": ((), float),  # python type
        "f": ((1,), "f8"),  # short code
    }
    with ReplayBuffer.create(shm_name, capacity=3, fields=fields) as buf:
        assert buf.fields == {
            "a": ((5,), np.dtype(np.float32)),
            "b": ((), np.dtype(np.int16)),
            "c": ((2, 3), np.dtype(np.uint64)),
            "d": ((4,), np.dtype(np.bool_)),
            "e": ((), np.dtype(np.float64)),
            "f": ((1,), np.dtype(np.float64)),
        }
        buf.add(a=np.arange(5), b=3, c=np.ones((2, 3), np.uint64), d=[True, False, True, False], e=1.5, f=[2.0])
        row = buf[0]
        assert np.asarray(row["a"]).dtype == np.float32
        assert np.array_equal(np.asarray(row["a"]), np.arange(5, dtype=np.float32))
        assert np.asarray(row["b"]) == 3
        assert np.asarray(row["e"]) == 1.5


def test_attach_sees_same_schema_and_data(shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=16, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(5)))
        other = ReplayBuffer.attach(shm_name)
        try:
            assert other.name == shm_name
            assert other.path == buf.path
            assert other.capacity == 16
            assert other.fields == buf.fields
            assert other.record_bytes == buf.record_bytes
            assert other.nbytes == buf.nbytes
            assert other.is_owner is False
            assert len(other) == 5
            assert_slots_hold_keys(other, atari_fields, range(5))
            # writes through either handle are visible through the other
            other.add(**row_for_key(atari_fields, 5))
            assert len(buf) == 6
            assert_slots_hold_keys(buf, atari_fields, range(6))
        finally:
            other.close()


def test_path_directory(shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields, path=shm_dir) as buf:
        assert buf.path == segment_path(shm_name, shm_dir)
        assert os.path.isfile(buf.path)
        assert stat.S_IMODE(os.stat(buf.path).st_mode) == 0o600
        assert not os.path.exists(segment_path(shm_name))
        buf.extend(rows_for_keys(control_fields, range(3)))
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(shm_name)  # not in /dev/shm
        other = ReplayBuffer.attach(shm_name, path=str(shm_dir))  # str path works too
        try:
            assert_slots_hold_keys(other, control_fields, range(3))
        finally:
            other.close()
    assert not os.path.exists(segment_path(shm_name, shm_dir))


def test_list_buffers(shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields, path=shm_dir) as buf:
        buf.extend(rows_for_keys(control_fields, range(4)))
        infos = shmreplay.list_buffers(path=shm_dir)
        assert [i["name"] for i in infos] == [shm_name]
        info = infos[0]
        assert info["capacity"] == 10
        assert info["size"] == 4
        assert info["record_bytes"] == buf.record_bytes
        assert info["bytes"] == buf.nbytes
        assert info["path"] == buf.path
        assert info["attached"] >= 1
        assert info["stale"] is False
    assert shmreplay.list_buffers(path=shm_dir) == []


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", SUPPORTED_DTYPES)
def test_round_trip_every_dtype(shm_name, dtype):
    fields = {"scalar": ((), dtype), "vec": ((3,), dtype), "cube": ((2, 3, 4), dtype)}
    with ReplayBuffer.create(shm_name, capacity=8, fields=fields) as buf:
        assert buf.fields == normalize_fields(fields)
        rows = rows_for_keys(fields, range(6))
        buf.add(**take_row(rows, 0))
        buf.extend({k: v[1:] for k, v in rows.items()})
        assert len(buf) == 6
        for i in range(6):
            assert_row_equal(buf[i], take_row(rows, i), where=f"buf[{i}]")
        batch, info = buf.sample(20, return_info=True)
        for name, (shape, dt) in normalize_fields(fields).items():
            assert batch[name].shape == (20, *shape)
            assert batch[name].dtype == dt
            assert np.array_equal(batch[name], rows[name][info["index"]])


def test_round_trip_mixed_schema_alignment(shm_name):
    """All dtypes with odd sizes in one record: padding must not shift any field."""
    fields = {f"f_{dt}": ((3,), dt) for dt in SUPPORTED_DTYPES}
    fields["tail"] = ((), "uint8")
    with ReplayBuffer.create(shm_name, capacity=5, fields=fields) as buf:
        assert buf.record_bytes == expected_record_bytes(fields)
        buf.extend(rows_for_keys(fields, range(12)))  # wraps
        assert_slots_hold_keys(buf, fields, range(7, 12))


def test_extreme_values_round_trip(shm_name):
    fields = {"i64": ((2,), np.int64), "u64": ((2,), np.uint64), "f64": ((4,), np.float64), "f16": ((2,), np.float16)}
    with ReplayBuffer.create(shm_name, capacity=2, fields=fields) as buf:
        i64 = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max])
        u64 = np.array([0, np.iinfo(np.uint64).max], dtype=np.uint64)
        f64 = np.array([np.inf, -np.inf, -0.0, 5e-324])
        f16 = np.array([65504, -65504], dtype=np.float16)
        buf.add(i64=i64, u64=u64, f64=f64, f16=f16)
        row = buf[0]
        assert np.array_equal(np.asarray(row["i64"]), i64)
        assert np.array_equal(np.asarray(row["u64"]), u64)
        assert np.array_equal(np.asarray(row["f64"]), f64)
        assert np.signbit(np.asarray(row["f64"])[2])
        assert np.array_equal(np.asarray(row["f16"]), f16)
        buf.add(i64=i64, u64=u64, f64=np.array([np.nan, 1, 2, 3]), f16=f16)
        assert np.isnan(np.asarray(buf[1]["f64"])[0])


def test_python_scalars_and_lists(shm_name):
    fields = {"obs": ((3,), np.float32), "action": ((), np.int32), "reward": ((), np.float32), "done": ((), np.bool_)}
    with ReplayBuffer.create(shm_name, capacity=4, fields=fields) as buf:
        buf.add(obs=[1.0, 2.0, 3.0], action=3, reward=1.0, done=False)
        buf.add(obs=(4, 5, 6), action=np.int64(-7), reward=2, done=True)  # int -> float32 is same_kind
        buf.extend({"obs": [[7, 8, 9], [0.5, 0.25, 0.125]], "action": [1, 2], "reward": [0.5, -0.5], "done": [True, False]})
        assert len(buf) == 4
        r0, r1, r3 = buf[0], buf[1], buf[3]
        assert np.array_equal(np.asarray(r0["obs"]), np.array([1, 2, 3], np.float32))
        assert np.asarray(r0["action"]) == 3 and np.asarray(r0["action"]).dtype == np.int32
        assert np.asarray(r0["reward"]) == 1.0
        assert not bool(np.asarray(r0["done"]))
        assert np.asarray(r1["action"]) == -7
        assert np.asarray(r1["reward"]) == 2.0
        assert bool(np.asarray(r1["done"]))
        assert np.array_equal(np.asarray(r3["obs"]), np.array([0.5, 0.25, 0.125], np.float32))
        assert np.asarray(r3["action"]) == 2


def test_same_kind_casts_are_accepted(shm_name):
    fields = {"x": ((4,), np.float32), "n": ((), np.int8), "u": ((2,), np.uint16)}
    with ReplayBuffer.create(shm_name, capacity=4, fields=fields) as buf:
        x = np.array([[0.1, 1e10, -2.5, 3.0]], dtype=np.float64)
        buf.extend({"x": x, "n": np.array([5], np.int64), "u": np.array([[1, 2]], np.uint32)})
        row = buf[0]
        assert np.array_equal(np.asarray(row["x"]), x[0].astype(np.float32))
        assert np.asarray(row["n"]) == 5 and np.asarray(row["n"]).dtype == np.int8
        assert np.array_equal(np.asarray(row["u"]), np.array([1, 2], np.uint16))


def test_non_contiguous_input(shm_name):
    fields = {"img": ((3, 4, 5), np.uint8), "v": ((6,), np.float64)}
    rows = rows_for_keys(fields, range(8))
    big_img = np.zeros((8, 2, 3, 4, 5), np.uint8)
    big_img[:, 1] = rows["img"]
    img_view = big_img[:, 1]  # non-contiguous
    v_f = np.asfortranarray(rows["v"])  # Fortran order
    v_strided = np.repeat(rows["v"], 2, axis=0)[::2]
    assert not img_view.flags.c_contiguous and not v_f.flags.c_contiguous
    with ReplayBuffer.create(shm_name, capacity=8, fields=fields) as buf:
        buf.extend({"img": img_view, "v": v_f})
        assert_slots_hold_keys(buf, fields, range(8))
        buf.add(img=np.asfortranarray(rows["img"][3]), v=v_strided[3])
        assert_row_equal(buf[0], take_row(rows, 3))


def test_extend_wraps_around_ring(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields) as buf:
        buf.extend(rows_for_keys(control_fields, range(25)))
        assert len(buf) == 10
        # (stats()["inserts"] counts committed rows; rows of one extend that the same extend
        # overwrites need not be committed, so only the tickets are checked here)
        assert_slots_hold_keys(buf, control_fields, range(15, 25))
        # the same through uneven chunks
        with ReplayBuffer.create(capacity=10, fields=control_fields) as buf2:
            for lo, hi in [(0, 3), (3, 12), (12, 13), (13, 25)]:
                buf2.extend(rows_for_keys(control_fields, range(lo, hi)))
            assert len(buf2) == 10
            for i in range(10):
                assert_row_equal(buf2[i], buf[i], where=f"slot {i}")
        _, info = buf.sample(500, return_info=True)
        keys = info["key"]
        assert keys.min() >= 15 and keys.max() <= 24
        assert set(info["index"].tolist()) == set(range(10))  # all slots are reachable
        # the ticket counter moved by all 25 rows: the next row is key 25, at slot 5
        buf.add(**row_for_key(control_fields, 25))
        assert_slots_hold_keys(buf, control_fields, range(16, 26))
        _, info = buf.sample(500, return_info=True)
        assert int(info["key"].max()) == 25 and int(info["key"].min()) == 16


def test_add_wraps_around_ring(shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=3, fields=atari_fields) as buf:
        for k in range(8):
            buf.add(**row_for_key(atari_fields, k))
            assert len(buf) == min(k + 1, 3)
        assert_slots_hold_keys(buf, atari_fields, range(5, 8))


def test_add_and_extend_are_equivalent(name_factory, atari_fields):
    rows = rows_for_keys(atari_fields, range(13))
    with ReplayBuffer.create(name_factory(), capacity=5, fields=atari_fields) as a, ReplayBuffer.create(
        name_factory(), capacity=5, fields=atari_fields
    ) as b:
        for i in range(13):
            a.add(**take_row(rows, i))
        b.extend(rows)
        assert len(a) == len(b) == 5
        assert a.stats()["inserts"] == 13
        for i in range(5):
            assert_row_equal(a[i], b[i], where=f"slot {i}")
        assert_slots_hold_keys(a, atari_fields, range(8, 13))


def test_extend_single_row_and_capacity_one(shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=1, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, [0]))
        assert len(buf) == 1
        buf.extend(rows_for_keys(atari_fields, range(1, 4)))
        assert len(buf) == 1
        assert_slots_hold_keys(buf, atari_fields, [3])
        batch, info = buf.sample(4, return_info=True)
        assert info["index"].tolist() == [0, 0, 0, 0]
        assert info["key"].tolist() == [3, 3, 3, 3]


# --------------------------------------------------------------------------- sample


def test_sample_shapes_and_info(shm_name, atari_fields):
    with ReplayBuffer.create(shm_name, capacity=16, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(40)))
        batch = buf.sample(32)
        assert isinstance(batch, dict)
        assert set(batch) == set(atari_fields)
        for name, (shape, dtype) in normalize_fields(atari_fields).items():
            assert batch[name].shape == (32, *shape)
            assert batch[name].dtype == dtype
        batch, info = buf.sample(32, return_info=True)
        assert set(info) >= {"index", "key"}
        idx, key = info["index"], info["key"]
        assert idx.dtype == np.int64 and idx.shape == (32,)
        assert key.dtype == np.uint64 and key.shape == (32,)
        assert np.all((idx >= 0) & (idx < 16))
        assert np.array_equal(key % np.uint64(16), idx.astype(np.uint64))
        assert key.min() >= 40 - 16 and key.max() < 40
        expected = rows_for_keys(atari_fields, key)
        for name in atari_fields:
            assert np.array_equal(batch[name], expected[name]), name
        for j in range(32):
            assert_row_equal(take_row(batch, j), buf[int(idx[j])], where=f"sample row {j}")


def test_keys_are_global_insert_tickets(shm_name, control_fields):
    """The k-th inserted row overall (add or extend) has key k, at slot k % capacity."""
    with ReplayBuffer.create(shm_name, capacity=7, fields=control_fields) as buf:
        k = 0
        for step in range(6):
            if step % 2:
                buf.add(**row_for_key(control_fields, k))
                k += 1
            else:
                buf.extend(rows_for_keys(control_fields, range(k, k + 4)))
                k += 4
        _, info = buf.sample(400, return_info=True)
        assert sorted(set(info["key"].tolist())) == list(range(k - 7, k))
        for key, idx in zip(info["key"].tolist(), info["index"].tolist()):
            assert idx == key % 7


def test_sample_more_than_size_draws_with_replacement(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=100, fields=control_fields) as buf:
        buf.extend(rows_for_keys(control_fields, range(3)))
        batch, info = buf.sample(64, return_info=True)
        assert batch["obs"].shape == (64, 17)
        assert set(info["index"].tolist()) <= {0, 1, 2}
        expected = rows_for_keys(control_fields, info["key"])
        for name in control_fields:
            assert np.array_equal(batch[name], expected[name])


def test_sample_returns_fresh_owned_arrays(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        buf.add(**row_for_key(control_fields, 0))  # one row: every sample reads slot 0
        b1 = buf.sample(5)
        b2 = buf.sample(5)
        row = buf[0]
        for name, arr in b1.items():
            assert isinstance(arr, np.ndarray)
            assert arr.flags.c_contiguous, name
            assert arr.flags.writeable, name
            assert not np.shares_memory(arr, b2[name]), name
            r = np.asarray(row[name])
            assert not np.shares_memory(arr, r), name
        # mutating a sample changes neither the buffer nor later samples
        for arr in b1.values():
            arr[...] = 0
        assert_row_equal(buf[0], row_for_key(control_fields, 0))
        b3 = buf.sample(5)
        exp = rows_for_keys(control_fields, [0] * 5)
        for name in control_fields:
            assert np.array_equal(b3[name], exp[name])
        assert np.array_equal(b2["obs"], exp["obs"])


def test_getitem_returns_a_copy(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        buf.add(**row_for_key(control_fields, 0))
        row = buf[0]
        assert set(row) == set(control_fields)
        for name, val in row.items():
            arr = val
            if isinstance(arr, np.ndarray) and arr.flags.writeable and arr.size:
                arr[...] = 1
        assert_row_equal(buf[0], row_for_key(control_fields, 0))


def test_sample_covers_all_slots(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields) as buf:
        buf.extend(rows_for_keys(control_fields, range(10)))
        _, info = buf.sample(2000, return_info=True)
        counts = np.bincount(info["index"], minlength=10)
        assert counts.shape == (10,)
        assert np.all(counts > 0), counts


# --------------------------------------------------------------------------- getitem


def test_getitem_indexing(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=10, fields=control_fields) as buf:
        with pytest.raises(IndexError):
            buf[0]  # never written
        buf.extend(rows_for_keys(control_fields, range(3)))
        assert_row_equal(buf[2], row_for_key(control_fields, 2))
        assert_row_equal(buf[np.int64(1)], row_for_key(control_fields, 1))
        for bad in (3, 9, -1, -7):  # in range but never written
            with pytest.raises(IndexError):
                buf[bad]
        for bad in (10, 11, -11, 10**12):  # out of range
            with pytest.raises(IndexError):
                buf[bad]
        buf.extend(rows_for_keys(control_fields, range(3, 10)))
        assert_row_equal(buf[-1], row_for_key(control_fields, 9))
        assert_row_equal(buf[-10], row_for_key(control_fields, 0))
        with pytest.raises(IndexError):
            buf[-11]


# --------------------------------------------------------------------------- stats / len


def test_stats_counters(name_factory, control_fields):
    name = name_factory()
    with ReplayBuffer.create(name, capacity=5, fields=control_fields) as buf:
        s = buf.stats()
        assert set(s) >= STATS_KEYS
        assert s["capacity"] == 5
        assert s["size"] == 0 and s["inserts"] == 0 and s["samples"] == 0
        assert s["retries"] == 0 and s["recovered"] == 0
        assert s["attached"] == 1

        with pytest.raises(shmreplay.EmptyBufferError):
            buf.sample(3)
        assert buf.stats()["samples"] == 0

        buf.add(**row_for_key(control_fields, 0))
        s = buf.stats()
        assert s["inserts"] == 1 and s["size"] == 1 == len(buf)

        buf.extend(rows_for_keys(control_fields, range(1, 4)))
        s = buf.stats()
        assert s["inserts"] == 4 and s["size"] == 4 == len(buf)

        buf.sample(7)
        assert buf.stats()["samples"] == 7
        buf.sample(3, return_info=True)
        assert buf.stats()["samples"] == 10

        buf.extend(rows_for_keys(control_fields, range(4, 8)))
        buf.extend(rows_for_keys(control_fields, range(8, 12)))
        s = buf.stats()
        assert s["inserts"] == 12
        assert s["size"] == 5 == len(buf)
        assert s["retries"] == 0  # single process: nothing torn, nothing in progress
        assert s["recovered"] == 0

        other = ReplayBuffer.attach(name)
        try:
            assert buf.stats()["attached"] == 2
            assert other.stats()["attached"] == 2
            assert other.stats()["inserts"] == 12
            assert other.stats()["size"] == 5
        finally:
            other.close()
        assert buf.stats()["attached"] == 1
        assert os.getpid() in buf.processes()


# --------------------------------------------------------------------------- lifecycle


def test_context_manager_unlinks(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        path = buf.path
        assert os.path.exists(path)
    assert not os.path.exists(path)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(shm_name)
    # the name is free again
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields):
        pass


def test_context_manager_unlinks_on_exception(shm_name, control_fields):
    with pytest.raises(RuntimeError):
        with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields):
            raise RuntimeError("boom")
    assert not os.path.exists(segment_path(shm_name))


def test_attached_context_manager_does_not_unlink(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as buf:
        with ReplayBuffer.attach(shm_name) as other:
            assert other.is_owner is False
            other.add(**row_for_key(control_fields, 0))
        assert os.path.exists(buf.path)
        assert len(buf) == 1
        again = ReplayBuffer.attach(shm_name)
        again.close()


def test_unlink_keeps_attached_handles_working(shm_name, control_fields):
    buf = ReplayBuffer.create(shm_name, capacity=6, fields=control_fields)
    other = ReplayBuffer.attach(shm_name)
    try:
        buf.extend(rows_for_keys(control_fields, range(4)))
        buf.unlink()
        assert not os.path.exists(segment_path(shm_name))
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(shm_name)
        # both existing handles keep working on the (now anonymous) segment
        other.extend(rows_for_keys(control_fields, range(4, 8)))
        assert len(buf) == 6 and len(other) == 6
        assert_slots_hold_keys(buf, control_fields, range(2, 8))
        batch, info = buf.sample(8, return_info=True)
        exp = rows_for_keys(control_fields, info["key"])
        assert np.array_equal(batch["obs"], exp["obs"])
        buf.add(**row_for_key(control_fields, 8))
        assert_slots_hold_keys(other, control_fields, [8])
        # a new buffer can take the name meanwhile
        with ReplayBuffer.create(shm_name, capacity=2, fields=control_fields) as fresh:
            assert len(fresh) == 0
            assert len(other) == 6
    finally:
        other.close()
        buf.close()


def test_module_remove(shm_name, shm_dir, control_fields):
    buf = ReplayBuffer.create(shm_name, capacity=4, fields=control_fields, path=shm_dir)
    try:
        buf.add(**row_for_key(control_fields, 0))
        shmreplay.remove(shm_name, path=shm_dir)
        assert not os.path.exists(segment_path(shm_name, shm_dir))
        with pytest.raises(FileNotFoundError):
            ReplayBuffer.attach(shm_name, path=shm_dir)
        assert_slots_hold_keys(buf, control_fields, [0])
    finally:
        buf.close()


def test_close_then_any_operation_raises(shm_name, control_fields):
    with ReplayBuffer.create(shm_name, capacity=4, fields=control_fields) as owner:
        owner.add(**row_for_key(control_fields, 0))
        h = ReplayBuffer.attach(shm_name)
        assert h.closed is False
        h.close()
        assert h.closed is True
        ops = {
            "add": lambda: h.add(**row_for_key(control_fields, 1)),
            "extend": lambda: h.extend(rows_for_keys(control_fields, [1])),
            "sample": lambda: h.sample(1),
            "sample_info": lambda: h.sample(1, return_info=True),
            "getitem": lambda: h[0],
            "len": lambda: len(h),
            "stats": lambda: h.stats(),
            "processes": lambda: h.processes(),
        }
        for what, op in ops.items():
            with pytest.raises(ValueError):
                op()
                pytest.fail(f"{what} on a closed handle did not raise")
        # the owner is unaffected
        assert len(owner) == 1
        assert owner.stats()["inserts"] == 1
        assert owner.stats()["attached"] == 1


def test_owner_close_keeps_segment_for_others(shm_name, control_fields):
    owner = ReplayBuffer.create(shm_name, capacity=4, fields=control_fields)
    other = ReplayBuffer.attach(shm_name)
    try:
        owner.add(**row_for_key(control_fields, 0))
        owner.close()
        assert owner.closed
        assert len(other) == 1
        assert_slots_hold_keys(other, control_fields, [0])
    finally:
        other.close()
        if os.path.exists(segment_path(shm_name)):
            shmreplay.remove(shm_name)


# --------------------------------------------------------------------------- pickle


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_reattaches_in_process(shm_name, atari_fields, protocol):
    with ReplayBuffer.create(shm_name, capacity=8, fields=atari_fields) as buf:
        buf.extend(rows_for_keys(atari_fields, range(3)))
        data = pickle.dumps(buf, protocol=protocol)
        assert len(data) < 4096  # a name, not the data
        clone = pickle.loads(data)
        try:
            assert isinstance(clone, ReplayBuffer)
            assert clone is not buf
            assert clone.name == buf.name and clone.path == buf.path
            assert clone.capacity == 8 and clone.fields == buf.fields
            assert clone.is_owner is False
            assert_slots_hold_keys(clone, atari_fields, range(3))
            clone.add(**row_for_key(atari_fields, 3))
            assert_slots_hold_keys(buf, atari_fields, [3])
            assert buf.stats()["attached"] == 2
        finally:
            clone.close()
        # the clone's close neither unlinked nor closed the original
        assert os.path.exists(buf.path)
        assert len(buf) == 4


def test_pickle_keeps_path(shm_name, shm_dir, control_fields):
    with ReplayBuffer.create(shm_name, capacity=8, fields=control_fields, path=shm_dir) as buf:
        buf.add(**row_for_key(control_fields, 0))
        clone = pickle.loads(pickle.dumps(buf))
        try:
            assert clone.path == segment_path(shm_name, shm_dir)
            assert_slots_hold_keys(clone, control_fields, [0])
        finally:
            clone.close()


def test_unpickle_after_unlink_fails(shm_name, control_fields):
    buf = ReplayBuffer.create(shm_name, capacity=8, fields=control_fields)
    try:
        data = pickle.dumps(buf)
        buf.unlink()
        with pytest.raises(FileNotFoundError):
            pickle.loads(data)
    finally:
        buf.close()


# ---- sample(out=...): reusing batch arrays ----


def test_sample_into_caller_arrays(shm_dir, atari_fields):
    with shmreplay.ReplayBuffer.create(capacity=50, fields=atari_fields, path=shm_dir) as buf:
        buf.extend(helpers.rows_for_keys(atari_fields, range(50)))
        out = {name: np.empty((8,) + shape, dtype) for name, (shape, dtype) in buf.fields.items()}
        batch, info = buf.sample(8, return_info=True, out=out)
        assert all(batch[name] is out[name] for name in out)
        for row in range(8):
            expected = helpers.rows_for_keys(atari_fields, [int(info["key"][row])])
            helpers.assert_row_equal(helpers.take_row(batch, row), helpers.take_row(expected, 0))
        again = buf.sample(8, out=out)
        assert again["obs"] is out["obs"]


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda out: out.pop("done"), ValueError),
        (lambda out: out.update(extra=np.empty(8)), ValueError),
        (lambda out: out.update(action=np.empty(8, np.int64)), ValueError),
        (lambda out: out.update(action=np.empty(9, np.int32)), ValueError),
        (lambda out: out.update(obs=np.empty((8, 4, 84, 84, 2), np.uint8)[..., 0]), ValueError),
        (lambda out: out["reward"].setflags(write=False), ValueError),
        (lambda out: out.update(done=[False] * 8), TypeError),
        (lambda out: out.update(next_obs=out["obs"]), ValueError),  # two fields, one array
    ],
)
def test_sample_out_rejects_bad_arrays(shm_dir, atari_fields, spoil, error):
    with shmreplay.ReplayBuffer.create(capacity=10, fields=atari_fields, path=shm_dir) as buf:
        buf.extend(helpers.rows_for_keys(atari_fields, range(10)))
        out = {name: np.zeros((8,) + shape, dtype) for name, (shape, dtype) in buf.fields.items()}
        spoil(out)
        before = buf.stats()["samples"]
        with pytest.raises(error):
            buf.sample(8, out=out)
        assert buf.stats()["samples"] == before


def test_handles_prefault_the_segment(shm_dir, atari_fields):
    """Writing rows into a fresh buffer takes no page fault per 4 KiB page: the mapping is
    populated when a handle is made (otherwise 1,000 Atari rows cost ~14,000 minor faults)."""
    import resource

    with shmreplay.ReplayBuffer.create(capacity=1000, fields=atari_fields, path=shm_dir) as buf:
        rows = helpers.rows_for_keys(atari_fields, range(1000))
        other = shmreplay.ReplayBuffer.attach(buf.name, path=shm_dir)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        other.extend(rows)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        other.close()
        pages_written = 1000 * buf.record_bytes // 4096
        assert faults < pages_written // 10, (faults, pages_written)


def test_inspect_looks_without_attaching(shm_dir, control_fields):
    with shmreplay.ReplayBuffer.create(capacity=100, fields=control_fields, path=shm_dir) as buf:
        buf.extend(helpers.rows_for_keys(control_fields, range(10)))
        seen = shmreplay.ReplayBuffer.inspect(buf.name, path=shm_dir)
        assert seen.stats()["attached"] == 1
        assert seen.processes() == [os.getpid()]
        assert len(seen) == 10 and seen.fields == buf.fields
        helpers.assert_row_equal(seen[3], helpers.row_for_key(control_fields, 3))
        seen.close()
        with pytest.raises(FileNotFoundError):
            shmreplay.ReplayBuffer.inspect("no-such-buffer", path=shm_dir)


def test_stats_shape_is_defined_once(name_factory, control_fields):
    """The stats dict the core builds (from ``Stats::items``) has exactly the keys of the typed
    ``shmreplay.Stats``, in the same order: the counters (ints), the seconds waited (floats),
    the limiter, then, for a prioritized buffer only, the two priority figures (floats); an
    episode buffer's bytes per step come last, in its stats only."""
    from shmreplay import Stats

    keys = list(Stats.__annotations__)
    assert keys.pop() == "bytes_per_step"
    floats = ["priority_total", "max_priority"]
    waits = ["insert_wait_s", "sample_wait_s"]
    assert keys[-2:] == floats and keys[-5:-3] == waits and keys[-3] == "limiter"
    with ReplayBuffer.create(name_factory(), capacity=4, fields=control_fields) as buf:
        stats = buf.stats()
        assert list(stats) == keys[:-2]
        assert all(type(stats[k]) is int for k in keys[:-5]) and stats["limiter"] is None
        assert all(type(stats[k]) is float for k in waits)
    sampler = shmreplay.Prioritized()
    with ReplayBuffer.create(name_factory(), capacity=4, fields=control_fields, sampler=sampler) as buf:
        stats = buf.stats()
        assert list(stats) == keys
        assert all(type(stats[k]) is float for k in floats)
