"""Quick single-process throughput check of shmreplay against numpy on the same bytes.

    .venv/bin/python benches/quick.py

Prints GB/s or rows/s for Atari-sized rows (56.5 KB) and control-sized rows (184 B). Not the
full benchmark suite (peers, concurrency, scale): a smoke check that copies run near numpy speed.
"""

import time, numpy as np, shmreplay
def rate(fn, seconds=1.5):
    fn(); n = 0; t = time.perf_counter()
    while time.perf_counter() - t < seconds: fn(); n += 1
    return n / (time.perf_counter() - t)
atari = {"obs": ((4, 84, 84), np.uint8), "action": ((), np.int32), "reward": ((), np.float32), "next_obs": ((4, 84, 84), np.uint8), "done": ((), np.bool_)}
cap = 20_000
with shmreplay.ReplayBuffer.create(capacity=cap, fields=atari) as buf:
    rb = buf.record_bytes
    b64 = {"obs": np.random.randint(0, 255, (64, 4, 84, 84), np.uint8), "action": np.arange(64, dtype=np.int32), "reward": np.ones(64, np.float32), "next_obs": np.random.randint(0, 255, (64, 4, 84, 84), np.uint8), "done": np.zeros(64, bool)}
    r = rate(lambda: buf.extend(b64)); print(f"atari extend b=64: {r*64*rb/1e9:.2f} GB/s")
    for bs in (32, 256):
        r = rate(lambda: buf.sample(bs)); print(f"atari sample b={bs} fresh arrays: {r*bs*rb/1e9:.2f} GB/s")
        out = buf.sample(bs)
        r = rate(lambda: buf.sample(bs, out=out)); print(f"atari sample b={bs} out=: {r*bs*rb/1e9:.2f} GB/s")
    # limit: numpy gather of random rows from a same-size array
    ring = np.zeros((cap, rb), np.uint8); ring[:] = 1
    dst = np.empty((32, rb), np.uint8)
    r = rate(lambda: np.take(ring, np.random.randint(0, cap, 32), axis=0, out=dst)); print(f"numpy gather b=32 limit: {r*32*rb/1e9:.2f} GB/s")
    src = np.ones((64, rb), np.uint8); pos = [0]
    def put():
        i = pos[0]; ring[i:i+64] = src; pos[0] = (i + 64) % (cap - 64)
    r = rate(put); print(f"numpy ring put b=64 limit: {r*64*rb/1e9:.2f} GB/s")
control = {"obs": ((17,), np.float32), "next_obs": ((17,), np.float32), "action": ((6,), np.float32), "reward": ((), np.float32), "done": ((), np.bool_)}
with shmreplay.ReplayBuffer.create(capacity=1_000_000, fields=control) as buf:
    o = np.zeros(17, np.float32); a = np.zeros(6, np.float32)
    r = rate(lambda: buf.add(obs=o, next_obs=o, action=a, reward=1.0, done=False)); print(f"control add(): {r/1e3:.0f}k rows/s")
    b = {"obs": np.zeros((64, 17), np.float32), "next_obs": np.zeros((64, 17), np.float32), "action": np.zeros((64, 6), np.float32), "reward": np.zeros(64, np.float32), "done": np.zeros(64, bool)}
    r = rate(lambda: buf.extend(b)); print(f"control extend b=64: {r*64/1e6:.2f}M rows/s")
    r = rate(lambda: buf.sample(256)); print(f"control sample b=256: {r*256/1e6:.2f}M rows/s")
    # Where one add() goes: an empty Python call taking the same keywords (the floor of any
    # add(**row) API), the Rust fast path alone, and the whole call.
    row = dict(obs=o, next_obs=o, action=a, reward=1.0, done=False)
    def noop(**values): pass
    for what, fn in (("empty call, same keywords", lambda: noop(**row)), ("Rust fast path alone", lambda: buf._raw.put(row)), ("add(**row)", lambda: buf.add(**row))):
        print(f"control {what}: {1e9 / rate(fn):.0f} ns")
