"""Hostile or broken segment files: ``attach``/``inspect`` either open a usable buffer or raise
``CorruptSegmentError`` naming the file -- never a crash, a hang, or another exception.

A real segment (full ring, counters, a released handle entry) is built once per module; every
example rewrites a copy of its bytes with one corruption drawn by hypothesis (truncation,
extension, random bytes anywhere in the header, counters, schema text and handle table, garbage
in the slots' version words and records, header words set to random or boundary values, forged
headers whose checksum was recomputed so that the deeper checks are reached, forged schema
texts, random foreign files), then inspects and attaches it and lists its directory. About
3,900 examples in all, plus directories of special and broken files for ``list_buffers``,
``gc`` and the CLI.

The expected outcome of each example comes from ``model_validate``, an independent Python
model of what ``attach`` validates (the header layout documented in
``crates/shmreplay-core/src/buffer.rs``). ``test_model_matches_real_segments`` checks the model
against segments the library itself wrote, so a layout change fails loudly here instead of
silently weakening these tests. When the model says "valid", the buffer must also be usable:
``len``, ``stats``, ``processes``, ``buf[i]`` for every slot, ``sample`` and ``add`` must work
(or fail with their documented exceptions), whatever garbage the unvalidated regions hold.

A segfault or SIGBUS would kill pytest, so merely finishing is part of the assertion.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

import shmreplay
from helpers import rows_for_keys, run_forked
from shmreplay import CorruptSegmentError, EmptyBufferError, ReplayBuffer

# --------------------------------------------------------------------------- the format (mirror)

MAGIC = int.from_bytes(b"SHMRPLY\0", "little")
LAYOUT_VERSION = 2
READY = 1
H_MAGIC, H_VERSION, H_READY, H_CHECKSUM = 0, 8, 16, 24
H_CAPACITY, H_RECORD_BYTES, H_SCHEMA_LEN, H_SCHEMA_HASH = 32, 40, 48, 56
H_TABLE, H_SLOT, H_DATA, H_TOTAL, H_CREATOR, H_CREATED = 64, 72, 80, 88, 96, 104
H_END = 128
CURSOR, FILLED, RETIRED, REAPER = 128, 256, 384, 448
SCHEMA_TEXT = 512
ENTRY_BYTES = 128
MAX_HANDLES = 1024
MAX_CAPACITY = 1 << 40
MAX_SCHEMA_TEXT = 32 * 1024
MAX_FIELDS, MAX_FIELD_NAME, MAX_NDIM = 256, 64, 8
MAX_RECORD_BYTES = 1 << 32
REAPED = 2**64 - 1
U64 = 2**64 - 1
CODES = {"b1": 1, "u1": 1, "u2": 2, "u4": 4, "u8": 8, "i1": 1, "i2": 2, "i4": 4, "i8": 8, "f2": 2, "f4": 4, "f8": 8}
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DIM_RE = re.compile(r"[1-9][0-9]*\Z")

FIELDS = {"obs": ((3,), "uint8"), "act": ((), "int32"), "rew": ((2,), "float32")}
CAP = 8
VICTIM = "victim"


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & U64
    return h


def word(data: bytes | bytearray, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def put(data: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<Q", data, offset, value & U64)


def roundup(n: int, m: int) -> int:
    return -(-n // m) * m


def layout(capacity: int, record_bytes: int, schema_len: int) -> dict | None:
    """Mirror of ``Layout::new``: the offsets a header must hold, or None if impossible."""
    if not 1 <= capacity <= MAX_CAPACITY or schema_len > MAX_SCHEMA_TEXT:
        return None
    table = roundup(SCHEMA_TEXT + schema_len, ENTRY_BYTES)
    data = roundup(table + MAX_HANDLES * ENTRY_BYTES, 4096)
    # each slot: its version word, then its record (cache-line aligned from 1 KiB on)
    slot = record_bytes + 8 if record_bytes < 1024 else roundup(record_bytes + 64, 64)
    total = data + capacity * slot
    if total > 2**63 - 1:
        return None
    return {"table": table, "slot": slot, "data": data, "total": total, "record_bytes": record_bytes}


def parse_schema(text: bytes) -> list[tuple[str, str, tuple[int, ...]]] | None:
    """Mirror of ``Schema::decode``: the fields of a canonical, valid schema text, else None."""
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not s.endswith("\n"):
        return None
    fields = []
    for line in s[:-1].split("\n"):
        parts = line.split(":")
        if len(parts) != 3:
            return None
        name, code, dims = parts
        if not NAME_RE.match(name) or len(name) > MAX_FIELD_NAME or code not in CODES:
            return None
        shape = ()
        if dims:
            ds = dims.split(",")
            if not all(DIM_RE.match(d) for d in ds):
                return None
            shape = tuple(int(d) for d in ds)
            if any(d > U64 for d in shape):
                return None
        fields.append((name, code, shape))
    if not fields or len(fields) > MAX_FIELDS or len({f[0] for f in fields}) != len(fields):
        return None
    if record_bytes_of(fields) is None:
        return None
    return fields


def record_bytes_of(fields) -> int | None:
    offset = 0
    for _, code, shape in fields:
        if len(shape) > MAX_NDIM:
            return None
        nbytes = CODES[code]
        for d in shape:
            nbytes *= d
            if nbytes > MAX_RECORD_BYTES:
                return None
        offset += roundup(nbytes, 8)
        if offset > MAX_RECORD_BYTES:
            return None
    return offset


def encode_schema(fields) -> bytes:
    return "".join(f"{n}:{c}:{','.join(map(str, s))}\n" for n, c, s in fields).encode()


def checksum(data: bytes | bytearray, schema_len: int) -> int:
    return fnv1a(bytes(data[32:H_END]) + bytes(data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len]))


def model_validate(data: bytes) -> str:
    """What ``attach`` must do with a file holding ``data``: "ok", "corrupt", or "reaped"
    (a gc marked it removed: attach says FileNotFoundError)."""
    size = len(data)
    if size < SCHEMA_TEXT or size % 8:
        return "corrupt"
    if word(data, H_MAGIC) != MAGIC or word(data, H_VERSION) != LAYOUT_VERSION or word(data, H_READY) != READY:
        return "corrupt"
    schema_len = word(data, H_SCHEMA_LEN)
    if schema_len > MAX_SCHEMA_TEXT or SCHEMA_TEXT + schema_len > size:
        return "corrupt"
    if checksum(data, schema_len) != word(data, H_CHECKSUM):
        return "corrupt"
    text = data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len]
    fields = parse_schema(text)
    if fields is None or fnv1a(text) != word(data, H_SCHEMA_HASH):
        return "corrupt"
    lay = layout(word(data, H_CAPACITY), record_bytes_of(fields), schema_len)
    if lay is None:
        return "corrupt"
    for offset, key in ((H_RECORD_BYTES, "record_bytes"), (H_TABLE, "table"), (H_SLOT, "slot"), (H_DATA, "data"), (H_TOTAL, "total")):
        if word(data, offset) != lay[key]:
            return "corrupt"
    if size != lay["total"]:
        return "corrupt"
    return "reaped" if word(data, REAPER) == REAPED else "ok"


def reseal(data: bytearray) -> bytearray:
    """Recomputes the checksum (and the schema hash) so that a forged header passes them."""
    schema_len = word(data, H_SCHEMA_LEN)
    if SCHEMA_TEXT + schema_len <= len(data) and schema_len <= MAX_SCHEMA_TEXT:
        put(data, H_SCHEMA_HASH, fnv1a(bytes(data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len])))
        put(data, H_CHECKSUM, checksum(data, schema_len))
    return data


def forge(base: bytes, *, capacity: int | None = None, text: bytes | None = None, size_delta: int = 0,
          max_size: int = 8 << 20) -> bytes:
    """A header made consistent by hand for another capacity and/or schema text, sealed, and a
    file of the size it states plus ``size_delta`` (bytes kept from ``base`` where they fit)."""
    data = bytearray(base)
    old_len = word(data, H_SCHEMA_LEN)
    if text is not None:
        data[SCHEMA_TEXT : SCHEMA_TEXT + old_len] = bytes(old_len)
        if SCHEMA_TEXT + len(text) > len(data):
            data.extend(bytes(SCHEMA_TEXT + len(text) - len(data)))
        data[SCHEMA_TEXT : SCHEMA_TEXT + len(text)] = text
        put(data, H_SCHEMA_LEN, len(text))
    cap = word(data, H_CAPACITY) if capacity is None else capacity
    put(data, H_CAPACITY, cap)
    fields = parse_schema(bytes(data[SCHEMA_TEXT : SCHEMA_TEXT + word(data, H_SCHEMA_LEN)]))
    rb = record_bytes_of(fields) if fields is not None else word(data, H_RECORD_BYTES)
    lay = layout(cap, rb, word(data, H_SCHEMA_LEN))
    size = len(data)
    if lay is not None:
        for offset, key in ((H_RECORD_BYTES, "record_bytes"), (H_TABLE, "table"), (H_SLOT, "slot"), (H_DATA, "data"), (H_TOTAL, "total")):
            put(data, offset, lay[key])
        if lay["total"] <= max_size:
            size = lay["total"]
    size = max(SCHEMA_TEXT + 8, size + size_delta)
    if size > len(data):
        data.extend(bytes(size - len(data)))
    del data[size:]
    return bytes(reseal(data))


# --------------------------------------------------------------------------- fixtures


class Pristine:
    def __init__(self, data: bytes, directory: str) -> None:
        self.data = data
        self.dir = directory
        self.path = os.path.join(directory, "shmreplay." + VICTIM)
        self.size = len(data)
        self.schema_len = word(data, H_SCHEMA_LEN)
        self.table = word(data, H_TABLE)
        self.slots = word(data, H_DATA)  # the slots (version word + record each) start here


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    directory = str(tmp_path_factory.mktemp("corrupt"))
    buf = ReplayBuffer.create("pristine", capacity=CAP, fields=FIELDS, path=directory)
    buf.extend(rows_for_keys(FIELDS, range(CAP)))
    buf.extend(rows_for_keys(FIELDS, range(CAP, CAP + 3)))  # wrapped: every slot committed
    path = buf.path
    buf.close()  # releases its handle entry: no live owner in the copy
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    assert data[H_END:SCHEMA_TEXT] != bytes(SCHEMA_TEXT - H_END), "counters expected"
    return Pristine(data, directory)


def write_victim(p: Pristine, data: bytes) -> None:
    """A fresh file (new inode: mappings of earlier examples are never truncated under us)."""
    try:
        os.unlink(p.path)
    except FileNotFoundError:
        pass
    fd = os.open(p.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def exercise(buf: ReplayBuffer, full: bool) -> None:
    """Everything a user does with a handle must work (or raise a documented error)."""
    n = len(buf)
    assert 0 <= n <= buf.capacity
    st_ = buf.stats()
    assert st_["capacity"] == buf.capacity and st_["size"] == n
    buf.processes()
    repr(buf)
    for i in range(buf.capacity):
        try:
            row = buf[i]
        except IndexError:
            continue
        assert set(row) == set(buf.fields)
    if not full:
        return
    if n:
        batch = buf.sample(4)
        assert all(batch[f].shape == (4,) + shape for f, (shape, _) in buf.fields.items())
    else:
        with pytest.raises(EmptyBufferError):
            buf.sample(4)
    row = {f: np.zeros(shape, dtype) for f, (shape, dtype) in buf.fields.items()}
    try:
        buf.add(**row)
    except ValueError as e:  # a forged insert counter can be exhausted
        assert "exhausted" in str(e), e
    buf.stats()


def attach_outcome(p: Pristine, data: bytes) -> str:
    """Writes ``data`` as the victim segment, inspects and attaches it, checks that both agree
    with the model and that a successful handle is usable; returns the outcome."""
    write_victim(p, data)
    expected = model_validate(data)
    if currently_in_test_context():
        event(f"outcome: {expected}")
    outcomes = []
    for open_ in (ReplayBuffer.inspect, ReplayBuffer.attach):
        try:
            buf = open_(VICTIM, path=p.dir)
        except CorruptSegmentError as e:
            assert p.path in str(e), f"message does not name the file: {e}"
            outcomes.append("corrupt")
            continue
        except FileNotFoundError as e:
            assert open_ is ReplayBuffer.attach and expected == "reaped", f"{expected}: {e!r}"
            outcomes.append("reaped")
            continue
        try:
            if expected == "reaped":
                assert open_ is ReplayBuffer.inspect, "attach of a reaped segment succeeded"
                exercise(buf, full=False)
                outcomes.append("reaped")
            else:
                exercise(buf, full=open_ is ReplayBuffer.attach)
                outcomes.append("ok")
        finally:
            buf.close()
    assert outcomes == [expected, expected], f"model says {expected}, inspect/attach gave {outcomes}"
    listed = [b["name"] for b in shmreplay.list_buffers(p.dir)]  # never raises over a bad file
    assert listed == ([] if expected == "corrupt" else [VICTIM]), listed
    return expected


def fast(examples: int) -> settings:
    """Hypothesis settings for these tests: no deadline (the machine is shared), no example
    database written into the checkout, and ``examples`` cases."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------- sanity of the model


def test_model_matches_real_segments(tmp_path):
    """The Python model accepts what the library writes, for several schemas and capacities,
    and reproduces every offset in the header; a pristine copy attaches and holds its rows."""
    schemas = [
        FIELDS,
        {"x": ((), "bool")},
        {"obs": ((4, 84, 84), "uint8"), "a": ((), "int64"), "r": ((), "float16")},
        {f"f{i}": ((i + 1,), "float64") for i in range(20)},
    ]
    for i, fields in enumerate(schemas):
        for cap in (1, 7, 513):
            with ReplayBuffer.create(f"m{i}-{cap}", capacity=cap, fields=fields, path=tmp_path) as buf:
                buf.add(**{f: np.ones(s, d) for f, (s, d) in buf.fields.items()})
                with open(buf.path, "rb") as f:
                    data = f.read()
                assert model_validate(data) == "ok"
                text = data[SCHEMA_TEXT : SCHEMA_TEXT + word(data, H_SCHEMA_LEN)]
                parsed = parse_schema(text)
                assert [n for n, _, _ in parsed] == list(buf.fields)
                assert record_bytes_of(parsed) == buf.record_bytes
                lay = layout(cap, buf.record_bytes, len(text))
                assert lay["total"] == buf.nbytes == len(data)
                assert forge(data) == data, "re-forging a valid header must change nothing"


def test_pristine_copy_attaches(pristine):
    assert attach_outcome(pristine, pristine.data) == "ok"
    write_victim(pristine, pristine.data)
    buf = ReplayBuffer.attach(VICTIM, path=pristine.dir)
    try:
        assert len(buf) == CAP and buf.stats()["inserts"] == CAP + 3
        _, info = buf.sample(64, return_info=True)
        assert set(info["key"].tolist()) <= set(range(3, CAP + 3))
    finally:
        buf.close()


# --------------------------------------------------------------------------- property tests


def test_truncated_at_boundaries_is_corrupt(pristine):
    p = pristine
    for n in [0, 1, 7, 8, 100, 511, 512, 513, 520, 4096, p.table, p.slots, p.slots + 8, p.size - 8, p.size - 1]:
        assert attach_outcome(p, p.data[:n]) == "corrupt", n


@fast(400)
@given(st.data())
def test_truncated_segment_is_corrupt(pristine, data):
    """Any length short of the header's total is refused (no mapping past the end of file)."""
    n = data.draw(st.integers(0, pristine.size - 1), label="length")
    assert attach_outcome(pristine, pristine.data[:n]) == "corrupt"


@fast(200)
@given(extra=st.one_of(st.binary(min_size=1, max_size=9000), st.integers(1, 1 << 20).map(bytes)))
def test_extended_segment_is_corrupt(pristine, extra):
    """A file longer than its header says is refused, whatever the extra bytes."""
    assert attach_outcome(pristine, pristine.data + extra) == "corrupt"


def _region(p: Pristine):
    """Byte offsets in the header, counters, schema text (and padding) and handle table."""
    return st.one_of(
        st.integers(0, H_END - 1),
        st.integers(H_END, SCHEMA_TEXT - 1),
        st.integers(SCHEMA_TEXT, SCHEMA_TEXT + p.schema_len + 8),
        st.integers(SCHEMA_TEXT, p.table - 1),
        st.integers(p.table, p.slots - 1),
        st.integers(0, p.slots - 1),
    )


@fast(1000)
@given(st.data())
def test_random_bytes_in_header_schema_and_table(pristine, data):
    """Random bytes written anywhere before the slot words: a change to a validated byte (the
    header words or the schema text) is refused; anything else attaches and stays usable."""
    writes = data.draw(st.lists(st.tuples(_region(pristine), st.integers(0, 255)), min_size=1, max_size=12), label="writes")
    buf = bytearray(pristine.data)
    for offset, value in writes:
        buf[offset] = value
    changed = sorted({i for i, _ in writes if buf[i] != pristine.data[i]})
    assume(changed)
    validated = any(i < H_END or SCHEMA_TEXT <= i < SCHEMA_TEXT + pristine.schema_len for i in changed)
    outcome = attach_outcome(pristine, bytes(buf))
    if validated:
        assert outcome == "corrupt", changed
    else:
        assert outcome in ("ok", "reaped"), changed


@fast(300)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, CAP - 1), st.integers(0, 31), st.integers(0, U64)), min_size=1, max_size=12
    ),
    keep=st.integers(0, CAP - 1),
)
def test_garbage_in_slots(pristine, writes, keep):
    """Random words in the slots themselves (version words and records) of every slot but
    one: the header is fine, so the buffer opens; a slot whose version word is garbage reads
    as some record or as no record (IndexError), sampling still finds the intact slot, and a
    writer is not blocked by a garbage "busy" word."""
    buf = bytearray(pristine.data)
    slot_bytes = word(buf, H_SLOT)
    for slot, word_index, value in writes:
        if slot == keep:
            continue
        if word_index % (slot_bytes // 8) == 0 and _is_busy_without_ticket(value):
            continue  # see test_busy_version_word_without_ticket_does_not_stall_reads
        offset = pristine.slots + slot * slot_bytes + 8 * (word_index % (slot_bytes // 8))
        put(buf, offset, value)
    assert attach_outcome(pristine, bytes(buf)) == "ok"


def _is_busy_without_ticket(version_word: int) -> bool:
    """Busy bit set, ticket field 0 ("ticket -1"): no writer ever makes such a word."""
    return bool(version_word & 1) and version_word >> 12 == 0


def test_busy_version_word_without_ticket_does_not_stall_reads(pristine):
    """A slot version word of 1 (busy, owner entry 0, ticket field 0) is taken as being written
    by the reader's own live handle (entry 0; its idle 'writing' word 0 equals the wrapped
    ticket + 1), so ``buf[i]`` waits its full 5 s and raises TimeoutError; debug builds panic
    on that ``+ 1``. Such a word can only come from corruption: it must read as no record
    at once, like any other orphaned slot."""
    buf = bytearray(pristine.data)
    put(buf, pristine.slots, 1)  # slot 0
    write_victim(pristine, bytes(buf))

    def read_slot_0() -> str:  # in a forked child: a stalled read is killed with it
        handle = ReplayBuffer.attach(VICTIM, path=pristine.dir)
        try:
            handle[0]
            return "row"
        except BaseException as e:  # noqa: BLE001
            return type(e).__name__

    assert run_forked(read_slot_0, timeout=1.5) == "IndexError"


_BOUNDARY = st.sampled_from([0, 1, 2, 7, 8, 9, 63, 64, 511, 512, 4095, 4096, 2**31, 2**32, 2**40, 2**40 + 1, 2**63 - 1, 2**63, U64 - 1, U64])


@fast(700)
@given(
    offset=st.one_of(st.sampled_from(list(range(0, H_END, 8))), st.sampled_from(list(range(0, SCHEMA_TEXT, 8)))),
    value=st.one_of(st.integers(0, U64), _BOUNDARY),
    delta=st.integers(-4096, 4096),
    relative=st.booleans(),
    sealed=st.booleans(),
)
def test_header_and_counter_words(pristine, offset, value, delta, relative, sealed):
    """Any header or counter word set to a random, boundary or nearby value, with the checksum
    left stale or recomputed (so that the layout checks themselves are exercised)."""
    buf = bytearray(pristine.data)
    new = (word(buf, offset) + delta) & U64 if relative else value
    put(buf, offset, new)
    if sealed:
        reseal(buf)
    outcome = attach_outcome(pristine, bytes(buf))
    if bytes(buf) == pristine.data:
        assert outcome == "ok"
    elif offset < H_END and not (sealed and offset in (H_CHECKSUM, H_SCHEMA_HASH, H_CREATOR, H_CREATED, 112, 120)):
        assert outcome == "corrupt"


@fast(300)
@given(
    capacity=st.one_of(st.integers(1, 512), _BOUNDARY),
    size_delta=st.one_of(st.just(0), st.sampled_from([-4096, -8, -1, 1, 8, 4096]), st.integers(-10_000, 10_000)),
)
def test_forged_consistent_layout(pristine, capacity, size_delta):
    """Headers rewritten by hand for another capacity with a valid checksum: accepted exactly
    when the file size matches (then the buffer has that capacity and works), refused
    otherwise -- a forged capacity never makes attach map or touch past the end of the file."""
    data = forge(pristine.data, capacity=capacity, size_delta=size_delta)
    outcome = attach_outcome(pristine, data)
    lay = layout(capacity, word(data, H_RECORD_BYTES), pristine.schema_len)
    fits = lay is not None and lay["total"] == len(data)
    assert outcome == ("ok" if fits else "corrupt")
    if fits:
        with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as buf:
            assert buf.capacity == capacity and buf.nbytes == len(data)


_NAMES = st.one_of(
    st.sampled_from(["obs", "act", "rew", "x", "_", "a" * 64, "a" * 65, "1a", "a b", "", "é", "a-b", "obs"]),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
)
_CODES = st.sampled_from(list(CODES) + ["q9", "u3", "f16", "c8", "U1", "", "B1", "u1 ", "O"])
_DIM = st.one_of(
    st.integers(1, 6).map(str),
    st.sampled_from(["0", "01", "+1", "-1", " 1", "1 ", "x", "", "99999999999999999999999", str(2**64 - 1), str(2**32), "65536"]),
)


@st.composite
def _schema_texts(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=80)).encode("utf-8", "surrogatepass")
    if kind >= 6:  # a valid schema, different from the real one
        names = draw(st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), min_size=1, max_size=5, unique=True))
        fields = [(n, draw(st.sampled_from(sorted(CODES))), tuple(draw(st.lists(st.integers(1, 6), max_size=3)))) for n in names]
        return encode_schema(fields)
    lines = draw(st.lists(st.tuples(_NAMES, _CODES, st.lists(_DIM, max_size=10)), min_size=0, max_size=6))
    text = "".join(f"{n}:{c}:{','.join(d)}\n" for n, c, d in lines)
    mutation = draw(st.sampled_from(["none", "none", "none", "chop", "crlf", "extra-colon", "blank-line", "dup"]))
    if mutation == "chop" and text:
        text = text[:-1]
    elif mutation == "crlf":
        text = text.replace("\n", "\r\n")
    elif mutation == "extra-colon" and text:
        text = text.replace(":", "::", 1)
    elif mutation == "blank-line":
        text += "\n"
    elif mutation == "dup" and lines:
        text += text.splitlines(keepends=True)[0]
    return text.encode("utf-8", "surrogatepass")


@fast(700)
@given(text=_schema_texts(), consistent=st.booleans(), size_delta=st.sampled_from([0, 0, 0, 8, -8]))
@example(text=b"obs:u1:3\nact:i4:\nrew:f4:2\n", consistent=True, size_delta=0)
@example(text=b"obz:u1:3\nact:i4:\nrew:f4:2\n", consistent=False, size_delta=0)
@example(text=b"obs:u1:300\nact:i4:\nrew:f4:2\n", consistent=False, size_delta=0)
@example(text=b"obs:u1:4294967296,4294967296\n", consistent=True, size_delta=0)
@example(text=b"x:f8:" + b",".join([b"2"] * 9) + b"\n", consistent=True, size_delta=0)
@example(text=b"", consistent=True, size_delta=0)
def test_forged_schema_text(pristine, text, consistent, size_delta):
    """Schema texts replaced by garbage, malformed or valid-but-different schemas, with the
    checksum and schema hash recomputed, and optionally the whole layout made consistent:
    the buffer opens exactly when the model says the header is valid, with the forged fields."""
    assume(len(text) <= MAX_SCHEMA_TEXT)
    if consistent:
        data = forge(pristine.data, text=text, size_delta=size_delta)
    else:
        buf = bytearray(pristine.data)
        old = word(buf, H_SCHEMA_LEN)
        buf[SCHEMA_TEXT : SCHEMA_TEXT + old] = bytes(old)
        end = min(SCHEMA_TEXT + len(text), pristine.table)
        buf[SCHEMA_TEXT:end] = text[: end - SCHEMA_TEXT]
        put(buf, H_SCHEMA_LEN, len(text))
        data = bytes(reseal(buf))
    outcome = attach_outcome(pristine, data)
    parsed = parse_schema(data[SCHEMA_TEXT : SCHEMA_TEXT + len(text)])
    if parsed is None:
        assert outcome == "corrupt"
    if outcome == "ok":
        with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as buf:
            assert [(n, s) for n, (s, _) in buf.fields.items()] == [(n, s) for n, _, s in parsed]


@fast(300)
@given(
    body=st.binary(max_size=4096),
    size=st.sampled_from([0, 512, 4096, 8192]),
    prefix=st.sampled_from(["none", "magic", "magic+version", "magic+version+ready"]),
)
def test_foreign_files(pristine, body, size, prefix):
    """Files that merely look like segments (random bytes, maybe behind a right magic, version
    and ready word) are refused."""
    data = bytearray(body.ljust(size, b"\0"))
    heads = {"none": [], "magic": [MAGIC], "magic+version": [MAGIC, 1], "magic+version+ready": [MAGIC, 1, 1]}[prefix]
    if len(data) >= 8 * len(heads):
        for i, w in enumerate(heads):
            put(data, 8 * i, w)
    assert attach_outcome(pristine, bytes(data)) == "corrupt"


# --------------------------------------------------------------------------- specific hostile files


def test_messages_say_what_is_wrong(pristine):
    cases = {
        "magic": (H_MAGIC, 0x1234, "magic"),
        "version": (H_VERSION, LAYOUT_VERSION + 1, "version"),
        "ready": (H_READY, 0, "ready"),
        "checksum": (H_CHECKSUM, 1, "checksum"),
    }
    for offset, value, needle in cases.values():
        buf = bytearray(pristine.data)
        put(buf, offset, value)
        write_victim(pristine, bytes(buf))
        with pytest.raises(CorruptSegmentError, match=needle) as exc:
            ReplayBuffer.attach(VICTIM, path=pristine.dir)
        assert pristine.path in str(exc.value)
    write_victim(pristine, pristine.data[: pristine.size // 2])
    with pytest.raises(CorruptSegmentError, match="bytes") as exc:
        ReplayBuffer.attach(VICTIM, path=pristine.dir)


def test_reaped_segment_is_not_found_for_attach(pristine):
    """A segment a gc marked as removed (reaper word) is gone for attach, and the refused
    attach leaves no handle entry behind."""
    buf = bytearray(pristine.data)
    put(buf, REAPER, REAPED)
    write_victim(pristine, bytes(buf))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.attach(VICTIM, path=pristine.dir)
    with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as peek:
        assert peek.stats()["attached"] == 0


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_hostile_reaper_word_does_not_hang_attach(pristine):
    """The reaper word is not covered by any validation: set to the identity of a live process
    that is not running a gc (here pid 1), every attach waits for that "gc" to finish -- forever.
    attach must give up after a bounded time (a few seconds at most) with an error."""
    buf = bytearray(pristine.data)
    put(buf, REAPER, (_start_ticks(1) & 0xFFFFFFFF) << 32 | 1)
    write_victim(pristine, bytes(buf))
    script = (
        "import sys, shmreplay\n"
        "try:\n"
        f"    shmreplay.ReplayBuffer.attach({VICTIM!r}, path={pristine.dir!r})\n"
        "except (ValueError, OSError) as e:\n"
        "    print(type(e).__name__)\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("attach of a segment with a hostile reaper word still waits after 5 s")
    assert proc.returncode == 0, proc.stderr


def _special_files(directory: str) -> dict[str, str]:
    made = {}
    os.mkdir(os.path.join(directory, "shmreplay.adir"))
    made["adir"] = "directory"
    os.mkfifo(os.path.join(directory, "shmreplay.afifo"), 0o600)
    made["afifo"] = "fifo"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(directory, "shmreplay.asock"))
    sock.close()
    made["asock"] = "socket"
    if os.geteuid() == 0:
        os.mknod(os.path.join(directory, "shmreplay.achr"), 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        made["achr"] = "char device (/dev/zero)"
    return made


@pytest.mark.parametrize("kind", ["afifo", "achr"])
def test_special_file_at_segment_name_is_corrupt(tmp_path, kind):
    made = _special_files(str(tmp_path))
    if kind not in made:
        pytest.skip("mknod needs root")
    for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
        with pytest.raises(CorruptSegmentError, match="regular file"):
            open_(kind, path=tmp_path)


@pytest.mark.parametrize(
    "kind",
    [
        "adir",
        "asock",
    ],
)
def test_directory_or_socket_at_segment_name_is_corrupt(tmp_path, kind):
    _special_files(str(tmp_path))
    for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
        with pytest.raises(CorruptSegmentError):
            open_(kind, path=tmp_path)


def _zoo(p: Pristine, directory: str) -> list[str]:
    """A directory with one valid segment and every kind of broken one; returns broken names."""
    def put_file(name: str, data: bytes, mode: int = 0o600) -> None:
        path = os.path.join(directory, "shmreplay." + name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    bad = bytearray(p.data)
    put(bad, H_CAPACITY, 9)
    reaped = bytearray(p.data)
    put(reaped, REAPER, REAPED)
    broken = {
        "empty": b"",
        "short": p.data[:100],
        "truncated": p.data[: p.size // 2],
        "longer": p.data + b"\0" * 4096,
        "magic": b"\0" * 8 + p.data[8:],
        "sealed-bad-capacity": bytes(reseal(bad)),
        "noise": os.urandom(8192),
        "mode-000": p.data[: p.size // 2],
    }
    for name, data in broken.items():
        put_file(name, data, 0 if name == "mode-000" else 0o600)
    put_file("reaped", bytes(reaped))
    os.symlink("/dev/zero", os.path.join(directory, "shmreplay.link"))
    put_file("good", p.data)
    _special_files(directory)
    return sorted(broken)


def test_listing_and_gc_with_corrupt_files(pristine, tmp_path):
    """list_buffers, gc (dry run) and the CLI's ls/info never fail because of broken files next
    to a good one: the good one is listed, the broken ones are not listed as buffers, and info
    on a broken one is a one-line error naming the file."""
    d = str(tmp_path)
    broken = _zoo(pristine, d)
    listed = {b["name"]: b for b in shmreplay.list_buffers(d)}
    assert "good" in listed and listed["good"]["capacity"] == CAP and listed["good"]["size"] == CAP
    assert not set(broken) & set(listed), listed
    names = shmreplay.gc(d, dry_run=True)
    assert not set(broken) & set(names)
    cli = [sys.executable, "-m", "shmreplay.cli"]
    proc = subprocess.run([*cli, "ls", "--json", "--path", d], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    status = {b["name"]: b["status"] for b in json.loads(proc.stdout)}
    assert status["good"] == "live"
    assert all(status.get(name) == "corrupt" for name in broken), status
    proc = subprocess.run([*cli, "ls", "--path", d], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "good" in proc.stdout
    for name in ("truncated", "magic", "sealed-bad-capacity"):
        proc = subprocess.run([*cli, "info", name, "--path", d], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"shmreplay.{name}" in lines[0], proc.stderr
    # the good one is intact and usable after all that
    with ReplayBuffer.attach("good", path=d) as buf:
        assert len(buf) == CAP and buf.stats()["inserts"] == CAP + 3
        buf.sample(4)
    # gc for real removes nothing that is not a stale buffer, and never a broken file
    before = set(os.listdir(d))
    removed = shmreplay.gc(d)
    assert set(removed) <= {"good"}
    assert before - set(os.listdir(d)) <= {"shmreplay.good"}
