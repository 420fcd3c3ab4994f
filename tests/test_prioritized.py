"""Acceptance tests for prioritized replay (``sampler=shmreplay.Prioritized(...)``).

Written from the contract alone: v = (p + eps) ** alpha, P(i) = v_i / sum(v over live items),
weight_i = (v_i / v_min) ** -beta with v_min the smallest positive live v, stratified draws by
default, stale keys ignored and counted, bad input applies nothing, priority sums kept in fixed
point and repaired after a process dies mid-insert or mid-update.

Conventions used here (beyond the contract, shared with the rest of the suite):

* ``key`` is the record's insert ticket: one process inserting alone gives its rows the keys
  0, 1, 2, ... in order, and a record with key k lives in slot ``k % capacity``. Where more
  processes insert, keys are found by sampling (or checked against samples).
* Rows are self-describing: every row carries an ``ident`` and its ``obs`` derives from it, and
  priorities are derived from the ident too (``f_prio`` at insert, ``g_prio`` by updaters), so
  whose priority a slot holds can be told from the slot alone.

Every child process is a real process (``spawn`` and ``fork``), killed with a real SIGKILL where
a test says so, and every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import queue as queue_mod
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np
import pytest

import shmreplay
from shmreplay import ReplayBuffer

from helpers import kill_and_reap, segment_path

# A correct implementation runs every test here in well under 20 s on two cores; the marker
# only turns a hang into a failure.
pytestmark = pytest.mark.timeout(120)

FIELDS: dict[str, tuple[tuple[int, ...], Any]] = {"obs": ((4,), np.float32), "ident": ((), np.int64)}
OBS_OFFSETS = np.array([0.0, 0.25, 0.5, 0.75], dtype=np.float32)

# Relative tolerance for sums and probabilities kept in fixed point (contract: ~1e-5).
TOTAL_RTOL = 2e-5
PROB_RTOL = 2e-5
# p-value below which a goodness-of-fit test fails (small: the tests must not be flaky).
P_THRESHOLD = 1e-4

INFO_DTYPES = {
    "index": np.dtype(np.int64),
    "key": np.dtype(np.uint64),
    "probability": np.dtype(np.float64),
    "weight": np.dtype(np.float32),
    "priority": np.dtype(np.float64),
}

BARRIER_TIMEOUT = 30.0  # for children to start (spawn imports numpy, shmreplay, pytest)
CHILD_DEADLINE = 60.0  # a child stops by itself, whatever the parent does


# =======================================================================================
# Helpers
# =======================================================================================


def Prioritized(**kwargs: Any) -> Any:
    return shmreplay.Prioritized(**kwargs)


def Uniform() -> Any:
    return shmreplay.Uniform()


def create(name: str, capacity: int, sampler: Any = None, **kwargs: Any) -> ReplayBuffer:
    if sampler is None:
        return ReplayBuffer.create(name, capacity=capacity, fields=FIELDS, **kwargs)
    return ReplayBuffer.create(name, capacity=capacity, fields=FIELDS, sampler=sampler, **kwargs)


def make_rows(idents: Any) -> dict[str, np.ndarray]:
    """Rows (batch form) whose content derives from their idents."""
    idents = np.asarray(idents, dtype=np.int64).reshape(-1)
    base = (idents % 100_000).astype(np.float32)
    return {"obs": base[:, None] + OBS_OFFSETS[None, :], "ident": idents.copy()}


def one_row(ident: int) -> dict[str, Any]:
    rows = make_rows([ident])
    return {"obs": rows["obs"][0], "ident": rows["ident"][0]}


def rows_consistent(batch: dict[str, Any]) -> np.ndarray:
    """Per row: its obs is the one its ident gives (no torn or mixed row)."""
    ident = np.asarray(batch["ident"]).reshape(-1)
    obs = np.asarray(batch["obs"]).reshape(ident.shape[0], 4)
    want = (ident % 100_000).astype(np.float32)[:, None] + OBS_OFFSETS[None, :]
    return np.all(obs == want, axis=1)


def f_prio(ident: Any) -> np.ndarray:
    """Priority given at insert: exact in float64, injective in ident (< 2**22), in [1, 2)."""
    return 1.0 + np.asarray(ident, dtype=np.float64) / float(1 << 22)


def g_prio(ident: Any) -> np.ndarray:
    """Priority given by updaters: exact, injective (ident < 2**22), in [4, 8): never an f_prio."""
    return 4.0 + np.asarray(ident, dtype=np.float64) / float(1 << 20)


def v_of(p: Any, alpha: float, eps: float) -> np.ndarray:
    return (np.asarray(p, dtype=np.float64) + eps) ** alpha


def u64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def tickets(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.uint64)


def slot_idents(buf: ReplayBuffer) -> np.ndarray:
    """The ident of every slot's record, -1 where a slot holds none (never written, or its
    writer died while writing it)."""
    out = np.full(buf.capacity, -1, dtype=np.int64)
    for i in range(buf.capacity):
        try:
            row = buf[i]
        except IndexError:
            continue
        assert rows_consistent({k: np.asarray(v)[None] for k, v in row.items()})[0], f"slot {i} holds a torn row"
        out[i] = int(row["ident"])
    return out


def last_wins(keys: np.ndarray, values: np.ndarray) -> dict[int, float]:
    out: dict[int, float] = {}
    for k, v in zip(np.asarray(keys).tolist(), np.asarray(values, dtype=np.float64).tolist()):
        out[int(k)] = float(v)
    return out


def assert_total(buf: ReplayBuffer, expected: float, what: str = "", rtol: float = TOTAL_RTOL) -> None:
    got = buf.stats()["priority_total"]
    assert isinstance(got, float), f"priority_total must be a float, got {type(got).__name__}"
    assert math.isclose(got, expected, rel_tol=rtol, abs_tol=1e-9), (
        f"{what}: priority_total {got!r} != sum of the live items' v {expected!r} "
        f"(relative error {abs(got - expected) / max(abs(expected), 1e-300):.3g})"
    )


def check_info(info: dict[str, np.ndarray], n: int) -> None:
    """Every info array is there, 1-D of length n, of the contract's dtype."""
    missing = set(INFO_DTYPES) - set(info)
    assert not missing, f"info lacks {sorted(missing)}: {sorted(info)}"
    for name, dtype in INFO_DTYPES.items():
        a = info[name]
        assert isinstance(a, np.ndarray), f"info[{name!r}] is a {type(a).__name__}, not an ndarray"
        assert a.dtype == dtype, f"info[{name!r}] has dtype {a.dtype}, expected {dtype}"
        assert a.shape == (n,), f"info[{name!r}] has shape {a.shape}, expected {(n,)}"


def sample_many(buf: ReplayBuffer, batches: int, batch_size: int, **kwargs: Any):
    """Yields (batch, info) for ``batches`` samples."""
    for _ in range(batches):
        yield buf.sample(batch_size, return_info=True, **kwargs)


def _normal_isf(p: float) -> float:
    return statistics.NormalDist().inv_cdf(1.0 - p)


def chi2_upper_critical(df: int, p: float = P_THRESHOLD) -> float:
    """The chi-square value exceeded with probability ``p`` (scipy if available, else the
    Wilson-Hilferty normal approximation)."""
    try:
        from scipy.stats import chi2  # type: ignore[import-not-found]

        return float(chi2.isf(p, df))
    except ImportError:
        h = 2.0 / (9.0 * df)
        return df * (1.0 - h + _normal_isf(p) * math.sqrt(h)) ** 3


def chi2_lower_critical(df: int, p: float = P_THRESHOLD) -> float:
    """The chi-square value undershot with probability ``p``."""
    try:
        from scipy.stats import chi2  # type: ignore[import-not-found]

        return float(chi2.ppf(p, df))
    except ImportError:
        h = 2.0 / (9.0 * df)
        return df * max(0.0, 1.0 - h - _normal_isf(p) * math.sqrt(h)) ** 3


def chi2_statistic(counts: np.ndarray, probs: np.ndarray) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    expected = counts.sum() * np.asarray(probs, dtype=np.float64)
    assert expected.min() >= 5, f"chi-square needs >= 5 expected counts per cell, got {expected.min():.2f}"
    return float(((counts - expected) ** 2 / expected).sum())


def worst_cells(counts: np.ndarray, probs: np.ndarray, k: int = 5) -> str:
    expected = counts.sum() * probs
    z = (counts - expected) / np.sqrt(expected)
    order = np.argsort(-np.abs(z))[:k]
    return ", ".join(f"item {i}: {int(counts[i])} drawn, {expected[i]:.1f} expected" for i in order)


def stratified_violations(counts: np.ndarray, probs: np.ndarray, batch_size: int) -> np.ndarray:
    """Items whose count in one stratified batch is not within 2 of batch_size * P: an item
    owning an interval of L strata widths meets at most floor(L)+2 and at least ceil(L)-2
    strata, whatever the order of the items in [0, T)."""
    return np.nonzero(np.abs(counts - batch_size * probs) > 2.0 + 1e-3)[0]


def _report(q: Any, body: Callable[[], Any]) -> None:
    try:
        q.put(("ok", body()))
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        q.put(("err", f"pid {os.getpid()}:\n{traceback.format_exc()}"))


def _child_entry(q: Any, fn: Callable, args: tuple) -> None:
    _report(q, lambda: fn(*args))


def run_child(ctx: Any, fn: Callable, *args: Any, timeout: float = 60.0) -> Any:
    """Runs top-level ``fn(*args)`` in a child of context ``ctx`` and returns its result."""
    q = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(q, fn, args), daemon=True)
    proc.start()
    try:
        try:
            status, payload = q.get(timeout=timeout)
        except queue_mod.Empty:
            raise AssertionError(
                f"child {proc.pid} sent nothing within {timeout}s (alive={proc.is_alive()}, exit {proc.exitcode})"
            ) from None
        assert status == "ok", f"child failed:\n{payload}"
        proc.join(timeout)
        assert proc.exitcode == 0, f"child exit code {proc.exitcode}"
        return payload
    finally:
        kill_and_reap([proc])
        q.close()
        q.join_thread()


def _expect_raises(exc: type[BaseException], fn: Callable[[], Any], what: str) -> None:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        assert isinstance(e, exc), f"{what}: raised {type(e).__name__}: {e} (expected {exc.__name__})"
        if exc is TypeError:
            assert not isinstance(e, ValueError), f"{what}: {type(e).__name__} is also a ValueError"
        if exc is ValueError:
            assert not isinstance(e, TypeError), f"{what}: {type(e).__name__} is also a TypeError"
        return
    raise AssertionError(f"{what}: nothing raised (expected {exc.__name__})")


# =======================================================================================
# 1. The golden case, sampler objects, info arrays
# =======================================================================================

GOLDEN_P = np.array([1.0, 2.0, 4.0])
GOLDEN_PROB = np.array([1 / 7, 2 / 7, 4 / 7])
GOLDEN_W = np.array([1.0, 0.5, 0.25])


def test_sampler_objects_are_frozen_value_dataclasses():
    u = Uniform()
    p = Prioritized(alpha=0.6, eps=1e-6)
    assert dataclasses.is_dataclass(u) and dataclasses.is_dataclass(p)
    assert u == Uniform() and hash(u) == hash(Uniform())
    assert p == Prioritized(alpha=0.6, eps=1e-6, stratified=True) == Prioritized()
    assert hash(p) == hash(Prioritized(alpha=0.6, eps=1e-6, stratified=True))
    assert (p.alpha, p.eps, p.stratified) == (0.6, 1e-6, True)
    assert Prioritized(alpha=0.6, eps=1e-6, stratified=False) != p
    assert Prioritized(alpha=0.5, eps=1e-6) != p
    assert Prioritized(alpha=0.6, eps=1e-5) != p
    assert p != u
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.alpha = 0.7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stratified = False  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(p)) == p
    assert pickle.loads(pickle.dumps(u)) == u


def test_default_sampler_is_uniform(shm_name):
    with ReplayBuffer.create(shm_name, capacity=8, fields=FIELDS) as buf:
        assert buf.sampler == Uniform()
        assert type(buf.sampler) is type(Uniform())
    with create(shm_name + "p", 8, Prioritized(alpha=0.3, eps=0.5, stratified=False)) as buf:
        assert buf.sampler == Prioritized(alpha=0.3, eps=0.5, stratified=False)
        assert type(buf.sampler) is type(Prioritized())


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "iid"])
def test_golden_case(shm_name, stratified):
    """p = [1, 2, 4], alpha 1, beta 1, eps 0: P = [1/7, 2/7, 4/7], weights [1, 0.5, 0.25]."""
    sampler = Prioritized(alpha=1.0, eps=0.0, stratified=stratified)
    with create(shm_name, 8, sampler) as buf:
        assert buf.sampler == sampler
        buf.extend(make_rows([10, 11, 12]), priority=GOLDEN_P.copy())
        stats = buf.stats()
        assert isinstance(stats["priority_total"], float)
        assert isinstance(stats["max_priority"], float)
        assert isinstance(stats["stale_updates"], int) and not isinstance(stats["stale_updates"], bool)
        assert stats["stale_updates"] == 0
        assert math.isclose(stats["priority_total"], 7.0, rel_tol=1e-6)
        assert stats["max_priority"] == 4.0
        assert np.array_equal(buf.priorities(tickets(0, 3)), GOLDEN_P)

        counts = np.zeros(3, dtype=np.int64)
        for bs in (1, 2, 7, 64, 1000):
            for _ in range(20 if bs < 64 else 5):
                batch, info = buf.sample(bs, beta=1.0, return_info=True)
                check_info(info, bs)
                idx = info["index"]
                assert idx.min() >= 0 and idx.max() <= 2, f"drew slots {np.unique(idx)} of a 3-item buffer"
                assert np.array_equal(info["key"], idx.astype(np.uint64)), "keys of slots 0-2 are tickets 0-2"
                assert np.array_equal(batch["ident"], 10 + idx)
                assert rows_consistent(batch).all()
                np.testing.assert_allclose(info["probability"], GOLDEN_PROB[idx], rtol=1e-6)
                np.testing.assert_allclose(info["weight"], GOLDEN_W[idx], rtol=1e-6)
                assert np.array_equal(info["priority"], GOLDEN_P[idx]), "info['priority'] is the raw p"
                counts += np.bincount(idx, minlength=3)
        # the golden frequencies (5,520 draws; 6 sigma)
        n = counts.sum()
        sigma = np.sqrt(n * GOLDEN_PROB * (1 - GOLDEN_PROB))
        assert np.all(np.abs(counts - n * GOLDEN_PROB) < 6 * sigma), f"{counts} for P = 1/7, 2/7, 4/7"

        # v_min is global: a batch of one still weighs against the smallest live v
        for _ in range(60):
            _, info = buf.sample(1, beta=1.0, return_info=True)
            i = int(info["index"][0])
            assert math.isclose(float(info["weight"][0]), GOLDEN_W[i], rel_tol=1e-6), (
                f"a lone draw of item {i} weighs {info['weight'][0]}, expected {GOLDEN_W[i]} (v_min is global)"
            )

        # default beta 0.4; beta 0 gives weights 1
        _, info = buf.sample(256, return_info=True)
        np.testing.assert_allclose(info["weight"], (GOLDEN_P[info["index"]] / 1.0) ** -0.4, rtol=1e-6)
        _, info = buf.sample(256, beta=0.0, return_info=True)
        assert np.all(info["weight"] == 1.0)
        _, info = buf.sample(256, beta=0.5, return_info=True)
        np.testing.assert_allclose(info["weight"], GOLDEN_P[info["index"]] ** -0.5, rtol=1e-6)

        if stratified:
            # T = 7, B = 7 (or 14): stratum k is [k, k+1) (or half of it); items own intervals
            # of lengths 1, 2 and 4 (whatever their order), so the counts are exact.
            for bs, want in ((7, [1, 2, 4]), (14, [2, 4, 8]), (70, [10, 20, 40])):
                for _ in range(30):
                    _, info = buf.sample(bs, beta=1.0, return_info=True)
                    got = np.bincount(info["index"], minlength=3).tolist()
                    assert got == want, f"a stratified batch of {bs} drew counts {got}, expected {want}"
        else:
            seen = set()
            for _ in range(300):
                _, info = buf.sample(7, beta=1.0, return_info=True)
                seen.add(tuple(np.bincount(info["index"], minlength=3).tolist()))
            assert len(seen) > 3, f"300 i.i.d. batches of 7 all drew the same counts {seen}: stratified?"


def test_eps_is_added_before_the_power(shm_name):
    """alpha 0.5, eps 1: p = [0, 3] gives v = [1, 2] (not p**alpha + eps = [1, 2.73])."""
    with create(shm_name, 4, Prioritized(alpha=0.5, eps=1.0)) as buf:
        buf.extend(make_rows([0, 1]), priority=np.array([0.0, 3.0]))
        assert_total(buf, 3.0, "v = [1, 2]", rtol=1e-6)
        for _ in range(10):
            _, info = buf.sample(64, beta=1.0, return_info=True)
            idx = info["index"]
            np.testing.assert_allclose(info["probability"], np.array([1 / 3, 2 / 3])[idx], rtol=1e-6)
            np.testing.assert_allclose(info["weight"], np.array([1.0, 0.5])[idx], rtol=1e-6)
            assert np.array_equal(info["priority"], np.array([0.0, 3.0])[idx])


def test_weights_use_the_smallest_positive_live_v(shm_name):
    """v_min follows the live items: an overwritten item and a zero item do not count."""
    with create(shm_name, 3, Prioritized(alpha=1.0, eps=0.0)) as buf:
        buf.extend(make_rows([0, 1, 2]), priority=np.array([1.0, 2.0, 4.0]))
        buf.add(**one_row(3), priority=8.0)  # key 3 overwrites slot 0 (p = 1): live v = [8, 2, 4]
        assert np.isnan(buf.priorities(u64([0])))[0]
        assert_total(buf, 14.0, "live v = [8, 2, 4]", rtol=1e-6)
        probs = np.array([8.0, 2.0, 4.0]) / 14.0
        weights = np.array([0.25, 1.0, 0.5])
        for _ in range(20):
            batch, info = buf.sample(50, beta=1.0, return_info=True)
            idx = info["index"]
            np.testing.assert_allclose(info["probability"], probs[idx], rtol=1e-6)
            np.testing.assert_allclose(info["weight"], weights[idx], rtol=1e-6)
            assert np.array_equal(batch["ident"], np.array([3, 1, 2])[idx])
        # key 1 (slot 1) to p = 0: live v = [8, 0, 4]; v_min is the smallest POSITIVE v = 4
        assert buf.update_priorities(u64([1]), np.array([0.0])) == 1
        assert_total(buf, 12.0, "live v = [8, 0, 4]", rtol=1e-6)
        probs = np.array([8.0, 0.0, 4.0]) / 12.0
        weights = np.array([0.5, np.nan, 1.0])
        for _ in range(200):
            _, info = buf.sample(100, beta=1.0, return_info=True)
            idx = info["index"]
            assert not np.any(idx == 1), "an item with v = 0 was drawn while others have v > 0"
            np.testing.assert_allclose(info["probability"], probs[idx], rtol=1e-6)
            np.testing.assert_allclose(info["weight"], weights[idx], rtol=1e-6)
            assert np.all(info["weight"] <= 1.0)


def test_priorities_are_returned_bit_exact(shm_name):
    rng = np.random.default_rng(7)
    special = np.array([0.0, 5e-324, 1 / 3, np.nextafter(1.0, 2.0), 1e-300, 123456.789, 0.1, 2.0**-40])
    with create(shm_name, 600, Prioritized(alpha=0.6, eps=1e-6)) as buf:
        p = np.concatenate([special, rng.uniform(0, 100, 500 - special.size)])
        buf.extend(make_rows(np.arange(500)), priority=p)
        got = buf.priorities(tickets(0, 500))
        assert got.dtype == np.float64 and got.shape == (500,)
        assert np.array_equal(got.view(np.uint64), p.view(np.uint64)), "priorities() must return p bit for bit"
        assert_total(buf, float(v_of(p, 0.6, 1e-6).sum()), "after extend")
        keys = u64(rng.permutation(500)[:200])
        new = rng.uniform(0, 50, 200) ** 2
        assert buf.update_priorities(keys, new) == 200
        p[keys.astype(np.int64)] = new
        got = buf.priorities(tickets(0, 500))
        assert np.array_equal(got.view(np.uint64), p.view(np.uint64))
        assert_total(buf, float(v_of(p, 0.6, 1e-6).sum()), "after update_priorities")
        # the order of the keys asked is the order of the answer
        order = rng.permutation(500)
        assert np.array_equal(buf.priorities(u64(order)), p[order])
        for k in (7, 123, 499):
            buf.add(**one_row(1000 + k), priority=float(p[k]))
        assert np.array_equal(buf.priorities(tickets(500, 3)), p[[7, 123, 499]])


# =======================================================================================
# 2. Goodness of fit
# =======================================================================================

FIT_N = 1000
FIT_BATCHES = 200
FIT_BATCH = 1024


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "iid"])
def test_chi_square_goodness_of_fit(shm_name, stratified):
    alpha, eps, beta = 0.6, 1e-6, 0.4
    p = 1.0 + (np.arange(FIT_N) * 7919 % 97).astype(np.float64)
    v = v_of(p, alpha, eps)
    probs = v / v.sum()
    v_min = v.min()
    with create(shm_name, FIT_N, Prioritized(alpha=alpha, eps=eps, stratified=stratified)) as buf:
        # two inserts, the second a wrap: slot i ends up holding item i
        buf.extend(make_rows(np.arange(FIT_N)), priority=np.full(FIT_N, 3.0))
        buf.extend(make_rows(np.arange(FIT_N)), priority=p)
        assert_total(buf, float(v.sum()), "after the wrap")
        counts = np.zeros(FIT_N, dtype=np.int64)
        violations = 0
        first_violation = ""
        for batch, info in sample_many(buf, FIT_BATCHES, FIT_BATCH, beta=beta):
            idx = info["index"]
            assert np.array_equal(batch["ident"], idx), "slot i holds item i"
            assert np.array_equal(info["key"], (idx + FIT_N).astype(np.uint64))
            np.testing.assert_allclose(info["probability"], probs[idx], rtol=PROB_RTOL)
            np.testing.assert_allclose(info["weight"], (v[idx] / v_min) ** -beta, rtol=PROB_RTOL)
            assert np.array_equal(info["priority"], p[idx])
            c = np.bincount(idx, minlength=FIT_N)
            bad = stratified_violations(c, probs, FIT_BATCH)
            if bad.size:
                violations += 1
                if not first_violation:
                    i = int(bad[0])
                    first_violation = f"item {i}: {c[i]} draws, {FIT_BATCH * probs[i]:.2f} expected"
            counts += c
        stat = chi2_statistic(counts, probs)
        df = FIT_N - 1
        upper = chi2_upper_critical(df)
        assert stat < upper, (
            f"chi-square {stat:.1f} >= {upper:.1f} (df {df}, p < {P_THRESHOLD}): the draws do not follow "
            f"P(i) = v_i / sum v; worst: {worst_cells(counts, probs)}"
        )
        if stratified:
            assert violations == 0, (
                f"{violations} of {FIT_BATCHES} batches were not stratified (an item's count differs from "
                f"B * P(i) by more than 2): {first_violation}"
            )
        else:
            lower = chi2_lower_critical(df)
            assert stat > lower, (
                f"chi-square {stat:.1f} <= {lower:.1f}: far less spread than i.i.d. draws have (stratified?)"
            )
            assert violations > 0, "i.i.d. batches all looked stratified"


# =======================================================================================
# 3. Zero priorities are never drawn
# =======================================================================================

ZERO_DRAWS = 1_000_000
ZERO_BATCH = 4096


def _layout(buf: ReplayBuffer, name: str) -> dict[int, float]:
    """Fills ``buf`` per layout ``name``; returns {slot: p} of the live items."""
    cap = buf.capacity
    if name == "tail":  # full ring, the last 24 slots zero
        p = np.where(np.arange(cap) < cap - 24, 1.0 + np.arange(cap) % 3, 0.0)
        buf.extend(make_rows(np.arange(cap)), priority=p)
        return dict(enumerate(p.tolist()))
    if name == "partial":  # 100 of 4096 slots written, the last 10 zero, the rest never written
        p = np.where(np.arange(100) < 90, 1.0 + np.arange(100) % 5, 0.0)
        buf.extend(make_rows(np.arange(100)), priority=p)
        return dict(enumerate(p.tolist()))
    if name == "wrapped":  # 1500 inserts in 1000 slots; the newest 100 (slots 400-499) zero,
        # and slots 990-999 (keys 990-999) set to zero by update_priorities
        first = 1.0 + np.arange(1000) % 7
        buf.extend(make_rows(np.arange(1000)), priority=first)
        second = np.where(np.arange(500) < 400, 2.5, 0.0)
        buf.extend(make_rows(np.arange(1000, 1500)), priority=second)
        assert buf.update_priorities(tickets(990, 10), np.zeros(10)) == 10
        live = {s: float(first[s]) for s in range(500, 1000)}
        live.update({s: float(second[s]) for s in range(500)})
        live.update({s: 0.0 for s in range(990, 1000)})
        return live
    if name == "boundaries":  # 16-ary tree node boundaries: only 15, 16, 255, 256, 4095 nonzero
        p = np.zeros(cap)
        p[[15, 16, 255, 256, 4095]] = [1e4, 0.5, 3.0, 1e4, 0.5]
        buf.extend(make_rows(np.arange(cap)), priority=p)
        return dict(enumerate(p.tolist()))
    if name == "single":  # one nonzero item
        p = np.zeros(cap)
        p[2048] = 0.75
        buf.extend(make_rows(np.arange(cap)), priority=p)
        return dict(enumerate(p.tolist()))
    raise AssertionError(name)


ZERO_LAYOUTS = [("tail", 1024), ("partial", 4096), ("wrapped", 1000), ("boundaries", 4096), ("single", 4096)]


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "iid"])
@pytest.mark.parametrize("layout,capacity", ZERO_LAYOUTS, ids=[name for name, _ in ZERO_LAYOUTS])
def test_zero_priorities_are_never_drawn(shm_name, layout, capacity, stratified):
    alpha, eps, beta = 0.6, 0.0, 0.7
    with create(shm_name, capacity, Prioritized(alpha=alpha, eps=eps, stratified=stratified)) as buf:
        live = _layout(buf, layout)
        slots = np.array(sorted(live))
        p = np.array([live[s] for s in slots])
        v = v_of(p, alpha, eps)
        nonzero = set(slots[v > 0].tolist())
        assert nonzero and len(nonzero) < len(slots)
        assert_total(buf, float(v.sum()), layout)
        prob_of = np.zeros(capacity)
        prob_of[slots] = v / v.sum()
        v_min = v[v > 0].min()
        weight_of = np.full(capacity, np.nan)
        weight_of[slots[v > 0]] = (v[v > 0] / v_min) ** -beta
        p_of = np.full(capacity, np.nan)
        p_of[slots] = p
        counts = np.zeros(capacity, dtype=np.int64)
        for _ in range(-(-ZERO_DRAWS // ZERO_BATCH)):
            batch, info = buf.sample(ZERO_BATCH, beta=beta, return_info=True)
            idx = info["index"]
            counts += np.bincount(idx, minlength=capacity)
            if prob_of[idx].min() <= 0:
                bad = sorted(set(idx[prob_of[idx] <= 0].tolist()))
                raise AssertionError(f"{layout}: drew slots {bad[:10]} whose v is 0 (or that hold nothing)")
            np.testing.assert_allclose(info["probability"], prob_of[idx], rtol=PROB_RTOL)
            np.testing.assert_allclose(info["weight"], weight_of[idx], rtol=PROB_RTOL)
            assert np.array_equal(info["priority"], p_of[idx])
            assert rows_consistent(batch).all()
        drawn = set(np.nonzero(counts)[0].tolist())
        assert drawn <= nonzero
        assert drawn == nonzero, f"{layout}: nonzero items never drawn: {sorted(nonzero - drawn)[:10]}"
        if len(nonzero) > 1:
            nz = np.array(sorted(nonzero))
            q = prob_of[nz] / prob_of[nz].sum()
            stat = chi2_statistic(counts[nz], q)
            upper = chi2_upper_critical(len(nz) - 1)
            assert stat < upper, f"{layout}: chi-square {stat:.1f} >= {upper:.1f}; {worst_cells(counts[nz], q)}"


@pytest.mark.parametrize("stratified", [True, False], ids=["stratified", "iid"])
def test_all_zero_priorities_draw_uniformly(shm_name, stratified):
    n, cap = 50, 64
    with create(shm_name, cap, Prioritized(alpha=0.6, eps=0.0, stratified=stratified)) as buf:
        buf.extend(make_rows(np.arange(n)), priority=0.0)
        assert buf.stats()["priority_total"] == 0.0
        counts = np.zeros(cap, dtype=np.int64)
        for batch, info in sample_many(buf, 200, 500, beta=0.9):
            idx = info["index"]
            assert idx.max() < n, f"drew never-written slots {sorted(set(idx[idx >= n].tolist()))}"
            np.testing.assert_allclose(info["probability"], 1.0 / n, rtol=1e-9)
            assert np.all(info["weight"] == 1.0), "all-zero buffer: weights must be 1"
            assert np.all(info["priority"] == 0.0)
            assert np.array_equal(batch["ident"], idx)
            counts += np.bincount(idx, minlength=cap)
        stat = chi2_statistic(counts[:n], np.full(n, 1.0 / n))
        upper = chi2_upper_critical(n - 1)
        assert stat < upper, f"not uniform: chi-square {stat:.1f} >= {upper:.1f}"
        # one item becomes positive: from now on it alone is drawn
        assert buf.update_priorities(u64([17]), np.array([2.0])) == 1
        for _ in range(50):
            _, info = buf.sample(1000, beta=0.9, return_info=True)
            assert np.all(info["index"] == 17), f"drew {sorted(set(info['index'].tolist()))[:10]}"
            np.testing.assert_allclose(info["probability"], 1.0, rtol=1e-9)
            np.testing.assert_allclose(info["weight"], 1.0, rtol=1e-6)
        # and back to all zero: uniform again
        assert buf.update_priorities(u64([17]), np.array([0.0])) == 1
        seen = np.zeros(cap, dtype=bool)
        for _, info in sample_many(buf, 20, 500):
            assert info["index"].max() < n
            np.testing.assert_allclose(info["probability"], 1.0 / n, rtol=1e-9)
            assert np.all(info["weight"] == 1.0)
            seen[info["index"]] = True
        assert seen[:n].all()


# =======================================================================================
# 4. The default priority
# =======================================================================================


def test_default_priority_is_the_largest_ever_set_and_at_least_one(shm_name):
    cap = 8
    with create(shm_name, cap, Prioritized(alpha=1.0, eps=0.0)) as buf:

        def prio(key: int) -> float:
            return float(buf.priorities(u64([key]))[0])

        buf.add(**one_row(0))  # key 0
        assert prio(0) == 1.0, "nothing set yet: the default is 1.0"
        buf.add(**one_row(1), priority=0.5)  # key 1
        assert prio(1) == 0.5
        buf.add(**one_row(2))  # key 2
        assert prio(2) == 1.0, "0.5 < 1.0: the default stays 1.0"
        buf.add(**one_row(3), priority=3.0)  # key 3
        buf.add(**one_row(4))  # key 4
        assert prio(4) == 3.0
        assert buf.stats()["max_priority"] == 3.0
        buf.extend(make_rows([5, 6]), priority=np.array([2.0, 5.0]))  # keys 5, 6
        buf.add(**one_row(7))  # key 7
        assert prio(7) == 5.0
        assert buf.stats()["max_priority"] == 5.0
        assert np.array_equal(buf.priorities(tickets(0, 8)), [1.0, 0.5, 1.0, 3.0, 3.0, 2.0, 5.0, 5.0])

        assert buf.update_priorities(u64([0]), np.array([9.0])) == 1  # raised by an update
        assert buf.stats()["max_priority"] == 9.0
        buf.add(**one_row(8))  # key 8 overwrites slot 0, the record that holds 9.0
        assert np.isnan(prio(0))
        assert prio(8) == 9.0, "the default follows the largest priority set by update_priorities"
        assert buf.update_priorities(u64([8]), np.array([0.25])) == 1
        buf.extend(make_rows([9, 10, 11]))  # keys 9-11, no priority given
        assert np.array_equal(buf.priorities(tickets(9, 3)), [9.0, 9.0, 9.0]), (
            "the default is the largest priority EVER set, even once no live record holds it"
        )
        assert buf.stats()["max_priority"] == 9.0
        buf.extend(make_rows([12, 13]), priority=12.5)  # a scalar applies to every row
        assert np.array_equal(buf.priorities(tickets(12, 2)), [12.5, 12.5])
        buf.add(**one_row(14))
        assert prio(14) == 12.5
        assert buf.stats()["max_priority"] == 12.5

        live = buf.priorities(tickets(15 - cap, cap))
        assert not np.isnan(live).any()
        assert_total(buf, float(live.sum()), "alpha 1, eps 0: the total is the sum of p")


def test_default_priority_is_shared_between_processes(shm_name):
    """The default is a property of the buffer, not of a handle."""
    ctx = multiprocessing.get_context("fork")
    with create(shm_name, 16, Prioritized(alpha=1.0, eps=0.0)) as buf:
        buf.add(**one_row(0), priority=6.0)  # key 0
        got = run_child(ctx, _child_add_default_and_update, shm_name, 1, 0, 11.0)
        assert got == {"default": 6.0, "applied": 1}
        buf.add(**one_row(2))  # key 2
        assert buf.priorities(u64([2]))[0] == 11.0, "the child's update raised the default here too"
        assert buf.stats()["max_priority"] == 11.0


def _child_add_default_and_update(name: str, ident: int, key: int, p: float) -> dict:
    buf = ReplayBuffer.attach(name)
    try:
        buf.add(**one_row(ident))  # key 1 (the parent wrote key 0 and waits)
        default = float(buf.priorities(u64([1]))[0])
        applied = buf.update_priorities(u64([key]), np.array([p]))
        return {"default": default, "applied": applied}
    finally:
        buf.close()


# =======================================================================================
# 5-6. Stale keys and duplicate keys
# =======================================================================================


def test_stale_keys_are_ignored_and_counted(shm_name):
    cap = 16
    alpha, eps = 0.6, 1e-6
    with create(shm_name, cap, Prioritized(alpha=alpha, eps=eps)) as buf:
        p0 = 1.0 + np.arange(cap)
        buf.extend(make_rows(np.arange(cap)), priority=p0)  # keys 0-15
        _, info = buf.sample(64, return_info=True)
        # every key once at least, in a shuffled order with repeats
        keys = np.concatenate([info["key"], tickets(0, cap)[::-1]])
        assert keys.dtype == np.uint64

        # half the ring overwritten: keys 0-7 are stale, 8-15 fresh
        p1 = 100.0 + np.arange(8)
        buf.extend(make_rows(np.arange(100, 108)), priority=p1)  # keys 16-23 in slots 0-7
        before = buf.stats()
        new = 50.0 + np.arange(keys.size, dtype=np.float64)
        n = buf.update_priorities(keys, new)
        assert n == 8, f"8 distinct fresh keys (8-15), got {n}"
        after = buf.stats()
        assert after["stale_updates"] - before["stale_updates"] == 8, "8 distinct stale keys (0-7)"
        wins = last_wins(keys, new)
        got = buf.priorities(tickets(0, cap))
        assert np.isnan(got[:8]).all(), f"stale keys must read NaN: {got[:8]}"
        assert np.array_equal(got[8:], [wins[k] for k in range(8, 16)])
        assert np.array_equal(buf.priorities(tickets(16, 8)), p1), "an update of a stale key landed on the new record"
        live = np.concatenate([p1, [wins[k] for k in range(8, 16)]])
        assert_total(buf, float(v_of(live, alpha, eps).sum()), "half stale")
        for _, info in sample_many(buf, 10, 256):
            assert np.array_equal(info["priority"], live[info["index"]])

        # the whole ring overwritten: every old key is stale
        p2 = 200.0 + np.arange(cap)
        buf.extend(make_rows(np.arange(200, 200 + cap)), priority=p2)  # keys 24-39
        old = np.concatenate([keys, tickets(16, 8)])
        before = buf.stats()
        assert buf.update_priorities(old, np.full(old.size, 77.0)) == 0
        after = buf.stats()
        assert after["stale_updates"] - before["stale_updates"] == len(np.unique(old)) == 24
        assert np.isnan(buf.priorities(tickets(0, 24))).all()
        assert np.array_equal(buf.priorities(tickets(24, cap)), p2), "stale updates changed the new records"
        assert after["priority_total"] == before["priority_total"]
        assert_total(buf, float(v_of(p2, alpha, eps).sum()), "all stale")
        assert after["max_priority"] == before["max_priority"]
        slot_p2 = np.empty(cap)
        slot_p2[(24 + np.arange(cap)) % cap] = p2  # key 24 + j lives in slot (24 + j) % 16
        for _, info in sample_many(buf, 10, 256):
            assert np.array_equal(info["priority"], slot_p2[info["index"]])
            assert np.array_equal(info["key"], (24 + (info["index"] - 8) % cap).astype(np.uint64))


def test_duplicate_keys_last_value_wins(shm_name):
    cap = 64
    alpha, eps = 0.6, 1e-6
    with create(shm_name, cap, Prioritized(alpha=alpha, eps=eps)) as buf:
        p = 1.0 + np.arange(cap, dtype=np.float64)
        buf.extend(make_rows(np.arange(cap)), priority=p)
        n = buf.update_priorities(u64([3, 5, 3, 3, 9]), np.array([50.0, 2.0, 3.0, 4.0, 5.0]))
        assert n == 3, f"3 distinct keys, got {n}"
        p[[3, 5, 9]] = [4.0, 2.0, 5.0]
        assert np.array_equal(buf.priorities(tickets(0, cap)), p)
        assert_total(buf, float(v_of(p, alpha, eps).sum()), "after the duplicates")

        rng = np.random.default_rng(3)
        keys = u64(rng.integers(0, cap, 10_000))
        values = rng.uniform(0, 20, keys.size)
        n = buf.update_priorities(keys, values)
        assert n == len(np.unique(keys))
        for k, val in last_wins(keys, values).items():
            p[k] = val
        assert np.array_equal(buf.priorities(tickets(0, cap)), p)
        assert_total(buf, float(v_of(p, alpha, eps).sum()), "after 10,000 updates of 64 keys")

        assert buf.update_priorities(u64([7] * 1000), np.arange(1000, dtype=np.float64)) == 1
        assert buf.priorities(u64([7]))[0] == 999.0
        p[7] = 999.0
        assert_total(buf, float(v_of(p, alpha, eps).sum()), "one key 1000 times")


# =======================================================================================
# 7-8. Bad input applies nothing; refusals
# =======================================================================================


def _state(buf: ReplayBuffer, keys: np.ndarray) -> dict[str, Any]:
    s = buf.stats()
    return {
        "len": len(buf),
        "inserts": s["inserts"],
        "size": s["size"],
        "priority_total": s["priority_total"],
        "max_priority": s["max_priority"],
        "stale_updates": s["stale_updates"],
        "priorities": buf.priorities(keys).tobytes(),
        "idents": slot_idents(buf).tobytes(),
    }


def _assert_unchanged(buf: ReplayBuffer, keys: np.ndarray, before: dict[str, Any], what: str) -> None:
    after = _state(buf, keys)
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"{what}: a refused call changed {changed}: " + "; ".join(
        f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed if k not in ("priorities", "idents")
    )


BAD_PRIORITY_VALUES = [
    pytest.param(float("nan"), id="nan"),
    pytest.param(float("inf"), id="inf"),
    pytest.param(float("-inf"), id="-inf"),
    pytest.param(-1.0, id="negative"),
    pytest.param(-1e-300, id="tiny-negative"),
    pytest.param(1e300, id="beyond-max"),
]


def _bad_update_cases(keys: np.ndarray, good: np.ndarray) -> list[tuple[str, type, Any, Any]]:
    cases: list[tuple[str, type, Any, Any]] = []
    for label, bad in (("nan", np.nan), ("inf", np.inf), ("-inf", -np.inf), ("negative", -1.0), ("beyond-max", 1e300)):
        p = good.copy()
        p[-1] = bad  # the bad value last: a partial update would have applied the others
        cases.append((f"{label} priority", ValueError, keys, p))
    cases += [
        ("float keys", ValueError, keys.astype(np.float64), good),
        ("string keys", TypeError, np.array([str(k) for k in keys.tolist()]), good),
        ("string priorities", TypeError, keys, np.array([str(x) for x in good.tolist()])),
        ("fewer priorities", ValueError, keys, good[:-1]),
        ("more priorities", ValueError, keys, np.append(good, 1.0)),
        ("fewer keys", ValueError, keys[:-1], good),
        ("2-D keys and priorities", ValueError, keys.reshape(2, -1), good.reshape(2, -1)),
        ("2-D priorities", ValueError, keys, good.reshape(-1, 1)),
        ("2-D keys", ValueError, keys.reshape(-1, 1), good),
    ]
    return cases


def test_update_priorities_with_bad_input_applies_nothing(shm_name):
    cap = 16
    with create(shm_name, cap, Prioritized(alpha=0.6, eps=1e-6)) as buf:
        buf.extend(make_rows(np.arange(cap)), priority=1.0 + np.arange(cap))
        buf.extend(make_rows(np.arange(100, 104)), priority=2.0)  # keys 16-19: keys 0-3 stale
        all_keys = tickets(0, 20)
        keys = tickets(4, 8)  # fresh keys
        good = 40.0 + np.arange(8, dtype=np.float64)  # above every priority so far: would raise max
        for what, exc, k, p in _bad_update_cases(keys, good):
            before = _state(buf, all_keys)
            _expect_raises(exc, lambda: buf.update_priorities(k, p), f"update_priorities with {what}")
            _assert_unchanged(buf, all_keys, before, f"update_priorities with {what}")
        # stale keys among bad input: the stale counter does not move either
        stale_mix = np.concatenate([tickets(0, 4), keys])
        p = np.append(np.full(11, 3.0), np.nan)
        before = _state(buf, all_keys)
        _expect_raises(ValueError, lambda: buf.update_priorities(stale_mix, p), "stale keys and a NaN")
        _assert_unchanged(buf, all_keys, before, "stale keys and a NaN")
        # and the same call with good values works
        assert buf.update_priorities(keys, good) == 8
        assert np.array_equal(buf.priorities(keys), good)
        assert buf.stats()["max_priority"] == good.max()


@pytest.mark.parametrize("bad", BAD_PRIORITY_VALUES)
def test_add_and_extend_with_bad_priority_write_nothing(shm_name, bad):
    cap = 32
    with create(shm_name, cap, Prioritized(alpha=0.6, eps=1e-6)) as buf:
        buf.extend(make_rows(np.arange(20)), priority=1.0 + np.arange(20))
        keys = tickets(0, 20)
        n = 5
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("add", lambda: buf.add(**one_row(500), priority=bad)),
            ("add numpy scalar", lambda: buf.add(**one_row(500), priority=np.float64(bad))),
            ("extend scalar", lambda: buf.extend(make_rows(np.arange(500, 500 + n)), priority=bad)),
            (
                "extend array, bad last",
                lambda: buf.extend(make_rows(np.arange(500, 500 + n)), priority=np.append(np.full(n - 1, 2.0), bad)),
            ),
            (
                "extend array, bad first",
                lambda: buf.extend(make_rows(np.arange(500, 500 + n)), priority=np.append(bad, np.full(n - 1, 2.0))),
            ),
        ]
        for what, call in cases:
            before = _state(buf, keys)
            _expect_raises(ValueError, call, f"{what} with priority {bad!r}")
            _assert_unchanged(buf, keys, before, f"{what} with priority {bad!r}")
        # a full ring: a bad extend would overwrite instead of growing
        buf.extend(make_rows(np.arange(20, 32)), priority=1.5)
        keys = tickets(0, 32)
        before = _state(buf, keys)
        _expect_raises(ValueError, cases[3][1], f"extend into a full ring with priority {bad!r}")
        _assert_unchanged(buf, keys, before, f"extend into a full ring with priority {bad!r}")


def test_extend_with_a_malformed_priority_array_writes_nothing(shm_name):
    cap = 32
    with create(shm_name, cap, Prioritized(alpha=0.6, eps=1e-6)) as buf:
        buf.extend(make_rows(np.arange(20)), priority=1.0 + np.arange(20))
        keys = tickets(0, 20)
        n = 5
        rows = make_rows(np.arange(500, 500 + n))
        cases = [
            ("one priority too many", ValueError, np.full(n + 1, 2.0)),
            ("one priority too few", ValueError, np.full(n - 1, 2.0)),
            ("a 2-D (n, 1) array", ValueError, np.full((n, 1), 2.0)),
            ("a 2-D (1, n) array", ValueError, np.full((1, n), 2.0)),
            ("strings", TypeError, np.array(["2.0"] * n)),
        ]
        for what, exc, prio in cases:
            before = _state(buf, keys)
            _expect_raises(exc, lambda: buf.extend(rows, priority=prio), f"extend with {what}")
            _assert_unchanged(buf, keys, before, f"extend with {what}")
        before = _state(buf, keys)
        _expect_raises(TypeError, lambda: buf.add(**one_row(500), priority="2.0"), "add with a string priority")
        _assert_unchanged(buf, keys, before, "add with a string priority")
        # the good call still works
        buf.extend(rows, priority=np.full(n, 2.0))
        assert len(buf) == 25
        assert np.array_equal(buf.priorities(tickets(20, n)), np.full(n, 2.0))


def test_uniform_buffers_refuse_priorities(shm_name):
    with ReplayBuffer.create(shm_name, capacity=16, fields=FIELDS) as buf:
        buf.extend(make_rows(np.arange(4)))
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("add(priority=)", lambda: buf.add(**one_row(9), priority=1.0)),
            ("extend(priority=) scalar", lambda: buf.extend(make_rows([9, 10]), priority=1.0)),
            ("extend(priority=) array", lambda: buf.extend(make_rows([9, 10]), priority=np.ones(2))),
            ("update_priorities", lambda: buf.update_priorities(tickets(0, 2), np.ones(2))),
        ]
        for what, call in calls:
            before = (len(buf), buf.stats()["inserts"], slot_idents(buf).tobytes())
            with pytest.raises(TypeError) as ei:
                call()
            assert "uniform" in str(ei.value).lower(), f"{what}: the message must name the sampler: {ei.value}"
            assert (len(buf), buf.stats()["inserts"], slot_idents(buf).tobytes()) == before, f"{what} wrote"


@pytest.mark.parametrize("sampler", ["default", "uniform", "prioritized"])
def test_a_field_named_priority_is_refused(shm_name, sampler):
    kwargs = {} if sampler == "default" else {"sampler": Uniform() if sampler == "uniform" else Prioritized()}
    for fields in ({"priority": ((), np.float64)}, {"obs": ((4,), np.float32), "priority": ((), np.float32)}):
        with pytest.raises(ValueError):
            ReplayBuffer.create(shm_name, capacity=8, fields=fields, **kwargs)
        assert not os.path.exists(segment_path(shm_name)), "a refused create left a segment"


@pytest.mark.parametrize("beta", [-0.01, 1.01, -1.0, 2.0, float("nan"), float("inf")])
def test_beta_outside_zero_one_is_refused(shm_name, beta):
    with create(shm_name, 8, Prioritized()) as buf:
        buf.extend(make_rows(np.arange(4)), priority=np.arange(1.0, 5.0))
        with pytest.raises(ValueError):
            buf.sample(4, beta=beta, return_info=True)
        with pytest.raises(ValueError):
            buf.sample(4, beta=beta)
        for ok in (0.0, 1.0, 0.4):
            _, info = buf.sample(4, beta=ok, return_info=True)
            assert np.all(info["weight"] <= 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": -1.0},
        {"alpha": -1e-9},
        {"alpha": float("nan")},
        {"eps": -1e-6},
        {"eps": -1.0},
        {"eps": float("nan")},
        {"alpha": float("nan"), "eps": float("nan")},
    ],
    ids=repr,
)
def test_bad_sampler_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Prioritized(**kwargs)


# =======================================================================================
# 9. Concurrent writers, samplers and updaters
# =======================================================================================

CONC_CAP = 2000
CONC_ROWS = 20_000  # per writer: the ring wraps 20 times
CONC_CHUNK = 100
IDENT_STRIDE = 1 << 20  # writer w writes idents w * 2**20 + seq; the parent's prefill uses w = 3
CONC_ALPHA, CONC_EPS = 0.6, 1e-6


def _conc_writer(name: str, wid: int, n_rows: int, chunk: int, start: Any, q: Any) -> None:
    """Writes idents wid * 2**20 + 0..n_rows-1 with priority f_prio(ident): extend mostly,
    add for every fifth chunk."""

    def body() -> dict:
        buf = ReplayBuffer.attach(name)
        try:
            start.wait(BARRIER_TIMEOUT)
            began = time.monotonic()
            for c, lo in enumerate(range(0, n_rows, chunk)):
                idents = wid * IDENT_STRIDE + np.arange(lo, min(lo + chunk, n_rows))
                if c % 5 == 0:
                    for ident in idents.tolist():
                        buf.add(**one_row(ident), priority=float(f_prio(ident)))
                else:
                    buf.extend(make_rows(idents), priority=f_prio(idents))
                time.sleep(0.004)
            return {"role": "writer", "id": wid, "start": began, "end": time.monotonic()}
        finally:
            buf.close()

    _report(q, body)


def _conc_updater(name: str, uid: int, start: Any, stop: Any, q: Any) -> None:
    """Samples, checks, and sets the sampled records' priorities to g_prio(ident) (f_prio on
    every third call) until ``stop``."""

    def body() -> dict:
        buf = ReplayBuffer.attach(name)
        try:
            cap = buf.capacity
            rng = np.random.default_rng(100 + uid)
            r = {
                "role": "updater", "id": uid, "calls": 0, "applied": 0, "submitted_distinct": 0,
                "torn": 0, "bad_index": 0, "bad_info": 0, "bad_count": 0, "misattributed": 0, "first": "",
            }
            start.wait(BARRIER_TIMEOUT)
            r["start"] = time.monotonic()
            deadline = r["start"] + CHILD_DEADLINE
            while not stop.is_set() and time.monotonic() < deadline:
                bs = int(rng.integers(16, 512))
                batch, info = buf.sample(bs, beta=float(rng.uniform(0, 1)), return_info=True)
                idents = np.asarray(batch["ident"])
                keys = info["key"]
                torn = int((~rows_consistent(batch)).sum())
                r["torn"] += torn
                if not np.array_equal(keys % np.uint64(cap), info["index"].astype(np.uint64)):
                    r["bad_index"] += 1
                prob, w, pr = info["probability"], info["weight"], info["priority"]
                if not (
                    np.all(np.isfinite(prob)) and np.all((prob > 0) & (prob <= 1))
                    and np.all(np.isfinite(w)) and np.all(w > 0)
                    and np.all(np.isfinite(pr)) and np.all(pr >= 0)
                ):
                    r["bad_info"] += 1
                    r["first"] = r["first"] or f"info: prob {prob[:4]} weight {w[:4]} priority {pr[:4]}"
                # a record's priority is its own (NaN once overwritten), never another record's
                now = buf.priorities(keys)
                mis = ~(np.isnan(now) | (now == f_prio(idents)) | (now == g_prio(idents)))
                if mis.any():
                    r["misattributed"] += int(mis.sum())
                    i = int(np.argmax(mis))
                    r["first"] = r["first"] or (
                        f"priorities(key {keys[i]}) = {now[i]!r} for ident {idents[i]} "
                        f"(f {f_prio(idents[i])!r}, g {g_prio(idents[i])!r})"
                    )
                new = f_prio(idents) if r["calls"] % 3 == 2 else g_prio(idents)
                n = buf.update_priorities(keys, new)
                distinct = len(np.unique(keys))
                if not (isinstance(n, (int, np.integer)) and 0 <= n <= distinct):
                    r["bad_count"] += 1
                    r["first"] = r["first"] or f"update_priorities returned {n!r} for {distinct} distinct keys"
                r["applied"] += int(n)
                r["submitted_distinct"] += distinct
                r["calls"] += 1
            r["end"] = time.monotonic()
            return r
        finally:
            buf.close()

    _report(q, body)


def _run_concurrent(ctx: Any, name: str) -> list[dict]:
    n = 4
    start = ctx.Barrier(n + 1)
    stop = ctx.Event()
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_conc_writer, args=(name, w, CONC_ROWS, CONC_CHUNK, start, q), daemon=True)
        for w in range(2)
    ] + [ctx.Process(target=_conc_updater, args=(name, u, start, stop, q), daemon=True) for u in range(2)]
    results: list[tuple[str, Any]] = []
    try:
        for p in procs:
            p.start()
        waiting_until = time.monotonic() + BARRIER_TIMEOUT
        while start.n_waiting < n and all(p.is_alive() for p in procs) and time.monotonic() < waiting_until:
            time.sleep(0.01)
        try:
            start.wait(5.0 if start.n_waiting == n else 0.0)
        except threading.BrokenBarrierError:
            pass  # a child failed on the way: its report says why
        deadline = time.monotonic() + 60
        writers_done = 0
        while writers_done < 2 and time.monotonic() < deadline:
            try:
                msg = q.get(timeout=0.5)
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs[:2]):
                    break
                continue
            results.append(msg)
            if msg[0] == "err":
                break
            if msg[1]["role"] == "writer":
                writers_done += 1
        time.sleep(0.5)  # the updaters keep updating the final ring for a while
        stop.set()
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(q.get(timeout=0.5))
            except queue_mod.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [p.pid for p in procs if p.is_alive()]
    finally:
        stop.set()
        start.abort()
        kill_and_reap(procs)
        q.close()
        q.join_thread()
    errors = [payload for status, payload in results if status == "err"]
    assert not errors, "child failed:\n" + "\n".join(errors)
    assert not hung, f"children did not stop: {hung}"
    assert len(results) == len(procs), f"only {len(results)} of {len(procs)} children reported"
    return [payload for _, payload in results]


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_concurrent_inserts_samples_and_updates_keep_every_priority_on_its_record(shm_name, start_method):
    ctx = multiprocessing.get_context(start_method)
    cap = CONC_CAP
    with create(shm_name, cap, Prioritized(alpha=CONC_ALPHA, eps=CONC_EPS)) as buf:
        prefill = 3 * IDENT_STRIDE + np.arange(cap)
        buf.extend(make_rows(prefill), priority=f_prio(prefill))  # keys 0..cap-1
        stale_before = buf.stats()["stale_updates"]
        reports = _run_concurrent(ctx, shm_name)
        writers = [r for r in reports if r["role"] == "writer"]
        updaters = [r for r in reports if r["role"] == "updater"]
        assert len(writers) == 2 and len(updaters) == 2

        # the updaters really ran alongside the writers
        overlap = min(r["end"] for r in writers) - max(r["start"] for r in updaters)
        assert overlap > 0.2, f"updaters and writers barely overlapped ({overlap:.3f} s)"
        summary = "; ".join(
            f"updater {r['id']}: calls {r['calls']} applied {r['applied']} torn {r['torn']} bad_index "
            f"{r['bad_index']} bad_info {r['bad_info']} bad_count {r['bad_count']} misattributed "
            f"{r['misattributed']} first {r['first']!r}"
            for r in updaters
        )
        assert all(r["calls"] >= 20 for r in updaters), summary
        assert sum(r["torn"] for r in updaters) == 0, summary
        assert sum(r["bad_index"] for r in updaters) == 0, summary
        assert sum(r["bad_info"] for r in updaters) == 0, summary
        assert sum(r["bad_count"] for r in updaters) == 0, summary
        assert sum(r["misattributed"] for r in updaters) == 0, summary
        assert sum(r["applied"] for r in updaters) > 0, summary

        # --- quiet: every slot's record, its key, its priority
        total_tickets = cap + 2 * CONC_ROWS  # one ticket per row, every call under capacity
        idents = slot_idents(buf)
        assert (idents >= 0).all(), f"slots without a record: {np.nonzero(idents < 0)[0][:10]}"
        first = total_tickets - cap
        keys = u64(first + (np.arange(cap) - first) % cap)  # the newest ticket of each slot
        assert np.array_equal(keys % np.uint64(cap), np.arange(cap, dtype=np.uint64))
        seen = np.zeros(cap, dtype=bool)
        for batch, info in sample_many(buf, 16, 8192):
            idx = info["index"]
            assert np.array_equal(info["key"], keys[idx]), "sampled keys are not the newest tickets of their slots"
            assert np.array_equal(batch["ident"], idents[idx])
            seen[idx] = True
        assert seen.all(), f"slots never drawn in 131,072 draws: {np.nonzero(~seen)[0][:10]}"

        p = buf.priorities(keys)
        assert not np.isnan(p).any(), f"live keys read NaN: slots {np.nonzero(np.isnan(p))[0][:10]}"
        is_f = p == f_prio(idents)
        is_g = p == g_prio(idents)
        wrong = np.nonzero(~(is_f | is_g))[0]
        assert wrong.size == 0, (
            f"{wrong.size} slots hold a priority that is not their own record's: slot {wrong[0]} "
            f"(ident {idents[wrong[0]]}) has {p[wrong[0]]!r}, its own would be "
            f"{f_prio(idents[wrong[0]])!r} or {g_prio(idents[wrong[0]])!r}"
        )
        assert is_g.any(), "no update survived on the final ring"

        v = v_of(p, CONC_ALPHA, CONC_EPS)
        assert_total(buf, float(v.sum()), "after concurrent inserts, samples and updates")
        stats = buf.stats()
        submitted = sum(r["submitted_distinct"] for r in updaters)
        applied = sum(r["applied"] for r in updaters)
        assert stats["stale_updates"] - stale_before == submitted - applied, (
            f"every distinct key of a call is applied or stale: {submitted} submitted, {applied} applied, "
            f"stale_updates grew by {stats['stale_updates'] - stale_before}"
        )
        assert stats["max_priority"] >= p.max()
        assert stats["max_priority"] <= float(g_prio(3 * IDENT_STRIDE + cap))

        v_min = v.min()
        for batch, info in sample_many(buf, 5, 4096, beta=0.6):
            idx = info["index"]
            assert np.array_equal(info["priority"], p[idx])
            own = (info["priority"] == f_prio(batch["ident"])) | (info["priority"] == g_prio(batch["ident"]))
            assert own.all(), "a sampled row came with another record's priority"
            np.testing.assert_allclose(info["probability"], v[idx] / v.sum(), rtol=PROB_RTOL)
            np.testing.assert_allclose(info["weight"], (v[idx] / v_min) ** -0.6, rtol=PROB_RTOL)
            assert np.all(info["weight"] <= 1.0)


# =======================================================================================
# 10. Processes killed mid-update or mid-insert
# =======================================================================================

KILL_CAP = 4096
KILL_ROUNDS = 10
KILL_BATCH = 512
KILL_HIGH = 1000.0  # a big jump: one item's v left out of the sums is ~1e-4 of the total
REPAIR_SECONDS = 8.0
VICTIM_IDENTS = (1 << 18, 3 * IDENT_STRIDE)  # extend victims write idents in this range
SURVIVOR_BASE = 3 * IDENT_STRIDE


def victim_step(j: int) -> float:
    """What update number j of an update victim adds to f_prio: KILL_HIGH and small odd
    integers by turns, so consecutive values of an item differ by more than 950."""
    return KILL_HIGH if j % 2 == 0 else float(j % 50)


def kill_prio(ident: Any) -> np.ndarray:
    """Insert priority in the kill tests: f_prio, plus KILL_HIGH for the extend victims' rows."""
    ident = np.asarray(ident, dtype=np.int64)
    victim = (ident >= VICTIM_IDENTS[0]) & (ident < VICTIM_IDENTS[1])
    return f_prio(ident) + np.where(victim, KILL_HIGH, 0.0)


def _kill_victim_updater(name: str, conn: Any, seed: int) -> None:
    """Loops over update_priorities of every key (0..cap-1: the parent filled the ring once)
    with p = f_prio(ident) + victim_step(j), until killed."""
    try:
        buf = ReplayBuffer.attach(name)
        cap = buf.capacity
        keys = tickets(0, cap)
        base = f_prio(np.arange(cap))
        rng = np.random.default_rng(seed)
        conn.send(("ready", os.getpid()))
        j = 0
        while True:
            perm = rng.permutation(cap)
            buf.update_priorities(keys[perm], base[perm] + victim_step(j))
            j += 1
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("err", traceback.format_exc()))
        finally:
            os._exit(1)


def _kill_victim_extender(name: str, conn: Any, base_ident: int) -> None:
    """Loops over extend of KILL_BATCH rows with priority kill_prio(ident), until killed."""
    try:
        buf = ReplayBuffer.attach(name)
        conn.send(("ready", os.getpid()))
        seq = 0
        while True:
            idents = base_ident + (np.arange(seq, seq + KILL_BATCH) % (1 << 18))
            buf.extend(make_rows(idents), priority=kill_prio(idents))
            seq += KILL_BATCH
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("err", traceback.format_exc()))
        finally:
            os._exit(1)


def _kill_rounds(ctx: Any, name: str, victim: str, rng: np.random.Generator) -> list[float]:
    """KILL_ROUNDS times: start a victim, let it work for a random 0-200 ms, SIGKILL it."""
    delays = []
    for r in range(KILL_ROUNDS):
        parent_end, child_end = ctx.Pipe(duplex=False)
        if victim == "update":
            proc = ctx.Process(target=_kill_victim_updater, args=(name, child_end, r), daemon=True)
        else:
            base = (r + 1) << 18  # rounds write disjoint idents, all in VICTIM_IDENTS
            proc = ctx.Process(target=_kill_victim_extender, args=(name, child_end, base), daemon=True)
        proc.start()
        try:
            assert parent_end.poll(30), f"round {r}: the victim never got ready"
            msg = parent_end.recv()
            assert msg[0] == "ready", f"round {r}: victim failed:\n{msg[1]}"
            delay = float(rng.uniform(0.0, 0.2))
            time.sleep(delay)
            if parent_end.poll(0):
                raise AssertionError(f"round {r}: victim failed:\n{parent_end.recv()[1]}")
            assert proc.is_alive(), f"round {r}: the victim exited by itself (code {proc.exitcode})"
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            assert proc.exitcode == -signal.SIGKILL, f"round {r}: exit code {proc.exitcode}"
            delays.append(delay)
        finally:
            kill_and_reap([proc])
            parent_end.close()
            child_end.close()
    return delays


@pytest.mark.parametrize("victim", ["update", "extend"])
def test_processes_killed_mid_update_or_insert_never_leave_the_sums_wrong(shm_name, victim):
    """Processes looping over big update_priorities (or extend) calls are SIGKILLed at random
    moments, ten times; then the survivor's ordinary calls (inserts, samples, updates) must make
    priority_total equal the live items' v again within seconds."""
    ctx = multiprocessing.get_context("fork")
    alpha, eps = 0.6, 1e-6
    cap = KILL_CAP
    rng = np.random.default_rng(2024 if victim == "update" else 2025)
    with create(shm_name, cap, Prioritized(alpha=alpha, eps=eps)) as buf:
        buf.extend(make_rows(np.arange(cap)), priority=f_prio(np.arange(cap)))  # keys 0..cap-1
        _kill_rounds(ctx, shm_name, victim, rng)
        all_keys = tickets(0, cap)
        survivor_seq = 0

        def expected() -> tuple[float, str]:
            if victim == "update":
                p = buf.priorities(all_keys)
                assert not np.isnan(p).any(), "no insert ran: every key 0..cap-1 is live"
                k = p - f_prio(np.arange(cap))
                ok = (k == KILL_HIGH) | ((k == np.round(k)) & (k >= 0) & (k < 50))
                assert ok.all(), f"slot {int(np.argmin(ok))} holds {p[~ok][0]!r}: no update ever set that"
                return float(v_of(p, alpha, eps).sum()), f"{int((k > 0).sum())} slots hold a victim's value"
            idents = slot_idents(buf)
            live = idents >= 0
            return float(v_of(kill_prio(idents[live]), alpha, eps).sum()), f"{int((~live).sum())} slots hold nothing"

        deadline = time.monotonic() + REPAIR_SECONDS
        while True:
            # ordinary calls of a survivor
            if victim == "extend":
                ident = SURVIVOR_BASE + survivor_seq
                survivor_seq += 1
                buf.add(**one_row(ident), priority=float(kill_prio(ident)))
            batch, info = buf.sample(64, return_info=True)
            assert rows_consistent(batch).all()
            idents = np.asarray(batch["ident"])
            if victim == "update":
                buf.update_priorities(info["key"][:16], f_prio(idents[:16]))
            else:
                buf.update_priorities(info["key"], kill_prio(idents))  # the value they have
            want, detail = expected()
            got = buf.stats()["priority_total"]
            if math.isclose(got, want, rel_tol=TOTAL_RTOL):
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{REPAIR_SECONDS} s after the last kill, priority_total is still {got!r}, the live items' "
                    f"v sum to {want!r} (relative error {abs(got - want) / want:.3g}; {detail})"
                )
            time.sleep(0.05)

        # repaired: sampling follows the priorities again
        for batch, info in sample_many(buf, 5, 1024):
            assert np.isfinite(info["probability"]).all() and (info["probability"] > 0).all()
            assert np.all(info["weight"] <= 1.0)
            if victim == "extend":
                assert np.array_equal(info["priority"], kill_prio(batch["ident"]))
            assert np.array_equal(buf.priorities(info["key"]), info["priority"])
        want, _ = expected()
        assert_total(buf, want, "after repair")


# =======================================================================================
# 11. Attach and pickle keep the sampler
# =======================================================================================


def _child_attach_and_update(name: str, keys: list[int], values: list[float]) -> dict:
    buf = ReplayBuffer.attach(name)
    try:
        n = buf.update_priorities(u64(keys), np.asarray(values, dtype=np.float64))
        buf.add(**one_row(777))  # key 10, default priority
        return {"sampler": buf.sampler, "applied": n, "stats": dict(buf.stats())}
    finally:
        buf.close()


def _child_unpickle_sampler(blob: bytes) -> dict:
    buf = pickle.loads(blob)
    try:
        _, info = buf.sample(16, return_info=True) if len(buf) else (None, None)
        return {"sampler": buf.sampler, "name": buf.name, "has_info": info is not None and "priority" in info}
    finally:
        buf.close()


def test_attach_from_another_process_sees_the_sampler_and_updates(shm_name, mp_ctx):
    sampler = Prioritized(alpha=0.7, eps=0.25, stratified=False)
    alpha, eps = 0.7, 0.25
    with create(shm_name, 16, sampler) as buf:
        p = np.arange(1.0, 11.0)
        buf.extend(make_rows(np.arange(10)), priority=p)  # keys 0-9
        got = run_child(mp_ctx, _child_attach_and_update, shm_name, [2, 3, 2], [99.0, 0.5, 20.0])
        assert got["sampler"] == sampler
        assert type(got["sampler"]) is type(sampler)
        assert got["applied"] == 2
        p[2], p[3] = 20.0, 0.5
        p = np.append(p, 20.0)  # key 10: the default, max(1, largest ever set) = 20 (99 never won)
        got_p = buf.priorities(tickets(0, 11))
        assert np.array_equal(got_p[:10], p[:10])
        assert got_p[10] in (20.0, 99.0)  # whether a duplicate that lost counts as "set" is open
        p[10] = got_p[10]
        assert_total(buf, float(v_of(p, alpha, eps).sum()), "after the child's update and add")
        assert math.isclose(got["stats"]["priority_total"], buf.stats()["priority_total"], rel_tol=1e-12)


def test_pickled_buffer_keeps_the_sampler(shm_name, mp_ctx):
    sampler = Prioritized(alpha=0.9, eps=0.125, stratified=False)
    with create(shm_name, 16, sampler) as buf, create(shm_name + "u", 16) as ubuf:
        buf.extend(make_rows(np.arange(4)), priority=np.arange(1.0, 5.0))
        ubuf.extend(make_rows(np.arange(4)))
        copy = pickle.loads(pickle.dumps(buf))
        try:
            assert copy.sampler == sampler
            assert copy.update_priorities(u64([1]), np.array([7.0])) == 1
            assert buf.priorities(u64([1]))[0] == 7.0
        finally:
            copy.close()
        got = run_child(mp_ctx, _child_unpickle_sampler, pickle.dumps(buf))
        assert got == {"sampler": sampler, "name": shm_name, "has_info": True}
        got = run_child(mp_ctx, _child_unpickle_sampler, pickle.dumps(ubuf))
        assert got["sampler"] == Uniform() and got["name"] == shm_name + "u"


# =======================================================================================
# 12. The CLI
# =======================================================================================


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shmreplay.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_info_names_the_sampler(tmp_path):
    with create("apex", 64, Prioritized(alpha=0.7, eps=0.25), path=tmp_path) as buf, create(
        "plain", 64, path=tmp_path
    ) as plain:
        buf.extend(make_rows(np.arange(10)), priority=np.arange(1.0, 11.0))
        plain.extend(make_rows(np.arange(10)))
        proc = _cli("info", "apex", "--path", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        lines = [line for line in out.splitlines() if "prioritized" in line.lower()]
        assert lines, f"`shmreplay info` does not mention the prioritized sampler:\n{out}"
        text = "\n".join(lines) if any("alpha" in line for line in lines) else out
        for needle in ("alpha", "0.7", "eps", "0.25"):
            assert needle in text, f"`shmreplay info` lacks {needle!r}:\n{out}"

        proc = _cli("info", "apex", "--json", "--path", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert math.isclose(info["stats"]["priority_total"], float(v_of(np.arange(1.0, 11.0), 0.7, 0.25).sum()), rel_tol=TOTAL_RTOL)
        assert info["stats"]["max_priority"] == 10.0

        proc = _cli("info", "plain", "--path", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "prioritized" not in proc.stdout.lower(), proc.stdout


def test_rows_an_extend_overwrites_itself_set_no_maximum(name_factory: Any) -> None:
    """An extend longer than the ring never writes its first rows (the same call overwrites
    them): their priorities are not "set", so they neither raise max_priority nor give later
    inserts their default."""
    buf = create(name_factory(), 4, Prioritized())
    try:
        buf.extend(make_rows(range(5)), priority=[100.0, 1.0, 1.0, 1.0, 1.0])
        assert buf.stats()["max_priority"] == 1.0
        buf.add(**one_row(5))
        _, info = buf.sample(64, return_info=True)
        assert np.all(info["priority"] == 1.0), info["priority"]
    finally:
        buf.unlink()
        buf.close()
