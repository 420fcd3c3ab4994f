"""``seed=`` (issue 13): a handle's random draws follow its seed.

Two handles seeded alike, in one process or in two (spawn, fork), draw identical samples from a
buffer in the same state: indices, keys, rows and priority info, for uniform and prioritized
(stratified and i.i.d.) ReplayBuffers, EpisodeBuffer ``sample`` and ``sample_sequences``, and
``batches()``. Another seed draws otherwise; ``seed=None`` keeps draws different per handle and
per process; a forked child using an inherited seeded handle repeats its parent's draws until it
reseeds. Bad seeds raise and change nothing."""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numpy as np
import pytest

from shmreplay import EpisodeBuffer, Prioritized, ReplayBuffer

import helpers

pytestmark = pytest.mark.timeout(120)

ROWS = 500
BATCH = 32
CALLS = 3

SAMPLERS = {
    "uniform": None,
    "stratified": Prioritized(alpha=0.6, stratified=True),
    "iid": Prioritized(alpha=0.6, stratified=False),
}


# ---------------------------------------------------------------------------------------
# Buffers in a known state, and their draws
# ---------------------------------------------------------------------------------------


def _ring(name: str, path: Any, sampler: Any, seed: int | None = None) -> ReplayBuffer:
    buf = ReplayBuffer.create(
        name, capacity=ROWS, fields={"x": ((), np.int64), "v": ((3,), np.float32)},
        sampler=sampler, path=path, seed=seed,
    )
    x = np.arange(ROWS, dtype=np.int64)
    batch = {"x": x, "v": np.stack([x, -x, 2 * x], 1).astype(np.float32)}
    if sampler is None:
        buf.extend(batch)
    else:
        buf.extend(batch, priority=(x % 17 + 1).astype(np.float64))
    return buf


def _episodes(name: str, path: Any, sampler: Any, seed: int | None = None) -> EpisodeBuffer:
    buf = EpisodeBuffer.create(
        name, capacity=ROWS, fields={"obs": ((2,), np.int32), "reward": ((), np.float32)},
        frame_stack=2, n_step=3, sampler=sampler, path=path, seed=seed,
    )
    w = buf.writer(4)
    t = 0
    w.reset(obs=np.zeros((4, 2), np.int32))
    for t in range(1, 100):
        ended = np.array([(t + e) % (9 + e) == 0 for e in range(4)])
        obs = np.stack([[t, e] for e in range(4)]).astype(np.int32)
        w.step(obs=obs, reward=np.full(4, t, np.float32), terminated=ended, truncated=np.zeros(4, bool))
    return buf


def _as_lists(batch: dict[str, np.ndarray], info: dict[str, np.ndarray]) -> dict[str, Any]:
    out = {k: v.tolist() for k, v in batch.items()}
    out.update({f"info.{k}": v.tolist() for k, v in info.items()})
    return out


def draws_ring(buf: ReplayBuffer, calls: int = CALLS) -> list[dict[str, Any]]:
    return [_as_lists(*buf.sample(BATCH, return_info=True)) for _ in range(calls)]


def draws_sample(buf: EpisodeBuffer, calls: int = CALLS) -> list[dict[str, Any]]:
    return [_as_lists(*buf.sample(BATCH, return_info=True)) for _ in range(calls)]


def draws_sequences(buf: EpisodeBuffer, calls: int = CALLS) -> list[dict[str, Any]]:
    return [_as_lists(*buf.sample_sequences(BATCH, 4, 2, return_info=True)) for _ in range(calls)]


def _indices(draws: list[dict[str, Any]]) -> list[list[int]]:
    return [d["info.index"] for d in draws]


KINDS: dict[str, tuple[Callable[..., Any], Callable[..., Any], Any]] = {
    # name: (make, draw, attach class)
    "ring": (_ring, draws_ring, ReplayBuffer),
    "episodes.sample": (_episodes, draws_sample, EpisodeBuffer),
    "episodes.sample_sequences": (_episodes, draws_sequences, EpisodeBuffer),
}

CASES = [
    (kind, sampler)
    for kind in KINDS
    for sampler in SAMPLERS
    if not (kind != "ring" and sampler == "iid")  # episode buffers: one prioritized case
]


# ---------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, sampler", CASES)
def test_same_seed_same_draws(kind, sampler, shm_name, shm_dir):
    make, draw, cls = KINDS[kind]
    with make(shm_name, shm_dir, SAMPLERS[sampler], seed=2024) as buf:
        a = cls.attach(shm_name, path=shm_dir, seed=7)
        b = cls.attach(shm_name, path=shm_dir, seed=7)
        first = draw(a)
        assert draw(b) == first
        # Within a sequence, calls differ from each other.
        assert len({str(d["info.index"]) for d in first}) == CALLS
        # The creator's seed= works the same as attach's.
        other = cls.attach(shm_name, path=shm_dir, seed=2024)
        assert draw(buf) == draw(other)
        # Another seed, other draws.
        c = cls.attach(shm_name, path=shm_dir, seed=8)
        assert _indices(draw(c)) != _indices(first)
        # seed() restarts a handle's sequence, whatever it drew before.
        c.seed(7)
        assert draw(c) == first
        buf.seed(7)
        assert draw(buf) == first
        for h in (a, b, c, other):
            h.close()


@pytest.mark.parametrize("kind, sampler", CASES)
def test_unseeded_handles_draw_differently(kind, sampler, shm_name, shm_dir):
    make, draw, cls = KINDS[kind]
    with make(shm_name, shm_dir, SAMPLERS[sampler]) as buf:
        a = cls.attach(shm_name, path=shm_dir)
        b = cls.attach(shm_name, path=shm_dir, seed=None)
        assert _indices(draw(a)) != _indices(draw(b)) != _indices(draw(buf))
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["ring", "episodes.sample", "episodes.sample_sequences"])
@pytest.mark.parametrize("sampler", ["uniform", "stratified"])
def test_batches_follow_the_seed(kind, sampler, shm_name, shm_dir):
    """A seeded handle's prefetched batches are its sample() calls, in order."""
    make, draw, cls = KINDS[kind]
    with make(shm_name, shm_dir, SAMPLERS[sampler]) as buf:
        twin = cls.attach(shm_name, path=shm_dir, seed=99)
        expected = draw(twin, 4)
        buf.seed(99)
        kw: dict[str, Any] = {"sequences": True, "length": 4, "period": 2} if kind.endswith("sequences") else {}
        got = []
        with buf.batches(BATCH, prefetch=2, timeout=10, **kw) as it:
            for _ in range(4):
                got.append(_as_lists(*next(it)))
        assert got == expected
        twin.close()


def test_threads_share_one_seeded_sequence(shm_name, shm_dir):
    """Calls from several threads on one seeded handle each take the next state: together they
    draw exactly the calls of a twin handle (in some order)."""
    threads, calls = 4, 25
    with _ring(shm_name, shm_dir, None, seed=5) as buf:
        twin = ReplayBuffer.attach(shm_name, path=shm_dir, seed=5)
        expected = sorted(tuple(d["info.index"]) for d in draws_ring(twin, threads * calls))
        got: list[tuple[int, ...]] = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                barrier.wait(10)
                for _ in range(calls):
                    _, info = buf.sample(BATCH, return_info=True)
                    with lock:
                        got.append(tuple(info["index"].tolist()))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        workers = [threading.Thread(target=run) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        assert not any(t.is_alive() for t in workers)
        assert not errors, errors
        assert sorted(got) == expected
        twin.close()


# ---------------------------------------------------------------------------------------
# Bad seeds: refused, nothing changes
# ---------------------------------------------------------------------------------------

BAD_SEEDS = [
    (True, TypeError),
    (False, TypeError),
    (np.bool_(True), TypeError),
    (1.0, TypeError),
    ("1", TypeError),
    (-1, ValueError),
    (2**64, ValueError),
    (-(2**70), ValueError),
]


@pytest.mark.parametrize("bad, error", BAD_SEEDS, ids=repr)
def test_bad_seeds_are_refused(bad, error, shm_name, shm_dir):
    with pytest.raises(error, match="seed"):
        ReplayBuffer.create(shm_name, capacity=4, fields={"x": ((), np.int64)}, path=shm_dir, seed=bad)
    with pytest.raises(error, match="seed"):
        EpisodeBuffer.create(shm_name, capacity=4, fields={"obs": ((), np.int64)}, reward=None, path=shm_dir, seed=bad)
    assert os.listdir(shm_dir) == []  # nothing was created
    with _ring(shm_name, shm_dir, None, seed=3) as buf:
        twin = ReplayBuffer.attach(shm_name, path=shm_dir, seed=3)
        with pytest.raises(error, match="seed"):
            ReplayBuffer.attach(shm_name, path=shm_dir, seed=bad)
        with pytest.raises(error, match="seed"):
            buf.seed(bad)
        with pytest.raises(TypeError, match="seed"):
            buf.seed(None)  # type: ignore[arg-type]
        # The refused calls left the sequence alone.
        assert draws_ring(buf) == draws_ring(twin)
        assert buf.stats()["attached"] == 2
        twin.close()


def test_seed_bounds_and_integer_types(shm_name, shm_dir):
    with _ring(shm_name, shm_dir, None) as buf:
        twin = ReplayBuffer.attach(shm_name, path=shm_dir)
        for seed in (0, 2**64 - 1, np.uint64(2**64 - 1), np.int8(5)):
            buf.seed(seed)
            twin.seed(int(seed))
            assert draws_ring(buf) == draws_ring(twin)
        twin.close()


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def child_draws(kind: str, name: str, path: str, seed: int | None, calls: int) -> dict:
    _, draw, cls = KINDS[kind]
    buf = cls.attach(name, path=path, seed=seed)
    try:
        return {"pid": os.getpid(), "draws": draw(buf, calls)}
    finally:
        buf.close()


def _child_entry(q: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        q.put(("ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - everything goes to the parent
        import traceback

        q.put(("err", traceback.format_exc()))


def run_child(ctx: Any, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` (a module-level function: spawn pickles it by name) in a child process."""
    import queue

    q = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(q, fn, args), daemon=True)
    proc.start()
    try:
        try:
            status, value = q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child {proc.pid} sent nothing within {timeout}s (exit code {proc.exitcode})") from None
        assert status == "ok", value
        return value
    finally:
        helpers.kill_and_reap([proc])
        q.close()
        q.join_thread()


@pytest.mark.parametrize("kind, sampler", [("ring", "uniform"), ("ring", "stratified"), ("episodes.sample", "uniform")])
def test_seeded_draws_do_not_depend_on_the_process(kind, sampler, mp_ctx, shm_name, shm_dir):
    """Reruns reproduce: a child process (spawn or fork, another pid) seeded like this one draws
    what this one draws; unseeded it does not."""
    make, draw, cls = KINDS[kind]
    with make(shm_name, shm_dir, SAMPLERS[sampler]) as buf:
        mine = cls.attach(shm_name, path=shm_dir, seed=31337)
        expected = draw(mine)
        theirs = run_child(mp_ctx, child_draws, kind, shm_name, str(shm_dir), 31337, CALLS)
        assert theirs["pid"] != os.getpid()
        assert theirs["draws"] == expected
        unseeded = run_child(mp_ctx, child_draws, kind, shm_name, str(shm_dir), None, CALLS)
        assert _indices(unseeded["draws"]) != _indices(expected)
        mine.close()


def test_forked_child_repeats_an_inherited_seeded_handle(shm_name, shm_dir):
    """Documented: a forked child using its parent's seeded handle repeats the parent's draws
    until it calls seed(); an unseeded handle draws differently in the child."""
    with _ring(shm_name, shm_dir, None) as buf:
        buf.seed(77)
        child = helpers.run_forked(lambda: draws_ring(buf), timeout=60)
        assert child == draws_ring(buf)

        buf.seed(77)
        expected = draws_ring(buf)
        buf.seed(77)

        def reseeded() -> list:
            buf.seed(78)
            return draws_ring(buf)

        assert _indices(helpers.run_forked(reseeded, timeout=60)) != _indices(expected)
        assert draws_ring(buf) == expected  # the child's seed() did not touch the parent's

        fresh = ReplayBuffer.attach(shm_name, path=shm_dir)  # unseeded
        in_child = helpers.run_forked(lambda: draws_ring(fresh), timeout=60)
        assert _indices(in_child) != _indices(draws_ring(fresh))
        fresh.close()


def test_pickled_handle_arrives_unseeded(shm_name, shm_dir):
    """The seed is the handle's, not the buffer's: a handle passed to a process (pickled)
    attaches unseeded, and the process seeds its own."""
    import pickle

    with _ring(shm_name, shm_dir, None, seed=1) as buf:
        copy = pickle.loads(pickle.dumps(buf))
        assert _indices(draws_ring(copy)) != _indices(draws_ring(ReplayBuffer.attach(shm_name, path=shm_dir, seed=1)))
        copy.seed(1)
        buf.seed(1)
        assert draws_ring(copy) == draws_ring(buf)
        copy.close()

