"""The two workloads and their self-validating rows.

Every row is derived from ``(writer id, sequence number)``, and those two numbers are stored in
the row itself (Atari: the ``actor`` and ``step`` fields; control: ``obs[0]`` and ``obs[1]``).
So a sampled row can be checked on its own: a torn row (bytes of two different records, or a
slot read while it was being written) does not match what its own id fields say it should be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Batch = dict[str, np.ndarray]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
PREFILL_WID = 7  # the writer id of rows written while filling a buffer before a measurement


def splitmix64(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.uint64) + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def row_word(wids: Any, seqs: Any) -> np.ndarray:
    """One 64-bit word per row, a hash of (writer id, sequence number)."""
    w = np.asarray(wids, dtype=np.int64).astype(np.uint64)
    s = np.asarray(seqs, dtype=np.int64).astype(np.uint64)
    return splitmix64((w << np.uint64(40)) ^ s)


@dataclass(frozen=True)
class Workload:
    name: str
    fields: dict[str, tuple[tuple[int, ...], np.dtype]]
    make: Callable[..., Batch]  # (wids, seqs, frames=True) -> batch (frames=False: no frames)
    ids: Callable[[Batch, int], tuple[np.ndarray, np.ndarray]]  # batch, n -> (wids, seqs)
    frame_word: Any  # (field, wids, seqs) -> the 64-bit word a frame repeats (None: no frames)
    fill_batch: int  # rows per batch used to fill a buffer

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's data (no padding): what every contender moves per row."""
        return sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in self.fields.values())

    def rows(self, wid: int, seqs: Any) -> Batch:
        seqs = np.asarray(seqs, dtype=np.int64)
        return self.make(np.full(seqs.shape, wid, np.int64), seqs)

    def pool(self, wid: int, n_batches: int, batch_rows: int, seq0: int = 0) -> list[Batch]:
        """``n_batches`` batches of distinct rows, for writers to cycle through."""
        return [self.rows(wid, np.arange(seq0 + k * batch_rows, seq0 + (k + 1) * batch_rows)) for k in range(n_batches)]

    def bad_rows(self, batch: Batch) -> np.ndarray:
        """Boolean mask of the rows that are not exactly what their own id fields say."""
        n = len(batch["done"])
        wids, seqs = self.ids(batch, n)
        bad = (wids < 0) | (wids > 255) | (seqs < 0) | (seqs >= 1 << 24)
        wids, seqs = np.where(bad, 0, wids), np.where(bad, 0, seqs)
        expected = self.make(wids, seqs, frames=False)
        for name, (shape, dtype) in self.fields.items():
            got = np.ascontiguousarray(batch[name]).reshape(n, -1)
            if got.dtype != dtype:
                got = got.astype(dtype)
            if name in expected:
                bad |= (got != expected[name].reshape(n, -1)).any(axis=1)
            else:  # a frame: every 64-bit word of the row is the row's word for that frame
                words, want = got.view(np.uint64), self.frame_word(name, wids, seqs)
                bad |= (words.min(axis=1) != want) | (words.max(axis=1) != want)  # 2x faster than !=.any
        return bad


# ---- Atari: frames 4x84x84 uint8; ids in the actor and step fields ----

FRAME = (4, 84, 84)
_FRAME_WORDS = int(np.prod(FRAME)) // 8


def _frame_word(name: str, wids: np.ndarray, seqs: np.ndarray) -> np.ndarray:
    w = row_word(wids, seqs)
    return w if name == "obs" else w ^ GOLDEN


def _atari_make(wids: np.ndarray, seqs: np.ndarray, frames: bool = True) -> Batch:
    n = len(seqs)
    w = row_word(wids, seqs)
    rows: Batch = {}
    if frames:  # each frame is one 64-bit word repeated: a torn frame shows as a mixed row
        for name in ("obs", "next_obs"):
            words = np.empty((n, _FRAME_WORDS), np.uint64)
            words[:] = _frame_word(name, wids, seqs)[:, None]
            rows[name] = words.view(np.uint8).reshape((n, *FRAME))
    return rows | {
        "action": (w >> np.uint64(59)).astype(np.int32),
        "reward": (seqs % 1000).astype(np.float32),
        "done": seqs % 7 == 0,
        "actor": np.asarray(wids, np.int32),
        "step": np.asarray(seqs, np.int32),
    }


def _atari_ids(batch: Batch, n: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(batch["actor"]).reshape(n).astype(np.int64), np.asarray(batch["step"]).reshape(n).astype(np.int64))


ATARI = Workload(
    name="atari",
    fields={
        "obs": (FRAME, np.dtype(np.uint8)),
        "next_obs": (FRAME, np.dtype(np.uint8)),
        "action": ((), np.dtype(np.int32)),
        "reward": ((), np.dtype(np.float32)),
        "done": ((), np.dtype(np.bool_)),
        "actor": ((), np.dtype(np.int32)),
        "step": ((), np.dtype(np.int32)),
    },
    make=_atari_make,
    ids=_atari_ids,
    frame_word=_frame_word,
    fill_batch=64,
)


# ---- control (MuJoCo-like): float32 vectors; ids in obs[0] and obs[1] (exact below 2**24) ----


def _control_make(wids: np.ndarray, seqs: np.ndarray, frames: bool = True) -> Batch:
    w = row_word(wids, seqs)
    h = splitmix64(w[:, None] + np.arange(41, dtype=np.uint64)[None, :] * GOLDEN)
    vals = ((h >> np.uint64(40)).astype(np.float64) / 1024.0).astype(np.float32)  # exact in float32
    obs = vals[:, 0:17].copy()
    obs[:, 0] = wids
    obs[:, 1] = seqs
    return {
        "obs": obs,
        "next_obs": np.ascontiguousarray(vals[:, 17:34]),
        "action": np.ascontiguousarray(vals[:, 34:40]),
        "reward": vals[:, 40].copy(),
        "done": seqs % 7 == 0,
    }


def _control_ids(batch: Batch, n: int) -> tuple[np.ndarray, np.ndarray]:
    obs = np.asarray(batch["obs"]).reshape(n, 17)
    return obs[:, 0].astype(np.int64), obs[:, 1].astype(np.int64)


CONTROL = Workload(
    name="control",
    fields={
        "obs": ((17,), np.dtype(np.float32)),
        "next_obs": ((17,), np.dtype(np.float32)),
        "action": ((6,), np.dtype(np.float32)),
        "reward": ((), np.dtype(np.float32)),
        "done": ((), np.dtype(np.bool_)),
    },
    make=_control_make,
    ids=_control_ids,
    frame_word=None,
    fill_batch=4096,
)

WORKLOADS = {w.name: w for w in (ATARI, CONTROL)}


def take_row(batch: Batch, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in batch.items()}
