"""Hostile or broken segment files: ``attach``/``inspect`` either open a usable buffer or raise
``CorruptSegmentError`` naming the file and what is wrong -- never a crash, a hang, or another
exception.

Real segments (a full, wrapped ring; a partly filled one; one with holes; an empty one) are built
once per module, each as a uniform and as a prioritized buffer (every test that uses them runs
for both); every example rewrites a copy of their bytes with corruption drawn by hypothesis
(truncation, extension, random bytes anywhere before the slots, garbage in the slots' version
words and records, header and control words and handle-table words set to random or boundary
values, forged headers, section directories, kinds, feature bits and sampler words whose
checksum was recomputed so that the deeper checks are reached, forged schema texts, garbage in
the priority tree, files of layout version 2, random foreign files), then inspects and attaches
it and lists its directory. About 12,000 examples in all, plus directories of special and
broken files for ``list_buffers``, ``gc`` and the CLI.

The expected outcome of each example comes from ``model_check``, an independent Python model of
what ``attach`` validates in layout version 3 (``crates/shmreplay-core/src/layout/mod.rs``:
header words, the sampler's words and feature bit, section directory -- with a ``priority``
section whose size is that of the tree of ``protocol/priority.rs`` in a prioritized buffer --,
schema text, checksum) and of the reason it gives. ``test_model_matches_real_segments`` checks
the model against segments the library itself wrote, uniform and prioritized, so a layout change
fails loudly here instead of silently weakening these tests.

When the model says "valid", the buffer must also be usable whatever garbage the unvalidated
regions (control words, handle table, slots, priority tree) hold: ``len``, ``stats``,
``processes``, ``buf[i]`` for every slot, ``sample`` and ``add`` (and ``priorities`` and
``update_priorities``) must work (or fail with their documented exceptions). The numbers may
then be wrong, but they are the numbers the shared words imply: ``View`` models how the core
reads the size (per-entry ``firsts`` plus the adjustments of the inserts in progress,
``protocol/handles.rs``) and the counters (sums over the entries used), which slots are readable
(the version word of ``protocol/slot.rs``), and ``TreeView`` what the priority tree holds,
which leaves each row of a prioritized batch can descend to, and how the core rewrites the tree
when it repairs what a dead process left half-changed, resyncs it with the slots (after draws
that keep missing) or applies updates; ``len`` always stays within [0, capacity].

Version 3 has no reaper word (gc decides with kernel locks, ``protocol/gate.rs``), so there is
no "marked removed" outcome any more: nothing in the file's bytes can make attach report a
buffer as gone.

A segfault or SIGBUS would kill pytest, so merely finishing is part of the assertion.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import struct
import subprocess
import sys
from decimal import Decimal
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

import shmreplay
from helpers import rows_for_keys, run_forked
from shmreplay import CorruptSegmentError, EmptyBufferError, ReplayBuffer

# --------------------------------------------------------------------------- the format (mirror)

MAGIC = int.from_bytes(b"SHMRPLY\0", "little")
LAYOUT_VERSION = 4
READY = 1
KIND_RING = 1
FEATURE_PRIORITIZED = 1  # the buffer samples by priority and has a "priority" section
FEATURE_LIMITED = 2  # calls wait for the rate limiter of the header's limiter words
FEATURE_QUEUE = 4  # the buffer is a queue (sampler kind 2; the layout of a uniform ring)
FEATURE_EPISODES = 8  # an EpisodeBuffer: its settings in the header, metadata fields, a links section
KNOWN_FEATURES = FEATURE_PRIORITIZED | FEATURE_LIMITED | FEATURE_QUEUE | FEATURE_EPISODES
# Header words (layout/mod.rs). The checksum covers bytes CHECKED..HEADER_END and the schema text.
H_MAGIC, H_VERSION, H_READY, H_CHECKSUM = 0, 8, 16, 24
H_KIND, H_FEATURES, H_CAPACITY, H_RECORD_BYTES = 32, 40, 48, 56
H_SLOT_BYTES, H_RECORD_IN_SLOT, H_SCHEMA_LEN, H_SCHEMA_HASH = 64, 72, 80, 88
H_TOTAL, H_CREATOR, H_CREATOR_NAMESPACE, H_CREATED = 96, 104, 112, 120
H_SECTION_COUNT = 128
CHECKED = H_KIND
SECTION_DIRECTORY, MAX_SECTIONS, SECTION_ENTRY_BYTES = 136, 8, 32
DIRECTORY_END = SECTION_DIRECTORY + MAX_SECTIONS * SECTION_ENTRY_BYTES  # 392
# The sampler: kind (0 uniform, 1 prioritized, 2 queue), alpha and eps (f64 bits), stratified (0
# or 1). All four are 0 in a uniform buffer (and a queue), whose attach reads only the kind.
H_SAMPLER, H_ALPHA, H_EPS, H_STRATIFIED = 392, 400, 408, 416
SAMPLER_UNIFORM, SAMPLER_PRIORITIZED, SAMPLER_QUEUE = 0, 1, 2
QUEUE = "queue"  # what header_sampler says of a queue
# The rate limiter: kind (0 none, 1 MinSize, 2 SampleToInsertRatio), then samples per insert,
# min size, min diff and max diff (f64 bits but the size), read only when there is a limiter.
H_LIMITER, H_SAMPLES_PER_INSERT, H_MIN_SIZE, H_MIN_DIFF, H_MAX_DIFF = 424, 432, 440, 448, 456
LIMITER_WORDS = range(H_SAMPLES_PER_INSERT, H_MAX_DIFF + 8, 8)
RESERVED = H_MAX_DIFF + 8  # ..HEADER_END: words nobody writes or reads (checksum only)
HEADER_END = SCHEMA_TEXT = 512
# Sections, in directory order: (tag, offset, length, version) each.
CONTROL, HANDLES, SLOTS = b"control\0", b"handles\0", b"slots\0\0\0"
PRIORITY = b"priority"  # prioritized buffers only (8 bytes, no NUL)
SECTION_TAGS = (CONTROL, HANDLES, SLOTS)  # every buffer's; a prioritized one adds PRIORITY
SECTION_VERSION = 1
CONTROL_BYTES = 1024
C_CURSOR, C_ENTRIES_USED = 0, 128
# Flow control: S (rows admitted to sampling), a queue's head, the shutdown flag, the two futex
# words with their waiter counts (32-bit words), and the rows a rate-limited ring's inserts have
# committed. All 0 in the rings modelled here.
C_SAMPLED, C_HEAD, C_SHUTDOWN, C_INSERT_EVENT, C_SAMPLE_EVENT, C_COMMITTED = 256, 384, 512, 640, 768, 896
# Handle table (protocol/handles.rs): MAX_HANDLES entries of ENTRY_BYTES.
ENTRY_BYTES = 128
MAX_HANDLES = 1024
E_OWNER, E_NAMESPACE, E_INTENT, E_FIRSTS = 0, 8, 16, 24
COUNTERS = ("inserts", "samples", "retries", "recovered", "superseded", "lost", "stale_updates")
# ...then the nanoseconds inserts and samples waited for flow control (stats gives seconds).
WAIT_COUNTERS = ("insert_wait_ns", "sample_wait_ns")
E_COUNTER = {name: 32 + 8 * i for i, name in enumerate(COUNTERS + WAIT_COUNTERS)}
# How many changes of the priority tree the entry's process has in flight (leaves changed,
# ancestors not yet recomputed; 0 normally): whoever finds the process dead with a nonzero count
# recomputes the whole tree (and retags to no value the leaves of the slots it left busy).
E_TREE_CHANGES = 104
# A queue producer's insert in progress: its first ticket + 1 (0 in a ring).
E_QUEUE_CLAIM = 112
# Its process's calls waiting for flow control (inserts low half, samples high; 0 in a ring).
E_WAITERS = 120
E_UNUSED = range(128, ENTRY_BYTES, 8)  # none: the entry is full
SNAPSHOT_MASK = 0xFFF  # an intent word is (ticket + 1) << 12 | (firsts & 0xfff)
# Slot version word (protocol/slot.rs): ticket + 1 in bits 63..12, FIRST, owner entry, busy.
BUSY, OWNER_SHIFT, OWNER_MASK, FIRST, TICKET_SHIFT = 1, 1, 0x3FF, 1 << 11, 12
MAX_TICKET = (1 << 52) - 2
ALIGNED_RECORD_BYTES = 1024
MAX_CAPACITY = 1 << 40
MAX_SCHEMA_TEXT = 32 * 1024
MAX_FIELDS, MAX_FIELD_NAME, MAX_NDIM = 256, 64, 8
MAX_RECORD_BYTES = 1 << 32
U64 = 2**64 - 1
I64_MAX = 2**63 - 1
# The priority section (protocol/priority.rs): a head (the largest raw priority ever set, f64
# bits, 0 meaning 1.0), then one 16-byte leaf per slot (tag << q_bits | q, raw priority bits),
# then level 0 (a compact copy of every leaf's q, one word per slot), then each level of 16-ary
# nodes up to the root: sums, then minima, one word per node. Leaves, level 0 and node arrays
# are padded to whole nodes of FANOUT; the padding is never read.
FANOUT, TREE_HEAD_BYTES, LEAF_BYTES, MAX_RAW = 16, 128, 16, 0
V_BITS, MAX_Q_BITS, SUM_BITS = 20, 40, 62
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


def tag_word(tag: bytes) -> int:
    return int.from_bytes(tag, "little")


def committed(ticket: int) -> int:
    return ((ticket + 1) << TICKET_SHIFT) & U64


def committed_first(ticket: int, owner: int) -> int:
    return committed(ticket) | owner << OWNER_SHIFT | FIRST


def busy(ticket: int, owner: int, first: bool) -> int:
    return committed(ticket) | owner << OWNER_SHIFT | (FIRST if first else 0) | BUSY


def readable(version_word: int) -> bool:
    """The slot holds a committed record: the word names a ticket and is not busy."""
    return version_word >> TICKET_SHIFT != 0 and not version_word & BUSY


def ticket_of(version_word: int) -> int:
    return (version_word >> TICKET_SHIFT) - 1


class PrioritizedParams(NamedTuple):
    """The parameters of a prioritized sampler as the header holds them (a uniform sampler is
    ``None`` in this model)."""

    alpha: float
    eps: float
    stratified: bool


def f64(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits & U64))[0]


def bits_of(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def rust_float(x: float) -> str:
    """An f64 as Rust's ``Display`` writes it (shortest round trip, never an exponent)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def sampler_error(sampler: PrioritizedParams | None) -> str | None:
    """Mirror of ``Sampler::validate`` (the first check of ``Layout::new``)."""
    if sampler is not None:
        for name, value in (("alpha", sampler.alpha), ("eps", sampler.eps)):
            if not (math.isfinite(value) and value >= 0.0):
                return f"Prioritized: {name} must be a finite number >= 0, got {rust_float(value)}"
    return None


def header_sampler(data: bytes | bytearray) -> tuple[str | None, PrioritizedParams | None]:
    """Mirror of how ``read_header`` derives the sampler from the sampler kind word and the
    feature bit: ``(reason it is corrupt, None)`` or ``(None, sampler)``. alpha and eps are not
    validated here (``Layout::new`` does that)."""
    kind, features = word(data, H_SAMPLER), word(data, H_FEATURES)
    bits = features & (FEATURE_PRIORITIZED | FEATURE_QUEUE)
    if (kind, bits) == (SAMPLER_UNIFORM, 0):
        return None, None
    if (kind, bits) == (SAMPLER_QUEUE, FEATURE_QUEUE):
        return None, QUEUE
    if (kind, bits) == (SAMPLER_PRIORITIZED, FEATURE_PRIORITIZED):
        flag = word(data, H_STRATIFIED)
        if flag not in (0, 1):
            return f"sampler flag {flag} is not 0 or 1", None
        return None, PrioritizedParams(f64(word(data, H_ALPHA)), f64(word(data, H_EPS)), bool(flag))
    return f"sampler kind {kind} does not match the feature bits {features:#x}", None


def header_limiter_error(data: bytes | bytearray) -> str | None:
    """Mirror of how ``read_header`` reads the limiter kind (against the feature bit) and, for
    a MinSize, the words it leaves unused: None if they are consistent, else the reason."""
    kind, features = word(data, H_LIMITER), word(data, H_FEATURES)
    if (kind, bool(features & FEATURE_LIMITED)) not in ((0, False), (1, True), (2, True)):
        return f"limiter kind {kind} does not match the feature bits {features:#x}"
    if kind == 1:
        for offset, value in ((H_SAMPLES_PER_INSERT, 1.0), (H_MIN_DIFF, -math.inf), (H_MAX_DIFF, math.inf)):
            if word(data, offset) != bits_of(value):
                return f"limiter word at byte {offset} does not match the limiter's kind"
    return None


def limiter_error(data: bytes | bytearray, sampler: Any, capacity: int) -> str | None:
    """Mirror of ``Layout::new``'s checks of a limiter (``Limiter::validate``): None if there is
    none or it is valid, else (a piece of) the reason."""
    kind = word(data, H_LIMITER)
    if kind == 0:
        return None
    spi, min_size = f64(word(data, H_SAMPLES_PER_INSERT)), word(data, H_MIN_SIZE)
    lo, hi = f64(word(data, H_MIN_DIFF)), f64(word(data, H_MAX_DIFF))
    if sampler == QUEUE:
        return "a Queue() has its own flow control"
    if not 1 <= min_size <= capacity:
        return "min_size must be between 1 and the capacity"
    if kind == 2:
        if not (math.isfinite(spi) and spi > 0.0):
            return "samples_per_insert must be a finite number > 0"
        if math.isnan(lo) or math.isnan(hi):
            return "the error buffer must not be NaN"
        if hi - lo < 2.0 * max(1.0, spi) or lo > spi * min_size:
            return ""
    return None


def sampler_words(sampler: PrioritizedParams | None) -> list[tuple[int, int]]:
    """``(offset, value)`` of the feature bits and sampler words ``write_header`` writes."""
    if sampler is None:
        return [(H_FEATURES, 0), (H_SAMPLER, SAMPLER_UNIFORM), (H_ALPHA, 0), (H_EPS, 0), (H_STRATIFIED, 0)]
    return [(H_FEATURES, FEATURE_PRIORITIZED), (H_SAMPLER, SAMPLER_PRIORITIZED), (H_ALPHA, bits_of(sampler.alpha)),
            (H_EPS, bits_of(sampler.eps)), (H_STRATIFIED, int(sampler.stratified))]


def quantize(v: float, fraction_bits: int) -> int:
    """Mirror of ``Scale::quantize`` for a finite ``v >= 0`` (without its upper bound): ``v`` in
    fixed point, rounded half up (``+ 0.5`` in floating point, then truncated), at least 1 if
    ``v > 0``."""
    q = int(v * 2.0**fraction_bits + 0.5)
    return max(q, 1) if v > 0 else 0


def scale(capacity: int) -> tuple[int, int]:
    """Mirror of ``Scale::for_capacity``: ``(q_bits, fraction_bits)`` of the tree's fixed point."""
    log2 = (max(capacity, 1) - 1).bit_length()
    q_bits = max(min(MAX_Q_BITS, max(SUM_BITS - log2, 0)), V_BITS)
    return q_bits, q_bits - V_BITS


def geometry(capacity: int) -> dict:
    """Mirror of ``Geometry::new``: where the leaves, level 0 (the copies of the leaves' q) and
    each level of nodes (level 1, the parents of level 0, first; the root's last) are in the
    priority section, and its size."""
    def whole(n: int) -> int:
        return roundup(n, FANOUT)

    values = TREE_HEAD_BYTES + whole(capacity) * LEAF_BYTES
    at = values + whole(capacity) * 8
    levels, below = [], capacity
    while True:
        nodes = -(-below // FANOUT)
        words = whole(nodes) * 8
        levels.append({"nodes": nodes, "sums": at, "mins": at + words})
        at += 2 * words
        below = nodes
        if nodes <= 1:
            break
    q_bits, fraction_bits = scale(capacity)
    return {"leaves": TREE_HEAD_BYTES, "values": values, "levels": levels, "bytes": at, "q_bits": q_bits,
            "fraction_bits": fraction_bits}


def layout(capacity: int, record_bytes: int, schema_len: int, sampler: PrioritizedParams | None = None) -> dict | None:
    """Mirror of ``Layout::new``: what the header and its directory must hold, or None if
    impossible (including a sampler whose alpha or eps is refused)."""
    if sampler_error(sampler) is not None:
        return None
    if not 1 <= capacity <= MAX_CAPACITY or schema_len > MAX_SCHEMA_TEXT:
        return None
    record_in_slot = 64 if record_bytes >= ALIGNED_RECORD_BYTES else 8
    slot = roundup(record_bytes + record_in_slot, record_in_slot)
    control = roundup(SCHEMA_TEXT + schema_len, 128)
    handles = control + CONTROL_BYTES
    slots = roundup(handles + MAX_HANDLES * ENTRY_BYTES, 4096)
    slots_end = slots + capacity * slot
    if slots_end > U64:  # checked_mul / checked_add in usize
        return None
    sections = [
        (CONTROL, control, CONTROL_BYTES, SECTION_VERSION),
        (HANDLES, handles, MAX_HANDLES * ENTRY_BYTES, SECTION_VERSION),
        (SLOTS, slots, capacity * slot, SECTION_VERSION),
    ]
    priority = None
    if sampler is None:
        total = slots_end
    else:
        # The tree starts on the page after the slots. (Exact arithmetic: an offset past 2**64
        # makes the layout impossible, it must not wrap around to the start of the file.)
        priority = roundup(slots_end, 4096)
        tree = geometry(capacity)["bytes"]
        total = priority + tree
        sections.append((PRIORITY, priority, tree, SECTION_VERSION))
    if total > I64_MAX:
        return None
    return {
        "record_bytes": record_bytes, "slot": slot, "record_in_slot": record_in_slot, "total": total,
        "control": control, "handles": handles, "slots": slots, "priority": priority, "sections": sections,
    }


def header_words(lay: dict) -> list[tuple[int, int]]:
    """``(offset, value)`` of every header word ``attach`` checks against the layout, in the
    order it checks them: the stored sizes, then the section directory."""
    words = [
        (H_RECORD_BYTES, lay["record_bytes"]),
        (H_SLOT_BYTES, lay["slot"]),
        (H_RECORD_IN_SLOT, lay["record_in_slot"]),
        (H_TOTAL, lay["total"]),
        (H_SECTION_COUNT, len(lay["sections"])),
    ]
    for i, (tag, offset, length, version) in enumerate(lay["sections"]):
        at = SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES
        words += [(at, tag_word(tag)), (at + 8, offset), (at + 16, length), (at + 24, version)]
    return words


def unused_directory(sections: int) -> range:
    """Byte offsets of the directory entries a buffer of ``sections`` sections does not use."""
    return range(SECTION_DIRECTORY + sections * SECTION_ENTRY_BYTES, DIRECTORY_END)


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
    return fnv1a(bytes(data[CHECKED:HEADER_END]) + bytes(data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len]))


def section_name(tag: bytes) -> str:
    return tag.rstrip(b"\0").decode()


def model_check(data: bytes) -> str | None:
    """What ``attach`` must do with a file holding ``data``: None if it opens it, else a piece of
    the reason ``CorruptSegmentError`` must give (empty if not modelled), following the order of
    ``read_header``'s checks."""
    size = len(data)
    if size < SCHEMA_TEXT or size % 8:
        return f"file size {size} is not a segment size"
    if word(data, H_MAGIC) != MAGIC:
        return "wrong magic number"
    version = word(data, H_VERSION)
    if version != LAYOUT_VERSION:
        return f"layout version {version} (this shmreplay reads version {LAYOUT_VERSION}"
    if word(data, H_READY) != READY:
        return "ready flag is not set"
    schema_len = word(data, H_SCHEMA_LEN)
    if schema_len > MAX_SCHEMA_TEXT or SCHEMA_TEXT + schema_len > size:
        return f"schema length {schema_len} is out of range"
    if checksum(data, schema_len) != word(data, H_CHECKSUM):
        return "header checksum mismatch"
    kind = word(data, H_KIND)
    if kind != KIND_RING:
        return f"buffer kind {kind} (this shmreplay opens ring buffers, kind {KIND_RING})"
    unknown = word(data, H_FEATURES) & ~KNOWN_FEATURES
    if unknown:
        return f"features this shmreplay does not know (bits {unknown:#x})"
    text = data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len]
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return "schema is not UTF-8"
    fields = parse_schema(text)
    if fields is None:
        return ""  # Schema::decode's own reason
    if fnv1a(text) != word(data, H_SCHEMA_HASH):
        return "schema hash mismatch"
    reason, sampler = header_sampler(data)
    if reason is not None:
        return reason
    reason = header_limiter_error(data)
    if reason is not None:
        return reason
    reason = sampler_error(None if sampler == QUEUE else sampler)
    if reason is not None:
        return reason
    reason = limiter_error(data, sampler, word(data, H_CAPACITY))
    if reason is not None:
        return reason
    lay = layout(word(data, H_CAPACITY), record_bytes_of(fields), schema_len, None if sampler == QUEUE else sampler)
    if lay is None:
        return "capacity"
    if word(data, H_FEATURES) & FEATURE_EPISODES:
        # The buffers here are rings: their schema lacks an episode buffer's metadata fields, so
        # whatever the episode words say, they are refused (the reason follows this prefix).
        return "episode words: "
    for offset, expected in header_words(lay)[:5]:
        if word(data, offset) != expected:
            return f"header word at byte {offset} is {word(data, offset)}, the schema and capacity imply {expected}"
    for i, (tag, offset, length, version) in enumerate(lay["sections"]):
        at = SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES
        if word(data, at) != tag_word(tag):
            return f"section {i} is "
        found = (word(data, at + 8), word(data, at + 16), word(data, at + 24))
        if found != (offset, length, version):
            return f'section "{section_name(tag)}" is at {found[0]}..+{found[1]} version {found[2]}, the schema'
    if size != lay["total"]:
        return f"file is {size} bytes, its header says {lay['total']}"
    return None


def model_validate(data: bytes) -> str:
    """"ok" or "corrupt"."""
    return "ok" if model_check(data) is None else "corrupt"


def reseal(data: bytearray) -> bytearray:
    """Recomputes the checksum (and the schema hash) so that a forged header passes them."""
    schema_len = word(data, H_SCHEMA_LEN)
    if SCHEMA_TEXT + schema_len <= len(data) and schema_len <= MAX_SCHEMA_TEXT:
        put(data, H_SCHEMA_HASH, fnv1a(bytes(data[SCHEMA_TEXT : SCHEMA_TEXT + schema_len])))
        put(data, H_CHECKSUM, checksum(data, schema_len))
    return data


def forge(base: bytes, *, capacity: int | None = None, text: bytes | None = None, size_delta: int = 0,
          max_size: int = 8 << 20) -> bytes:
    """A header (and section directory) made consistent by hand for another capacity and/or
    schema text and for the sampler its words describe (a priority section or none), sealed, and
    a file of the size it states plus ``size_delta`` (bytes kept from ``base`` where they fit; the
    sections' contents are not moved). A header whose sampler words are refused keeps its
    directory and size."""
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
    reason, header = header_sampler(data)
    lay = None if reason is not None else layout(cap, rb, word(data, H_SCHEMA_LEN), header)
    size = len(data)
    if lay is not None:
        old_sections = word(data, H_SECTION_COUNT)
        for offset, value in header_words(lay):
            put(data, offset, value)
        for i in range(len(lay["sections"]), min(old_sections, MAX_SECTIONS)):  # entries no longer used
            at = SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES
            data[at : at + SECTION_ENTRY_BYTES] = bytes(SECTION_ENTRY_BYTES)
        if lay["total"] <= max_size:
            size = lay["total"]
    size = max(SCHEMA_TEXT + 8, size + size_delta)
    if size > len(data):
        data.extend(bytes(size - len(data)))
    del data[size:]
    return bytes(reseal(data))


def v2_segment(capacity: int, fields, *, creator: int = 1) -> bytes:
    """A segment as layout version 2 wrote it (the previous release): header words at other
    offsets (capacity at 32, ..., no kind, features or section directory), a fixed handle table
    right after the schema text, checksum over bytes 32..128 and the schema text."""
    text = encode_schema(fields)
    rb = record_bytes_of(fields)
    table = roundup(SCHEMA_TEXT + len(text), ENTRY_BYTES)
    slots = roundup(table + MAX_HANDLES * ENTRY_BYTES, 4096)
    slot = rb + 8 if rb < 1024 else roundup(rb + 64, 64)
    total = slots + capacity * slot
    data = bytearray(total)
    for offset, value in ((0, MAGIC), (8, 2), (16, READY), (32, capacity), (40, rb), (48, len(text)),
                          (56, fnv1a(text)), (64, table), (72, slot), (80, slots), (88, total),
                          (96, creator), (104, 1)):
        put(data, offset, value)
    data[SCHEMA_TEXT : SCHEMA_TEXT + len(text)] = text
    put(data, 24, fnv1a(bytes(data[32:128]) + text))
    return bytes(data)


def _signed(x: int) -> int:
    return x - 2**64 if x >= 2**63 else x


def _wrap_i64(x: int) -> int:
    return (x + 2**63) % 2**64 - 2**63


class View:
    """The shared words of a valid segment, read as the core reads them (offsets from its
    header): what ``len``, ``stats`` and reads must report, however wrong the words are."""

    def __init__(self, data: bytes) -> None:
        assert model_check(data) is None
        self.data = data
        self.capacity = word(data, H_CAPACITY)
        self.slot_bytes = word(data, H_SLOT_BYTES)
        self.control, self.handles, self.slots = (
            word(data, SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES + 8) for i in range(3)
        )
        self.sampler = header_sampler(data)[1]
        self.tree = None
        if self.sampler is not None:
            at = SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES
            self.tree = TreeView(data, word(data, at + 8), word(data, at + 16), self.capacity)

    def cursor(self) -> int:
        return word(self.data, self.control + C_CURSOR)

    def entries_used(self) -> int:
        return min(word(self.data, self.control + C_ENTRIES_USED), MAX_HANDLES)

    def entry(self, e: int, offset: int) -> int:
        return word(self.data, self.handles + e * ENTRY_BYTES + offset)

    def seq(self, index: int) -> int:
        return word(self.data, self.slots + index * self.slot_bytes)

    def size(self) -> int:
        """``len``: the sum over the entries used of ``firsts`` plus the adjustment of the
        insert each entry's intent word announces (wrapping i64 arithmetic, then clamped)."""
        total = 0
        for e in range(self.entries_used()):
            intent, firsts = self.entry(e, E_INTENT), self.entry(e, E_FIRSTS)
            adjustment = 0
            if intent >> TICKET_SHIFT:
                ticket = (intent >> TICKET_SHIFT) - 1
                seq = self.seq(ticket % self.capacity)
                if seq == busy(ticket, e, False):
                    adjustment = -1
                elif seq == committed_first(ticket, e) and firsts & SNAPSHOT_MASK == intent & SNAPSHOT_MASK:
                    adjustment = 1
            total = _wrap_i64(_wrap_i64(total + _signed(firsts)) + adjustment)
        return min(max(total, 0), self.capacity)

    def counter(self, name: str) -> int:
        return sum(self.entry(e, E_COUNTER[name]) for e in range(self.entries_used())) & U64

    def claimed_readable(self) -> dict[int, int]:
        """``{slot: ticket}`` of the readable slots among those ``sample`` draws from."""
        claimed = min(self.cursor(), self.capacity)
        return {i: ticket_of(s) for i in range(claimed) if readable(s := self.seq(i))}

    def drawable(self) -> dict[int, int]:
        """Prioritized buffers: ``{slot: ticket}`` of the slots ``sample`` may return when the
        tree draws them: readable, and their leaf holds a value (q > 0) under the tag of the
        ticket their version word names."""
        tree = self.tree
        return {
            i: ticket_of(s) for i in range(self.capacity)
            if readable(s := self.seq(i)) and (leaf := tree.leaf(i))[1] > 0 and leaf[0] == tree.tag(ticket_of(s))
        }

    def holds_key(self, key: int) -> bool:
        """Prioritized buffers: whether ``priorities`` finds the record ``key``: slot
        ``key % capacity`` holds it (its version word) and its leaf carries its tag."""
        index = key % self.capacity
        seq = self.seq(index)
        return readable(seq) and ticket_of(seq) == key and self.tree.leaf(index)[0] == self.tree.tag(key)

    def updatable(self, key: int) -> bool:
        """Prioritized buffers: whether ``update_priorities`` applies to key ``key``. It does
        not read the version word: the key must lie between the oldest one whose tag no newer
        record can share and the cursor (keys at or past it were never issued), and the leaf
        of its slot must carry its tag."""
        cursor = self.cursor()
        return (self.tree.oldest_distinguishable(cursor) <= key < cursor
                and self.tree.leaf(key % self.capacity)[0] == self.tree.tag(key))

    def priority(self, key: int) -> float:
        """``priorities([key])``: the raw priority of the record ``key``'s leaf, else NaN."""
        return f64(self.tree.leaf(key % self.capacity)[2]) if self.holds_key(key) else math.nan

    def tree_changes(self, e: int) -> int:
        return self.entry(e, E_TREE_CHANGES)

    def holds_overwrite(self, e: int) -> bool:
        """Entry ``e``'s intent names a ticket whose slot holds ``busy(ticket, e, first=False)``:
        the entry still holds a slot whose old record it destroyed, and attach does not take it."""
        intent = self.entry(e, E_INTENT)
        if not intent >> TICKET_SHIFT:
            return False
        ticket = (intent >> TICKET_SHIFT) - 1
        return self.seq(ticket % self.capacity) == busy(ticket, e, False)

    def attach_entry(self) -> int:
        """The entry ``attach`` takes when no other process holds one: the first that holds no
        overwrite (``take_entry``)."""
        return next(e for e in range(MAX_HANDLES) if not self.holds_overwrite(e))

    def repair_entry(self, e: int) -> bool:
        """Mirror of ``repair_entry`` (bytearray views): if entry ``e``'s (dead) process had
        changes of the tree in flight, every leaf of a slot it left busy is retagged to the
        record it claimed, with no value, the whole tree is recomputed and the count reset."""
        if not self.tree_changes(e):
            return False

        def abandoned(index: int, _leaf) -> int | None:
            seq = self.seq(index)
            if seq & BUSY and seq >> TICKET_SHIFT and (seq >> OWNER_SHIFT) & OWNER_MASK == e:
                return self.tree.tag(ticket_of(seq))
            return None

        self.tree.repair(abandoned)
        put(self.data, self.handles + e * ENTRY_BYTES + E_TREE_CHANGES, 0)
        return True

    def resync(self) -> None:
        """Mirror of ``resync_tree`` (bytearray views), what sampling does once after 1024 misses
        for one row: a leaf whose slot is not busy and holds no record keeps its tag and loses its
        value, one whose slot holds a record of another tag takes that tag with no value; then
        the whole tree is recomputed."""
        def abandoned(index: int, leaf) -> int | None:
            seq = self.seq(index)
            if seq & BUSY:
                return None
            if not seq >> TICKET_SHIFT:
                return leaf[0]
            tag = self.tree.tag(ticket_of(seq))
            return tag if tag != leaf[0] else None

        self.tree.repair(abandoned)

    def update(self, keys: list[int], raw: float) -> int:
        """Mirror of ``update_priorities`` of ``keys`` to one raw priority (bytearray views):
        each distinct key that ``updatable`` says gets its leaf set (under its tag), then the
        ancestors of those leaves are recomputed. Returns how many keys applied."""
        q, bits = self.quantize(raw), bits_of(raw + 0.0)
        assert q is not None
        applied = []
        for key in sorted(set(keys), key=lambda k: (k % self.capacity, k)):
            if self.updatable(key):
                self.tree.store_leaf(key % self.capacity, self.tree.tag(key), q, bits)
                applied.append(key % self.capacity)
        self.tree.propagate(applied, everything=False)
        if applied and raw > 1.0:  # raise_max_raw: a fetch_max of the bits
            self.tree.put(MAX_RAW, max(self.tree.word(MAX_RAW), bits_of(raw)))
        return len(applied)

    def quantize_default(self) -> int | None:
        """The ``q`` of an ``add`` without a priority: that of the largest raw priority ever set
        (the tree's head)."""
        return self.quantize(self.tree.max_raw())

    def quantize(self, raw: float) -> int | None:
        """The ``q`` of raw priority ``raw``: ``(p + eps) ** alpha`` in the tree's fixed point,
        or None if it is refused (not a finite number >= 0, or above the largest value)."""
        if not (math.isfinite(raw) and raw >= 0.0):
            return None
        try:
            v = math.pow(raw + self.sampler.eps, self.sampler.alpha)
        except OverflowError:
            return None
        if not math.isfinite(v * 2.0**self.tree.fraction_bits):  # (then its q is above the largest)
            return None
        q = quantize(v, self.tree.fraction_bits)
        return None if q > self.tree.q_max else q


M64 = 2**64


def _ends(values: list[int]) -> list[int]:
    """Mirror of ``Tree::ends``: where the children's ranges end, cumulatively, with wrapping
    adds (only scribbled sums can wrap)."""
    ends, total = [], 0
    for v in values:
        total = (total + v) % M64
        ends.append(total)
    return ends


def _pick_child(ends: list[int], target: int) -> int:
    """Mirror of ``pick``'s branch-free binary search (``target`` below the total): the first
    child whose range ends above the target when the ends increase; scribbled ends (wrapped,
    not increasing) only make it pick another child."""
    child, half = 0, FANOUT // 2
    while half:
        if ends[child + half - 1] <= target:
            child += half
        half //= 2
    return child


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _step(values: list[int], ranges: list[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """Mirror of ``Tree::step`` for every target of ``ranges`` (inclusive) at once: ``{child:
    targets within that child}``. The target is wrapped into the children's total (0: nowhere)
    if beyond it; the child is the one ``pick`` chooses, which depends only on which of the 16
    ends are at most the target, so it is the same over each piece between two ends, and so
    is the shift to the target within the child (target - end of the child before, wrapping)."""
    ends = _ends(values)
    total = ends[-1]
    if total == 0:
        return {}
    residues: list[tuple[int, int]] = []
    for a, b in ranges:
        if b - a + 1 >= total:
            residues = [(0, total - 1)]
            break
        ra, rb = a % total, b % total
        residues += [(ra, rb)] if ra <= rb else [(ra, total - 1), (0, rb)]
    points = sorted(set(ends))
    out: dict[int, list[tuple[int, int]]] = {}
    for a, b in _merge(residues):
        cuts = [a, *(p for p in points if a < p <= b), b + 1]
        for x, end in zip(cuts, cuts[1:]):
            child = _pick_child(ends, x)
            start = ends[child - 1] if child else 0
            lo, hi = (x - start) % M64, (end - 1 - start) % M64
            assert lo <= hi
            out.setdefault(child, []).append((lo, hi))
    return {child: _merge(rs) for child, rs in out.items()}


class TreeView:
    """The priority section of a valid prioritized segment, read as the core reads it
    (``protocol/priority.rs``), however wrong its words are. Over a bytearray, the methods that
    change it (``store_leaf``, ``propagate``) change it as the core would."""

    def __init__(self, data: bytes | bytearray, base: int, length: int, capacity: int) -> None:
        self.data, self.base, self.length, self.capacity = data, base, length, capacity
        g = geometry(capacity)
        assert g["bytes"] == length
        self.levels = g["levels"]
        self.values = g["values"]
        self.q_bits, self.fraction_bits = g["q_bits"], g["fraction_bits"]
        self.q_max = (1 << self.q_bits) - 1
        self.tag_mask = U64 >> self.q_bits

    def word(self, offset: int) -> int:
        assert 0 <= offset and offset + 8 <= self.length, f"the model reads past the section ({offset})"
        return word(self.data, self.base + offset)

    def put(self, offset: int, value: int) -> None:
        assert 0 <= offset and offset + 8 <= self.length
        put(self.data, self.base + offset, value)

    def section(self) -> bytes:
        return bytes(self.data[self.base : self.base + self.length])

    def leaf(self, index: int) -> tuple[int, int, int]:
        """``(tag, q, raw priority bits)`` of leaf ``index``."""
        low = self.word(TREE_HEAD_BYTES + LEAF_BYTES * index)
        raw = self.word(TREE_HEAD_BYTES + LEAF_BYTES * index + 8)
        return low >> self.q_bits, low & self.q_max, raw

    def store_leaf(self, index: int, tag: int, q: int, raw: int) -> None:
        self.put(TREE_HEAD_BYTES + LEAF_BYTES * index, (tag & self.tag_mask) << self.q_bits | (q & self.q_max))
        self.put(TREE_HEAD_BYTES + LEAF_BYTES * index + 8, raw)

    def value(self, index: int) -> int:
        """Level 0's copy of leaf ``index``'s q (what the descent reads)."""
        return self.word(self.values + 8 * index)

    def tag(self, ticket: int) -> int:
        """The leaf tag of the record of ``ticket``: its lap plus one, in the bits above q."""
        return (ticket // self.capacity + 1) & self.tag_mask

    def oldest_distinguishable(self, cursor: int) -> int:
        """Mirror of ``Scale::oldest_distinguishable``: keys older than this are stale to
        ``update_priorities`` without looking (their tag could be a newer record's)."""
        return max(cursor - min(self.capacity * self.tag_mask, U64), 0)

    def total(self) -> int:
        """The root's sum (what sampling draws targets below)."""
        return self.word(self.levels[-1]["sums"])

    def minimum(self) -> int:
        return self.word(self.levels[-1]["mins"])

    def max_raw(self) -> float:
        bits = self.word(MAX_RAW)
        return 1.0 if bits == 0 else f64(bits)

    def count(self, level: int, node: int) -> int:
        """How many children node ``node`` of level ``level`` has (the words after them, up to
        16, are padding)."""
        below = self.capacity if level == 1 else self.levels[level - 2]["nodes"]
        return max(min(below - node * FANOUT, FANOUT), 0)

    def child_words(self, level: int, node: int, what: str = "sums") -> list[int]:
        """The words of node ``node`` of level ``level``'s children that exist: their sums (or
        minima), level 0's values at level 1."""
        first = node * FANOUT
        if level == 1:
            return [self.value(first + k) for k in range(self.count(level, node))]
        below = self.levels[level - 2][what]
        return [self.word(below + 8 * (first + k)) for k in range(self.count(level, node))]

    def children(self, level: int, node: int) -> list[int]:
        """What the descent compares at node ``node`` of level ``level``: its children's sums
        (level 0's values at level 1), a child that does not exist counted as 0."""
        words = self.child_words(level, node)
        return words + [0] * (FANOUT - len(words))

    def reachable(self, lo: int, hi: int) -> set[int]:
        """The leaves the descent from the root can end at for a target in ``lo..=hi``, step by
        step as ``Tree::step`` goes (see ``_step``). Never a leaf past the capacity."""
        return self.descents(lo, hi)[0]

    def descents(self, lo: int, hi: int) -> tuple[set[int], bool]:
        """``reachable``, and whether some target of ``lo..=hi`` leads nowhere (to a node whose
        children hold nothing: ``descend`` returns None, and sample draws again)."""
        found: set[int] = set()
        nowhere = False
        stack = [(len(self.levels), 0, [(lo, hi)])]
        while stack:
            level, node, ranges = stack.pop()
            steps = _step(self.children(level, node), ranges)
            nowhere = nowhere or not steps
            for child, rest in steps.items():
                index = node * FANOUT + child
                if level > 1:
                    assert index < self.levels[level - 2]["nodes"], (level, index)
                    stack.append((level - 1, index, rest))
                else:
                    assert index < self.capacity, index
                    found.add(index)
        return found, nowhere

    # ---- changes, as the core makes them (on a bytearray)

    def _summary(self, level: int, node: int) -> tuple[int, int]:
        """Mirror of ``Tree::summary``: the wrapping sum of the children that exist and their
        smallest positive minimum (at level 1 the values themselves), 0 if none."""
        sums = self.child_words(level, node)
        minima = sums if level == 1 else self.child_words(level, node, "mins")
        return sum(sums) & U64, min((m for m in minima if m), default=0)

    def propagate(self, leaves, everything: bool) -> None:
        """Mirror of ``Tree::propagate``: level 0's copies of ``leaves`` (sorted), then their
        ancestors level by level, each stored where it differs from what is below it; only the
        parents of what was stored are recomputed, unless ``everything`` (a repair)."""
        leaves = list(leaves)
        stored = []
        for i in leaves:
            q = self.leaf(i)[1]
            if self.value(i) != q:
                self.put(self.values + 8 * i, q)
                stored.append(i)
        changed = leaves if everything else sorted(set(stored))
        for level in range(1, len(self.levels) + 1):
            nodes = sorted({child // FANOUT for child in changed})
            if not nodes:
                return
            words = self.levels[level - 1]
            stored = []
            for node in nodes:
                want = self._summary(level, node)
                if (self.word(words["sums"] + 8 * node), self.word(words["mins"] + 8 * node)) != want:
                    self.put(words["sums"] + 8 * node, want[0])
                    self.put(words["mins"] + 8 * node, want[1])
                    stored.append(node)
            changed = nodes if everything else stored

    def repair(self, abandoned) -> None:
        """Mirror of ``Tree::repair`` over every leaf: a leaf for which ``abandoned(index, leaf)``
        names a tag is set to that tag with no value (and raw priority 0), then level 0 and every
        node are recomputed."""
        for i in range(self.capacity):
            leaf = self.leaf(i)
            tag = abandoned(i, leaf)
            if tag is not None and (tag, 0, 0) != leaf:
                self.store_leaf(i, tag, 0, 0)
        self.propagate(range(self.capacity), everything=True)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- fixtures


class Pristine:
    def __init__(self, data: bytes, directory: str) -> None:
        self.data = data
        self.dir = directory
        self.path = os.path.join(directory, "shmreplay." + VICTIM)
        self.size = len(data)
        self.schema_len = word(data, H_SCHEMA_LEN)
        view = View(data)
        self.control, self.handles, self.slots = view.control, view.handles, view.slots
        self.slot_bytes = view.slot_bytes
        self.cursor = view.cursor()
        self.sampler = view.sampler  # None (uniform) or PrioritizedParams
        self.sections = word(data, H_SECTION_COUNT)
        self.priority = view.tree.base if view.tree else None  # the tree's section

    def entry(self, e: int, offset: int = 0) -> int:
        """Byte offset of word ``offset`` of handle-table entry ``e``."""
        return self.handles + e * ENTRY_BYTES + offset

    def seq(self, index: int) -> int:
        """Byte offset of slot ``index``'s version word."""
        return self.slots + index * self.slot_bytes


# The prioritized rings: parameters that are not the defaults, and priorities (some 0, some
# above 1.0, so that the largest raw priority is recorded in the tree's head).
PRIORITIZED = shmreplay.Prioritized(alpha=0.7, eps=0.01, stratified=True)
SAMPLERS = {"uniform": shmreplay.Uniform(), "prioritized": PRIORITIZED}


def priority_of(key: int) -> float:
    """The raw priority the prioritized rings give the record of insert ticket ``key``."""
    return (key % 5) * 0.75


def _build(directory: str, name: str, sampler, batches, cursor: int | None = None) -> Pristine:
    buf = ReplayBuffer.create(name, capacity=CAP, fields=FIELDS, path=directory, sampler=sampler)
    for keys in batches:
        if isinstance(sampler, shmreplay.Prioritized):
            buf.extend(rows_for_keys(FIELDS, keys), priority=[priority_of(k) for k in keys])
        else:
            buf.extend(rows_for_keys(FIELDS, keys))
    path = buf.path
    buf.close()  # releases its handle entry: no live owner in the copy
    data = bytearray(read_file(path))
    os.unlink(path)
    if cursor is not None:
        put(data, View(bytes(data)).control + C_CURSOR, cursor)
    return Pristine(bytes(data), directory)


@pytest.fixture(scope="module", params=sorted(SAMPLERS))
def rings(request, tmp_path_factory) -> dict[str, Pristine]:
    """Real segments in several states, all written as the victim of the same directory; every
    test that uses them runs for a uniform and for a prioritized buffer."""
    d = str(tmp_path_factory.mktemp("corrupt"))
    sampler = SAMPLERS[request.param]
    return {
        "full": _build(d, "full", sampler, [range(CAP), range(CAP, CAP + 3)]),  # wrapped: every slot committed
        "partial": _build(d, "partial", sampler, [range(3)]),
        # a writer took a chunk of 64 tickets and died before claiming its first slot
        "holes": _build(d, "holes", sampler, [range(3)], cursor=3 + 64),
        "empty": _build(d, "empty", sampler, []),
        "taken": _build(d, "taken", sampler, [], cursor=64),  # the same before any slot was claimed
    }


@pytest.fixture(scope="module")
def pristine(rings) -> Pristine:
    p = rings["full"]
    view = View(p.data)
    assert view.cursor() == CAP + 3 and view.entries_used() == 1, "control words expected"
    assert view.entry(0, E_FIRSTS) == CAP and view.counter("inserts") == CAP + 3, "counters expected"
    if p.sampler is not None:
        assert p.sampler == (PRIORITIZED.alpha, PRIORITIZED.eps, PRIORITIZED.stratified), "sampler expected"
        assert view.tree.max_raw() == max(priority_of(k) for k in range(CAP + 3)), "head expected"
        assert view.tree_changes(0) == 0, "no tree change in flight"
    return p


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


def note(what: str) -> None:
    """A hypothesis event (the statistics show how often each case came up), outside of a
    hypothesis test nothing."""
    if currently_in_test_context():
        event(what)


def same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


def _check_counts(buf: ReplayBuffer, registered: bool) -> int:
    """``len`` and ``stats`` report what the shared words say right now (see ``View``), and
    so does the sampler (and for a prioritized buffer the priority total and maximum)."""
    view = View(read_file(buf.path))
    n = len(buf)
    assert 0 <= n <= buf.capacity, n
    assert n == view.size(), f"len {n}, the shared words say {view.size()}"
    st_ = buf.stats()
    assert st_["capacity"] == buf.capacity and st_["size"] == n
    assert {c: st_[c] for c in COUNTERS} == {c: view.counter(c) for c in COUNTERS}
    for side in ("insert", "sample"):
        assert st_[f"{side}_wait_s"] == view.counter(f"{side}_wait_ns") / 1e9
    assert st_["deletes"] == max(view.cursor() - buf.capacity, 0) and st_["limiter"] is None
    assert st_["attached"] == int(registered)
    prioritized_keys = set() if view.tree is None else {"priority_total", "max_priority"}
    flow_keys = {"deletes", "insert_wait_s", "sample_wait_s", "limiter"}
    assert set(st_) == {"capacity", "size", "attached", *COUNTERS, *flow_keys, *prioritized_keys}, (
        "the model misses a counter"
    )
    if view.tree is None:
        assert buf.sampler == shmreplay.Uniform() and "priority_total" not in st_
    else:
        sampler = buf.sampler
        assert isinstance(sampler, shmreplay.Prioritized)
        assert (bits_of(sampler.alpha), bits_of(sampler.eps), sampler.stratified) == (
            bits_of(view.sampler.alpha), bits_of(view.sampler.eps), view.sampler.stratified)
        assert st_["priority_total"] == view.tree.total() / 2.0**view.tree.fraction_bits, (st_, view.tree.total())
        assert same_float(st_["max_priority"], view.tree.max_raw()), (st_, view.tree.max_raw())
    return n


def _sample_uniformly(buf: ReplayBuffer, expected: View, prioritized: bool):
    """``sample`` over the committed slots, as a uniform buffer (or a prioritized one whose
    priority total is 0, or nothing of whose is drawable by priority after a resync) draws:
    EmptyBufferError at once when none of the claimed slots is readable (a forged size or not:
    after 4096 misses the sampler looks at every slot), else rows of readable slots (or
    EmptyBufferError if the size says 0: it is checked every 32 misses). Returns the keys."""
    tickets = expected.claimed_readable()
    if not tickets:
        note("sample: nothing readable, EmptyBufferError")
        with pytest.raises(EmptyBufferError):
            buf.sample(4, return_info=True)
        return None
    try:
        batch, info = buf.sample(4, return_info=True)
    except EmptyBufferError:
        assert not len(buf), "EmptyBufferError with readable slots and a nonzero size"
        return None
    _check_uniform_rows(buf, View(read_file(buf.path)), batch, info, prioritized)
    return info["key"]


def _check_uniform_rows(buf: ReplayBuffer, view: View, batch, info, prioritized: bool) -> None:
    tickets = view.claimed_readable()
    assert tickets, "sampled a ring without a readable slot"
    assert all(batch[f].shape == (4,) + shape for f, (shape, _) in buf.fields.items())
    for i, key in zip(info["index"].tolist(), info["key"].tolist()):
        assert tickets.get(i) == key, (i, key, tickets)
    if prioritized:  # nothing drawable by priority: probability 1/len, weight 1, the leaf's own priority
        note("sample: uniform fallback of a prioritized buffer")
        assert info["probability"].tolist() == [1.0 / max(len(buf), 1)] * 4 and info["weight"].tolist() == [1.0] * 4
        for i, key, p in zip(info["index"].tolist(), info["key"].tolist(), info["priority"].tolist()):
            tag, _, raw = view.tree.leaf(i)
            assert same_float(p, f64(raw) if tag == view.tree.tag(key) else 0.0), (i, key, p)


def _copy(view: View) -> View:
    return View(bytearray(view.data))


def _attached(data: bytes) -> tuple[View, int]:
    """What attach does to the priority tree of ``data`` (with nobody else attached): it takes
    the first entry holding no overwrite and, if that entry's dead process had changes of the
    tree in flight, repairs the tree (``take_entry``). Returns the view and the entry."""
    view = View(bytearray(data))
    mine = view.attach_entry()
    if view.tree is not None:
        view.repair_entry(mine)
    return view, mine


def _repaired(view: View, mine: int) -> View:
    """What the first prioritized call of a handle (sample, update, insert) does before anything
    else (``repair_if_due``): every other entry used whose process had changes of the tree in
    flight (dead: nobody else holds an entry here) is repaired and its count reset."""
    after = _copy(view)
    for e in range(after.entries_used()):
        if e != mine:
            after.repair_entry(e)
    return after


def _row_ranges(total: int, rows: int, stratified: bool, total_now: int | None = None) -> list[tuple[int, int]]:
    """The targets each row of a batch of ``rows`` draws (inclusive ranges) when the root held
    ``total`` at the start of the call: row k of a stratified batch its own k-th of [0, total)
    (the first ``total % rows`` strata one longer), an i.i.d. row (or a row of an empty stratum:
    total < rows) anywhere below ``total_now``, the root's sum when it draws again (after a
    resync)."""
    width, longer = divmod(total, rows)
    now = total if total_now is None else total_now
    ranges = []
    for k in range(rows):
        size = width + (k < longer)
        if stratified and size > 0:
            start = k * width + min(k, longer)
            ranges.append((start, start + size - 1))
        else:
            ranges.append((0, now - 1))
    return ranges


def _resync_risk(view: View, rows: int = 4) -> tuple[list[set[int]], list[set[int]] | None, View, str | None]:
    """For a prioritized buffer whose root holds a total (after the repair sample starts with):
    the leaves each row can reach; if some row can reach a leaf that is not drawable or a node
    whose children hold nothing (so that it may miss 1024 times and the tree be resynced), the
    leaves each row can reach after the resync (None if it cannot happen); the view after a
    resync; and why sample could not finish at once: a row that, even after the resync, can
    reach only leaves of slots being written draws again and again until sample gives up after
    10 s (ContendedError)."""
    tree, stratified = view.tree, view.sampler.stratified
    total = tree.total()
    drawable = view.drawable().keys()
    descents = [tree.descents(lo, hi) for lo, hi in _row_ranges(total, rows, stratified)]
    reach = [r for r, _ in descents]
    resynced = _copy(view)
    resynced.resync()
    if all(r <= drawable and not nowhere for r, nowhere in descents):
        return reach, None, resynced, None
    total_now = resynced.tree.total()
    if total_now == 0:  # nothing drawable by priority after the resync: uniform
        return reach, [set()] * rows, resynced, None
    descents = [resynced.tree.descents(lo, hi) for lo, hi in _row_ranges(total, rows, stratified, total_now)]
    after = [r for r, _ in descents]
    if not all(r & drawable and not nowhere for r, nowhere in descents):
        return reach, after, resynced, "a row can reach no drawable record, even after the resync"
    return reach, after, resynced, None


def _sample_by_priority(buf: ReplayBuffer, before: View):
    """``sample`` of a prioritized buffer whose root holds a total (``before``: the words after
    the repair sample starts with): each row descends the tree (within its stratum) to a leaf
    and returns that slot's record if the slot is readable and the leaf holds a value under the
    record's tag, else draws again; after 1024 misses for one row the tree is resynced with the
    slots once, and if nothing is then drawable by priority the batch is drawn uniformly.
    Checked against the words after the call: the tree is then as the repair left it, or as
    the resync made it. Returns the keys drawn."""
    reach, reach_after, resynced, why = _resync_risk(before)
    if why is not None:
        note(f"sample skipped: {why}")
        return None
    total = before.tree.total()
    try:
        batch, info = buf.sample(4, return_info=True)
    except EmptyBufferError:
        # only the uniform fallback raises it, when the resync left nothing drawable by priority
        assert reach_after is not None and resynced.tree.total() == 0, "EmptyBufferError with a priority total"
        assert View(read_file(buf.path)).tree.section() == resynced.tree.section()
        assert not len(buf) or not resynced.claimed_readable(), "EmptyBufferError with readable slots and a nonzero size"
        note("sample: empty after the resync")
        return None
    view = View(read_file(buf.path))
    tree = view.tree
    if tree.section() == before.tree.section():
        after = False
    else:
        assert reach_after is not None, "sample changed the tree, but no row could miss"
        assert tree.section() == resynced.tree.section(), "sample changed the tree, but not as a resync does"
        after = True
    if after and tree.total() == 0:
        note("sample: uniform fallback after the resync")
        _check_uniform_rows(buf, view, batch, info, prioritized=True)
        return info["key"]
    note("sample: by priority" + (" after a resync" if after else ""))
    drawable = view.drawable()
    assert all(batch[f].shape == (4,) + shape for f, (shape, _) in buf.fields.items())
    values = []
    for row, (i, key) in enumerate(zip(info["index"].tolist(), info["key"].tolist())):
        reached = reach[row] | (reach_after[row] if after else set())
        assert i in reached and drawable.get(i) == key, (row, i, key, reached, drawable)
        _, q, raw = tree.leaf(i)
        values.append(q)
        assert same_float(info["priority"][row], f64(raw))
        # as f64, then divided, by the total the call last read: the one it started with, or
        # after a resync the resynced tree's
        assert info["probability"][row] == float(q) / float(tree.total() if after else total)
    v_min = min(values) if tree.minimum() == 0 else min(tree.minimum(), *values)
    expected = np.array([(float(q) / float(v_min)) ** -0.4 for q in values], dtype=np.float32)  # beta 0.4
    assert np.allclose(info["weight"], expected, rtol=1e-6) and np.all(info["weight"] <= 1), info
    return info["key"]


def _update_and_read_back(buf: ReplayBuffer, keys) -> None:
    """``priorities`` of sampled keys reads what their leaves hold where the slots still hold
    them; ``update_priorities`` applies to the keys ``View.updatable`` names, and the tree is
    then exactly as ``View.update`` says; ``priorities`` reads the new value back."""
    view = View(read_file(buf.path))
    # (a drawn slot may hold a record of another slot: its key addresses that other slot)
    assert all(same_float(a, view.priority(k)) for a, k in zip(buf.priorities(keys).tolist(), keys.tolist()))
    if view.quantize(0.5) is None:  # a huge alpha or eps: no priority fits the tree
        with pytest.raises(ValueError, match="above the largest value"):
            buf.update_priorities(keys, np.full(len(keys), 0.5))
        assert View(read_file(buf.path)).tree.section() == view.tree.section()
        return
    expected = _copy(view)
    applied = expected.update(keys.tolist(), 0.5)
    assert applied == len({k for k in keys.tolist() if view.updatable(k)})
    note(f"update: {'all' if applied == len(set(keys.tolist())) else 'some' if applied else 'none'} applied")
    assert buf.update_priorities(keys, np.full(len(keys), 0.5)) == applied
    after = View(read_file(buf.path))
    assert after.tree.section() == expected.tree.section(), "the tree after update_priorities"
    got = buf.priorities(keys).tolist()
    assert all(same_float(a, after.priority(k)) for a, k in zip(got, keys.tolist())), got


def exercise(buf: ReplayBuffer, full: bool, mine: int | None = None) -> None:
    """Everything a user does with a handle must work (or raise a documented error), and report
    what the shared words say, however wrong (``mine``: the entry an attached handle took)."""
    _check_counts(buf, registered=full)
    assert buf.processes() == ([os.getpid()] if full else [])
    repr(buf)
    view = View(read_file(buf.path))
    for i in range(buf.capacity):
        seq = view.seq(i)
        try:
            row = buf[i]
        except IndexError:
            assert not readable(seq), f"slot {i} holds a record (version word {seq:#x})"
            continue
        assert readable(seq), f"slot {i} has no record (version word {seq:#x}) but was read"
        assert set(row) == set(buf.fields)
    if view.tree is not None:
        readable_keys = [ticket_of(view.seq(i)) for i in range(buf.capacity) if readable(view.seq(i))]
        got = buf.priorities(np.array(readable_keys, dtype=np.uint64)).tolist()
        assert all(same_float(a, view.priority(k)) for a, k in zip(got, readable_keys)), (got, readable_keys)
    if not full:
        return
    if view.tree is None:
        _sample_uniformly(buf, view, prioritized=False)
    else:
        repaired = _repaired(view, mine)
        if repaired.tree.total():
            keys = _sample_by_priority(buf, repaired)
        else:
            keys = _sample_uniformly(buf, repaired, prioritized=True)
            assert View(read_file(buf.path)).tree.section() == repaired.tree.section()
        if keys is not None:
            _update_and_read_back(buf, keys)
    row = {f: np.zeros(shape, dtype) for f, (shape, dtype) in buf.fields.items()}
    view = View(read_file(buf.path))
    try:
        buf.add(**row)
    except ValueError as e:  # a forged insert counter can be exhausted
        if view.tree is not None and view.quantize_default() is None:
            # the largest raw priority (the tree's head) or the sampler's words make the default
            # priority of a new record one the tree cannot hold
            assert "priorit" in str(e), e
        else:
            assert "exhausted" in str(e), e
    else:
        assert view.tree is None or view.quantize_default() is not None, "add took a priority the tree cannot hold"
    _check_counts(buf, registered=True)


def attach_outcome(p: Pristine, data: bytes) -> str:
    """Writes ``data`` as the victim segment, inspects and attaches it, checks that both agree
    with the model (outcome and reason) and that a successful handle is usable; returns the
    outcome, "ok" or "corrupt". An inspecting handle never changes the priority tree; attach
    changes it only by the repair of the entry it takes (``_attached``)."""
    write_victim(p, data)
    reason = model_check(data)
    expected = "ok" if reason is None else "corrupt"
    note(f"outcome: {expected}")
    outcomes = []
    # (not `open_ is ReplayBuffer.attach`: each access to a classmethod makes a new bound method)
    for full, open_ in ((False, ReplayBuffer.inspect), (True, ReplayBuffer.attach)):
        try:
            buf = open_(VICTIM, path=p.dir)
        except CorruptSegmentError as e:
            assert p.path in str(e), f"message does not name the file: {e}"
            if reason is not None:
                assert reason in str(e), f"message does not say {reason!r}: {e}"
            outcomes.append("corrupt")
            continue
        try:
            mine = None
            if full and reason is None:
                attached, mine = _attached(data)
                if attached.tree is not None:
                    now = View(read_file(buf.path))
                    if View(data).tree_changes(mine):
                        note("attach repaired the tree for the entry it took")
                    assert now.tree.section() == attached.tree.section(), "the tree after attach"
                    assert now.tree_changes(mine) == 0
            exercise(buf, full=full, mine=mine)
            outcomes.append("ok")
            if not full and reason is None and View(data).tree is not None:
                assert View(read_file(buf.path)).tree.section() == View(data).tree.section(), "inspect changed the tree"
        finally:
            buf.close()
    assert outcomes == [expected, expected], f"model says {expected} ({reason!r}), inspect/attach gave {outcomes}"
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


MODEL_SAMPLERS = [
    shmreplay.Uniform(),
    shmreplay.Prioritized(),
    shmreplay.Prioritized(alpha=1.0, eps=0.0, stratified=False),
    shmreplay.Prioritized(alpha=0.0, eps=2.5, stratified=True),
]


def _model_sampler(sampler) -> PrioritizedParams | None:
    if isinstance(sampler, shmreplay.Prioritized):
        return PrioritizedParams(sampler.alpha, sampler.eps, sampler.stratified)
    return None


def test_model_matches_real_segments(tmp_path):
    """The Python model accepts what the library writes, for several schemas, capacities and
    samplers, and reproduces every header word, sampler word and directory entry (and leaves
    the unused entries and reserved words 0); a first commit's version word keeps FIRST and its
    owner entry; the size and counters read as ``View`` says; in a prioritized buffer the
    leaves hold the records' tags and priorities where ``geometry`` puts them, and every level
    of nodes up to the root holds their sums and minima."""
    schemas = [
        FIELDS,
        {"x": ((), "bool")},
        {"obs": ((4, 84, 84), "uint8"), "a": ((), "int64"), "r": ((), "float16")},
        {f"f{i}": ((i + 1,), "float64") for i in range(20)},
    ]
    for i, fields in enumerate(schemas):
        for cap in (1, 7, 17, 513):
            for j, sampler in enumerate(MODEL_SAMPLERS):
                if j and i == 2 and cap == 513:
                    continue  # 14 MB each: the uniform one is enough
                _check_model_of(tmp_path, f"m{i}-{cap}-{j}", cap, fields, sampler)


def _check_model_of(tmp_path, name: str, cap: int, fields, sampler) -> None:
    model = _model_sampler(sampler)
    with ReplayBuffer.create(name, capacity=cap, fields=fields, path=tmp_path, sampler=sampler) as buf:
        row = {f: np.ones(s, d) for f, (s, d) in buf.fields.items()}
        buf.add(**row, **({"priority": 2.5} if model else {}))
        data = read_file(buf.path)
        assert model_check(data) is None
        text = data[SCHEMA_TEXT : SCHEMA_TEXT + word(data, H_SCHEMA_LEN)]
        parsed = parse_schema(text)
        assert [n for n, _, _ in parsed] == list(buf.fields)
        assert record_bytes_of(parsed) == buf.record_bytes
        lay = layout(cap, buf.record_bytes, len(text), model)
        assert lay["total"] == buf.nbytes == len(data)
        for offset, value in header_words(lay):
            assert word(data, offset) == value, (offset, word(data, offset), value)
        for offset, value in sampler_words(model):
            assert word(data, offset) == value, (offset, word(data, offset), value)
        assert header_sampler(data) == (None, model)
        assert (word(data, H_KIND), word(data, H_CAPACITY)) == (KIND_RING, cap)
        assert len(lay["sections"]) == (3 if model is None else 4)
        assert word(data, H_CREATOR) & 0xFFFFFFFF == os.getpid()
        for unused in (unused_directory(len(lay["sections"])), range(RESERVED, HEADER_END)):
            assert data[unused.start : unused.stop] == bytes(len(unused))
        assert forge(data) == data, "re-forging a valid header must change nothing"
        view = View(data)
        assert view.cursor() == 1 and view.entries_used() == 1
        assert view.seq(0) == committed_first(0, 0)
        assert all(view.seq(s) == 0 for s in range(1, cap))
        assert view.entry(0, E_OWNER) & 0xFFFFFFFF == os.getpid()
        assert (view.entry(0, E_INTENT), view.entry(0, E_FIRSTS)) == (0, 1)
        assert view.tree_changes(0) == 0 and all(view.entry(0, w) == 0 for w in E_UNUSED)
        assert view.size() == len(buf) == 1 and view.counter("inserts") == buf.stats()["inserts"] == 1
        if model is None:
            assert view.tree is None and lay["priority"] is None
            return
        tree = view.tree
        assert tree.base == lay["priority"] == roundup(lay["slots"] + cap * lay["slot"], 4096)
        q_bits, fraction_bits = scale(cap)
        assert buf.priority_range == ((2**q_bits - 1) / 2**fraction_bits, 2.0**-fraction_bits)
        assert buf.stats()["max_priority"] == tree.max_raw() == 2.5
        q = quantize(math.pow(2.5 + model.eps, model.alpha), fraction_bits)
        assert q == view.quantize_default()
        assert tree.leaf(0) == (tree.tag(0), q, bits_of(2.5)) and tree.tag(0) == 1
        assert all(tree.leaf(s) == (0, 0, 0) for s in range(1, roundup(cap, FANOUT)))
        # level 0, right after the leaves and before level 1, holds a copy of every leaf's value
        # (padding included: 0)
        padded = roundup(cap, FANOUT)
        assert tree.values == TREE_HEAD_BYTES + padded * LEAF_BYTES == tree.levels[0]["sums"] - padded * 8
        assert [tree.value(s) for s in range(padded)] == [q] + [0] * (padded - 1)
        # every node of every level: leaf 0's value on the path from leaf 0 to the root, 0 elsewhere
        for level in tree.levels:
            assert [word(data, tree.base + level["sums"] + 8 * k) for k in range(roundup(level["nodes"], FANOUT))] == (
                [q] + [0] * (roundup(level["nodes"], FANOUT) - 1))
            assert [word(data, tree.base + level["mins"] + 8 * k) for k in range(roundup(level["nodes"], FANOUT))] == (
                [q] + [0] * (roundup(level["nodes"], FANOUT) - 1))
        assert tree.total() == tree.minimum() == q and tree.levels[-1]["nodes"] == 1
        assert buf.stats()["priority_total"] == q / 2**fraction_bits
        # an add without a priority takes the largest raw priority so far (2.5), under the tag
        # of its ticket's lap (+1): ticket 1 is in slot 1, or in slot 0 on its second lap
        buf.add(**row)
        view = View(read_file(buf.path))
        assert view.tree.leaf(1 % cap) == (1 // cap + 1, q, bits_of(2.5)) and view.tree.total() == q * min(cap, 2)
        # a whole lap more, of priority 0: every leaf holds its latest record's tag, with the
        # value of (0 + eps) ** alpha
        buf.extend({f: np.stack([a] * cap) for f, a in row.items()}, priority=0.0)
        view = View(read_file(buf.path))
        zero = quantize(math.pow(model.eps, model.alpha), fraction_bits)
        tickets = [max(t for t in range(cap + 2) if t % cap == s) for s in range(cap)]
        for s, ticket in enumerate(tickets):
            assert view.tree.leaf(s) == (ticket // cap + 1, zero, 0), (s, view.tree.leaf(s))
            assert view.priority(ticket) == 0.0 and math.isnan(view.priority(ticket + cap))
        got = buf.priorities(np.array(tickets + [t + cap for t in tickets], dtype=np.uint64)).tolist()
        assert got[:cap] == [0.0] * cap and all(math.isnan(p) for p in got[cap:])
        assert view.tree.total() == cap * zero and view.tree.minimum() == zero
        assert [view.tree.value(s) for s in range(cap)] == [zero] * cap
        # update_priorities applies a key iff its leaf carries its tag (and the key was issued,
        # not too long ago); -0.0 is held as +0.0; only an update that applied raises the
        # largest raw priority; the tree then is as View.update says
        expected = _copy(view)
        first, last = np.array([tickets[0]], dtype=np.uint64), np.array([tickets[-1]], dtype=np.uint64)
        stale = np.array([t for t in (tickets[0] - cap, tickets[0] + cap, U64) if t >= 0], dtype=np.uint64)
        stale_before = buf.stats()["stale_updates"]
        assert buf.update_priorities(first, np.array([-0.0])) == expected.update(first.tolist(), -0.0) == 1
        assert bits_of(buf.priorities(first)[0]) == 0 and expected.tree.leaf(tickets[0] % cap)[2] == 0
        assert buf.update_priorities(stale, np.full(len(stale), 9.0)) == expected.update(stale.tolist(), 9.0) == 0
        assert buf.stats()["max_priority"] == 2.5 and buf.stats()["stale_updates"] == stale_before + len(stale)
        assert buf.update_priorities(last, np.array([3.0])) == expected.update(last.tolist(), 3.0) == 1
        assert buf.stats()["max_priority"] == 3.0
        assert View(read_file(buf.path)).tree.section() == expected.tree.section()


def test_pristine_copy_attaches(pristine):
    assert attach_outcome(pristine, pristine.data) == "ok"
    view = View(pristine.data)
    # overwritten slots lose FIRST; the others keep their first commit's word (entry 0)
    assert [view.seq(i) for i in range(CAP)] == (
        [committed(CAP + i) for i in range(3)] + [committed_first(i, 0) for i in range(3, CAP)]
    )
    write_victim(pristine, pristine.data)
    buf = ReplayBuffer.attach(VICTIM, path=pristine.dir)
    try:
        assert len(buf) == CAP and buf.stats()["inserts"] == CAP + 3
        _, info = buf.sample(64, return_info=True)
        assert set(info["key"].tolist()) <= set(range(3, CAP + 3))
        if pristine.sampler is None:
            return
        # the leaves hold each record's priority under its tag, and the root their sum
        tree = view.tree
        q = {k: quantize(math.pow(priority_of(k) + PRIORITIZED.eps, PRIORITIZED.alpha), tree.fraction_bits)
             for k in range(3, CAP + 3)}
        assert [tree.leaf(k % CAP) for k in range(3, CAP + 3)] == [(tree.tag(k), q[k], bits_of(priority_of(k))) for k in range(3, CAP + 3)]
        assert tree.total() == sum(q.values()) and tree.minimum() == min(q.values())
        assert info["priority"].tolist() == [priority_of(k) for k in info["key"].tolist()]
        assert info["probability"].tolist() == [float(q[k]) / float(tree.total()) for k in info["key"].tolist()]
        assert buf.priorities(np.arange(CAP + 3, dtype=np.uint64)).tolist()[3:] == [priority_of(k) for k in range(3, CAP + 3)]
        assert all(math.isnan(x) for x in buf.priorities(np.arange(3, dtype=np.uint64)).tolist())
    finally:
        buf.close()


@pytest.mark.parametrize("state", ["partial", "holes", "empty"])
def test_other_rings_attach(rings, state):
    assert attach_outcome(rings[state], rings[state].data) == "ok"


# --------------------------------------------------------------------------- property tests


def test_truncated_at_boundaries_is_corrupt(pristine):
    p = pristine
    tree = [] if p.priority is None else [p.slots + CAP * p.slot_bytes, p.priority, p.priority + 8]
    for n in [0, 1, 7, 8, 100, 511, 512, 513, 520, 4096, p.control, p.handles, p.entry(1), p.slots, p.slots + 8,
              *tree, p.size - 8, p.size - 1]:
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
    """Byte offsets in the header words, the section directory (used and unused entries), the
    schema text (and padding), the control section and the handle table."""
    return st.one_of(
        st.integers(0, SECTION_DIRECTORY - 1),
        st.integers(SECTION_DIRECTORY, HEADER_END - 1),
        st.integers(SCHEMA_TEXT, SCHEMA_TEXT + p.schema_len + 8),
        st.integers(SCHEMA_TEXT, p.control - 1),
        st.integers(p.control, p.handles - 1),
        st.integers(p.handles, p.entry(3) - 1),
        st.integers(p.handles, p.slots - 1),
        st.integers(0, p.slots - 1),
    )


@fast(1000)
@given(st.data())
def test_random_bytes_in_header_schema_and_table(pristine, data):
    """Random bytes written anywhere before the slots: a change to a checked byte (the header,
    its whole section directory, the schema text) is refused; anything else (padding, control
    words, handle table) attaches and stays usable."""
    writes = data.draw(st.lists(st.tuples(_region(pristine), st.integers(0, 255)), min_size=1, max_size=12), label="writes")
    buf = bytearray(pristine.data)
    for offset, value in writes:
        buf[offset] = value
    changed = sorted({i for i, _ in writes if buf[i] != pristine.data[i]})
    assume(changed)
    validated = any(i < SCHEMA_TEXT + pristine.schema_len for i in changed)
    outcome = attach_outcome(pristine, bytes(buf))
    assert outcome == ("corrupt" if validated else "ok"), changed


def _stalls_own_writer(p: Pristine, version_word: int) -> bool:
    """A busy word naming the ticket the next insert takes: see
    test_busy_word_naming_the_next_ticket_does_not_stall_add."""
    return bool(version_word & BUSY) and ticket_of(version_word) == p.cursor


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
    as some record or as no record (IndexError) as that word says, sampling still finds the
    intact slot, and a writer is not blocked by a garbage "busy" word."""
    buf = bytearray(pristine.data)
    slot_bytes = pristine.slot_bytes
    for slot, word_index, value in writes:
        if slot == keep:
            continue
        if word_index % (slot_bytes // 8) == 0 and _stalls_own_writer(pristine, value):
            continue
        offset = pristine.seq(slot) + 8 * (word_index % (slot_bytes // 8))
        put(buf, offset, value)
    assert attach_outcome(pristine, bytes(buf)) == "ok"


def _is_busy_without_ticket(version_word: int) -> bool:
    """Busy bit set, ticket field 0 ("ticket -1"): no writer ever makes such a word."""
    return bool(version_word & 1) and version_word >> 12 == 0


def test_busy_version_word_without_ticket_does_not_stall_reads(pristine):
    """A slot version word of 1 (busy, owner entry 0, ticket field 0) names no insert: it must
    read as no record at once (not wait for entry 0, which is the reader's own), like any other
    orphaned slot."""
    buf = bytearray(pristine.data)
    put(buf, pristine.seq(0), 1)
    assert _is_busy_without_ticket(1)
    write_victim(pristine, bytes(buf))

    def read_slot_0() -> str:  # in a forked child: a stalled read is killed with it
        handle = ReplayBuffer.attach(VICTIM, path=pristine.dir)
        try:
            handle[0]
            return "row"
        except BaseException as e:  # noqa: BLE001
            return type(e).__name__

    # a stalled read waits out the core's WAIT_LIMIT (10 s); a loaded machine needs more than a
    # second or so to fork, attach and read
    assert run_forked(read_slot_0, timeout=5) == "IndexError"


_BOUNDARY = st.sampled_from([0, 1, 2, 7, 8, 9, 63, 64, 511, 512, 4095, 4096, 2**31, 2**32, 2**40, 2**40 + 1, 2**63 - 1, 2**63, U64 - 1, U64])
# Header words that no check looks at once the checksum is recomputed: the checksum and schema
# hash themselves (recomputed), the creator's identity and time, the limiter's words but its kind
# (read only with a limiter: the pristines have none), the reserved words after them (and, see
# sealed_free, the unused directory entries and some sampler words).
SEALED_FREE = {H_CHECKSUM, H_SCHEMA_HASH, H_CREATOR, H_CREATOR_NAMESPACE, H_CREATED, *LIMITER_WORDS,
               *range(RESERVED, HEADER_END, 8)}


def sealed_free(p: Pristine, offset: int, value: int) -> bool:
    """Whether ``p`` still opens with header word ``offset`` set to ``value`` and the checksum
    recomputed: the words of SEALED_FREE, the directory entries it does not use, and the sampler's
    parameters -- in a uniform buffer whatever they hold (only the kind word is read), in a
    prioritized one an alpha or eps that is a finite number >= 0 (-0.0 included) and a
    stratified flag of 0 or 1 (the buffer then samples with those)."""
    if offset in SEALED_FREE or offset in unused_directory(p.sections):
        return True
    if offset in (H_ALPHA, H_EPS, H_STRATIFIED):
        if p.sampler is None:
            return True
        if offset == H_STRATIFIED:
            return value in (0, 1)
        return math.isfinite(f64(value)) and f64(value) >= 0.0
    return False


_WORDS = st.one_of(
    st.tuples(st.just("header"), st.integers(0, SECTION_DIRECTORY // 8)),
    st.tuples(st.just("header"), st.integers(0, HEADER_END // 8 - 1)),
    st.tuples(st.just("header"), st.integers(H_FEATURES // 8, H_FEATURES // 8) | st.integers(H_SAMPLER // 8, RESERVED // 8)),
    st.tuples(st.just("control"), st.sampled_from([C_CURSOR, C_ENTRIES_USED, 8, 120, 136, CONTROL_BYTES - 8])),
    st.tuples(st.just("entry"), st.sampled_from([0, 1, 2, MAX_HANDLES - 1]), st.integers(0, ENTRY_BYTES // 8 - 1)),
)


def _word_offset(p: Pristine, where) -> int:
    if where[0] == "header":
        return 8 * where[1]
    if where[0] == "control":
        return p.control + where[1]
    return p.entry(where[1], 8 * where[2])


@fast(700)
@given(
    where=_WORDS,
    value=st.one_of(st.integers(0, U64), _BOUNDARY),
    delta=st.integers(-4096, 4096),
    relative=st.booleans(),
    sealed=st.booleans(),
)
@example(where=("header", H_ALPHA // 8), value=2**63, delta=0, relative=False, sealed=True)  # -0.0
@example(where=("header", H_EPS // 8), value=bits_of(-1.0), delta=0, relative=False, sealed=True)
@example(where=("header", H_STRATIFIED // 8), value=2, delta=0, relative=False, sealed=True)
@example(where=("header", H_STRATIFIED // 8), value=0, delta=0, relative=False, sealed=True)
@example(where=("header", H_SAMPLER // 8), value=0, delta=1, relative=True, sealed=True)
@example(where=("header", H_FEATURES // 8), value=0, delta=1, relative=True, sealed=True)
@example(where=("header", H_FEATURES // 8), value=0, delta=-1, relative=True, sealed=True)
def test_header_and_counter_words(pristine, where, value, delta, relative, sealed):
    """Any header, directory, sampler, control or handle-table word set to a random, boundary or
    nearby value, with the checksum left stale or recomputed (so that the layout checks
    themselves are exercised): a header word is refused unless the checksum was recomputed and
    it is one that only the checksum covers or a sampler parameter the buffer accepts
    (``sealed_free``); control and handle-table words are never refused."""
    offset = _word_offset(pristine, where)
    buf = bytearray(pristine.data)
    new = (word(buf, offset) + delta) & U64 if relative else value
    put(buf, offset, new)
    if sealed:
        reseal(buf)
    outcome = attach_outcome(pristine, bytes(buf))
    if bytes(buf) == pristine.data:
        assert outcome == "ok"
    else:
        refused = offset < HEADER_END and not (sealed and sealed_free(pristine, offset, new))
        assert outcome == ("corrupt" if refused else "ok")


@fast(300)
@given(
    capacity=st.one_of(st.integers(1, 512), _BOUNDARY),
    size_delta=st.one_of(st.just(0), st.sampled_from([-4096, -8, -1, 1, 8, 4096]), st.integers(-10_000, 10_000)),
)
def test_forged_consistent_layout(pristine, capacity, size_delta):
    """Headers and section directories rewritten by hand for another capacity with a valid
    checksum: accepted exactly when the file size matches (then the buffer has that capacity and
    works), refused otherwise -- a forged capacity never makes attach map or touch past the end
    of the file."""
    data = forge(pristine.data, capacity=capacity, size_delta=size_delta)
    outcome = attach_outcome(pristine, data)
    lay = layout(capacity, word(data, H_RECORD_BYTES), pristine.schema_len, pristine.sampler)
    fits = lay is not None and lay["total"] == len(data)
    assert outcome == ("ok" if fits else "corrupt")
    if fits:
        with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as buf:
            assert buf.capacity == capacity and buf.nbytes == len(data)
            if pristine.sampler is None:
                assert buf.priority_range is None
            else:  # the tree's fixed point follows the capacity
                q_bits, fraction_bits = scale(capacity)
                assert buf.priority_range == ((2**q_bits - 1) / 2**fraction_bits, 2.0**-fraction_bits)


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
@example(text=b"x:u1:1\n" * 20, consistent=True, size_delta=0)  # the sections move past their old place
def test_forged_schema_text(pristine, text, consistent, size_delta):
    """Schema texts replaced by garbage, malformed or valid-but-different schemas, with the
    checksum and schema hash recomputed, and optionally the whole layout (header and section
    directory) made consistent: the buffer opens exactly when the model says the header is
    valid, with the forged fields (and then whatever its moved sections now hold)."""
    assume(len(text) <= MAX_SCHEMA_TEXT)
    if consistent:
        data = forge(pristine.data, text=text, size_delta=size_delta)
    else:
        buf = bytearray(pristine.data)
        old = word(buf, H_SCHEMA_LEN)
        buf[SCHEMA_TEXT : SCHEMA_TEXT + old] = bytes(old)
        end = min(SCHEMA_TEXT + len(text), pristine.control)
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
    prefix=st.sampled_from(["none", "magic", "magic+version", "magic+version+ready", "magic+version+ready+kind"]),
    version=st.sampled_from([1, 2, LAYOUT_VERSION]),
)
def test_foreign_files(pristine, body, size, prefix, version):
    """Files that merely look like segments (random bytes, maybe behind a right magic, a
    version, a ready word and a kind) are refused."""
    data = bytearray(body.ljust(size, b"\0"))
    heads = {
        "none": [], "magic": [(H_MAGIC, MAGIC)], "magic+version": [(H_MAGIC, MAGIC), (H_VERSION, version)],
        "magic+version+ready": [(H_MAGIC, MAGIC), (H_VERSION, version), (H_READY, READY)],
        "magic+version+ready+kind": [(H_MAGIC, MAGIC), (H_VERSION, version), (H_READY, READY), (H_KIND, KIND_RING)],
    }[prefix]
    for offset, w in heads:
        if len(data) >= offset + 8:
            put(data, offset, w)
    assert attach_outcome(pristine, bytes(data)) == "corrupt"


# --------------------------------------------------------------------------- v3 header: directory, kind, features, version


_DIRECTORY_VALUES = st.one_of(
    st.tuples(st.just("value"), st.one_of(st.integers(0, U64), _BOUNDARY)),
    st.tuples(st.just("tag"), st.sampled_from(
        [tag_word(t) for t in (*SECTION_TAGS, PRIORITY, b"prio\0\0\0\0", b"priorit\0", b"Priority", b"CONTROL\0",
                               b"control\x01", b"control ", b"slots\0\0\x01", bytes(8))])),
    st.tuples(st.just("delta"), st.sampled_from([1, -1, 8, -8, 64, -64, 128, -128, 4096, -4096, 1 << 32])),
    st.tuples(st.just("from-entry"), st.integers(0, MAX_SECTIONS - 1)),  # the same word of another entry
)


@fast(400)
@given(
    entry=st.integers(0, MAX_SECTIONS - 1),
    field=st.sampled_from([0, 1, 2, 3]),  # tag, offset, length, version
    change=_DIRECTORY_VALUES,
    sealed=st.sampled_from([True, True, True, False]),
)
def test_forged_section_directory(pristine, entry, field, change, sealed):
    """A directory entry's tag, offset, length or version set to another value (random, another
    section's, a near miss), with the checksum recomputed: any change to one of the buffer's
    sections' entries (three, four with a priority tree) is refused with a reason naming that
    section; the unused entries are covered by the checksum only."""
    buf = bytearray(pristine.data)
    at = SECTION_DIRECTORY + entry * SECTION_ENTRY_BYTES + 8 * field
    how, value = change
    if how == "delta":
        new = word(buf, at) + value
    elif how == "from-entry":
        new = word(buf, SECTION_DIRECTORY + value * SECTION_ENTRY_BYTES + 8 * field)
    else:
        new = value
    put(buf, at, new)
    if sealed:
        reseal(buf)
    assume(bytes(buf) != pristine.data)
    outcome = attach_outcome(pristine, bytes(buf))
    tags = SECTION_TAGS if pristine.sampler is None else (*SECTION_TAGS, PRIORITY)
    assert pristine.sections == len(tags)
    if not sealed:
        assert outcome == "corrupt"
    elif entry < len(tags):
        assert outcome == "corrupt"
        name = section_name(tags[entry])
        assert (f"section {entry} is " if field == 0 else f'section "{name}" is at') in model_check(bytes(buf))
    else:
        assert outcome == "ok"


def _directory_forgeries(p: Pristine) -> dict[str, tuple[bytearray, bool]]:
    """Hand-made directories, sealed: ``name -> (bytes, attach must accept)``."""
    def entry(i: int, field: int) -> int:
        return SECTION_DIRECTORY + i * SECTION_ENTRY_BYTES + 8 * field

    cases = {}

    def case(name: str, ok: bool = False):
        data = bytearray(p.data)
        cases[name] = (data, ok)
        return data

    n = p.sections
    pairs = ((0, 1), (1, 2), (0, 2)) if n == 3 else ((0, 1), (1, 2), (0, 2), (2, 3), (0, 3))
    for i, j in pairs:
        d = case(f"entries {i} and {j} swapped")
        d[entry(i, 0) : entry(i + 1, 0)], d[entry(j, 0) : entry(j + 1, 0)] = d[entry(j, 0) : entry(j + 1, 0)], d[entry(i, 0) : entry(i + 1, 0)]
    slots_end = p.slots + CAP * p.slot_bytes
    put(case("slots one page later, shorter, same end"), entry(2, 1), p.slots + 4096)
    put(cases["slots one page later, shorter, same end"][0], entry(2, 2), slots_end - p.slots - 4096)
    put(case("handles over control"), entry(1, 1), p.control)
    put(case("control over the header"), entry(0, 1), 0)
    put(case("slots past the end"), entry(2, 1), p.size)
    put(case("slots length for one more slot"), entry(2, 2), (CAP + 1) * p.slot_bytes)
    put(case("section version 2"), entry(1, 3), 2)
    put(case("section version 0"), entry(2, 3), 0)
    for tag in (b"prio\0\0\0\0", PRIORITY):
        # a section more than the sampler implies, counted or not (a tree in a uniform buffer,
        # a second tree in a prioritized one)
        d = case(f"one more section ({section_name(tag)}) counted")
        d[entry(n, 0) : entry(n + 1, 0)] = d[entry(n - 1, 0) : entry(n, 0)]
        put(d, entry(n, 0), tag_word(tag))
        put(d, entry(n, 1), p.size)
        put(d, H_SECTION_COUNT, n + 1)
        d = case(f"one more section ({section_name(tag)}) not counted", ok=True)
        d[entry(n, 0) : entry(n + 1, 0)] = d[entry(n - 1, 0) : entry(n, 0)]
        put(d, entry(n, 0), tag_word(tag))
        put(d, entry(n, 1), p.size)
    put(case("two sections counted"), H_SECTION_COUNT, 2)
    put(case("one section fewer counted"), H_SECTION_COUNT, n - 1)
    d = case("no directory")
    d[H_SECTION_COUNT:DIRECTORY_END] = bytes(DIRECTORY_END - H_SECTION_COUNT)
    put(case("tag in capitals"), entry(0, 0), tag_word(b"CONTROL\0"))
    put(case("tag without its NUL"), entry(1, 0), tag_word(b"handlesX"))
    d = case("garbage in every unused entry", ok=True)
    unused = unused_directory(n)
    d[unused.start : unused.stop] = bytes(i % 251 + 1 for i in range(len(unused)))
    d = case("garbage in the reserved words", ok=True)
    d[RESERVED:HEADER_END] = bytes(i % 251 + 1 for i in range(HEADER_END - RESERVED))
    if p.sampler is None:
        # the tree a prioritized buffer of this capacity would have, listed and counted
        d = case("a priority section where a prioritized buffer has it")
        for field, value in enumerate((tag_word(PRIORITY), roundup(slots_end, 4096), geometry(CAP)["bytes"], 1)):
            put(d, entry(3, field), value)
        put(d, H_SECTION_COUNT, 4)
        return {name: (bytes(reseal(data)), ok) for name, (data, ok) in cases.items()}
    tree, tree_bytes = p.priority, p.size - p.priority
    assert tree == roundup(slots_end, 4096) and tree_bytes == geometry(CAP)["bytes"]
    put(case("priority entry cleared, three sections counted"), H_SECTION_COUNT, 3)
    d = cases["priority entry cleared, three sections counted"][0]
    d[entry(3, 0) : entry(4, 0)] = bytes(SECTION_ENTRY_BYTES)
    d = case("priority entry cleared")
    d[entry(3, 0) : entry(4, 0)] = bytes(SECTION_ENTRY_BYTES)
    put(case("priority right after the slots"), entry(3, 1), slots_end)
    put(case("priority one page later"), entry(3, 1), tree + 4096)
    put(case("priority over the slots"), entry(3, 1), p.slots)
    put(case("priority over the header"), entry(3, 1), 0)
    put(case("priority past the end"), entry(3, 1), p.size)
    put(case("priority 16 bytes shorter"), entry(3, 2), tree_bytes - 16)
    put(case("priority with a leaf group more"), entry(3, 2), tree_bytes + FANOUT * LEAF_BYTES)
    put(case("priority without its levels"), entry(3, 2), TREE_HEAD_BYTES + roundup(CAP, FANOUT) * LEAF_BYTES)
    put(case("priority version 2"), entry(3, 3), 2)
    put(case("priority tag with a NUL"), entry(3, 0), tag_word(b"priorit\0"))
    put(case("priority tag in capitals"), entry(3, 0), tag_word(b"PRIORITY"))
    return {name: (bytes(reseal(data)), ok) for name, (data, ok) in cases.items()}


def test_forged_section_directories(pristine):
    for name, (data, ok) in _directory_forgeries(pristine).items():
        assert attach_outcome(pristine, data) == ("ok" if ok else "corrupt"), name


@fast(120)
@given(features=st.one_of(st.integers(0, 63).map(lambda bit: 1 << bit), st.integers(1, U64)), sealed=st.booleans())
def test_unknown_feature_bits(pristine, features, sealed):
    """A segment using feature bits this version does not know (it knows bit 0, prioritized
    sampling) is refused, with the unknown bits in the reason once the checksum is right."""
    assume(features & ~KNOWN_FEATURES)
    buf = bytearray(pristine.data)
    put(buf, H_FEATURES, features)
    if sealed:
        reseal(buf)
    assert attach_outcome(pristine, bytes(buf)) == "corrupt"
    assert (f"bits {features & ~KNOWN_FEATURES:#x})" in model_check(bytes(buf))) == sealed


@fast(120)
@given(kind=st.one_of(st.sampled_from([0, 2, 3, 255, 2**32 + 1, U64]), st.integers(0, U64)), sealed=st.booleans())
def test_wrong_kind(pristine, kind, sealed):
    """A segment of another kind than a ring (a future kind of buffer, garbage) is refused,
    naming the kind once the checksum is right."""
    assume(kind != KIND_RING)
    buf = bytearray(pristine.data)
    put(buf, H_KIND, kind)
    if sealed:
        reseal(buf)
    assert attach_outcome(pristine, bytes(buf)) == "corrupt"
    assert (f"buffer kind {kind} " in model_check(bytes(buf))) == sealed


FIELD_CODES = [("obs", "u1", (3,)), ("act", "i4", ()), ("rew", "f4", (2,))]  # FIELDS, as schema text


@pytest.mark.parametrize("capacity", [1, CAP, 513])
def test_layout_version_2_file(pristine, capacity):
    """A segment written by the previous release (layout version 2, valid by its own rules) is
    refused by attach and inspect with a reason that names version 2, and is not listed."""
    assert encode_schema(FIELD_CODES) == pristine.data[SCHEMA_TEXT : SCHEMA_TEXT + pristine.schema_len]
    data = v2_segment(capacity, FIELD_CODES, creator=os.getpid())
    assert model_check(data).startswith("layout version 2 ")
    assert attach_outcome(pristine, data) == "corrupt"
    for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
        with pytest.raises(CorruptSegmentError, match=r"layout version 2\b") as exc:
            open_(VICTIM, path=pristine.dir)
        assert pristine.path in str(exc.value)
    # the current layout's bytes labelled version 2 (the version word is outside the checksum)
    buf = bytearray(pristine.data)
    put(buf, H_VERSION, 2)
    assert attach_outcome(pristine, bytes(buf)) == "corrupt"
    with pytest.raises(CorruptSegmentError, match=r"layout version 2\b"):
        ReplayBuffer.attach(VICTIM, path=pristine.dir)


# --------------------------------------------------------------------------- prioritized buffers: sampler words, priority tree


_F64_BITS = st.one_of(
    st.floats().map(bits_of),  # every kind of float: negative, -0.0, subnormal, huge, inf, NaN
    st.sampled_from([0, 1, 2**63, 2**63 + 1, 0x7FF0000000000000, 0x7FF0000000000001, 0x7FF8000000000000,
                     0xFFF0000000000000, U64, bits_of(0.6), bits_of(1e-6), bits_of(1e308), bits_of(-1e-300)]),
    st.integers(0, U64),
)


def _valid_parameter(bits: int) -> bool:
    x = f64(bits)
    return not math.isnan(x) and x != math.inf and x >= 0.0


_PARAMETER = st.one_of(st.floats(0.0, 4.0).map(bits_of), st.floats(0.0, 4.0).map(bits_of), _F64_BITS)  # mostly valid


@fast(600)
@given(
    kind=st.one_of(st.none(), st.none(), st.sampled_from([SAMPLER_UNIFORM, SAMPLER_PRIORITIZED, 2, 3, 2**32 + 1, U64]),
                   st.integers(0, U64)),  # None: the kind that agrees with the feature bit
    feature=st.sampled_from([0, FEATURE_PRIORITIZED]),
    alpha=_PARAMETER,
    eps=_PARAMETER,
    stratified=st.one_of(st.sampled_from([0, 1]), st.sampled_from([0, 1]), st.sampled_from([2, 3, 2**32, 2**63, U64]),
                         st.integers(0, U64)),
    consistent=st.booleans(),
    sealed=st.sampled_from([True, True, True, False]),
)
@example(kind=1, feature=1, alpha=bits_of(0.5), eps=bits_of(0.0), stratified=0, consistent=True, sealed=True)
@example(kind=0, feature=0, alpha=0, eps=0, stratified=0, consistent=True, sealed=True)
@example(kind=1, feature=1, alpha=bits_of(-0.0), eps=bits_of(-0.0), stratified=1, consistent=False, sealed=True)
@example(kind=1, feature=1, alpha=bits_of(1e308), eps=bits_of(1e308), stratified=1, consistent=True, sealed=True)
@example(kind=1, feature=1, alpha=bits_of(0.7), eps=bits_of(-5e-324), stratified=1, consistent=False, sealed=True)
@example(kind=1, feature=0, alpha=bits_of(0.7), eps=bits_of(0.01), stratified=1, consistent=True, sealed=True)
@example(kind=0, feature=1, alpha=0, eps=0, stratified=0, consistent=True, sealed=True)
@example(kind=0, feature=0, alpha=U64, eps=bits_of(-1.0), stratified=7, consistent=False, sealed=True)
def test_forged_sampler_words(pristine, kind, feature, alpha, eps, stratified, consistent, sealed):
    """The sampler's words (kind, the prioritized feature bit, alpha, eps, stratified) set to
    anything, with the checksum recomputed (or not), and optionally the directory and file
    size made consistent with the sampler they describe (a uniform buffer turned into a
    prioritized one with an all-zero tree, a prioritized one into a uniform one without its
    tree). The buffer opens exactly when the checksum is right, the kind and the feature bit
    agree (0 and off, 1 and on), a prioritized sampler has a flag of 0 or 1 and an alpha and eps
    that are finite and >= 0 (-0.0 included), and the directory and size are those of that
    sampler; it then samples as those words say: Uniform(), or Prioritized with exactly that
    alpha, eps and stratified. In a uniform buffer only the kind word is read."""
    kind = feature if kind is None else kind
    buf = bytearray(pristine.data)
    for offset, value in ((H_SAMPLER, kind), (H_FEATURES, feature), (H_ALPHA, alpha), (H_EPS, eps), (H_STRATIFIED, stratified)):
        put(buf, offset, value)
    if consistent:
        data = forge(bytes(buf))  # sealed
    else:
        data = bytes(reseal(buf) if sealed else buf)
    outcome = attach_outcome(pristine, data)
    words_ok = (kind, feature) == (SAMPLER_UNIFORM, 0) or (
        (kind, feature) == (SAMPLER_PRIORITIZED, FEATURE_PRIORITIZED)
        and stratified in (0, 1) and _valid_parameter(alpha) and _valid_parameter(eps))
    same_sections = (kind == SAMPLER_PRIORITIZED) == (pristine.sampler is not None)
    if data == pristine.data:
        assert outcome == "ok"
        return
    assert outcome == ("ok" if words_ok and (consistent or (sealed and same_sections)) else "corrupt")
    if not words_ok and (consistent or sealed):
        reason = model_check(data)
        assert reason.startswith("sampler ") or reason.startswith("Prioritized: "), reason
    if outcome == "ok":
        note(f"opened as {'prioritized' if kind else 'uniform'} ({'converted' if not same_sections else 'same sections'})")
        with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as handle:
            if kind == SAMPLER_UNIFORM:
                assert handle.sampler == shmreplay.Uniform() and handle.priority_range is None
            else:
                got = handle.sampler
                assert isinstance(got, shmreplay.Prioritized)
                assert (bits_of(got.alpha), bits_of(got.eps), got.stratified) == (alpha, eps, bool(stratified))
                assert handle.nbytes == len(data) == roundup(pristine.slots + CAP * pristine.slot_bytes, 4096) + geometry(CAP)["bytes"]


@pytest.fixture(scope="module")
def deep_ring(tmp_path_factory) -> Pristine:
    """A full prioritized ring of 300 slots: three levels of nodes, with padding at each."""
    d = str(tmp_path_factory.mktemp("deep"))
    buf = ReplayBuffer.create("deep", capacity=300, fields=FIELDS, path=d, sampler=PRIORITIZED)
    buf.extend(rows_for_keys(FIELDS, range(330)), priority=[priority_of(k) for k in range(330)])
    path = buf.path
    buf.close()
    data = read_file(path)
    os.unlink(path)
    assert [level["nodes"] for level in View(data).tree.levels] == [19, 2, 1]
    return Pristine(data, d)


@st.composite
def _tree_writes(draw, p: Pristine) -> list[tuple[int, int]]:
    """``(byte offset in the segment, value)`` of words of the priority section: the head,
    leaves (the real ones and the padding), level 0's copies of the leaves' values (real and
    padding), node sums and minima (real and padding), set to random words, boundary values,
    leaf-like words (small tags and values) or priorities."""
    view = View(p.data)
    tree = view.tree
    cap = view.capacity
    leaf = st.integers(0, roundup(cap, FANOUT) - 1).map(lambda i: TREE_HEAD_BYTES + LEAF_BYTES * i)
    value = st.integers(0, roundup(cap, FANOUT) - 1).map(lambda i: tree.values + 8 * i)
    level = st.sampled_from(tree.levels)
    node = level.flatmap(lambda l: st.integers(0, roundup(l["nodes"], FANOUT) - 1).flatmap(
        lambda k: st.sampled_from([l["sums"] + 8 * k, l["mins"] + 8 * k])))
    offsets = st.one_of(st.sampled_from([MAX_RAW, 8, TREE_HEAD_BYTES - 8]), leaf, leaf.map(lambda o: o + 8), value, node)
    values = st.one_of(
        st.integers(0, U64), _BOUNDARY, st.integers(0, 1 << 24),
        st.builds(lambda tag, q: tag << tree.q_bits | q, st.integers(0, 45), st.integers(0, 1 << 22) | st.just(tree.q_max)),
        _F64_BITS,
    )
    writes = draw(st.lists(st.tuples(offsets, values), min_size=1, max_size=8))
    return [(tree.base + offset, value) for offset, value in writes]


@fast(300)
@given(data=st.data())
def test_garbage_in_priority_tree(rings, deep_ring, data):
    """Random words in the priority section (its head, leaves, node sums and minima, padding
    included) of a prioritized ring, of 8 slots (one node) or 300 (three levels): the tree is not
    validated, so the buffer opens, and everything works as those words say: the priority total
    and maximum in stats are the root's sum and the head; sample descends the scribbled nodes
    and returns only readable records whose leaf holds a value under their tag, with the
    probability the root's sum implies (after 1024 misses for one row it resyncs the tree with
    the slots, and if nothing is then drawable by priority it draws uniformly); priorities finds
    a record when its slot holds it and its leaf carries its tag, update_priorities applies to
    a key when its leaf carries its tag; an add without a priority takes the head's (or raises
    ValueError when the tree cannot hold it)."""
    if rings["full"].sampler is None:
        pytest.skip("a uniform buffer has no priority tree")
    p = data.draw(st.sampled_from([rings["full"], rings["partial"], rings["holes"], deep_ring]), label="ring")
    buf = bytearray(p.data)
    for offset, value in data.draw(_tree_writes(p), label="writes"):
        put(buf, offset, value)
    assert attach_outcome(p, bytes(buf)) == "ok"


def test_priority_offset_past_2_64_is_refused(pristine):
    """A header forged so that the slots end within a page of 2**64 bytes: the tree's page
    would start at 2**64, which is no offset. attach must refuse the layout ("too large"), not
    let the offset wrap around to 0 -- that would put the tree over the header, and slots past
    the end of the (sparse, 74 GB) file."""
    if pristine.sampler is None:
        pytest.skip("only a prioritized buffer has a section after the slots")
    n, cap = 4234638208, 4356155801  # slots of 4234638272 bytes; they end 576 bytes before 2**64
    text = f"x:u1:{n}\n".encode()
    buf = bytearray(pristine.data[:SCHEMA_TEXT + 4096])
    buf[SCHEMA_TEXT : SCHEMA_TEXT + pristine.schema_len] = bytes(pristine.schema_len)
    buf[SCHEMA_TEXT : SCHEMA_TEXT + len(text)] = text
    put(buf, H_SCHEMA_LEN, len(text))
    put(buf, H_CAPACITY, cap)
    small = layout(1, n, len(text), pristine.sampler)
    slots_end = small["slots"] + cap * small["slot"]
    assert 2**64 - 4096 < slots_end < 2**64 and layout(cap, n, len(text), pristine.sampler) is None
    tree = geometry(cap)["bytes"]
    wrapped = [
        (H_RECORD_BYTES, n), (H_SLOT_BYTES, small["slot"]), (H_RECORD_IN_SLOT, 64), (H_TOTAL, tree), (H_SECTION_COUNT, 4),
        *header_words(small)[5:13],
        (SECTION_DIRECTORY + 2 * SECTION_ENTRY_BYTES + 16, cap * small["slot"]),
        (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES, tag_word(PRIORITY)), (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES + 8, 0),
        (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES + 16, tree), (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES + 24, 1),
    ]
    for offset, value in wrapped:
        put(buf, offset, value)
    reseal(buf)
    assert model_check(bytes(buf)) == "capacity"
    try:
        os.unlink(pristine.path)
    except FileNotFoundError:
        pass
    with open(pristine.path, "wb") as f:
        f.write(buf)
        try:
            f.truncate(tree)
        except OSError as e:
            pytest.skip(f"no sparse file of {tree} bytes here: {e}")

    def open_it() -> str:
        try:
            with ReplayBuffer.inspect(VICTIM, path=pristine.dir) as handle:
                return f"opened with capacity {handle.capacity}"
        except CorruptSegmentError as e:
            return str(e)

    try:
        outcome = run_forked(open_it, timeout=30)
    finally:
        os.unlink(pristine.path)
    assert "too large" in outcome and pristine.path in outcome, outcome


def test_descent_stays_in_the_priority_section(deep_ring):
    """Scribbled sums in the padding of every array the descent reads (level 0's copies past
    the 300 leaves, level 1's nodes past its 19, level 2's past its 2), each with 100 times the
    mass of the real leaves, and the sums above them made as if the padding counted: the descent
    reads only the children that exist (one that does not counts as 0), so it never follows the
    padding past the leaves into memory beyond the section (and the file), which the core's
    bounds check would turn into a panic, nor to a leaf past the capacity; every i.i.d. draw
    ends at a real leaf (the target wrapped into what the real children hold), with the
    probability the scribbled root's sum implies."""
    p = deep_ring
    buf = bytearray(p.data)
    tree = View(buf).tree  # over buf: puts change it
    level1, level2, root = tree.levels
    assert (level1["nodes"], level2["nodes"], root["nodes"]) == (19, 2, 1)
    mass = 100 * tree.total()
    for i in range(300, 304):
        tree.put(tree.values + 8 * i, mass)
    for k in range(19, FANOUT * 2):
        tree.put(level1["sums"] + 8 * k, mass)
    for k in range(2, FANOUT):
        tree.put(level2["sums"] + 8 * k, mass)
    # the sums above them, as a descent that read all 16 words of each node would see them
    def whole(offset: int, first: int) -> int:
        return sum(tree.word(offset + 8 * (first + k)) for k in range(FANOUT))

    tree.put(level1["sums"] + 8 * 18, whole(tree.values, 18 * FANOUT))
    tree.put(level2["sums"] + 8 * 1, whole(level1["sums"], FANOUT))
    tree.put(root["sums"], whole(level2["sums"], 0))
    put(buf, H_STRATIFIED, 0)  # i.i.d.: every row can go anywhere
    data = bytes(reseal(buf))
    view = View(data)
    total = view.tree.total()
    assert total > 30 * mass and view.tree.reachable(0, total - 1) == set(range(300)) == view.drawable().keys()
    write_victim(p, data)

    def sample_often() -> list[tuple[int, int, float]]:
        with ReplayBuffer.attach(VICTIM, path=p.dir) as handle:
            rows = []
            for _ in range(20):
                _, info = handle.sample(64, return_info=True)
                rows += zip(info["index"].tolist(), info["key"].tolist(), info["probability"].tolist())
            return rows

    rows = run_forked(sample_often, timeout=10)
    assert len(rows) == 20 * 64
    drawable = view.drawable()
    for i, key, probability in rows:
        assert 0 <= i < 300 and drawable.get(i) == key, (i, key)
        assert probability == float(view.tree.leaf(i)[1]) / float(total)
    assert View(read_file(p.path)).tree.section() == view.tree.section(), "sampling changed the tree"
    assert attach_outcome(p, data) == "ok"


# --------------------------------------------------------------------------- handle-table words


_ENTRY_OFFSETS = [E_OWNER, E_NAMESPACE, E_INTENT, E_FIRSTS, *E_COUNTER.values(), E_TREE_CHANGES, E_TREE_CHANGES,
                  E_QUEUE_CLAIM, E_WAITERS, *E_UNUSED]
_ENTRY_VALUES = st.one_of(
    st.integers(0, U64), _BOUNDARY, st.integers(0, 2 * CAP), st.integers(U64 - 2 * CAP, U64),
    st.integers(2**63 - CAP, 2**63 + CAP), st.integers(MAX_TICKET - CAP, MAX_TICKET + CAP),
)
_ENTRIES = st.sampled_from([0, 0, 1, 2, 5, MAX_HANDLES - 1])
_SLOT_STATES = st.sampled_from(["keep", "busy", "busy-first", "committed-first"])


@fast(800)
@given(
    state=st.sampled_from(["full", "partial", "holes", "empty", "taken"]),
    writes=st.lists(st.tuples(_ENTRIES, st.sampled_from(_ENTRY_OFFSETS), _ENTRY_VALUES), max_size=8),
    intents=st.lists(
        st.tuples(_ENTRIES, st.integers(0, 80), st.one_of(st.none(), st.integers(0, SNAPSHOT_MASK)), _SLOT_STATES),
        max_size=3,
    ),
    used=st.one_of(st.none(), st.sampled_from([0, 1, 2, 3, 6, MAX_HANDLES - 1, MAX_HANDLES, MAX_HANDLES + 1, U64])),
)
@example(state="full", writes=[(0, E_FIRSTS, U64)], intents=[], used=None)
@example(state="partial", writes=[(0, E_FIRSTS, U64)], intents=[(0, 2, None, "committed-first")], used=None)
@example(state="partial", writes=[(0, E_FIRSTS, 2**63 - 1), (1, E_FIRSTS, 2**63 - 1)], intents=[], used=2)
@example(state="full", writes=[(0, E_COUNTER["inserts"], U64), (1, E_COUNTER["inserts"], 5)], intents=[], used=MAX_HANDLES)
# a dead writer with a change of the tree in flight (entry 1; entry 0 while it holds an
# overwrite, so that attach takes entry 1): sample repairs the tree first
@example(state="full", writes=[(1, E_TREE_CHANGES, 1)], intents=[(1, 8, None, "busy")], used=2)
@example(state="full", writes=[(0, E_TREE_CHANGES, U64)], intents=[(0, 9, None, "busy"), (0, 10, None, "busy")], used=None)
@example(state="partial", writes=[(2, E_TREE_CHANGES, 3)], intents=[(2, 1, None, "busy")], used=3)
# ... on the entry attach takes, which repairs it before it registers
@example(state="full", writes=[(0, E_TREE_CHANGES, 2)], intents=[(0, 9, None, "busy-first")], used=None)
# ... on an entry past those used: nobody looks at it
@example(state="full", writes=[(5, E_TREE_CHANGES, 1)], intents=[(5, 10, None, "busy")], used=None)
def test_corrupted_entry_words(rings, state, writes, intents, used):
    """``firsts``, the counters, intents and owners of handle-table entries (and the count of
    entries used) set to anything, with intents naming slots that hold their entry's busy or
    first-commit word (what a writer killed mid-insert leaves, with a snapshot that matches or
    not): nothing crashes or hangs -- attach, len, stats, processes, reads, sample and add all
    work; ``len`` stays within [0, capacity] and len and stats report what those words say
    (wrapping sums), before and after attach settles its entry and after an insert. In a
    prioritized buffer, an entry counting changes of the tree in flight has the whole tree
    recomputed (and the leaves of the slots it left busy retagged with no value): by attach if
    it is the entry attach takes, else by the first sample if it is among the entries used."""
    p = rings[state]
    buf = bytearray(p.data)
    for e, offset, value in writes:
        put(buf, p.entry(e, offset), value)
    for e, ticket, snapshot, slot_state in intents:
        firsts = word(buf, p.entry(e, E_FIRSTS))
        put(buf, p.entry(e, E_INTENT), (ticket + 1) << TICKET_SHIFT | (firsts & SNAPSHOT_MASK if snapshot is None else snapshot))
        seq = {"keep": None, "busy": busy(ticket, e, False), "busy-first": busy(ticket, e, True),
               "committed-first": committed_first(ticket, e)}[slot_state]
        if seq is not None and not _stalls_own_writer(p, seq):
            put(buf, p.seq(ticket % CAP), seq)
    if used is not None:
        put(buf, p.control + C_ENTRIES_USED, used)
    size = View(bytes(buf)).size()
    event(f"modelled size: {'0' if size == 0 else 'capacity' if size == CAP else 'between'}")
    assert attach_outcome(p, bytes(buf)) == "ok"


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def test_hostile_handle_table_does_not_hang(pristine):
    """Every handle-table entry names a live process that holds no handle (pid 1, with its real
    start time and our PID namespace), all of them counted as used, and eight of them announce
    overwrites of the eight slots, whose version words say they are being written (as if eight
    writers had died mid-copy; in a prioritized buffer each with a change of the tree in flight,
    which writers count before they claim). Owners are judged by their entry locks, not by
    these words: attach, reads, sampling and inserts finish at once instead of waiting for those
    "writers", and pid 1 is not reported as attached. (Layout 2's counterpart was a hostile
    reaper word.) In a prioritized buffer the first sample repairs the tree for each of those
    entries (the whole tree, recomputed): the leaves of the slots the dead writers claimed lose
    their values (taking the tags of the records being written), so nothing is drawable by
    priority, sample falls back to uniform draws and, with no readable slot, raises
    EmptyBufferError."""
    p = pristine
    buf = bytearray(p.data)
    pid1 = (_start_ticks(1) & 0xFFFFFFFF) << 32 | 1
    namespace = os.stat("/proc/self/ns/pid").st_ino
    for e in range(MAX_HANDLES):
        put(buf, p.entry(e, E_OWNER), pid1)
        put(buf, p.entry(e, E_NAMESPACE), namespace)
    put(buf, p.control + C_ENTRIES_USED, MAX_HANDLES)
    tickets = []
    for i in range(CAP):
        ticket, e = ticket_of(word(buf, p.seq(i))), i + 1
        tickets.append(ticket)
        put(buf, p.entry(e, E_INTENT), (ticket + 1) << TICKET_SHIFT | word(buf, p.entry(e, E_FIRSTS)) & SNAPSHOT_MASK)
        put(buf, p.seq(i), busy(ticket, e, False))
        if p.sampler is not None:
            put(buf, p.entry(e, E_TREE_CHANGES), 1)
    data = bytes(buf)
    assert View(data).size() == 0 and not View(data).claimed_readable()
    assert run_forked(lambda: attach_outcome(p, data), timeout=15) == "ok"
    if p.sampler is None:
        return
    write_victim(p, data)
    before = View(data)
    assert before.tree.total() > 0 and not before.drawable()
    attached, mine = _attached(data)
    assert mine == 0 and attached.tree.section() == before.tree.section()
    expected = _repaired(attached, mine)
    assert _try_in_child(p, lambda h: h.sample(4)) == "EmptyBufferError"
    after = View(read_file(p.path))
    assert after.tree.section() == expected.tree.section()
    assert [after.tree.leaf(i) for i in range(CAP)] == [(after.tree.tag(t), 0, 0) for t in tickets]
    assert after.tree.total() == after.tree.minimum() == 0
    assert all(after.tree_changes(e) == 0 for e in range(MAX_HANDLES))


# --------------------------------------------------------------------------- known core problems


_ZEROS = {f: np.zeros(shape, dtype) for f, (shape, dtype) in FIELDS.items()}


def _try_in_child(p: Pristine, action) -> str:
    def run() -> str:
        handle = ReplayBuffer.attach(VICTIM, path=p.dir)
        try:
            action(handle)
            return "done"
        except BaseException as e:  # noqa: BLE001
            return type(e).__name__
        finally:
            handle.close()

    # a stalled call waits out the core's WAIT_LIMIT (10 s): below that, with room for a loaded
    # machine to fork, attach and act
    return run_forked(run, timeout=8)


def test_busy_word_naming_the_next_ticket_does_not_stall_add(pristine):
    """A slot version word busy(T, entry 0) for the ticket T the next insert takes, in T's slot.
    attach takes entry 0 (free, its intent cleared) and the insert announces T in entry 0's
    intent: the word names the claiming writer itself, which is not writing that slot, so the
    word can only be damage and is taken over at once (it once made ``add`` wait 10 s)."""
    buf = bytearray(pristine.data)
    put(buf, pristine.seq(pristine.cursor % CAP), busy(pristine.cursor, 0, False))
    write_victim(pristine, bytes(buf))
    assert _try_in_child(pristine, lambda h: h.add(**_ZEROS)) == "done"


def test_sample_with_forged_size_and_no_record_does_not_spin(rings):
    """A ring that holds no record but whose cursor moved (a writer took a chunk of 64 tickets
    and died before its first claim), with entry 0's ``firsts`` damaged to 5: ``len`` says 5,
    but after a few thousand misses ``sample`` scans the slots, finds none readable and raises
    EmptyBufferError at once (it once drew for 10 s and raised ContendedError)."""
    p = rings["taken"]
    buf = bytearray(p.data)
    put(buf, p.entry(0, E_FIRSTS), 5)
    write_victim(p, bytes(buf))
    assert _try_in_child(p, lambda h: h.sample(4)) == "EmptyBufferError"


# --------------------------------------------------------------------------- specific hostile files


def test_messages_say_what_is_wrong(pristine):
    p = pristine
    cases = [  # (offset, value, reseal, what the message must say)
        (H_MAGIC, 0x1234, False, "magic"),
        (H_VERSION, LAYOUT_VERSION + 1, False, f"layout version {LAYOUT_VERSION + 1} "),
        (H_VERSION, 2, False, "layout version 2 "),
        (H_READY, 0, False, "ready"),
        (H_CHECKSUM, 1, False, "checksum"),
        (H_KIND, 2, True, "buffer kind 2 "),
        (H_FEATURES, 1 << 5, True, "bits 0x20"),
        # (in a prioritized buffer one more slot fits before the tree's page: only the slots move)
        (H_CAPACITY, CAP + 1, True, f"header word at byte {H_TOTAL} is {p.size}" if p.sampler is None
         else f'section "slots" is at {p.slots}..+{CAP * p.slot_bytes} version 1, the schema and capacity imply '
              f'{p.slots}..+{(CAP + 1) * p.slot_bytes}'),
        (H_CAPACITY, 4 * CAP, True, f"header word at byte {H_TOTAL} is {p.size}"),
        (SECTION_DIRECTORY + 8, p.control + 128, True, f'section "control" is at {p.control + 128}..+'),
        (SECTION_DIRECTORY + SECTION_ENTRY_BYTES, tag_word(b"prio\0\0\0\0"), True, 'section 1 is "prio", expected "handles"'),
        (H_SAMPLER, 2, True, f"sampler kind 2 does not match the feature bits {word(p.data, H_FEATURES):#x}"),
    ]
    if p.sampler is None:
        cases += [
            (H_FEATURES, FEATURE_PRIORITIZED, True, "sampler kind 0 does not match the feature bits 0x1"),
            (H_SAMPLER, SAMPLER_PRIORITIZED, True, "sampler kind 1 does not match the feature bits 0x0"),
            (H_SECTION_COUNT, 4, True, f"header word at byte {H_SECTION_COUNT} is 4, the schema and capacity imply 3"),
        ]
    else:
        cases += [
            (H_FEATURES, 0, True, "sampler kind 1 does not match the feature bits 0x0"),
            (H_SAMPLER, SAMPLER_UNIFORM, True, "sampler kind 0 does not match the feature bits 0x1"),
            (H_STRATIFIED, 2, True, "sampler flag 2 is not 0 or 1"),
            (H_STRATIFIED, U64, True, f"sampler flag {U64} is not 0 or 1"),
            (H_ALPHA, bits_of(math.nan), True, "Prioritized: alpha must be a finite number >= 0, got NaN"),
            (H_ALPHA, bits_of(-math.inf), True, "Prioritized: alpha must be a finite number >= 0, got -inf"),
            (H_EPS, bits_of(math.inf), True, "Prioritized: eps must be a finite number >= 0, got inf"),
            (H_EPS, bits_of(-1.0), True, "Prioritized: eps must be a finite number >= 0, got -1"),
            (H_EPS, bits_of(-0.25), True, "Prioritized: eps must be a finite number >= 0, got -0.25"),
            (H_EPS, bits_of(-1e20), True, "Prioritized: eps must be a finite number >= 0, got -100000000000000000000"),
            (H_SECTION_COUNT, 3, True, f"header word at byte {H_SECTION_COUNT} is 3, the schema and capacity imply 4"),
            (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES + 16, 1, True, f'section "priority" is at {p.priority}..+1 version 1'),
            (SECTION_DIRECTORY + 3 * SECTION_ENTRY_BYTES, tag_word(b"priorit\0"), True, 'section 3 is "priorit", expected "priority"'),
        ]
    for offset, value, sealed, needle in cases:
        buf = bytearray(p.data)
        put(buf, offset, value)
        if sealed:
            reseal(buf)
        reason = model_check(bytes(buf))
        assert reason is not None
        write_victim(p, bytes(buf))
        with pytest.raises(CorruptSegmentError, match=re.escape(needle)) as exc:
            ReplayBuffer.attach(VICTIM, path=p.dir)
        assert p.path in str(exc.value) and reason in str(exc.value)
    # Layout::new checks the sampler's parameters before the capacity; a uniform buffer's are not read
    buf = bytearray(p.data)
    put(buf, H_CAPACITY, 0)
    put(buf, H_ALPHA, bits_of(-2.5))
    reseal(buf)
    needle = "capacity must be between 1 and" if p.sampler is None else "alpha must be a finite number >= 0, got -2.5"
    assert model_check(bytes(buf)) == ("capacity" if p.sampler is None else "Prioritized: " + needle)
    write_victim(p, bytes(buf))
    with pytest.raises(CorruptSegmentError, match=re.escape(needle)):
        ReplayBuffer.attach(VICTIM, path=p.dir)
    write_victim(p, p.data[: p.size // 2])
    with pytest.raises(CorruptSegmentError, match="bytes") as exc:
        ReplayBuffer.attach(VICTIM, path=p.dir)


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

    def sealed(offset: int, value: int) -> bytes:
        data = bytearray(p.data)
        put(data, offset, value)
        return bytes(reseal(data))

    broken = {
        "empty": b"",
        "short": p.data[:100],
        "truncated": p.data[: p.size // 2],
        "longer": p.data + b"\0" * 4096,
        "magic": b"\0" * 8 + p.data[8:],
        "sealed-bad-capacity": sealed(H_CAPACITY, 9),
        "sealed-bad-section": sealed(SECTION_DIRECTORY + 8, 0),
        "sealed-feature": sealed(H_FEATURES, 2),
        "sealed-kind": sealed(H_KIND, 2),
        "sealed-sampler": sealed(H_SAMPLER, 2),
        "sealed-other-sampler": sealed(H_FEATURES, word(p.data, H_FEATURES) ^ FEATURE_PRIORITIZED),
        "v2": v2_segment(CAP, FIELD_CODES, creator=os.getpid()),
        "noise": os.urandom(8192),
        "mode-000": p.data[: p.size // 2],
    }
    for name, data in broken.items():
        put_file(name, data, 0 if name == "mode-000" else 0o600)
    os.symlink("/dev/zero", os.path.join(directory, "shmreplay.link"))
    put_file("good", p.data)
    _special_files(directory)
    return sorted(broken)


def test_listing_and_gc_with_corrupt_files(pristine, tmp_path):
    """list_buffers, gc (dry run) and the CLI's ls/info never fail because of broken files next
    to a good one: the good one is listed, the broken ones are not listed as buffers, and info
    on a broken one is a one-line error naming the file (and, for an old segment, its version)."""
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
    for name in ("truncated", "magic", "sealed-bad-capacity", "sealed-bad-section", "sealed-sampler", "v2"):
        proc = subprocess.run([*cli, "info", name, "--path", d], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1, proc
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"shmreplay.{name}" in lines[0], proc.stderr
        if name == "v2":
            assert "layout version 2 " in lines[0], lines
    # the good one is intact and usable after all that
    with ReplayBuffer.attach("good", path=d) as buf:
        assert len(buf) == CAP and buf.stats()["inserts"] == CAP + 3
        buf.sample(4)
    # gc for real removes nothing that is not a stale buffer, and never a broken file
    before = set(os.listdir(d))
    removed = shmreplay.gc(d)
    assert set(removed) <= {"good"}
    assert before - set(os.listdir(d)) <= {"shmreplay.good"}
