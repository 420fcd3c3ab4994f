"""The fast path of ``add``/``extend`` (``RawBuffer.put``, rows.rs) against numpy's conversion.

``put`` turns exact-dtype arrays, Python scalars and numpy scalars into column bytes without
numpy; everything else it declines and the Python package converts with numpy (the slow path:
``_columns`` then ``RawBuffer.extend``). For random schemas and values in every form, the
bytes stored must be the same whichever path runs, equal to what numpy's own conversion
makes, and whatever the slow path refuses the public methods refuse with the same exception
type, writing nothing. Stored bytes are compared bit for bit (NaN payloads, -0.0).
"""

from __future__ import annotations

import contextlib
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
# Same kinds in another byte order or size: numpy converts them, put declines them.
OTHER_DTYPES = DTYPES + [np.dtype(f">{c}") for c in ("i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8")]
SHAPES = [(), (), (1,), (3,), (2, 2)]
CAPACITY = 4  # more than the rows of one example
_names = itertools.count()

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    return tmp_path_factory.mktemp("fast-path")


schemas = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES)),
    min_size=1,
    max_size=4,
)

# Python numbers of every kind, near the edges of every dtype's range too.
_edges = sorted({e + d for t in DTYPES if t.kind in "iu" for e in (np.iinfo(t).min, np.iinfo(t).max) for d in (-1, 0, 1)})
python_numbers = st.one_of(
    st.booleans(),
    st.integers(-300, 300),
    st.sampled_from(_edges),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.floats(width=16),
)


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """A flat list as nested lists of ``shape`` (a lone element for shape ``()``)."""
    if not shape:
        return flat[0]
    if shape[0] == 0:
        return []
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


@st.composite
def values(draw, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, bool]:
    """A value of ``shape`` for a ``dtype`` field, in one of the forms add/extend take, and
    whether it is one that must be accepted: values of the field's dtype, as an array, numpy
    scalar or Python numbers (``tolist``; not an empty list, which numpy makes float64)."""
    form = draw(st.sampled_from(["exact", "python", "numpy-scalar", "other-dtype", "other-scalar", "python-numbers"]))
    if form in ("numpy-scalar", "other-scalar") and shape:
        form = "exact"
    event(f"form {form}")
    if form in ("exact", "python", "numpy-scalar"):
        array = draw(hnp.arrays(dtype, shape))
        value = {"exact": array, "python": array.tolist(), "numpy-scalar": array[()]}[form]
        return value, form != "python" or array.size > 0
    if form in ("other-dtype", "other-scalar"):
        other = draw(st.sampled_from(OTHER_DTYPES))
        if draw(st.booleans()):  # the field's own values, so that narrowing casts fit
            with np.errstate(all="ignore"):
                array = draw(hnp.arrays(dtype, shape)).astype(other)
        else:
            array = draw(hnp.arrays(other, shape))
        return (array[()] if form == "other-scalar" else array), False
    flat = draw(st.lists(python_numbers, min_size=math.prod(shape), max_size=math.prod(shape)))
    return _nest(flat, shape), False


def _reference(value: Any, dtype: np.dtype) -> np.ndarray:
    """numpy's conversion of ``value`` to ``dtype`` (Python ints into an integer field one by
    one: numpy infers float64 for a list mixing ints beyond int64 with others)."""
    if dtype.kind in "iu" and not isinstance(value, (np.ndarray, np.generic)):
        leaves = np.asarray(value, dtype=object).ravel().tolist()
        if all(isinstance(v, int) for v in leaves):
            return np.array(value, dtype=dtype)
    return np.asarray(value).astype(dtype)


def _stored(buf: ReplayBuffer, rows: int) -> list[dict[str, bytes]]:
    return [{k: np.asarray(v).tobytes() for k, v in buf[i].items()} for i in range(rows)]


def _outcome(call) -> tuple[str, Any]:
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return "raised", type(e)
    return "stored", None


def _check(segments, fields, batch: dict[str, Any], rows: int | None, verdict: bool | None) -> None:
    """Stores ``batch`` (one row for ``add`` if ``rows`` is None) three ways and compares.
    ``verdict``: True if it must be stored, False if it must be refused, None if either."""
    n = 1 if rows is None else rows
    leading = () if rows is None else (-1,)
    with warnings.catch_warnings(), np.errstate(all="ignore"), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow warnings on casts
        public, slow, put = (
            stack.enter_context(ReplayBuffer.create(f"{how}{next(_names)}", capacity=CAPACITY, fields=fields, path=segments))
            for how in ("public", "slow", "put")
        )

        def slow_path():
            columns = slow._columns(batch, leading)
            slow._raw.extend(columns if rows is not None else [c.reshape((1,) + c.shape) for c in columns])

        expected = _outcome(slow_path)
        if verdict is not None:
            assert expected[0] == ("stored" if verdict else "raised"), expected
        got = _outcome(lambda: public.add(**batch) if rows is None else public.extend(batch))
        assert got == expected, f"public path {got}, slow path {expected}"
        taken = put._raw.put(batch, rows)
        event(f"put took it: {taken}")
        if expected[0] == "raised":
            assert not taken, "put stored a value the slow path refuses"
            for b in (public, slow, put):
                assert len(b) == 0 and b.stats()["inserts"] == 0
            return
        assert len(public) == len(slow) == n
        refs = [
            _reference(batch[k], dtype).reshape((n,) + shape) for k, (shape, dtype) in public.fields.items()
        ]
        want = [{k: ref[i].tobytes() for k, ref in zip(public.fields, refs)} for i in range(n)]
        assert _stored(slow, n) == want, "the slow path differs from numpy's conversion"
        assert _stored(public, n) == want, "add/extend store other bytes than numpy's conversion"
        if taken:
            assert _stored(put, n) == want, "put stores other bytes than numpy's conversion"


@SETTINGS
@given(data=st.data(), fields=schemas)
def test_add_stores_what_numpy_stores(segments, data, fields):
    drawn = {name: data.draw(values(shape, np.dtype(dtype)), label=name) for name, (shape, dtype) in fields.items()}
    row = {name: value for name, (value, _) in drawn.items()}
    _check(segments, fields, row, None, True if all(ok for _, ok in drawn.values()) else None)


@SETTINGS
@given(data=st.data(), fields=schemas, rows=st.integers(0, 3))
def test_extend_stores_what_numpy_stores(segments, data, fields, rows):
    batch, accepted, rowless = {}, True, False
    for name, (shape, dtype) in fields.items():
        # Now and then a value without its leading dimension (refused: extend takes rows).
        lead = () if data.draw(st.integers(0, 9), label=f"{name} lead") == 0 else (rows,)
        batch[name], ok = data.draw(values(lead + shape, np.dtype(dtype)), label=name)
        accepted &= ok
        rowless |= lead == ()
    _check(segments, fields, batch, rows, False if rowless else True if accepted else None)


# --------------------------------------------------------------------------- fixed cases


FIELDS = {"reward": ((), np.float32), "done": ((), np.bool_), "obs": ((2,), np.uint8)}


@pytest.fixture
def buf(shm_dir):
    with ReplayBuffer.create("fixed", capacity=CAPACITY, fields=FIELDS, path=shm_dir) as b:
        yield b


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(dict(reward=1.5, done=True, obs=np.array([1, 2], np.uint8)), id="python-scalars"),
        pytest.param(dict(reward=np.float32(1.5), done=np.True_, obs=np.array([1, 2], np.uint8)), id="numpy-scalars"),
        pytest.param(dict(reward=np.array(1.5, np.float32), done=np.array(True), obs=np.array([1, 2], np.uint8)), id="0d-arrays"),
        pytest.param(dict(reward=3, done=False, obs=np.zeros(2, np.uint8)), id="python-int-into-float"),
    ],
)
def test_put_takes_exact_values_of_one_row(buf, row):
    """The forms the property tests rely on put taking (else they only test the slow path)."""
    assert buf._raw.put(row) is True
    assert len(buf) == 1


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param(dict(reward=np.float32(1.5), done=np.True_, obs=np.array([[1, 2]], np.uint8)), id="numpy-scalars"),
        pytest.param(dict(reward=np.array(1.5, np.float32), done=np.array(True), obs=np.array([[1, 2]], np.uint8)), id="0d-arrays"),
        pytest.param(dict(reward=np.ones(1, np.float32), done=np.array(True), obs=np.array([[1, 2]], np.uint8)), id="1-row-then-0d"),
        pytest.param(dict(reward=np.ones(1, np.float32), done=True, obs=np.array([[1, 2]], np.uint8)), id="1-row-then-python-bool"),
        pytest.param(dict(reward=1.5, done=True, obs=np.array([[1, 2]], np.uint8)), id="python-scalars"),
    ],
)
@pytest.mark.parametrize("rows", [0, 1])
def test_put_with_rows_declines_values_without_a_leading_dimension(buf, batch, rows):
    """extend's fast path never takes a lone value as a row; extend then refuses it."""
    assert buf._raw.put(batch, rows) is False
    with pytest.raises(ValueError, match="leading dimension"):
        buf.extend(batch)
    assert len(buf) == 0 and buf.stats()["inserts"] == 0


def test_put_extend_exact_rows(buf):
    batch = dict(reward=np.arange(3, dtype=np.float32), done=np.array([True, False, True]), obs=np.ones((3, 2), np.uint8))
    assert buf._raw.put(batch, 3) is True
    assert [float(buf[i]["reward"]) for i in range(3)] == [0.0, 1.0, 2.0]
