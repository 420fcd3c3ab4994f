"""Bad input matrix: every public entry point given wrong types, shapes, dtypes, lengths,
missing or extra fields, zero/negative/huge/NaN counts, bad paths and bad CLI arguments.

For each case: the documented exception (``TypeError`` for a wrong type, ``ValueError`` for a
wrong value -- README "Errors"), nothing written (``len``, ``stats()`` counters and every slot's
content unchanged, no file created or removed), and the buffer still accepts a valid ``add``
and ``sample`` afterwards. The cases already in test_errors.py/test_api.py are not repeated;
the ones here cover the rest of the matrix (numbers that are NaN, bools, huge or of the wrong
kind, Python ints into unsigned fields, exact-dtype arrays of a wrong shape (the fast path),
``out=`` layouts, ``return_info``, indices, paths, ``list_buffers``/``remove``/``gc``, CLI).
"""

from __future__ import annotations

import decimal
import fractions
import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import shmreplay
from helpers import row_for_key, rows_for_keys, snapshot_slots, assert_row_equal
from shmreplay import EmptyBufferError, ReplayBuffer

FIELDS = {
    "x": ((2,), np.float32),
    "a": ((), np.int32),
    "u": ((), np.uint8),
    "v": ((3,), np.uint16),
    "b": ((), np.bool_),
    "q": ((), np.uint64),
}
CAP = 8
BAD_VALUE, BAD_TYPE = ValueError, TypeError


@pytest.fixture
def buf(shm_dir):
    b = ReplayBuffer.create("matrix", capacity=CAP, fields=FIELDS, path=shm_dir)
    b.extend(rows_for_keys(FIELDS, range(CAP)))
    b.extend(rows_for_keys(FIELDS, range(CAP, CAP + 3)))  # wrapped, every row really written
    try:
        yield b
    finally:
        b.close()


class State:
    """What must not change when a call is refused."""

    def __init__(self, buf: ReplayBuffer) -> None:
        self.len = len(buf)
        self.stats = dict(buf.stats())
        self.slots = snapshot_slots(buf)
        self.files = sorted(os.listdir(os.path.dirname(buf.path)))

    def check(self, buf: ReplayBuffer) -> None:
        assert len(buf) == self.len
        stats = dict(buf.stats())
        for key in ("inserts", "samples", "size", "superseded", "attached"):
            assert stats[key] == self.stats[key], (key, self.stats, stats)
        after = snapshot_slots(buf)
        assert after.keys() == self.slots.keys()
        for i, row in self.slots.items():
            assert_row_equal(after[i], row, where=f"slot {i}")
        assert sorted(os.listdir(os.path.dirname(buf.path))) == self.files


def assert_still_usable(buf: ReplayBuffer) -> None:
    """The next valid insert takes the next ticket, lands in its slot and is sampled back."""
    stats = buf.stats()
    ticket = stats["inserts"] + stats["superseded"]
    row = row_for_key(FIELDS, 10_000 + ticket)
    buf.add(**row)
    assert buf.stats()["inserts"] == stats["inserts"] + 1
    assert_row_equal(buf[ticket % buf.capacity], row)
    _, info = buf.sample(200, return_info=True)
    assert int(info["key"].max()) == ticket


def refused(buf: ReplayBuffer, exc, call) -> BaseException:
    state = State(buf)
    with pytest.raises(exc) as info:
        call()
    state.check(buf)
    assert_still_usable(buf)
    return info.value


# --------------------------------------------------------------------------- add


def _row(**changes: Any) -> dict:
    row = row_for_key(FIELDS, 1000)
    for k, v in changes.items():
        if v is _DROP:
            del row[k]
        else:
            row[k] = v
    return row


_DROP = object()

ADD_CASES = [
    # float into an int/bool field (same_kind refuses), NaN and inf included
    pytest.param(dict(a=float("nan")), BAD_TYPE, id="nan-into-int32"),
    pytest.param(dict(a=np.nan), BAD_TYPE, id="np.nan-into-int32"),
    pytest.param(dict(a=float("inf")), BAD_TYPE, id="inf-into-int32"),
    pytest.param(dict(a=-0.0), BAD_TYPE, id="negative-zero-into-int32"),
    pytest.param(dict(u=np.float32(3)), BAD_TYPE, id="float32-scalar-into-uint8"),
    pytest.param(dict(v=np.array([1.0, 2.0, 3.0])), BAD_TYPE, id="float-array-into-uint16"),
    pytest.param(dict(q=1.0), BAD_TYPE, id="pyfloat-into-uint64"),
    pytest.param(dict(b=1), BAD_TYPE, id="int-into-bool"),
    pytest.param(dict(b=np.uint8(1)), BAD_TYPE, id="uint8-into-bool"),
    pytest.param(dict(b=0.0), BAD_TYPE, id="float-into-bool"),
    pytest.param(dict(u=np.int8(-1)), BAD_TYPE, id="int8-scalar-into-uint8"),
    # not numbers at all
    pytest.param(dict(x="ab"), BAD_TYPE, id="str"),
    pytest.param(dict(x=b"\0" * 8), BAD_TYPE, id="bytes"),
    pytest.param(dict(a=None), BAD_TYPE, id="none-scalar"),
    pytest.param(dict(x=[None, None]), BAD_TYPE, id="list-of-none"),
    pytest.param(dict(a=decimal.Decimal(1)), BAD_TYPE, id="decimal"),
    pytest.param(dict(a=fractions.Fraction(1, 2)), BAD_TYPE, id="fraction"),
    pytest.param(dict(a=1j), BAD_TYPE, id="complex"),
    pytest.param(dict(x={"a": 1}), BAD_TYPE, id="dict"),
    pytest.param(dict(x=np.array([1, None], dtype=object)), BAD_TYPE, id="object-array"),
    pytest.param(dict(a=np.datetime64("2020-01-01")), BAD_TYPE, id="datetime64"),
    pytest.param(dict(a=np.timedelta64(1, "s")), BAD_TYPE, id="timedelta64"),
    pytest.param(dict(x=np.zeros(2, "U1")), BAD_TYPE, id="unicode-array"),
    # wrong shapes and lengths
    pytest.param(dict(x=[1.0]), BAD_VALUE, id="list-too-short"),
    pytest.param(dict(x=[1.0, 2.0, 3.0]), BAD_VALUE, id="list-too-long"),
    pytest.param(dict(x=[[1.0], [1.0, 2.0]]), BAD_VALUE, id="ragged-list"),
    pytest.param(dict(v=[]), (BAD_VALUE, BAD_TYPE), id="empty-list"),  # float64 and wrong shape
    pytest.param(dict(x=np.zeros(3, np.float32)), BAD_VALUE, id="exact-dtype-wrong-length"),
    pytest.param(dict(x=np.zeros((1, 2), np.float32)), BAD_VALUE, id="exact-dtype-extra-axis"),
    pytest.param(dict(x=np.zeros((2, 1), np.float32)), BAD_VALUE, id="exact-dtype-column"),
    pytest.param(dict(x=np.zeros(0, np.float32)), BAD_VALUE, id="exact-dtype-empty"),
    pytest.param(dict(a=np.array([7], np.int32)), BAD_VALUE, id="1-element-array-for-scalar"),
    pytest.param(dict(v=np.zeros((3, 1), np.uint16)), BAD_VALUE, id="uint16-wrong-shape"),
    # fields
    pytest.param(dict(q=_DROP), BAD_VALUE, id="missing-last-field"),
    pytest.param(dict(x=_DROP, a=_DROP), BAD_VALUE, id="missing-two-fields"),
    pytest.param(dict(X=np.zeros(2, np.float32)), BAD_VALUE, id="extra-field-case"),
    # out-of-range integers (README: ValueError)
    pytest.param(dict(a=2**31), BAD_VALUE, id="int32-max+1"),
    pytest.param(dict(a=-(2**31) - 1), BAD_VALUE, id="int32-min-1"),
    pytest.param(dict(a=np.int64(2**40)), BAD_VALUE, id="np.int64-too-big-for-int32"),
    pytest.param(dict(u=np.uint16(256)), BAD_VALUE, id="np.uint16-too-big-for-uint8"),
    pytest.param(dict(v=np.array([1, 2, 70000], np.uint32)), BAD_VALUE, id="uint32-array-too-big-for-uint16"),
    pytest.param(dict(u=256), BAD_VALUE, id="pyint-256-into-uint8"),
    pytest.param(dict(u=-1), BAD_VALUE, id="pyint-minus-1-into-uint8"),
    pytest.param(dict(q=-1), BAD_VALUE, id="pyint-minus-1-into-uint64"),
    pytest.param(dict(q=2**64), BAD_VALUE, id="pyint-2**64-into-uint64"),
    pytest.param(dict(a=2**70), BAD_VALUE, id="pyint-2**70-into-int32"),
    pytest.param(dict(v=[1, 2, 70000]), BAD_VALUE, id="pyint-list-too-big-for-uint16"),
    # numpy makes these lists float64 (or object): still a range error, not a dtype one
    pytest.param(dict(v=[2**63 + 1, 1, 2]), BAD_VALUE, id="pyint-list-beyond-int64-into-uint16"),
    pytest.param(dict(v=[-1, 2**63 + 1, 2]), BAD_VALUE, id="pyint-list-mixed-signs-into-uint16"),
    pytest.param(dict(v=[2**63 + 1, 1, 2.0]), BAD_TYPE, id="pyint-list-with-a-float-into-uint16"),
    pytest.param(dict(v=[2**64, 1, None]), BAD_TYPE, id="pyint-list-with-none-into-uint16"),
]


@pytest.mark.parametrize("changes, exc", ADD_CASES)
def test_add_refuses(buf, changes, exc):
    row = _row(**changes)
    err = refused(buf, exc, lambda: buf.add(**row))
    culprits = [k for k in changes if k in FIELDS or k == "X"]
    assert any(c in str(err) for c in culprits), f"message names no culprit field: {err}"


def test_add_positional_argument_is_a_type_error(buf):
    refused(buf, TypeError, lambda: buf.add(row_for_key(FIELDS, 1)))


ACCEPTED_ADDS = [
    pytest.param(dict(u=255), dict(u=255), id="pyint-255-into-uint8"),
    pytest.param(dict(q=2**64 - 1), dict(q=2**64 - 1), id="pyint-2**64-1-into-uint64"),
    pytest.param(dict(a=-(2**31)), dict(a=-(2**31)), id="pyint-min-into-int32"),
    pytest.param(dict(u=3, x=[1.0, 2.0]), dict(u=3, x=[1.0, 2.0]), id="pyint-into-uint8-beside-a-list"),
    pytest.param(dict(u=255, q=2**64 - 1, a=-(2**31)), dict(u=255, q=2**64 - 1, a=-(2**31)), id="python-int-extremes-together"),
    pytest.param(dict(a=True), dict(a=1), id="bool-into-int"),
    pytest.param(dict(x=[np.nan, -np.inf]), dict(x=[np.nan, -np.inf]), id="nan-and-inf-into-float"),
    pytest.param(dict(x=np.array([1.5, 2.5])), dict(x=[1.5, 2.5]), id="float64-into-float32"),
    pytest.param(dict(x=np.array([1.5, 2.5], ">f4")), dict(x=[1.5, 2.5]), id="big-endian-array"),
    pytest.param(dict(x=np.array([1.5, 9, 2.5], np.float32)[::2]), dict(x=[1.5, 2.5]), id="strided-exact-dtype"),
    pytest.param(dict(u=np.uint16(7)), dict(u=7), id="np.uint16-in-range-into-uint8"),
    pytest.param(dict(v=[1, 2, 3]), dict(v=[1, 2, 3]), id="pyint-list-into-uint16"),
]


@pytest.mark.parametrize("changes, stored", ACCEPTED_ADDS)
def test_add_accepts(buf, changes, stored):
    """The other side of the matrix: values the README says are fine are stored exactly."""
    inserts = buf.stats()["inserts"]
    buf.add(**_row(**changes))
    assert buf.stats()["inserts"] == inserts + 1
    row = buf[inserts % CAP]
    for field, value in stored.items():
        np.testing.assert_array_equal(np.asarray(row[field]), np.asarray(value, dtype=FIELDS[field][1]))


# --------------------------------------------------------------------------- extend


def _batch(n: int = 3, **changes: Any) -> dict:
    batch = rows_for_keys(FIELDS, range(2000, 2000 + n))
    for k, v in changes.items():
        if v is _DROP:
            del batch[k]
        else:
            batch[k] = v
    return batch


EXTEND_CASES = [
    pytest.param(lambda: _batch(x=np.zeros((2, 2), np.float32)), BAD_VALUE, id="first-field-fewer-rows"),
    pytest.param(lambda: _batch(q=np.zeros(4, np.uint64)), BAD_VALUE, id="last-field-more-rows"),
    pytest.param(lambda: _batch(x=np.zeros((3, 3), np.float32)), BAD_VALUE, id="exact-dtype-wrong-row-shape"),
    pytest.param(lambda: _batch(x=np.zeros(6, np.float32)), BAD_VALUE, id="flattened-rows"),
    pytest.param(lambda: _batch(x=np.zeros((3, 2, 1), np.float32)), BAD_VALUE, id="extra-trailing-axis"),
    pytest.param(lambda: _batch(a=5), BAD_VALUE, id="scalar-for-a-column"),
    pytest.param(lambda: _batch(a=np.int32(5)), BAD_VALUE, id="0d-for-a-column"),
    pytest.param(lambda: _batch(x=np.float32(1)), BAD_VALUE, id="0d-first-field"),
    # one row given without its leading dimension: not taken as a row
    pytest.param(lambda: _batch(1, a=5), BAD_VALUE, id="one-row-python-scalar-for-a-column"),
    pytest.param(lambda: _batch(1, a=np.int32(5)), BAD_VALUE, id="one-row-numpy-scalar-for-a-column"),
    pytest.param(lambda: _batch(1, q=np.array(5, np.uint64)), BAD_VALUE, id="one-row-0d-array-for-a-column"),
    pytest.param(lambda: _batch(1, b=np.True_), BAD_VALUE, id="one-row-numpy-bool-for-a-column"),
    pytest.param(lambda: _batch(v=[[1, 2, 3]] * 3 + [[1, 2]]), BAD_VALUE, id="ragged-column"),
    pytest.param(lambda: _batch(a=np.array([1.0, np.nan, 2.0])), BAD_TYPE, id="nan-into-int-column"),
    pytest.param(lambda: _batch(b=np.array([0, 1, 0])), BAD_TYPE, id="ints-into-bool-column"),
    pytest.param(lambda: _batch(x=np.array([["a", "b"]] * 3)), BAD_TYPE, id="strings-column"),
    pytest.param(lambda: _batch(a=np.array([1, 2**40, 3])), BAD_VALUE, id="int64-too-big-for-int32"),
    pytest.param(lambda: _batch(q=np.array([1, 2, -3])), BAD_TYPE, id="negative-int64-into-uint64"),
    pytest.param(lambda: _batch(u=[1, 2, 300]), BAD_VALUE, id="pyint-list-too-big-for-uint8"),
    pytest.param(lambda: _batch(q=[2**63 + 1, 5, 2.0]), BAD_TYPE, id="big-pyint-list-with-a-float"),
    pytest.param(lambda: _batch(q=[2**63 + 1, 5, None]), BAD_TYPE, id="big-pyint-list-with-none"),
    pytest.param(lambda: _batch(q=np.array([2**63 + 1, 5, 1])), BAD_TYPE, id="float64-array-of-big-ints"),
    pytest.param(lambda: _batch(q=[1.0, 2.0, 3.0]), BAD_TYPE, id="pyfloat-list-into-uint64"),
    pytest.param(lambda: _batch(z=np.zeros(3)), BAD_VALUE, id="extra-field"),
    pytest.param(lambda: _batch(v=_DROP), BAD_VALUE, id="missing-field"),
    pytest.param(lambda: {k: v for k, v in list(_batch().items())[::-1][:-1]}, BAD_VALUE, id="reordered-and-missing"),
    pytest.param(lambda: type("Sub", (dict,), {})(_batch(z=np.zeros(3))), BAD_VALUE, id="dict-subclass-extra"),
    pytest.param(lambda: list(_batch().items()), BAD_TYPE, id="list-of-pairs"),
    pytest.param(lambda: tuple(_batch().values()), BAD_TYPE, id="tuple-of-columns"),
    pytest.param(lambda: set(FIELDS), BAD_TYPE, id="set"),
    pytest.param(lambda: np.zeros(3, [("x", "f4", (2,)), ("a", "i4")]), BAD_TYPE, id="structured-array"),
    pytest.param(lambda: None, BAD_TYPE, id="none"),
    pytest.param(lambda: "x", BAD_TYPE, id="str"),
]


@pytest.mark.parametrize("make, exc", EXTEND_CASES)
def test_extend_refuses(buf, make, exc):
    batch = make()
    refused(buf, exc, lambda: buf.extend(batch))


@pytest.mark.parametrize("rows", [0])
def test_extend_with_zero_rows_is_a_no_op(buf, rows):
    state = State(buf)
    buf.extend({k: v[:rows] for k, v in _batch().items()})
    buf.extend({k: np.asarray(v)[:0] for k, v in _batch().items()})
    state.check(buf)
    assert_still_usable(buf)


@pytest.mark.parametrize(
    "column",
    [
        pytest.param([1, 2, 3], id="pyint-list"),
        pytest.param(np.array([1, 2, 3], np.uint16), id="uint16-array"),
        pytest.param(np.array([True, False, True]), id="bool-array"),
    ],
)
def test_extend_accepts_in_range_ints_into_unsigned(buf, column):
    inserts = buf.stats()["inserts"]
    buf.extend(_batch(u=column))
    assert buf.stats()["inserts"] == inserts + 3
    assert [int(buf[(inserts + i) % CAP]["u"]) for i in range(3)] == [int(c) for c in column]


BIG = 2**63 + 1  # np.asarray([BIG, 5]) is float64, which rounds BIG to 2**63


@pytest.mark.parametrize(
    "column",
    [
        pytest.param([BIG, 5], id="list"),
        pytest.param((BIG, 5), id="tuple"),
        pytest.param([2**64 - 1, 0], id="uint64-max-and-0"),
        pytest.param([True, BIG], id="with-a-bool"),
        pytest.param([np.uint64(BIG), 2**64 - 2], id="with-a-numpy-int"),
    ],
)
def test_extend_stores_python_ints_beyond_int64_exactly(buf, column):
    inserts = buf.stats()["inserts"]
    buf.extend(_batch(2, q=column))
    assert buf.stats()["inserts"] == inserts + 2
    assert [int(buf[(inserts + i) % CAP]["q"]) for i in range(2)] == [int(c) for c in column]


def test_nested_python_ints_are_stored_exactly(shm_dir):
    fields = {"u": ((2,), np.uint64), "m": ((2, 2), np.uint64), "i": ((2,), np.int64)}
    with ReplayBuffer.create("nested", capacity=4, fields=fields, path=shm_dir) as b:
        b.extend(
            {
                "u": [[BIG, 5], (2**64 - 1, 0)],
                "m": [[[BIG, 1], [2, 3]], [(4, 5), [6, 2**64 - 1]]],
                "i": [[-(2**63), 2**63 - 1], [1, -1]],
            }
        )
        b.add(u=[BIG, 7], m=((BIG, BIG + 2), [0, 1]), i=(2**63 - 1, -(2**63)))
        assert len(b) == 3
        assert [[int(v) for v in b[s]["u"]] for s in range(3)] == [[BIG, 5], [2**64 - 1, 0], [BIG, 7]]
        assert b[0]["m"].tolist() == [[BIG, 1], [2, 3]]
        assert b[1]["m"].tolist() == [[4, 5], [6, 2**64 - 1]]
        assert b[2]["m"].tolist() == [[BIG, BIG + 2], [0, 1]]
        assert b[2]["i"].tolist() == [2**63 - 1, -(2**63)]


@pytest.mark.parametrize(
    "changes, field, dtype",
    [
        pytest.param(dict(q=[-1, BIG]), "q", "uint64", id="negative-beside-beyond-int64"),
        pytest.param(dict(q=[2**64, 5]), "q", "uint64", id="2**64"),
        pytest.param(dict(q=[-(2**70), 5]), "q", "uint64", id="-2**70"),
        pytest.param(dict(a=[BIG, 1]), "a", "int32", id="beyond-int64-into-int32"),
        pytest.param(dict(a=(1, -(2**63) - 1)), "a", "int32", id="below-int64-into-int32"),
        pytest.param(dict(v=[[BIG, 1, 2], [1, 2, 3]]), "v", "uint16", id="nested-into-uint16"),
    ],
)
def test_extend_refuses_python_ints_out_of_range(buf, changes, field, dtype):
    err = refused(buf, ValueError, lambda: buf.extend(_batch(2, **changes)))
    assert f"field {field!r}: values out of range for {dtype}" in str(err)


def _scalar_only(shm_dir):
    return ReplayBuffer.create(
        "scalars", capacity=4, fields={"reward": ((), np.float32), "done": ((), np.bool_)}, path=shm_dir
    )


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param({"reward": 1.0, "done": False}, id="python-scalars"),
        pytest.param({"reward": np.float32(1.0), "done": np.False_}, id="numpy-scalars"),
        pytest.param({"reward": np.array(1.0, np.float32), "done": np.array(False)}, id="0d-arrays"),
        pytest.param({"reward": np.array(1.0), "done": np.array(False)}, id="0d-arrays-other-dtype"),
        pytest.param({"reward": np.ones(1, np.float32), "done": np.array(False)}, id="1-row-then-0d"),
        pytest.param({"reward": np.ones(1, np.float32), "done": True}, id="1-row-then-python-scalar"),
    ],
)
def test_extend_refuses_rows_without_a_leading_dimension(shm_dir, batch):
    """extend takes N rows; a lone scalar is not silently one row (add takes one row)."""
    with _scalar_only(shm_dir) as b:
        b.add(reward=0.5, done=True)
        with pytest.raises(ValueError, match="leading"):
            b.extend(batch)
        assert len(b) == 1 and b.stats()["inserts"] == 1
        b.extend({k: np.reshape(v, 1) for k, v in batch.items()})  # with the row dimension it is fine
        assert len(b) == 2 and float(b[1]["reward"]) == 1.0


def test_add_takes_fields_named_like_its_parameters(shm_dir):
    fields = {"self": ((), np.float32), "values": ((2,), np.int32), "batch": ((), np.uint8)}
    with ReplayBuffer.create("kw", capacity=4, fields=fields, path=shm_dir) as b:
        b.add(**{"self": 1.5, "values": np.array([1, 2], np.int32), "batch": 3})  # fast path
        b.add(self=2.5, values=[3, 4], batch=np.uint16(4))  # converted by numpy
        b.extend({"self": [3.5], "values": [[5, 6]], "batch": [5]})
        assert [float(b[i]["self"]) for i in range(3)] == [1.5, 2.5, 3.5]
        assert [b[i]["values"].tolist() for i in range(3)] == [[1, 2], [3, 4], [5, 6]]
        assert [int(b[i]["batch"]) for i in range(3)] == [3, 4, 5]
        with pytest.raises(ValueError, match="values"):
            b.add(self=1.0, batch=1)
        assert len(b) == 3


# --------------------------------------------------------------------------- sample

BATCH_SIZES = [
    pytest.param(0, BAD_VALUE, id="0"),
    pytest.param(-1, BAD_VALUE, id="-1"),
    pytest.param(-(2**70), BAD_VALUE, id="-2**70"),
    pytest.param(1.5, BAD_TYPE, id="1.5"),
    pytest.param(2.0, BAD_TYPE, id="2.0"),
    pytest.param(float("nan"), BAD_TYPE, id="nan"),
    pytest.param(float("inf"), BAD_TYPE, id="inf"),
    pytest.param(np.float64(4), BAD_TYPE, id="np.float64"),
    pytest.param(True, BAD_TYPE, id="True"),
    pytest.param(False, BAD_TYPE, id="False"),
    pytest.param(np.bool_(True), BAD_TYPE, id="np.True_"),
    pytest.param("4", BAD_TYPE, id="str"),
    pytest.param(None, BAD_TYPE, id="None"),
    pytest.param([4], BAD_TYPE, id="list"),
    pytest.param(4 + 0j, BAD_TYPE, id="complex"),
    pytest.param(2**40, (ValueError, MemoryError), id="2**40"),
    pytest.param(2**62, (ValueError, MemoryError), id="2**62"),
    pytest.param(2**70, (ValueError, MemoryError), id="2**70"),
]


@pytest.mark.parametrize("batch_size, exc", BATCH_SIZES)
def test_sample_refuses_batch_size(buf, batch_size, exc):
    refused(buf, exc, lambda: buf.sample(batch_size))
    refused(buf, exc, lambda: buf.sample(batch_size, return_info=True))


def test_sample_batch_size_numpy_int_is_fine(buf):
    assert buf.sample(np.int64(3))["a"].shape == (3,)
    assert buf.sample(np.uint8(2))["a"].shape == (2,)


def _out(n: int = 4) -> dict:
    return {f: np.zeros((n,) + s, d) for f, (s, d) in FIELDS.items()}


def _overlapping() -> dict:
    out = _out()
    raw = np.zeros(64, np.uint8)
    out["u"] = raw[0:4]
    out["b"] = raw[2:6].view(np.bool_)
    return out


OUT_CASES = [
    pytest.param(lambda: {**_out(), "x": np.asfortranarray(np.zeros((4, 2), np.float32))}, BAD_VALUE, id="fortran-order"),
    pytest.param(lambda: {**_out(), "x": np.zeros((2, 4), np.float32).T}, BAD_VALUE, id="transposed-view"),
    pytest.param(lambda: {**_out(), "a": np.zeros(4, ">i4")}, BAD_VALUE, id="byte-swapped"),
    pytest.param(lambda: {**_out(), "a": np.zeros(4, np.uint32)}, BAD_VALUE, id="same-size-other-kind"),
    pytest.param(lambda: {**_out(), "a": np.zeros((4, 1), np.int32)}, BAD_VALUE, id="extra-axis"),
    pytest.param(lambda: {**_out(), "a": np.zeros((), np.int32)}, BAD_VALUE, id="0d"),
    pytest.param(lambda: _out(5), BAD_VALUE, id="rows-differ-from-batch-size"),
    pytest.param(_overlapping, BAD_VALUE, id="partially-overlapping-views"),
    pytest.param(lambda: {**_out(), "a": np.zeros(8, np.int32)[::2]}, BAD_VALUE, id="strided"),
    pytest.param(lambda: {**_out(), "a": memoryview(np.zeros(4, np.int32))}, BAD_TYPE, id="memoryview"),
    pytest.param(lambda: {**_out(), "a": None}, BAD_TYPE, id="none-array"),
    pytest.param(lambda: list(_out().values()), BAD_TYPE, id="list-of-arrays"),
    pytest.param(lambda: np.zeros(4), BAD_TYPE, id="an-array"),
]


@pytest.mark.parametrize("make, exc", OUT_CASES)
def test_sample_refuses_out(buf, make, exc):
    out = make()
    refused(buf, exc, lambda: buf.sample(4, out=out))


@pytest.mark.parametrize(
    "flag",
    [
        pytest.param(value, id=repr(value))
        for value in ("yes", "no", None, 1, 0, [], 2.0)
    ],
)
def test_sample_return_info_must_be_a_bool(buf, flag):
    refused(buf, TypeError, lambda: buf.sample(2, return_info=flag))


def test_sample_return_info_accepts_numpy_bool(buf):
    _, info = buf.sample(2, return_info=np.bool_(True))
    assert info["index"].shape == (2,)
    assert isinstance(buf.sample(2, return_info=np.bool_(False)), dict)


def test_sample_of_empty_buffer_after_bad_calls(shm_dir):
    with ReplayBuffer.create("empty", capacity=4, fields=FIELDS, path=shm_dir) as b:
        for bad in (0, -1, 1.5, None):
            with pytest.raises((ValueError, TypeError)):
                b.sample(bad)
        with pytest.raises(EmptyBufferError):
            b.sample(1)
        assert b.stats()["samples"] == 0 and len(b) == 0


# --------------------------------------------------------------------------- __getitem__

INDICES = [
    pytest.param(CAP, IndexError, id="capacity"),
    pytest.param(CAP + 1, IndexError, id="capacity+1"),
    pytest.param(-CAP - 1, IndexError, id="-capacity-1"),
    pytest.param(2**63, IndexError, id="2**63"),
    pytest.param(2**70, IndexError, id="2**70"),
    pytest.param(-(2**63), IndexError, id="-2**63"),
    pytest.param(-(2**63) - 1, IndexError, id="-2**63-1"),
    pytest.param(-(2**70), IndexError, id="-2**70"),
    pytest.param(-(2**200) - 1, IndexError, id="-2**200-1"),
    pytest.param(-(2**300), IndexError, id="-2**300"),
    pytest.param(2**300, IndexError, id="2**300"),
    pytest.param(np.int64(-(2**63)), IndexError, id="np.int64-min"),
    pytest.param(np.uint64(2**64 - 1), IndexError, id="np.uint64-max"),
    pytest.param(np.True_, TypeError, id="np.True_"),
    pytest.param(1.0, TypeError, id="1.0"),
    pytest.param(float("nan"), TypeError, id="nan"),
    pytest.param(np.float32(0), TypeError, id="np.float32"),
    pytest.param("0", TypeError, id="str"),
    pytest.param(None, TypeError, id="None"),
    pytest.param(True, TypeError, id="True"),
    pytest.param(slice(0, 2), TypeError, id="slice"),
    pytest.param([0], TypeError, id="list"),
    pytest.param((0,), TypeError, id="tuple"),
    pytest.param(np.array([0, 1]), TypeError, id="array"),
]


@pytest.mark.parametrize("index, exc", INDICES)
def test_getitem_refuses(buf, index, exc):
    refused(buf, exc, lambda: buf[index])


def test_getitem_numpy_ints_and_negatives(buf):
    assert_row_equal(buf[np.int64(3)], row_for_key(FIELDS, 3))  # keys 8..10 wrapped into slots 0..2
    assert_row_equal(buf[np.uint8(3)], buf[3])
    assert_row_equal(buf[-1], buf[CAP - 1])
    assert_row_equal(buf[-CAP], buf[0])


# --------------------------------------------------------------------------- create / attach / inspect


def _fields(**changes: Any) -> dict:
    f = dict(FIELDS)
    f.update(changes)
    return f


CREATE_CASES = [
    pytest.param(dict(capacity=1.5), BAD_TYPE, id="capacity-1.5"),
    pytest.param(dict(capacity=float("nan")), BAD_TYPE, id="capacity-nan"),
    pytest.param(dict(capacity=float("inf")), BAD_TYPE, id="capacity-inf"),
    pytest.param(dict(capacity=np.float64(8)), BAD_TYPE, id="capacity-np.float64"),
    pytest.param(dict(capacity=True), BAD_TYPE, id="capacity-True"),
    pytest.param(dict(capacity="10"), BAD_TYPE, id="capacity-str"),
    pytest.param(dict(capacity=[8]), BAD_TYPE, id="capacity-list"),
    pytest.param(dict(capacity=8 + 0j), BAD_TYPE, id="capacity-complex"),
    pytest.param(dict(capacity=-(2**70)), BAD_VALUE, id="capacity--2**70"),
    pytest.param(dict(capacity=2**40 + 1), BAD_VALUE, id="capacity-above-max"),
    pytest.param(dict(capacity=2**64), BAD_VALUE, id="capacity-2**64"),
    pytest.param(dict(capacity=2**70), BAD_VALUE, id="capacity-2**70"),
    pytest.param(dict(capacity=2**40), MemoryError, id="capacity-max-does-not-fit"),
    pytest.param(dict(fields=list(FIELDS.items())), BAD_TYPE, id="fields-list-of-pairs"),
    pytest.param(dict(fields=None), BAD_TYPE, id="fields-none"),
    pytest.param(dict(fields=_fields(x=((float("nan"),), "f4"))), BAD_TYPE, id="dim-nan"),
    pytest.param(dict(fields=_fields(x=((2.0,), "f4"))), BAD_TYPE, id="dim-float"),
    pytest.param(dict(fields=_fields(x=((True,), "f4"))), BAD_TYPE, id="dim-bool"),
    pytest.param(dict(fields=_fields(x=((np.float64(2),), "f4"))), BAD_TYPE, id="dim-np.float64"),
    pytest.param(dict(fields=_fields(x=(None, "f4"))), BAD_TYPE, id="shape-none"),
    pytest.param(dict(fields=_fields(x=("2", "f4"))), BAD_TYPE, id="shape-str"),
    pytest.param(dict(fields=_fields(x=((0,), "f4"))), BAD_VALUE, id="dim-0"),
    pytest.param(dict(fields=_fields(x=((2, -1), "f4"))), BAD_VALUE, id="dim-negative"),
    pytest.param(dict(fields=_fields(x=((2**31, 2**31), "u1"))), BAD_VALUE, id="record-too-big"),
    pytest.param(dict(fields=_fields(x=((1,) * 9, "u1"))), BAD_VALUE, id="9-dims"),
    pytest.param(dict(fields=_fields(x=((2**70,), "u1"))), BAD_VALUE, id="dim-2**70"),
    pytest.param(dict(fields={f"f{i}": ((), "u1") for i in range(257)}), BAD_VALUE, id="257-fields"),
    pytest.param(dict(fields={"a b": ((), "u1")}), BAD_VALUE, id="field-name-space"),
    pytest.param(dict(fields={"1a": ((), "u1")}), BAD_VALUE, id="field-name-digit-first"),
    pytest.param(dict(fields={"a" * 65: ((), "u1")}), BAD_VALUE, id="field-name-65-chars"),
    pytest.param(dict(fields={"a:b": ((), "u1")}), BAD_VALUE, id="field-name-colon"),
    pytest.param(dict(fields={"a\nb": ((), "u1")}), BAD_VALUE, id="field-name-newline"),
    pytest.param(dict(fields=_fields(x=((), ">f4"))), BAD_TYPE, id="dtype-big-endian"),
    pytest.param(dict(fields=_fields(x=((), "M8[s]"))), BAD_TYPE, id="dtype-datetime"),
    pytest.param(dict(fields=_fields(x=((), "V8"))), BAD_TYPE, id="dtype-void"),
    pytest.param(dict(fields=_fields(x=((), "(2,)f4"))), BAD_TYPE, id="dtype-subarray"),
    pytest.param(dict(fields=_fields(x=((), [("p", "f4")]))), BAD_TYPE, id="dtype-structured"),
    pytest.param(dict(fields=_fields(x=((), 3.5))), BAD_TYPE, id="dtype-a-float"),
    pytest.param(dict(fields=_fields(x=((), np.longdouble))), BAD_TYPE, id="dtype-longdouble"),
    pytest.param(dict(path=3), BAD_TYPE, id="path-int"),
    pytest.param(dict(path=b"/tmp"), BAD_TYPE, id="path-bytes"),
    pytest.param(dict(path=["/tmp"]), BAD_TYPE, id="path-list"),
]


@pytest.mark.parametrize("kwargs, exc", CREATE_CASES)
def test_create_refuses(buf, shm_dir, kwargs, exc):
    args = dict(capacity=4, fields=FIELDS, path=shm_dir)
    args.update(kwargs)
    before = sorted(os.listdir(shm_dir))
    refused(buf, exc, lambda: ReplayBuffer.create("new", **args))
    assert sorted(os.listdir(shm_dir)) == before


@pytest.mark.parametrize("path, exc", [(3, TypeError), (b"/dev/shm", TypeError), (["x"], TypeError), ("", FileNotFoundError)])
def test_attach_and_inspect_refuse_paths(buf, path, exc):
    refused(buf, exc, lambda: ReplayBuffer.attach("matrix", path=path))
    refused(buf, exc, lambda: ReplayBuffer.inspect("matrix", path=path))


def test_attach_and_inspect_refuse_positional_path(buf, shm_dir):
    refused(buf, TypeError, lambda: ReplayBuffer.attach("matrix", str(shm_dir)))


ODD_DTYPES = [
    pytest.param(None, id="None"),
    pytest.param(object, id="object"),
    pytest.param("O", id="O"),
    pytest.param("U5", id="U5"),
    pytest.param("S4", id="S4"),
    pytest.param(str, id="str"),
    pytest.param(np.void, id="np.void"),
    pytest.param("V", id="V"),
    pytest.param("M8", id="M8"),
    pytest.param("m8[ns]", id="m8"),
    pytest.param("T", id="StringDType"),
    pytest.param(complex, id="complex"),
    pytest.param("c8", id="complex64"),
    pytest.param("f4,", id="one-field-structured"),
    pytest.param([("p", "f4"), ("p", "f4")], id="structured-duplicate-names"),
    pytest.param("bogus", id="unknown-name"),
    pytest.param("", id="empty-str"),
]


@pytest.mark.parametrize("dtype", ODD_DTYPES)
def test_create_refuses_odd_dtypes(buf, shm_dir, dtype):
    fields = _fields(x=((), dtype))
    err = refused(buf, TypeError, lambda: ReplayBuffer.create("new", capacity=4, fields=fields, path=shm_dir))
    assert "field 'x'" in str(err)
    assert not os.path.exists(shm_dir / "shmreplay.new")


# --------------------------------------------------------------------------- module functions


@pytest.mark.parametrize(
    "call, exc",
    [
        pytest.param(lambda d: shmreplay.list_buffers(3), TypeError, id="list-int"),
        pytest.param(lambda d: shmreplay.list_buffers(b"/dev/shm"), TypeError, id="list-bytes"),
        pytest.param(lambda d: shmreplay.list_buffers(d / "missing"), FileNotFoundError, id="list-missing"),
        pytest.param(lambda d: shmreplay.list_buffers(d / "shmreplay.matrix"), NotADirectoryError, id="list-a-file"),
        pytest.param(lambda d: shmreplay.remove(5, path=d), TypeError, id="remove-int-name"),
        pytest.param(lambda d: shmreplay.remove(None, path=d), TypeError, id="remove-none-name"),
        pytest.param(lambda d: shmreplay.remove("", path=d), ValueError, id="remove-empty-name"),
        pytest.param(lambda d: shmreplay.remove("..", path=d), ValueError, id="remove-dotdot"),
        pytest.param(lambda d: shmreplay.remove("nosuch", path=d), FileNotFoundError, id="remove-unknown"),
        pytest.param(lambda d: shmreplay.remove("matrix", path=3), TypeError, id="remove-path-int"),
        pytest.param(lambda d: shmreplay.remove("matrix", path=d / "missing"), FileNotFoundError, id="remove-path-missing"),
        pytest.param(lambda d: shmreplay.remove("matrix", d), TypeError, id="remove-positional-path"),
        pytest.param(lambda d: shmreplay.gc(3), TypeError, id="gc-path-int"),
        pytest.param(lambda d: shmreplay.gc(d / "missing"), FileNotFoundError, id="gc-path-missing"),
        pytest.param(lambda d: shmreplay.gc(d / "shmreplay.matrix"), NotADirectoryError, id="gc-path-a-file"),
        pytest.param(lambda d: shmreplay.gc(d, dry_run="yes"), TypeError, id="gc-dry-run-str"),
        pytest.param(lambda d: shmreplay.gc(d, dry_run=1), TypeError, id="gc-dry-run-int"),
        pytest.param(lambda d: shmreplay.gc(d, True), TypeError, id="gc-positional-dry-run"),
    ],
)
def test_module_functions_refuse(buf, shm_dir, call, exc):
    refused(buf, exc, lambda: call(shm_dir))
    assert os.path.exists(buf.path)


# --------------------------------------------------------------------------- CLI

CLI_CASES = [
    pytest.param([], 2, id="no-command"),
    pytest.param(["bogus"], 2, id="unknown-command"),
    pytest.param(["ls", "--bogus"], 2, id="unknown-option"),
    pytest.param(["ls", "--path"], 2, id="path-without-value"),
    pytest.param(["ls", "--path", "{dir}/missing"], 1, id="ls-missing-dir"),
    pytest.param(["ls", "--path", "{dir}/shmreplay.matrix"], 1, id="ls-path-is-a-file"),
    pytest.param(["info"], 2, id="info-without-name"),
    pytest.param(["info", "a/b", "--path", "{dir}"], 1, id="info-slash"),
    pytest.param(["info", "..", "--path", "{dir}"], 1, id="info-dotdot"),
    pytest.param(["info", "x" * 300, "--path", "{dir}"], 1, id="info-too-long"),
    pytest.param(["info", "", "--path", "{dir}"], 1, id="info-empty"),
    pytest.param(["info", "nosuch", "--path", "{dir}", "--json"], 1, id="info-unknown-json"),
    pytest.param(["rm", "--path", "{dir}"], 1, id="rm-nothing"),
    pytest.param(["rm", "../matrix", "--path", "{dir}"], 1, id="rm-traversal"),
    pytest.param(["gc", "--path", "{dir}/missing"], 1, id="gc-missing-dir"),
    pytest.param(["gc", "--bogus"], 2, id="gc-unknown-option"),
    pytest.param(["demo", "--synthetic", "--capacity", "0"], 1, id="demo-capacity-0"),
    pytest.param(["demo", "--synthetic", "--capacity", "abc"], 2, id="demo-capacity-str"),
    pytest.param(["demo", "--synthetic", "--capacity", "1099511627777"], 1, id="demo-capacity-above-max"),
    pytest.param(["demo", "--synthetic", "--capacity", "99999999999999999999999"], 1, id="demo-capacity-huge"),
    pytest.param(["demo", "--synthetic", "--seconds", "nan"], 1, id="demo-seconds-nan"),
    pytest.param(["demo", "--synthetic", "--seconds", "inf"], 1, id="demo-seconds-inf"),
    pytest.param(["demo", "--synthetic", "--seconds", "-1"], 1, id="demo-seconds-negative"),
    pytest.param(["demo", "--synthetic", "--actors", "0"], 1, id="demo-actors-0"),
    pytest.param(["demo", "--synthetic", "--actors", "-1"], 1, id="demo-actors-negative"),
    pytest.param(["demo", "--synthetic", "--learners", "-1"], 1, id="demo-learners-negative"),
    pytest.param(["demo", "--synthetic", "--batch-size", "0"], 1, id="demo-batch-0"),
    pytest.param(["demo", "--synthetic", "--chunk", "-5"], 1, id="demo-chunk-negative"),
    pytest.param(["demo", "--synthetic", "--batch-size", "1.5"], 2, id="demo-batch-float"),
    pytest.param(["demo", "--synthetic", "--start-method", "bogus"], 2, id="demo-start-method"),
    pytest.param(["demo", "--synthetic", "--path", "{dir}/missing"], 1, id="demo-missing-dir"),
]

_RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    from shmreplay import cli
    results = []
    for argv in json.loads(sys.argv[1]):
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
            except BaseException:
                traceback.print_exc()
                code = "uncaught"
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()})
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Runs every CLI case in one subprocess (one interpreter start instead of thirty)."""
    d = tmp_path_factory.mktemp("cli")
    with ReplayBuffer.create("matrix", capacity=CAP, fields=FIELDS, path=d) as b:
        b.extend(rows_for_keys(FIELDS, range(3)))
        argvs = [[a.format(dir=d) for a in p.values[0]] for p in CLI_CASES]
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, json.dumps(argvs)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert sorted(os.listdir(d)) == ["shmreplay.matrix"], "a CLI error created or removed a file"
        assert len(b) == 3
    return {p.id: r for p, r in zip(CLI_CASES, results)}


@pytest.mark.parametrize("argv, code", CLI_CASES)
def test_cli_refuses(cli_results, request, argv, code):
    result = cli_results[request.node.callspec.id]
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert result["code"] == code, result
    lines = result["stderr"].strip().splitlines()
    assert lines, "no message on stderr"
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("shmreplay: error:"), lines
