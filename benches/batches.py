"""``batches()`` against plain ``sample()`` calls, in a learner loop with a step of fixed CPU
cost (issue 13, part 1): is the sampling time hidden?

    .venv/bin/python benches/batches.py            # 5 repetitions, ~1 min on 2 cores
    .venv/bin/python benches/batches.py --quick    # smoke run: 1 repetition, small buffer

The learner step is a numpy matmul loop on one BLAS thread (``OPENBLAS_NUM_THREADS=1``, set
before numpy loads) tuned to ``--step-ms`` (default 5 ms); numpy releases the GIL inside the
matmul, as PyTorch and JAX release it inside their kernels. Per iteration it times:

* ``step``: the step alone;
* ``sample + step``: ``sample(32)`` then the step (what a loop without prefetching does);
* ``batches + step``: ``for batch, info in buf.batches(32, prefetch=2)``, then the step;

on an Atari ``EpisodeBuffer`` (84x84 frames, ``frame_stack=4``, ``n_step=3``: each item is two
4-frame stacks, 56 KB) filled by one writer. The figure: ``batches + step`` over ``step`` (target:
within 10 %, when ``sample`` is shorter than the step), and how much of the sampling time it hides.
Medians over ``--reps`` rounds; writes ``batches[-quick].json`` to ``--out`` (default
benches/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import shmreplay  # noqa: E402
from sysinfo import cpu_info, describe_cpu  # noqa: E402


def make_step(step_ms: float):
    """A learner step: matmuls of one size, repeated to take ``step_ms``."""
    a = np.random.default_rng(0).standard_normal((192, 192)).astype(np.float32)

    def once() -> None:
        np.dot(a, a)

    start = time.perf_counter()
    for _ in range(200):
        once()
    per = (time.perf_counter() - start) / 200
    repeats = max(1, round(step_ms / 1e3 / per))

    def step() -> None:
        for _ in range(repeats):
            once()

    return step


def fill(capacity: int) -> shmreplay.EpisodeBuffer:
    fields = {"obs": ((84, 84), np.uint8), "action": ((), np.int32), "reward": ((), np.float32)}
    buf = shmreplay.EpisodeBuffer.create(capacity=capacity, fields=fields, frame_stack=4, n_step=3)
    w = buf.writer(num_envs=8)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (8, 84, 84), dtype=np.uint8)
    w.reset(obs=frames)
    zeros, ones, no = np.zeros(8, np.int32), np.ones(8, np.float32), np.zeros(8, bool)
    for _ in range(capacity // 8 + 10):
        w.step(obs=frames, action=zeros, reward=ones, terminated=rng.random(8) < 1 / 400, truncated=no)
    return buf


def per_iteration(loop, iterations: int) -> float:
    loop(10)  # warm up
    start = time.perf_counter()
    loop(iterations)
    return (time.perf_counter() - start) / iterations


def round_of(buf: shmreplay.EpisodeBuffer, step, batch: int, iterations: int) -> dict[str, float]:
    def only_step(n: int) -> None:
        for _ in range(n):
            step()

    def sample_then_step(n: int) -> None:
        for _ in range(n):
            buf.sample(batch, return_info=True)
            step()

    def only_sample(n: int) -> None:
        for _ in range(n):
            buf.sample(batch, return_info=True)

    it = buf.batches(batch, prefetch=2)

    def batches_then_step(n: int) -> None:
        for _ in range(n):
            next(it)
            step()

    try:
        return {
            "step": per_iteration(only_step, iterations),
            "sample": per_iteration(only_sample, iterations),
            "sample + step": per_iteration(sample_then_step, iterations),
            "batches + step": per_iteration(batches_then_step, iterations),
        }
    finally:
        it.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="1 repetition, a small buffer")
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--capacity", type=int, default=100_000)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.capacity, args.iterations = 1, 5_000, 50
    step = make_step(args.step_ms)
    buf = fill(args.capacity)
    try:
        rounds = [round_of(buf, step, args.batch_size, args.iterations) for _ in range(args.reps)]
    finally:
        buf.close()
        buf.unlink()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    overhead = med["batches + step"] / med["step"] - 1
    hidden = (med["sample + step"] - med["batches + step"]) / max(med["sample"], 1e-12)
    cpu = describe_cpu(cpu_info())
    print(f"cpu: {cpu}")
    print(f"EpisodeBuffer Atari ({args.capacity:,} frames, frame_stack 4, n_step 3), batch {args.batch_size}, "
          f"{args.iterations} iterations x {args.reps} rounds (medians)")
    for key, value in med.items():
        print(f"  {key:<15} {value * 1e3:8.3f} ms per iteration")
    verdict = "met" if overhead <= 0.10 and med["sample"] < med["step"] else "MISSED"
    saved = med["sample + step"] - med["batches + step"]
    print(f"batches + step is {overhead * 100:+.1f} % over the step alone (target <= +10 %: {verdict}); "
          f"it saves {saved * 1e3:.3f} ms per iteration against sample + step ({hidden * 100:.0f} % of "
          f"the {med['sample'] * 1e3:.3f} ms sample: over 100 % when the plain loop's fresh arrays cost more)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "batches-quick.json" if args.quick else "batches.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "cpu": cpu, "rounds": rounds, "medians": med,
                   "overhead": overhead, "hidden": hidden, "verdict": verdict}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
