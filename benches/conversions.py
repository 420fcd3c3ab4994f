"""µs per extend/add call of one control row, in each form a training script hands over (exact
dtypes, Python scalars, float64, int64, bool): the Rust fast path converts the common
same-kind casts itself. Prints one line per case: method, form, µs per call (best of 5 repeats
of N calls), and whether the fast path took it.

    .venv/bin/python benches/conversions.py
"""

import sys
import tempfile
import timeit

import numpy as np

import shmreplay
from shmreplay import ReplayBuffer

FIELDS = {"obs": ((17,), np.float32), "action": ((), np.int32), "reward": ((), np.float32), "done": ((), np.uint8)}
obs = np.linspace(-1, 1, 17)
o32, o64 = obs.astype(np.float32), obs

EXTEND = {  # one row, with its leading dimension
    "a exact": dict(obs=o32[None], action=np.int32([3]), reward=np.float32([0.5]), done=np.uint8([1])),
    "b python (lists)": dict(obs=o32[None], action=[3], reward=[0.5], done=[True]),
    "c float64": dict(obs=o64[None], action=np.int32([3]), reward=np.array([0.5]), done=np.uint8([1])),
    "d int64": dict(obs=o32[None], action=np.array([3]), reward=np.float32([0.5]), done=np.uint8([1])),
    "e bool": dict(obs=o32[None], action=np.int32([3]), reward=np.float32([0.5]), done=np.array([True])),
    "f cleanrl (c+d+e)": dict(obs=o64[None], action=np.array([3]), reward=np.array([0.5]), done=np.array([True])),
}
ADD = {  # one row, no leading dimension
    "a exact": dict(obs=o32, action=np.int32(3), reward=np.float32(0.5), done=np.uint8(1)),
    "b python": dict(obs=o32, action=3, reward=0.5, done=True),
    "c float64": dict(obs=o64, action=np.int32(3), reward=np.float64(0.5), done=np.uint8(1)),
    "d int64": dict(obs=o32, action=np.int64(3), reward=np.float32(0.5), done=np.uint8(1)),
    "e bool": dict(obs=o32, action=np.int32(3), reward=np.float32(0.5), done=np.True_),
    "f cleanrl (c+d+e)": dict(obs=o64, action=np.int64(3), reward=np.float64(0.5), done=np.True_),
}
N = 20_000

with ReplayBuffer.create(capacity=100_000, fields=FIELDS, path=tempfile.mkdtemp()) as buf:
    for method, cases in (("extend", EXTEND), ("add", ADD)):
        for name, row in cases.items():
            if method == "extend":
                call = lambda row=row: buf.extend(row)  # noqa: E731
                taken = buf._raw.put(row, 1) if type(row["obs"]) is np.ndarray else False
            else:
                call = lambda row=row: buf.add(**row)  # noqa: E731
                taken = buf._raw.put(row)
            us = min(timeit.repeat(call, number=N, repeat=5)) / N * 1e6
            print(f"{method}\t{name}\t{us:.2f}\t{taken}", flush=True)
print("shmreplay", shmreplay.__file__, "numpy", np.__version__, file=sys.stderr)
