"""examples/apex_dqn.py: its bookkeeping against hand-computed answers, and whole runs (real actor
processes, JAX learner) that survive an actor killed mid-run and leave no segment behind.

CI's learning check (`make apex-check`: the score after 90 s at least 5x a random policy's) runs
outside pytest; here runs are short and check behaviour, not scores."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import shmreplay

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "apex_dqn.py"


@pytest.fixture(scope="module")
def apex() -> Any:
    spec = importlib.util.spec_from_file_location("apex_dqn", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["apex_dqn"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_epsilon_ladder_is_apex_s(apex: Any) -> None:
    ladder = apex.epsilon_ladder(8)
    assert ladder[0] == pytest.approx(0.4) and ladder[-1] == pytest.approx(0.4**8)
    assert np.all(np.diff(ladder) < 0)
    assert apex.epsilon_ladder(5)[2] == pytest.approx(0.4 ** (1 + 7 * 2 / 4))
    assert apex.epsilon_ladder(1).tolist() == [0.4]


def test_episode_returns_follow_next_step_autoreset(apex: Any) -> None:
    episodes = apex.Episodes(2)
    f, t = np.array([False, False]), np.array([True, False])
    assert episodes.step(np.array([1.0, 2.0]), f, f) == []
    assert episodes.step(np.array([1.0, 2.0]), t, f) == [(0, 2.0, 2)]  # env 0 ends
    # env 0's next step is the autoreset one: its reward is not an episode's
    assert episodes.step(np.array([9.0, 2.0]), f, np.array([False, True])) == [(1, 6.0, 3)]
    assert episodes.step(np.array([1.0, 5.0]), t, f) == [(0, 1.0, 1)]
    assert episodes.step(np.array([0.0, 5.0]), f, f) == []
    assert episodes.ret.tolist() == [0.0, 5.0]  # env 1: its autoreset step (5.0) did not count


def test_stacker_repeats_an_episodes_first_frame(apex: Any) -> None:
    stack = apex.Stacker(3, np.array([[1], [10]]))
    assert stack.frames[:, :, 0].tolist() == [[1, 1, 1], [10, 10, 10]]
    stack.push(np.array([[2], [11]]), np.array([False, False]))
    out = stack.push(np.array([[3], [20]]), np.array([False, True]))  # env 1 starts over at 20
    assert out[:, :, 0].tolist() == [[1, 2, 3], [20, 20, 20]]


def test_numpy_baseline_stores_n_step_returns_as_the_episode_buffer_defines_them(apex: Any) -> None:
    cfg = apex.Config(capacity=64, n_step=3, gamma=0.5, alpha=1.0)
    spec = apex.EnvSpec((1,), np.float32, 2)
    replay = apex.NumpyReplay(cfg, spec, num_envs=1)
    rewards = [1.0, 2.0, 4.0, 8.0, 16.0]
    obs = [np.full((1, 1), float(t)) for t in range(6)]  # o_0..o_5
    for t, r in enumerate(rewards):
        last = t == len(rewards) - 1
        replay.add(0, obs[t], t, r, obs[t + 1], terminated=last, truncated=False, priority=float(t))
    assert replay.size == 5
    for t in range(5):
        k = min(3, 5 - t)
        expected = sum(0.5**j * rewards[t + j] for j in range(k))
        assert replay.action[t] == t
        assert replay.reward[t] == pytest.approx(expected)
        assert replay.discount[t] == pytest.approx(0.5**k)
        assert replay.next_obs[t, 0, 0] == t + k
        assert replay.terminated[t] == (t + k == 5)
        assert replay.value[t] == pytest.approx(t + 1e-6)  # the priority given with step t
    batch, weight, idx = replay.sample(4)
    assert batch["obs"].shape == (4, 1, 1) and np.all(weight <= 1.0) and np.all(idx < 5)
    assert 0 not in idx  # priority 0 (+1e-6) against 1..4: practically never drawn


def test_a_truncated_episode_bootstraps(apex: Any) -> None:
    cfg = apex.Config(capacity=8, n_step=3, gamma=0.5)
    replay = apex.NumpyReplay(cfg, apex.EnvSpec((1,), np.float32, 2), num_envs=1)
    for t in range(2):
        replay.add(0, np.zeros((1, 1)), t, 1.0, np.ones((1, 1)), terminated=False, truncated=t == 1, priority=1.0)
    assert replay.size == 2 and not replay.terminated[:2].any()


def test_flags_are_validated(apex: Any) -> None:
    for argv in (["--actors", "0"], ["--min-size", "10", "--capacity", "5"], ["--beta", "2"], ["--env", "ALE/Pong-v5", "--beat-random", "5"]):
        with pytest.raises(SystemExit) as err:
            apex.parse_args(argv)
        assert err.value.code == 2


# ---------------------------------------------------------------------------------------------
# Whole runs (need the examples extra: jax, optax)
# ---------------------------------------------------------------------------------------------


def _run(*args: str, name: str, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(EXAMPLE), "--name", name, "--plot", str(tmp_path / f"{name}.png"), "--json-out", str(out), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def _leftovers(name: str) -> list[str]:
    return [b["name"] for b in shmreplay.list_buffers() if b["name"].startswith(name)]


def _kill_run(proc: subprocess.Popen[str], pids: list[int], name: str) -> None:
    """After a failure: the learner, its actors and the run's segments go."""
    proc.kill()
    proc.wait()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for leftover in _leftovers(name):
        shmreplay.remove(leftover)


def test_learning_goes_on_when_an_actor_is_killed_and_nothing_is_left_behind(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    name = f"apex-test-{os.getpid()}"
    # A budget the test never reaches: the actors' start (JAX import and compile) counts against
    # it, which a loaded machine may stretch to most of a short budget. The run is stopped with
    # SIGTERM once the learner has gone on learning after the death.
    proc, pids, lines = _start_and_wait_for_learning(name, tmp_path, minutes=10.0)
    try:
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # mid-run: writing, waiting or acting
        deadline = time.monotonic() + 120
        died = _read_until(proc, lines, lambda line: " died " in line, deadline)
        assert f"actor-0 (pid {pids[0]}) died" in died and "learning goes on with 1 actor(s)" in died, "".join(lines)
        # learning goes on: the updates grow between two progress lines after the death
        first = _updates(_read_until(proc, lines, lambda line: _updates(line) is not None, deadline))
        _read_until(proc, lines, lambda line: (_updates(line) or 0) > first, deadline)
    except BaseException:
        _kill_run(proc, pids, name)
        raise
    text = _finish_after(proc, lines, lambda: proc.send_signal(signal.SIGTERM), timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "terminated (SIGTERM)" in text and "Traceback" not in text, text
    assert _leftovers(name) == [], "the run left segments behind"
    _wait_gone(pids, 15, "actors outlived the learner")


def test_the_numpy_baseline_runs(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    proc, out = _run("--buffer", "numpy", "--minutes", "0.25", "--no-target", name="np", tmp_path=tmp_path)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    result = json.loads(out.read_text())
    assert result["buffer"] == "numpy" and result["updates"] > 0


def _start_and_wait_for_learning(name: str, tmp_path: Path, minutes: float = 1.0) -> tuple[subprocess.Popen[str], list[int], list[str]]:
    """Starts a run; returns once its learner has made an update, with the actors' pids."""
    proc, _ = _run("--minutes", str(minutes), "--no-target", name=name, tmp_path=tmp_path)
    assert proc.stdout is not None
    lines: list[str] = []
    pids: list[int] = []
    deadline = time.monotonic() + 120
    while not lines or not re.search(r"updates\s+[1-9]", lines[-1]):
        chunk = proc.stdout.readline()
        assert chunk and time.monotonic() < deadline, "".join(lines)
        lines.extend(chunk.replace("\r", "\n").splitlines(keepends=True) or [chunk])
        if chunk.startswith("actor pids:"):
            pids = [int(p) for p in chunk.split(":")[1].split()]
    return proc, pids, lines


def _read_until(proc: subprocess.Popen[str], lines: list[str], pred: Callable[[str], bool], deadline: float) -> str:
    """Reads the run's output into ``lines`` until a line satisfies ``pred``; returns that line."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()  # text mode: a progress line ending in "\r" is a line
        assert line and time.monotonic() < deadline, "".join(lines)
        lines.append(line)
        if pred(line):
            return line


def _updates(line: str) -> int | None:
    """The learner's update count in a progress line (None in any other line)."""
    m = re.search(r"updates\s+([\d,]+) ", line)
    return int(m.group(1).replace(",", "")) if m else None


def _finish_after(proc: subprocess.Popen[str], lines: list[str], act: Callable[[], object], timeout: float) -> str:
    """Does ``act`` to a running example, waits for it to end, and returns all it printed; it
    is killed if the test fails first."""
    try:
        act()
        rest, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines) + rest


def _wait_gone(pids: list[int], seconds: float, why: str) -> None:
    deadline = time.monotonic() + seconds
    while not all(_gone(p) for p in pids):
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return True


def test_sigterm_stops_the_run_like_ctrl_c(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    name = f"apex-term-{os.getpid()}"
    proc, pids, lines = _start_and_wait_for_learning(name, tmp_path)
    text = _finish_after(proc, lines, lambda: proc.send_signal(signal.SIGTERM), timeout=60)
    assert proc.returncode == 143, text
    assert "Traceback" not in text, text
    assert _leftovers(name) == []
    _wait_gone(pids, 15, "actors outlived the learner")


def test_actors_stop_when_the_learner_is_killed(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    name = f"apex-kill-{os.getpid()}"
    proc, pids, _ = _start_and_wait_for_learning(name, tmp_path)
    try:
        proc.kill()  # no cleanup at all: the actors must notice and stop
        proc.wait(30)
        _wait_gone(pids, 20, "actors outlived a SIGKILLed learner")
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the segments are stale now: gc removes them
    deadline = time.monotonic() + 10
    while _leftovers(name):
        shmreplay.gc()
        assert time.monotonic() < deadline, _leftovers(name)
        time.sleep(0.2)
