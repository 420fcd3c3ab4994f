"""Conversions on the fast path of ``add``/``extend`` (``RawBuffer.put``, rows.rs).

``put`` converts values of another dtype than their field's in Rust (issue 10): numpy arrays
(C-contiguous, native byte order, the field's shape) and numpy scalars of any bool, int or
float dtype, and Python bools, ints and floats. For each value it either declines (returns
False, and the Python package converts it with numpy: the slow path) or stores exactly the bytes
``np.asarray(value).astype(field_dtype)`` makes. It takes a value exactly when ``_takes`` says:

* numpy's ``same_kind`` casting allows the cast (bool to anything; unsigned to any integer or
  float; signed to signed or float; float to float). Others are TypeErrors on the slow path;
* integers into integers fit the field (else the slow path's ValueError, never wrapped);
* float conversions raise no floating-point flag in numpy: no overflow to inf, no nonzero value
  below the field's smallest normal (numpy's underflow, which it reports for inexact ones only:
  a superset), no signalling NaN (invalid). The slow path then warns or raises as ``np.errstate``
  says, as it always did.

Stored bytes are compared bit for bit (NaN payloads, -0.0), for every (source, field) dtype
pair on edge values of each dtype, exhaustively for float16 sources, on random bit patterns, and
in hypothesis properties where ``add``/``extend`` must also give the slow path's outcome.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import SUPPORTED_DTYPES
from shmreplay import ReplayBuffer

DTYPES = [np.dtype(d) for d in SUPPORTED_DTYPES]
PAIRS = list(itertools.product(DTYPES, DTYPES))
_ids = itertools.count()

# NaNs of every float dtype, as bits: quiet (canonical, negative, payloads that survive the
# narrowing casts or not) and signalling.
NAN_BITS = {
    2: [0x7E00, 0xFE00, 0x7E01, 0x7FFF, 0x7C01, 0x7D00, 0xFC01],
    4: [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7FFFFFFF, 0x7FC02000, 0x7F800001, 0x7FA00000, 0xFF800001],
    8: [
        0x7FF8000000000000,
        0xFFF8000000000000,
        0x7FF8000000000001,
        0x7FFFFFFFFFFFFFFF,
        0x7FF8000020000000,  # survives into float32
        0x7FF8040000000000,  # survives into float16
        0x7FF0000000000001,
        0x7FF4000000000000,
        0xFFF0000000000001,
    ],
}


def _float_candidates() -> list[float]:
    f16max, f32max = 65504.0, float(np.finfo(np.float32).max)
    xs = [
        0.0, 1.0, 0.1, 1.5, 2.5, 1e-5, 1e30, 1e39, 1e300, math.inf, 5e-324, 2.0**-1022,
        np.finfo(np.float64).max, 2.0**-14, 2.0**-14 * (1 - 2.0**-12), 2.0**-14 * (1 - 2.0**-11),
        2.0**-24, 2.0**-25, 2.0**-25 * 1.5, 2.0**-126, 2.0**-126 * (1 - 2.0**-25), 2.0**-149,
        2.0**-150, f16max, 65519.0, 65519.99, 65520.0, 65536.0, f32max,
        f32max * (1 + 2.0**-25), f32max * (1 + 2.0**-24), 2.0**128,
        1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-11 + 2.0**-40,  # float16 ties (even, odd, above)
        1 + 2.0**-24, 1 + 3 * 2.0**-24, 1 + 2.0**-24 + 2.0**-50,  # float32 ties
        2049.0, 2051.0, 2.0**24 + 1, 2.0**53 + 2, 2.0**63, 2.0**64,
    ]  # fmt: skip
    return xs + [-x for x in xs]


def _int_candidates() -> list[int]:
    ns = {0, 1, 2, 127, 128, 255, 256, 2048, 2049, 2050, 2051, 65504, 65505, 65519, 65520, 65535, 65536}
    ns |= {2**24 + 1, 2**24 + 3, 2**53 + 1, 2**62 + 2**39 + 1}
    for t in DTYPES:
        if t.kind in "iu":
            info = np.iinfo(t)
            ns |= {int(info.min) + d for d in (-1, 0, 1)} | {int(info.max) + d for d in (-1, 0, 1)}
    return sorted(ns | {-n for n in ns})


def edge_values(dtype: np.dtype) -> np.ndarray:
    """Distinct edge values of ``dtype``: every range limit of the other dtypes ±1 that it holds,
    rounding ties, subnormals, ±0, ±inf, NaNs (quiet, signalling, with payloads)."""
    if dtype.kind == "b":
        return np.array([0, 1, 2, 255], np.uint8).view(np.bool_)  # any nonzero byte is True
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([n for n in _int_candidates() if info.min <= n <= info.max], dtype)
    with np.errstate(all="ignore"):
        xs = np.array(_float_candidates(), np.float64).astype(dtype)
    nans = np.array(NAN_BITS[dtype.itemsize], f"u{dtype.itemsize}").view(dtype)
    xs = np.concatenate([xs, nans])
    _, first = np.unique(xs.view(f"u{dtype.itemsize}"), return_index=True)
    return xs[np.sort(first)]


def _is_snan(a: np.ndarray) -> np.ndarray:
    bits = a.view(f"u{a.dtype.itemsize}").astype(np.uint64)
    quiet = np.uint64(1) << np.uint64(np.finfo(a.dtype).nmant - 1)
    return np.isnan(a) & ((bits & quiet) == 0)


def _takes(a: np.ndarray, dst: np.dtype) -> np.ndarray:
    """Per element of ``a`` (of any supported dtype), whether put must take it into a ``dst``
    field (see the module's doc)."""
    src = a.dtype
    if src == dst:  # stored as it is
        return np.ones(a.shape, bool)
    if not np.can_cast(src, dst, "same_kind"):
        return np.zeros(a.shape, bool)
    if src.kind in "iu" and dst.kind in "iu":
        info = np.iinfo(dst)
        return np.array([info.min <= int(v) <= info.max for v in a.ravel()], bool).reshape(a.shape)
    ok = np.ones(a.shape, bool)
    if dst.kind == "f" and src.kind != "b":
        with np.errstate(all="ignore"):
            r = a.astype(dst)
        ok &= ~(np.isinf(r) & ~np.isinf(a))  # overflow
        if src.kind == "f":
            with np.errstate(all="ignore"):
                x = np.abs(a.astype(np.float64))
            ok &= ~((x != 0) & (x < np.finfo(dst).smallest_normal))  # underflow
            ok &= ~_is_snan(a)  # invalid
    return ok


def _takes_array(a: np.ndarray, dst: np.dtype) -> bool:
    """Whether put must take the whole array ``a`` (of any size: an empty one too is refused by
    the slow path if same_kind refuses its dtype)."""
    return (a.dtype == dst or np.can_cast(a.dtype, dst, "same_kind")) and bool(_takes(a, dst).all())


def _numpy_bytes(value: Any, dst: np.dtype) -> bytes:
    with np.errstate(all="ignore"):
        return np.asarray(value).astype(dst).tobytes()


class Trio:
    """Three buffers of the same fields, reused: one written by ``put`` alone, one by the
    public ``add``/``extend``, one by the slow path (``_columns`` then ``RawBuffer.extend``)."""

    def __init__(self, fields: dict, path, capacity: int = 64) -> None:
        self.capacity = capacity
        self.put, self.public, self.slow = (
            ReplayBuffer.create(f"conv{next(_ids)}", capacity=capacity, fields=fields, path=path)
            for _ in range(3)
        )

    def close(self) -> None:
        for b in (self.put, self.public, self.slow):
            b.unlink()
            b.close()

    def _rows(self, buf: ReplayBuffer, call) -> tuple[Any, list[dict[str, bytes]]]:
        before = buf.stats()["inserts"]
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            assert buf.stats()["inserts"] == before, "a refused call wrote rows"
            return type(e), []
        return None, [self._stored(buf, i % self.capacity) for i in range(before, buf.stats()["inserts"])]

    @staticmethod
    def _stored(buf: ReplayBuffer, index: int) -> dict[str, bytes]:
        """Slot ``index`` as it is stored (``buf[index]`` would make numpy scalars of scalar
        fields: bools of them 0 or 1)."""
        out = {name: np.empty(shape, dtype) for name, (shape, dtype) in buf.fields.items()}
        assert buf._raw.read(index, list(out.values())) is not None
        return {name: a.tobytes() for name, a in out.items()}

    def put_only(self, batch: dict, rows: int | None) -> tuple[bool, list[dict[str, bytes]]]:
        taken: list[bool] = []
        error, stored = self._rows(self.put, lambda: taken.append(self.put._raw.put(batch, rows)))
        assert error is None
        assert taken[0] or not stored
        return taken[0], stored

    def outcomes(self, batch: dict, rows: int | None):
        """(public error type or None, rows it stored), the same for the slow path."""
        leading = () if rows is None else (-1,)

        def slow():
            columns = self.slow._columns(batch, leading)
            self.slow._raw.extend(columns if rows is not None else [c.reshape((1,) + c.shape) for c in columns])

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            public = self._rows(self.public, lambda: self.public.add(**batch) if rows is None else self.public.extend(batch))
            return public, self._rows(self.slow, slow)


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    return tmp_path_factory.mktemp("conversions")


@pytest.fixture(scope="module")
def trios(segments):
    """A Trio of one scalar field ``x`` per field dtype."""
    made = {dt: Trio({"x": ((), dt)}, segments, capacity=256) for dt in DTYPES}
    yield made
    for t in made.values():
        t.close()


# --------------------------------------------------------------------------- the predicate


def test_the_predicate_declines_whatever_numpy_reports():
    """``_takes`` declines every conversion that numpy's astype reports with a floating-point
    flag (so numpy still warns or raises about it), and every one same_kind refuses."""
    for src, dst in PAIRS:
        values = edge_values(src)
        takes = _takes(values, dst)
        for v, t in zip(values, takes):
            try:
                with np.errstate(all="raise"):
                    np.asarray(v).astype(dst)
            except FloatingPointError:
                assert not t, (src, dst, v)
        if not np.can_cast(src, dst, "same_kind"):
            assert not takes.any()


def test_same_kind_table_is_numpy_s(trios):
    """put takes 1 (True) of every dtype into every field numpy's same_kind casting allows, and
    no other (as a one-row array, a 0-d array and a numpy scalar)."""
    for src, dst in PAIRS:
        one = np.ones(1, src)
        allowed = np.can_cast(src, dst, "same_kind")
        assert _takes(one, dst)[0] == allowed
        for batch, rows in (({"x": one}, 1), ({"x": one.reshape(())}, None), ({"x": one[0]}, None)):
            assert trios[dst].put_only(batch, rows)[0] == allowed, (src, dst, type(batch["x"]))


# --------------------------------------------------------------------------- edge values


@pytest.mark.parametrize("src", DTYPES, ids=str)
def test_edge_values_of_every_dtype_pair(trios, src):
    """Each edge value of ``src``, one by one into a field of every dtype, as a numpy scalar
    (add), a 0-d array (add) and a one-row array (extend): put takes it exactly when ``_takes``
    says, and stores numpy's bytes; add/extend give the slow path's outcome."""
    values = edge_values(src)
    for dst in DTYPES:
        trio = trios[dst]
        takes = _takes(values, dst)
        for i, v in enumerate(values):
            for batch, rows in (({"x": v}, None), ({"x": values[i : i + 1].reshape(())}, None), ({"x": values[i : i + 1]}, 1)):
                want = [{"x": _numpy_bytes(batch["x"], dst)}]  # (a numpy bool scalar is 0 or 1)
                taken, stored = trio.put_only(batch, rows)
                assert taken == takes[i], f"{src} {v!r} into {dst}: put {'took' if taken else 'declined'} it"
                if taken:
                    assert stored == want, f"{src} {v!r} into {dst}: not numpy's bytes"
                (public_error, public_rows), (slow_error, slow_rows) = trio.outcomes(batch, rows)
                assert public_error == slow_error and public_rows == slow_rows, (src, v, dst)
                if slow_error is None:
                    assert slow_rows == want


@pytest.mark.parametrize("src", DTYPES, ids=str)
@pytest.mark.parametrize("dst", DTYPES, ids=str)
def test_arrays_of_edge_values(segments, src, dst):
    """All the edge values of ``src`` that ``_takes`` takes, as one array (extend, and add of a
    field shaped like it): stored as numpy's bytes; with one more that it does not take, the
    whole array is declined."""
    values = edge_values(src)
    takes = _takes(values, dst)
    kept = values[takes]
    if not len(kept):
        return
    for fields, rows in (({"x": ((), dst)}, len(kept)), ({"x": (kept.shape, dst)}, None)):
        trio = Trio(fields, segments, capacity=len(kept))
        try:
            taken, stored = trio.put_only({"x": kept}, rows)
            assert taken
            assert b"".join(r["x"] for r in stored) == _numpy_bytes(kept, dst)
            if not takes.all():
                bad = np.concatenate([kept[1:], values[~takes][:1]])
                assert trio.put_only({"x": bad}, rows)[0] is False
        finally:
            trio.close()


@pytest.mark.parametrize("dst", [np.dtype(np.float32), np.dtype(np.float64)], ids=str)
def test_every_float16_value(segments, trios, dst):
    """All 65536 float16 bit patterns: put takes all but the signalling NaNs into float32 and
    float64, and stores numpy's bytes (NaN payloads included); it declines the others."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    snan = _is_snan(halves)
    assert snan.sum() == 2 * 511
    _takes_all_at_once(segments, halves[~snan], dst)
    for h in halves[snan][::50]:
        assert trios[dst].put_only({"x": h}, None)[0] is False


def _takes_all_at_once(segments, values: np.ndarray, dst: np.dtype) -> None:
    """put takes ``values`` as one record of a field of their shape, and stores numpy's bytes."""
    trio = Trio({"x": (values.shape, dst)}, segments, capacity=1)
    try:
        taken, stored = trio.put_only({"x": values}, None)
        assert taken and stored == [{"x": _numpy_bytes(values, dst)}]
    finally:
        trio.close()


@pytest.mark.parametrize(
    "src,dst",
    [(np.float32, np.float16), (np.float64, np.float16), (np.float64, np.float32), (np.float32, np.float64), (np.float16, np.float64)],
    ids=str,
)
def test_random_float_bit_patterns(segments, trios, src, dst):
    """200k random bit patterns (every NaN payload, subnormal and rounding case has its share)
    and as many values near the destination's range: those put must take are stored as numpy
    stores them, the rest declined one by one."""
    src, dst = np.dtype(src), np.dtype(dst)
    rng = np.random.default_rng(10)
    bits = rng.integers(0, np.iinfo(f"u{src.itemsize}").max, 200_000, dtype=f"u{src.itemsize}", endpoint=True)
    with np.errstate(all="ignore"):
        near = (rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 20, 200_000))).astype(src)
    values = np.concatenate([bits.view(src), near])
    takes = _takes(values, dst)
    assert takes.mean() > 0.3
    _takes_all_at_once(segments, values[takes], dst)
    for v in values[~takes][:200]:
        assert trios[dst].put_only({"x": v}, None)[0] is False


# --------------------------------------------------------------------------- Python scalars


PYTHON_VALUES = (
    [False, True]
    + _int_candidates()
    + [2**64, -(2**64), 2**70]
    + _float_candidates()
    + [math.nan, -math.nan]
    + [float(np.array([b], np.uint64).view(np.float64)[0]) for b in NAN_BITS[8]]
)


def _python_takes(v: Any, dst: np.dtype) -> bool:
    """When put must take a Python scalar: as numpy takes a bool or float (of numpy dtype bool
    or float64); an int into an integer field that holds it (the Python package checks Python
    ints by value); an int64 one into a float field as numpy takes an int64."""
    if isinstance(v, bool):
        return bool(_takes(np.array([v]), dst)[0])
    if isinstance(v, int):
        if dst.kind in "iu":
            return int(np.iinfo(dst).min) <= v <= int(np.iinfo(dst).max)
        if -(2**63) <= v < 2**64:  # numpy makes an int64 of it, or a uint64
            return bool(_takes(np.array([v], np.int64 if v < 2**63 else np.uint64), dst)[0])
        return False
    return bool(_takes(np.array([v], np.float64), dst)[0])


@pytest.mark.parametrize("dst", DTYPES, ids=str)
def test_python_scalars(trios, dst):
    """Python bools, ints and floats: put takes them exactly when ``_python_takes`` says and
    stores what the slow path stores; add gives the slow path's outcome."""
    trio = trios[dst]
    for v in PYTHON_VALUES:
        taken, stored = trio.put_only({"x": v}, None)
        assert taken == _python_takes(v, dst), f"{v!r} into {dst}: put {'took' if taken else 'declined'} it"
        (public_error, public_rows), (slow_error, slow_rows) = trio.outcomes({"x": v}, None)
        assert public_error == slow_error and public_rows == slow_rows, (v, dst)
        if taken:
            assert slow_error is None and stored == slow_rows, (v, dst)


# --------------------------------------------------------------------------- properties


SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SHAPES = [(), (), (1,), (3,), (2, 2)]


@st.composite
def field_values(draw, shape: tuple[int, ...], dst: np.dtype, rows: int | None):
    """A value for a ``dst`` field of ``shape``: an array (or numpy scalar) of a random dtype,
    with edge values, random bits or the field's own values converted; now and then in a form put
    must decline (big-endian, not C-contiguous, a list). Returns it and whether put may take it."""
    src = draw(st.sampled_from(DTYPES))
    full = shape if rows is None else (rows,) + shape
    how = draw(st.sampled_from(["edges", "bits", "own", "own"]))
    n = math.prod(full)
    if how == "edges":
        a = np.array(draw(st.lists(st.sampled_from(list(edge_values(src))), min_size=n, max_size=n)), src)
    elif how == "bits" and src.kind != "b":
        a = draw(hnp.arrays(f"u{src.itemsize}", n)).view(src)
    else:  # values of the field's dtype (so that narrowing casts fit), converted
        with np.errstate(all="ignore"):
            a = draw(hnp.arrays(dst, n)).astype(src)
    a = a.reshape(full)
    form = draw(st.sampled_from(["array"] * 6 + ["scalar", "big-endian", "strided", "list"]))
    if form == "scalar" and full == ():
        a = a[()]
    elif form == "big-endian" and src.itemsize > 1:
        a = a.astype(src.newbyteorder(">"))
    elif form == "strided" and a.ndim and a.size > 1:
        a = np.repeat(a, 2, axis=-1)[..., ::2]
    elif form == "list" and a.ndim:
        # A list of Python scalars for a scalar field of `extend` may be taken (when its values
        # are of one Python type and fit): None means "either, but exactly numpy's bytes".
        return a.tolist(), (None if rows is not None and shape == () else False)
    else:
        form = "array"
    event(f"{form} {src}->{dst}")
    readable = isinstance(a, np.generic) or (a.flags.c_contiguous and a.dtype.isnative)
    return a, readable and _takes_array(np.asarray(a), dst)


def _check(trio: Trio, fields: dict, batch: dict, rows: int | None, takes: bool | None) -> None:
    taken, stored = trio.put_only(batch, rows)
    if takes is not None:
        assert taken == takes
    converted = any(np.asarray(v).dtype != dt for v, (_, dt) in zip(batch.values(), fields.values()))
    event(f"put: {'took' if taken else 'declined'}{' (converting)' if converted else ''}")
    (public_error, public_rows), (slow_error, slow_rows) = trio.outcomes(batch, rows)
    assert public_error == slow_error and public_rows == slow_rows
    if taken:
        n = 1 if rows is None else rows
        with np.errstate(all="ignore"):
            refs = {k: np.asarray(batch[k]).astype(dt).reshape((n,) + shape) for k, (shape, dt) in fields.items()}
        want = [{k: ref[i].tobytes() for k, ref in refs.items()} for i in range(n)]
        assert stored == want == slow_rows


schemas = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES)),
    min_size=1,
    max_size=3,
)


@SETTINGS
@given(data=st.data(), fields=schemas)
def test_add_converts_as_numpy(segments, data, fields):
    trio = Trio(fields, segments, capacity=4)
    try:
        drawn = {k: data.draw(field_values(shape, dt, None), label=k) for k, (shape, dt) in fields.items()}
        _check(trio, fields, {k: v for k, (v, _) in drawn.items()}, None, all(t for _, t in drawn.values()))
    finally:
        trio.close()


@SETTINGS
@given(data=st.data(), fields=schemas, rows=st.integers(0, 3))
def test_extend_converts_as_numpy(segments, data, fields, rows):
    trio = Trio(fields, segments, capacity=4)
    try:
        drawn = {k: data.draw(field_values(shape, dt, rows), label=k) for k, (shape, dt) in fields.items()}
        flags = [t for _, t in drawn.values()]
        ndims = all(np.ndim(v) for v, _ in drawn.values())
        takes = False if False in flags or not ndims else (None if None in flags else True)
        _check(trio, fields, {k: v for k, (v, _) in drawn.items()}, rows, takes)
    finally:
        trio.close()


# --------------------------------------------------------------------------- the common cases


CONTROL = {"obs": ((17,), np.float32), "action": ((), np.int32), "reward": ((), np.float32), "done": ((), np.uint8)}
OBS = np.linspace(-1, 1, 17)


@pytest.fixture
def control(shm_dir):
    with ReplayBuffer.create("control", capacity=8, fields=CONTROL, path=shm_dir) as b:
        yield b


ONE_ROW = {
    "exact": dict(obs=OBS.astype(np.float32), action=np.int32(3), reward=np.float32(0.5), done=np.uint8(1)),
    "python": dict(obs=OBS.astype(np.float32), action=3, reward=0.5, done=True),
    "float64": dict(obs=OBS, action=np.int32(3), reward=np.float64(0.1), done=np.uint8(0)),
    "int64": dict(obs=OBS.astype(np.float32), action=np.int64(3), reward=np.float32(0.5), done=np.uint8(1)),
    "bool": dict(obs=OBS.astype(np.float32), action=np.int32(3), reward=np.float32(0.5), done=np.True_),
    "cleanrl": dict(obs=OBS, action=np.int64(5), reward=np.float64(1.0), done=np.False_),
    "0d-arrays": dict(obs=OBS, action=np.array(5), reward=np.array(-0.25), done=np.array(True)),
}
BATCH = {
    "exact": dict(obs=np.tile(OBS, (2, 1)).astype(np.float32), action=np.int32([1, 2]), reward=np.float32([0.5, 1]), done=np.uint8([0, 1])),
    "float64": dict(obs=np.tile(OBS, (2, 1)), action=np.int32([1, 2]), reward=np.array([0.1, 1e-3]), done=np.uint8([0, 1])),
    "int64": dict(obs=np.tile(OBS, (2, 1)).astype(np.float32), action=np.array([1, -2]), reward=np.float32([0.5, 1]), done=np.uint8([0, 1])),
    "bool": dict(obs=np.tile(OBS, (2, 1)).astype(np.float32), action=np.int32([1, 2]), reward=np.float32([0.5, 1]), done=np.array([True, False])),
    "cleanrl": dict(obs=np.tile(OBS, (2, 1)), action=np.array([4, 0]), reward=np.array([1.0, 0.0]), done=np.array([False, True])),
}


def _numpy_rows(batch: dict, n: int | None) -> list[dict[str, bytes]]:
    arrays = {k: np.asarray(v).astype(CONTROL[k][1]).reshape((n or 1,) + CONTROL[k][0]) for k, v in batch.items()}
    return [{k: a[i].tobytes() for k, a in arrays.items()} for i in range(n or 1)]


@pytest.mark.parametrize("case", ONE_ROW, ids=str)
def test_put_takes_the_common_rows(control, case):
    """What a training script gives add (numpy float64 rewards, int64 actions, bool dones, Python
    numbers): put takes it (the speedup of issue 10 must not silently regress) and stores what
    numpy's conversion makes."""
    assert control._raw.put(ONE_ROW[case]) is True
    assert [{k: np.asarray(v).tobytes() for k, v in control[0].items()}] == _numpy_rows(ONE_ROW[case], None)


@pytest.mark.parametrize("case", BATCH, ids=str)
def test_put_takes_the_common_batches(control, case):
    assert control._raw.put(BATCH[case], 2) is True
    stored = [{k: np.asarray(v).tobytes() for k, v in control[i].items()} for i in range(2)]
    assert stored == _numpy_rows(BATCH[case], 2)


@pytest.mark.parametrize(
    "src,dst,value",
    [
        (np.float64, np.float32, 0.1),
        (np.float32, np.float64, 0.1),
        (np.float16, np.float32, 0.1),
        (np.float64, np.float16, 0.1),
        (np.float32, np.float16, -2.5),
        (np.int64, np.int32, -7),
        (np.int64, np.int8, 100),
        (np.uint64, np.int64, 2**62),
        (np.uint8, np.int16, 255),
        (np.int32, np.float32, 16_777_217),
        (np.int64, np.float64, 2**53 + 1),
        (np.int64, np.float16, 2049),
        (np.bool_, np.uint8, True),
        (np.bool_, np.int64, True),
        (np.bool_, np.float32, True),
        (np.bool_, np.float16, True),
    ],
)
def test_put_takes_same_kind_casts(shm_dir, src, dst, value):
    """Each such cast as a numpy scalar and as an array of rows."""
    with ReplayBuffer.create("casts", capacity=4, fields={"x": ((), dst)}, path=shm_dir) as b:
        assert b._raw.put({"x": np.array(value).astype(src)[()]}) is True
        assert b._raw.put({"x": np.array([value, value]).astype(src)}, 2) is True
        want = np.array(value).astype(src).astype(dst).tobytes()
        assert [np.asarray(b[i]["x"]).tobytes() for i in range(3)] == [want] * 3


@pytest.mark.parametrize(
    "dst,value",
    [(np.float16, True), (np.float16, 3), (np.float16, 0.1), (np.float32, 0.1), (np.int8, -128), (np.uint64, 2**63 - 1), (np.uint64, 2**64 - 1), (np.float32, 2**63)],
)
def test_put_takes_python_scalars(shm_dir, dst, value):
    with ReplayBuffer.create("scalars", capacity=4, fields={"x": ((), dst)}, path=shm_dir) as b:
        assert b._raw.put({"x": value}) is True
        assert np.asarray(b[0]["x"]).tobytes() == np.asarray(value).astype(dst).tobytes()


def test_bool_bytes_other_than_one_are_true(shm_dir):
    """numpy's bools may hold any nonzero byte (views): converted, they are 1, as numpy makes."""
    done = np.array([0, 1, 2, 255], np.uint8).view(np.bool_)
    for dt in (np.uint8, np.int32, np.float32, np.float16):
        with ReplayBuffer.create(f"bools{np.dtype(dt)}", capacity=4, fields={"x": ((), dt)}, path=shm_dir) as b:
            assert b._raw.put({"x": done}, 4) is True
            assert b"".join(np.asarray(b[i]["x"]).tobytes() for i in range(4)) == done.astype(dt).tobytes()


def test_mixed_columns_keep_their_order(shm_dir):
    """Borrowed, converted and scalar columns interleaved land in their own fields."""
    fields = {"a": ((2,), np.float32), "b": ((2,), np.float32), "c": ((), np.int16), "d": ((), np.uint8), "e": ((), np.float64)}
    row = dict(a=np.float32([1, 2]), b=np.array([3.0, 4.0]), c=np.int64(-5), d=np.True_, e=6)
    with ReplayBuffer.create("mixed", capacity=2, fields=fields, path=shm_dir) as b:
        assert b._raw.put(row) is True
        got = b[0]
        assert got["a"].tolist() == [1, 2] and got["b"].tolist() == [3, 4]
        assert (got["c"], got["d"], got["e"]) == (-5, 1, 6.0)


# --------------------------------------------------------------------------- what is declined


@pytest.mark.parametrize(
    "dst,value,error",
    [
        # same_kind refuses: the slow path's TypeError.
        (np.uint8, np.array([1, 2], np.int64), TypeError),  # signed to unsigned, even in range
        (np.int32, np.array([1.0, 2.0]), TypeError),  # float to int
        (np.bool_, np.array([0, 1]), TypeError),  # int to bool
        (np.int64, np.array([1.0], np.float16), TypeError),
        # values out of range: the slow path's ValueError, never wrapped.
        (np.int32, np.array([2**31, 0], np.int64), ValueError),
        (np.int8, np.array([-129, 0], np.int64), ValueError),
        (np.int64, np.array([2**63], np.uint64), ValueError),
        (np.uint16, np.array([70000], np.uint32), ValueError),
    ],
)
def test_put_declines_what_the_slow_path_refuses(shm_dir, dst, value, error):
    with ReplayBuffer.create("refused", capacity=4, fields={"x": ((), dst)}, path=shm_dir) as b:
        assert b._raw.put({"x": value}, len(value)) is False
        assert b._raw.put({"x": value[0]}) is False  # as a numpy scalar
        with pytest.raises(error):
            b.extend({"x": value})
        with pytest.raises(error):
            b.add(x=value[0])
        assert len(b) == 0 and b.stats()["inserts"] == 0


@pytest.mark.parametrize(
    "dst,value,flag",
    [
        (np.float32, np.float64(1e300), "over"),
        (np.float32, 1e300, "over"),
        (np.float16, np.float32(1e5), "over"),
        (np.float16, np.int64(70_000), "over"),
        (np.float32, np.float64(1e-40), "under"),
        (np.float16, 1e-6, "under"),
        (np.float32, np.array(0x7FF0000000000001, np.uint64).view(np.float64)[()], "invalid"),
    ],
)
def test_float_flags_stay_numpy_s(shm_dir, dst, value, flag):
    """Conversions numpy reports (overflow, underflow, invalid) are declined, so that numpy's
    np.errstate still rules them: raising when asked, else storing what numpy stores."""
    with ReplayBuffer.create("flags", capacity=4, fields={"x": ((), dst)}, path=shm_dir) as b:
        assert b._raw.put({"x": value}) is False
        with np.errstate(**{flag: "raise"}), pytest.raises(FloatingPointError):
            b.add(x=value)
        assert len(b) == 0
        with np.errstate(all="ignore"):
            b.add(x=value)
            assert np.asarray(b[0]["x"]).tobytes() == np.asarray(value).astype(dst).tobytes()


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(np.array([1.0, 2.0], ">f8"), id="big-endian"),
        pytest.param(np.arange(4.0)[::2], id="strided"),
        pytest.param(np.array([1.0, 2.0], np.longdouble), id="longdouble"),
        pytest.param(np.array([1 + 0j, 2]), id="complex"),
        pytest.param(np.array([1.0, 2.0], object), id="object"),
    ],
)
def test_put_declines_other_arrays(shm_dir, value):
    with ReplayBuffer.create("other", capacity=4, fields={"x": ((), np.float32)}, path=shm_dir) as b:
        assert b._raw.put({"x": value}, 2) is False
        if value.flags.c_contiguous:  # (a 0-d view of a strided array is contiguous)
            assert b._raw.put({"x": value[:1].reshape(())}) is False


def test_extend_takes_lists_of_python_scalars_on_the_fast_path(segments):
    """A row given with Python lists for scalar fields (``reward=[0.5]``, ``action=[3]``,
    ``done=[True]``) takes the fast path and stores what numpy would; a list mixing ints and
    floats, or holding an int beyond int64, is left to numpy."""
    with ReplayBuffer.create(capacity=8, fields=CONTROL, path=segments) as buf:
        obs = np.linspace(-1, 1, 17, dtype=np.float32)[None]
        assert buf._raw.put({"obs": obs, "action": [3], "reward": [0.5], "done": [True]}, 1)
        row = buf[0]
        assert (row["action"], row["reward"], row["done"]) == (3, np.float32(0.5), 1)
        assert not buf._raw.put({"obs": obs, "action": [3], "reward": [0.5], "done": [1.5]}, 1)  # float into uint8
        assert not buf._raw.put({"obs": np.repeat(obs, 2, 0), "action": [3, 4], "reward": [1, 0.5], "done": [1, 0]}, 2)
        assert not buf._raw.put({"obs": obs, "action": [2**64 - 1], "reward": [0.5], "done": [1]}, 1)
        assert len(buf) == 1


def test_an_empty_list_is_left_to_numpy(segments):
    """numpy makes ``[]`` a float64 array: ``extend({"done": []})`` into a bool field is the
    TypeError numpy's same_kind rule gives, on the fast path as on the slow one (hypothesis
    found the fast path once taking it as zero rows)."""
    with ReplayBuffer.create(capacity=4, fields={"done": ((), np.bool_)}, path=segments) as buf:
        assert not buf._raw.put({"done": []}, 0)
        with pytest.raises(TypeError):
            buf.extend({"done": []})
        assert len(buf) == 0
