"""Episode buffers under the conditions an adversarial review found broken: writers a lap
behind a small ring (their frames superseded), frequent resets, processes killed, priorities
withheld until a window completes, limited samples with no complete item, threads sharing a
writer. Frames carry their stamp (writer, env, episode, position); every item is recomputed from
it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmreplay

FIELDS = {"obs": ((4,), np.int64), "action": ((), np.int32), "reward": ((), np.float32)}


def ep_len(wid, env, ep):
    # deterministic episode lengths 1..12 and end kind
    h = (wid * 7919 + env * 104729 + ep * 1299709) % 1000003
    return 1 + h % 12, ("term" if (h >> 4) % 3 else ("trunc" if (h >> 6) % 2 else "both"))


def rew(wid, env, ep, t):
    return float((wid * 3 + env * 5 + ep * 7 + t * 11) % 17 - 8) / 4.0


class Env:
    """A NEXT_STEP autoreset env stream."""

    def __init__(self, wid, env):
        self.wid, self.env, self.ep, self.t = wid, env, 0, 0
        self.ended = False

    def obs(self):
        return np.array([self.wid, self.env, self.ep, self.t], np.int64)

    def first(self):
        self.t = 0
        return self.obs()

    def step(self):
        """returns (obs, action, reward, term, trunc) as a gymnasium vec env with autoreset would."""
        if self.ended:
            self.ep += 1
            self.t = 0
            self.ended = False
            return self.obs(), 99, 123.0, False, False
        L, kind = ep_len(self.wid, self.env, self.ep)
        a = self.t
        r = rew(self.wid, self.env, self.ep, self.t)
        self.t += 1
        term = trunc = False
        if self.t == L:
            term = kind in ("term", "both")
            trunc = kind in ("trunc", "both")
            self.ended = True
        return self.obs(), a, r, term, trunc


def run(w, envs, steps):
    for _ in range(steps):
        outs = [e.step() for e in envs]
        w.step(obs=np.stack([o[0] for o in outs]), action=np.array([o[1] for o in outs], np.int32),
               reward=np.array([o[2] for o in outs], np.float32),
               terminated=np.array([o[3] for o in outs]), truncated=np.array([o[4] for o in outs]))


def expect_frame(wid, env, ep, t):
    return np.array([wid, env, ep, t], np.int64)


def check_step_item(buf, batch, i, gamma=None):
    fs, n, g = buf.frame_stack, buf.n_step, buf.gamma
    pad = buf.stack_padding
    obs = batch["obs"][i].reshape(fs, 4)
    last = obs[-1]
    wid, env, ep, t = (int(x) for x in last)
    L, kind = ep_len(wid, env, ep)
    errs = []
    def stack(end):
        out = []
        for p in range(end - fs + 1, end + 1):
            if p >= 0:
                out.append(expect_frame(wid, env, ep, p))
            elif pad == "first":
                out.append(expect_frame(wid, env, ep, 0))
            else:
                out.append(np.zeros(4, np.int64))
        return np.stack(out)
    if t >= L:
        errs.append(f"t {t} >= L {L}")
        return errs
    k = min(n, L - t)
    if not np.array_equal(obs, stack(t)):
        errs.append(f"obs {obs.tolist()} != {stack(t).tolist()}")
    nxt = batch["next_obs"][i].reshape(fs, 4)
    if not np.array_equal(nxt, stack(t + k)):
        errs.append(f"next {nxt.tolist()} != {stack(t + k).tolist()}")
    R = 0.0
    for j in range(k):
        R += g ** j * rew(wid, env, ep, t + j)
    if abs(float(batch["reward"][i]) - R) > 1e-4:
        errs.append(f"reward {batch['reward'][i]} != {R}")
    if abs(float(batch["discount"][i]) - g ** k) > 1e-6:
        errs.append(f"discount {batch['discount'][i]} != {g**k}")
    ends = t + k == L
    et = ends and kind in ("term", "both")
    eu = ends and kind in ("trunc", "both")
    if bool(batch["terminated"][i]) != et or bool(batch["truncated"][i]) != eu:
        errs.append(f"flags {batch['terminated'][i]},{batch['truncated'][i]} != {et},{eu}")
    if int(batch["action"][i]) != t:
        errs.append(f"action {batch['action'][i]} != {t}")
    return errs


def check_seq_item(buf, seq, i, length, period):
    fs = buf.frame_stack
    pad = buf.stack_padding
    obs = seq["obs"][i].reshape(length + 1, fs, 4)
    wid, env, ep, s = (int(x) for x in obs[0][-1])
    L, kind = ep_len(wid, env, ep)
    errs = []
    if s % period:
        errs.append(f"start {s} not multiple of {period}")
    def stack(end):
        out = []
        for p in range(end - fs + 1, end + 1):
            if p >= 0:
                out.append(expect_frame(wid, env, ep, p))
            elif pad == "first":
                out.append(expect_frame(wid, env, ep, 0))
            else:
                out.append(np.zeros(4, np.int64))
        return np.stack(out)
    for p in range(length + 1):
        exp = stack(s + p) if s + p <= L else np.zeros((fs, 4), np.int64)
        if not np.array_equal(obs[p], exp):
            errs.append(f"obs[{p}] {obs[p].tolist()} != {exp.tolist()}")
    for p in range(length):
        real = s + p < L
        if bool(seq["mask"][i][p]) != real:
            errs.append(f"mask[{p}]")
        if real:
            if abs(float(seq["reward"][i][p]) - rew(wid, env, ep, s + p)) > 1e-6:
                errs.append(f"reward[{p}]")
            if int(seq["action"][i][p]) != s + p:
                errs.append(f"action[{p}] {seq['action'][i][p]} != {s+p}")
            end = s + p + 1 == L
            if bool(seq["terminated"][i][p]) != (end and kind in ("term", "both")):
                errs.append(f"term[{p}]")
            if bool(seq["truncated"][i][p]) != (end and kind in ("trunc", "both")):
                errs.append(f"trunc[{p}]")
            if bool(seq["is_first"][i][p]) != (s + p == 0):
                errs.append(f"is_first[{p}]")
        else:
            if seq["reward"][i][p] != 0 or seq["action"][i][p] != 0 or seq["terminated"][i][p] or seq["truncated"][i][p] or seq["is_first"][i][p]:
                errs.append(f"padding[{p}] not zero")
    return errs


def _writer(name: str, wid: int, seconds: float, nenv: int, resets: bool) -> None:
    buf = shmreplay.EpisodeBuffer.attach(name)
    w = buf.writer(num_envs=nenv)
    envs = [Env(wid, e) for e in range(nenv)]
    w.reset(obs=np.stack([e.first() for e in envs]))
    start = time.time()
    while time.time() - start < seconds:
        if resets:  # every env starts a new episode every 4 steps
            for e in envs:
                e.ep += 1
                e.ended = False
            w.reset(obs=np.stack([e.first() for e in envs]))
            run(w, envs, 4)
        else:
            run(w, envs, 10)
    buf.close()


@pytest.mark.parametrize("capacity,sampler,resets", [
    (128, None, False),
    (256, "prioritized", False),
    (128, None, True),
])
def test_writers_a_lap_behind_a_small_ring_never_give_a_wrong_item(name_factory, capacity, sampler, resets) -> None:
    """4 writer processes x 8 envs into a ring of 128-256 frames: slow writers' frames are
    superseded (a newer ticket took their slot). Their episodes go on unlinked; no item ever
    mixes episodes, starts mid-episode or returns an autoreset row's values as a step."""
    fs, n = (2, 2) if resets else (4, 3)
    buf = shmreplay.EpisodeBuffer.create(
        name_factory(), capacity=capacity, fields=FIELDS, frame_stack=fs, n_step=n, gamma=0.9,
        sampler=shmreplay.Prioritized() if sampler else None,
    )
    try:
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_writer, args=(buf.name, wid + 1, 4.0, 8, resets)) for wid in range(4)]
        for p in procs:
            p.start()
        checked, wrong = 0, []
        while any(p.is_alive() for p in procs):
            try:
                batch = buf.sample(32)
            except shmreplay.EmptyBufferError:
                continue
            for i in range(32):
                wrong += check_step_item(buf, batch, i)
                checked += 1
            if resets:
                continue
            try:
                seq = buf.sample_sequences(8, 4, 2)
            except shmreplay.EmptyBufferError:
                continue
            for i in range(8):
                wrong += check_seq_item(buf, seq, i, 4, 2)
                checked += 1
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        assert wrong == [], wrong[:5]
        assert checked > 1000
    finally:
        buf.close()
        buf.unlink()


def test_withheld_priorities_leave_weights_at_one_for_equal_priorities(name_factory) -> None:
    """Frames and steps whose window is incomplete hold priority 0 (never drawn), not
    (0 + eps)^alpha: equal priorities give weight 1, as in a ReplayBuffer."""
    for n_step in (1, 3):
        with shmreplay.EpisodeBuffer.create(
            name_factory(), capacity=1000, fields=FIELDS, frame_stack=1, n_step=n_step,
            sampler=shmreplay.Prioritized(alpha=0.6, eps=1e-6),
        ) as buf:
            w = buf.writer(4)
            envs = [Env(1, e) for e in range(4)]
            w.reset(obs=np.stack([e.first() for e in envs]))
            run(w, envs, 50)
            _, info = buf.sample(64, return_info=True, beta=0.4)
            np.testing.assert_array_equal(info["priority"], 1.0)
            np.testing.assert_allclose(info["weight"], 1.0)
            assert buf.stats()["stale_updates"] == 0  # the writer's own updates are not counted


def test_a_limited_sample_with_no_complete_item_times_out_on_time(name_factory) -> None:
    with shmreplay.EpisodeBuffer.create(
        name_factory(), capacity=1000, fields=FIELDS, n_step=3, limiter=shmreplay.MinSize(10)
    ) as buf:
        w = buf.writer(num_envs=8)
        envs = [Env(1, e) for e in range(8)]
        w.reset(obs=np.stack([e.first() for e in envs]))
        zeros = np.zeros(8, bool)
        w.step(obs=np.stack([e.first() for e in envs]), action=np.zeros(8, np.int32),
               reward=np.zeros(8, np.float32), terminated=zeros, truncated=zeros)
        assert len(buf) == 16  # admitted (MinSize 10), but no 3-step window is complete
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            buf.sample(4, timeout=0.5)
        assert 0.45 < time.monotonic() - start < 1.5
        buf.shutdown()
        with pytest.raises(shmreplay.ShutdownError):
            buf.sample(4)


def test_prioritized_sequences_whose_starts_have_priority_0_are_drawn_uniformly(name_factory) -> None:
    with shmreplay.EpisodeBuffer.create(
        name_factory(), capacity=2000, fields=FIELDS, frame_stack=1, n_step=1,
        sampler=shmreplay.Prioritized(alpha=1.0, eps=0.0),
    ) as buf:
        w = buf.writer(4)
        envs = [Env(1, e) for e in range(4)]
        w.reset(obs=np.stack([e.first() for e in envs]))
        run(w, envs, 100)
        for _ in range(50):  # the learner sets every start it trained on to priority 0
            _, info = buf.sample_sequences(32, 4, 4, return_info=True)
            buf.update_priorities(info["key"], np.zeros(32))
        start = time.monotonic()
        seq = buf.sample_sequences(8, 4, 4)
        assert time.monotonic() - start < 2.0
        for i in range(8):
            assert check_seq_item(buf, seq, i, 4, 4) == []


def test_ctrl_c_reaches_a_thread_waiting_for_a_writer_another_thread_holds() -> None:
    """One thread's step waits for the limiter (nobody samples); the main thread steps the same
    writer and gets Ctrl-C: KeyboardInterrupt, not a hang."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(
        f"""
        import os, signal, sys, threading, time
        import numpy as np, shmreplay
        sys.path.insert(0, {here!r})
        from test_episodes_review import FIELDS, Env, run
        buf = shmreplay.EpisodeBuffer.create(capacity=1000, fields=FIELDS,
            limiter=shmreplay.SampleToInsertRatio(1.0, min_size=4, error_buffer=8))
        try:
            w = buf.writer(2)
            envs = [Env(1, 0), Env(1, 1)]
            w.reset(obs=np.stack([e.first() for e in envs]))
            def blocked():
                try:
                    while True:
                        run(w, envs, 1)
                except BaseException:
                    pass
            threading.Thread(target=blocked, daemon=True).start()
            time.sleep(0.5)
            threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
            start = time.monotonic()
            try:
                run(w, envs, 1)
                print("returned", flush=True)
            except KeyboardInterrupt:
                print(f"interrupted {{time.monotonic() - start:.2f}}", flush=True)
        finally:
            buf.shutdown()
            buf.unlink()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    word, seconds = proc.stdout.split()
    assert word == "interrupted" and float(seconds) < 1.5
