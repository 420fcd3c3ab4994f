"""``shmreplay demo``: real actor and learner processes, a real segment, real Ctrl-C."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import helpers
import shmreplay
from shmreplay import atari, demo


# The demo's clock starts once its children are started, and a spawned child still has to import
# numpy and shmreplay (gymnasium and ALE too for Atari) before it inserts anything: on a loaded
# machine that takes seconds. Runs that keep the default start method (spawn) are long enough
# for that; runs that check something else than the start method fork their children.
FORK = ("--start-method", "fork")


def run_demo(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreplay.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def group_members(pgid: int) -> list[str]:
    """Processes (other than zombies waiting for init) still in process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            found.append(f"{entry} ({state})")
    return found


def wait_group_gone(pgid: int, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        left = group_members(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def check_summary(stdout: str, summary_path: Path) -> dict[str, Any]:
    assert "shmreplay demo summary" in stdout
    for row in (
        "duration",
        "inserts/s",
        "samples/s",
        "GB moved",
        "GB/s",
        "retries",
        "final fill",
        "segment size",
        "per slot",
    ):
        assert row in stdout
    assert "the transition layout would need" in stdout
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    assert summary["inserts"] > 0
    assert summary["sampled_rows"] > 0
    assert summary["batches"] > 0
    assert summary["bad_batches"] == 0, summary["first_error"]
    assert summary["child_failures"] == []
    assert (summary["frame_stack"], summary["n_step"], summary["gamma"]) == (4, 3, 0.99)
    # The transition layout: a ReplayBuffer record holding obs and next_obs as 4x84x84 stacks.
    assert summary["transition_record_bytes"] >= 2 * 4 * 84 * 84
    assert summary["transition_segment_bytes"] == summary["transition_record_bytes"] * summary["capacity"]
    assert summary["bytes_per_step"] == summary["segment_bytes"] / summary["capacity"]
    assert 84 * 84 < summary["frame_bytes"] < summary["bytes_per_step"]
    assert summary["item_bytes"] > 2 * 4 * 84 * 84
    return summary


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_synthetic_demo(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "6", "--capacity", "2000", "--path", str(shm), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["source"] == "synthetic frames"
    assert summary["actors"] == 2 and summary["learners"] == 1 and summary["envs_per_actor"] == 4
    assert summary["capacity"] == 2000
    assert 0 < summary["final_size"] <= 2000
    assert summary["episodes"] > 0 and summary["gb_moved"] > 0
    # Each frame stored once: several times smaller than the transition layout.
    assert summary["segment_bytes"] * 5 < summary["transition_segment_bytes"]
    assert "[" in proc.stdout and "inserts" in proc.stdout  # at least one progress line
    assert os.listdir(shm) == []  # the segment is gone


def test_prioritized_demo_updates_priorities(tmp_path: Path) -> None:
    """``--prioritized``: the learner samples by priority, weights its TD step, and sets each
    sampled row's priority to its TD error; the summary reports the updates and the total."""
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "3", "--capacity", "2000", "--prioritized", *FORK,
        "--path", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_summary(proc.stdout, out)
    assert "priorities" in proc.stdout
    assert summary["priority_updates"] > 0
    assert summary["priority_total"] is not None and summary["priority_total"] > 0
    # Every update of a sampled batch either lands or is counted stale; never more than sampled.
    assert summary["priority_updates"] + summary["stale_updates"] <= summary["sampled_rows"]
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


@pytest.mark.parametrize("spi", [0.25, 4.0])
def test_rate_limited_demo_keeps_the_ratio(tmp_path: Path, spi: float) -> None:
    """``--samples-per-insert``: actors and learners wait for each other, so the rows sampled
    per row inserted end within the limiter's window of the ratio, and the run still stops on
    time (children waiting for the limiter are released by the shutdown)."""
    out = tmp_path / "summary.json"
    started = time.monotonic()
    proc = run_demo(
        "--synthetic", "--seconds", "3", "--capacity", "2000", "--samples-per-insert", str(spi), *FORK,
        "--path", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - started < 30
    summary = check_summary(proc.stdout, out)
    assert "rate limit" in proc.stdout and summary["samples_per_insert"] == spi
    limiter = demo.rate_limiter(demo.DemoConfig(capacity=2000, samples_per_insert=spi))
    assert limiter is not None
    diff = summary["inserts"] * spi - summary["sampled_rows"]
    assert limiter.min_diff - 32 <= diff <= limiter.max_diff, (diff, limiter)
    assert summary["inserts"] > limiter.min_size and summary["sampled_rows"] > 0
    # One side waited for the other: more samples per insert than the learner takes by itself
    # makes the learner wait, fewer makes the actors wait.
    assert summary["insert_wait_s"] + summary["sample_wait_s"] > 0


def test_uniform_demo_reports_no_priorities(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "2", "--capacity", "1000", "--actors", "1", "--envs-per-actor", "2", *FORK,
        "--path", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["priority_total"] is None and summary["priority_updates"] == 0
    assert "priorities" not in proc.stdout
    assert summary["actors"] == 1 and summary["envs_per_actor"] == 2


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_other_start_methods(tmp_path: Path, method: str) -> None:
    out = tmp_path / "summary.json"
    seconds = "2" if method == "fork" else "5"  # forkserver children import the demo themselves
    proc = run_demo(
        "--synthetic", "--seconds", seconds, "--capacity", "1000", "--start-method", method,
        "--actors", "1", "--path", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_summary(proc.stdout, out)
    assert sorted(os.listdir(tmp_path)) == ["summary.json"]


def test_atari_demo(tmp_path: Path) -> None:
    pytest.importorskip("ale_py")
    pytest.importorskip("gymnasium")
    shm = tmp_path / "shm"
    shm.mkdir()
    out = tmp_path / "summary.json"
    proc = run_demo("--seconds", "8", "--capacity", "2000", "--path", str(shm), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["source"] == "ALE/Pong-v5"
    assert "gymnasium vector env" in proc.stdout
    assert "A.L.E" not in proc.stderr  # the emulator's banner is silenced
    assert os.listdir(shm) == []


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    shm = tmp_path / "shm"
    shm.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shmreplay.cli", "demo", "--synthetic", "--seconds", "0",
         "--capacity", "2000", "--path", str(shm), "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=helpers.default_sigint,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # wait for the first progress line with data in the buffer
            seen.append(line)
            if line.startswith("[") and "inserts" in line:
                break
        assert seen and "inserts" in seen[-1], "".join(seen)
        assert len(os.listdir(shm)) == 1
        os.killpg(proc.pid, signal.SIGINT)
        started = time.monotonic()
        rest, err = proc.communicate(timeout=15)
        assert time.monotonic() - started < 15
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, rest + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "(interrupted)" in rest
    summary = check_summary(rest, out)
    assert summary["interrupted"] is True
    assert os.listdir(shm) == []
    assert wait_group_gone(proc.pid) == []


def test_missing_atari_packages_message(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["gymnasium"] = None  # make both look uninstalled
        sys.modules["ale_py"] = None
        from shmreplay.cli import main
        sys.exit(main(["demo", "--seconds", "1", "--path", {str(tmp_path)!r}]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "pip install 'shmreplay[atari]'" in proc.stderr and "--synthetic" in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "args", [["--capacity", "8", "--batch-size", "32"], ["--envs-per-actor", "0"], ["--envs-per-actor", "257"]]
)
def test_bad_arguments_are_one_line_errors(tmp_path: Path, args: list[str]) -> None:
    proc = run_demo("--synthetic", *args, "--path", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("shmreplay: error:") and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_options() -> None:
    """``--envs-per-actor`` and its old name ``--chunk`` (an actor's write is now one step of
    its vector env, a frame per env)."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.config_from_args(parser.parse_args([])) == demo.DemoConfig()
    assert demo.config_from_args(parser.parse_args(["--envs-per-actor", "8"])).envs_per_actor == 8
    assert demo.config_from_args(parser.parse_args(["--chunk", "3"])).envs_per_actor == 3


# ---------------------------------------------------------------------------------------------
# Pieces, in process
# ---------------------------------------------------------------------------------------------


def test_synthetic_frames_do_not_import_gymnasium() -> None:
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from shmreplay import atari, demo
        envs = atari.SyntheticVectorEnv(2)
        envs.reset(seed=0); envs.step(np.zeros(2, np.int64))
        assert "gymnasium" not in sys.modules and "ale_py" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_synthetic_vector_env_autoresets_like_gymnasium() -> None:
    """NEXT_STEP autoreset: the step after an episode's end returns the new episode's first
    frame, with reward 0 and no flags; the episodes end both ways, within the time limit."""
    envs = atari.SyntheticVectorEnv(8)
    obs, info = envs.reset(seed=3)
    assert obs.shape == (8, 84, 84) and obs.dtype == np.uint8 and info == {}
    ended = np.zeros(8, bool)
    length = np.zeros(8, int)
    ends = {"terminated": 0, "truncated": 0}
    for step in range(3000):
        obs, reward, terminated, truncated, _ = envs.step(np.full(8, step % 6))
        assert obs.shape == (8, 84, 84) and obs.dtype == np.uint8
        assert reward.shape == terminated.shape == truncated.shape == (8,)
        assert np.all(reward[ended] == 0) and not np.any((terminated | truncated)[ended])
        assert not np.any(terminated & truncated)
        length = np.where(ended, 0, length + 1)
        assert length.max() <= atari.SyntheticFrames.time_limit
        assert np.all(length[truncated] == atari.SyntheticFrames.time_limit)
        ends["terminated"] += int(terminated.sum())
        ends["truncated"] += int(truncated.sum())
        ended = terminated | truncated
    assert ends["terminated"] >= 5 and ends["truncated"] >= 2, ends
    # The same seed plays the same frames.
    again = atari.SyntheticVectorEnv(8)
    first, _ = again.reset(seed=3)
    second, _ = atari.SyntheticVectorEnv(8).reset(seed=3)
    assert np.array_equal(first, second)


def test_atari_vector_env() -> None:
    pytest.importorskip("ale_py")
    gymnasium = pytest.importorskip("gymnasium")
    envs, num_actions = atari.make_atari_vector_env("Pong", 2)
    try:
        assert num_actions == 6 and envs.num_envs == 2
        metadata: dict[str, Any] = getattr(envs, "metadata")
        assert metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.NEXT_STEP
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 84, 84) and obs.dtype == np.uint8
        obs, reward, terminated, truncated, _ = envs.step(np.array([0, 1]))
        assert obs.shape == (2, 84, 84) and reward.shape == terminated.shape == truncated.shape == (2,)
    finally:
        envs.close()


def test_downsampler() -> None:
    image = np.arange(210 * 160, dtype=np.int64).reshape(210, 160) % 251
    frame = atari.Downsampler(210, 160)(image.astype(np.uint8))
    assert frame.shape == (84, 84) and frame.dtype == np.uint8
    flat = atari.Downsampler(210, 160)(np.full((210, 160), 200, np.uint8))
    assert np.all(flat == 200)


def test_env_id() -> None:
    assert atari.atari_env_id("Pong") == "ALE/Pong-v5"
    assert atari.atari_env_id("ALE/Breakout-v5") == "ALE/Breakout-v5"


def test_stamps_round_trip() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 84, 84), dtype=np.uint8)
    stamps = np.zeros(3, demo.STAMP)
    stamps["episode"] = [0, 7, 2**32 - 1]
    stamps["position"] = [0, 1, 123_456]
    stamps["reward"] = [0.0, -1.0, 2.5]
    stamps["actor"], stamps["env"], stamps["action"] = 254, [0, 1, 255], 17
    stamps["flags"] = [0, demo.TERMINATED, demo.TERMINATED | demo.TRUNCATED]
    demo.write_stamps(frames, stamps)
    read, whole = demo.read_stamps(frames)
    assert read.tolist() == stamps.tolist() and whole.all()
    frames[1, -1, 3] ^= 1  # the last row from another write
    assert demo.read_stamps(frames)[1].tolist() == [True, False, True]


CHECK_ARGS: dict[str, Any] = dict(capacity=3000, num_actors=4, num_envs=8, num_actions=6)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Items sampled from the demo's buffer after actor 3 played 8 synthetic envs through
    :func:`demo.play` (the ring wraps about 50 times): many of them with windows cut short by
    an episode's end, or with stacks padded before an episode's start."""
    path = tmp_path_factory.mktemp("shm")
    with shmreplay.EpisodeBuffer.create(
        capacity=3000, fields=demo.demo_fields(), frame_stack=4, n_step=3, gamma=demo.GAMMA, path=path
    ) as buf:
        counter = itertools.count()
        report = demo.play(
            atari.SyntheticVectorEnv(8), buf.writer(num_envs=8), actor_id=3, num_actions=6, seed=1,
            keep_going=lambda: next(counter) < 20_000,
        )  # fmt: skip
        assert report["steps"] > 150_000 and report["episodes"] > 200
        # Keep items of every case the checker tells apart, 5 each, then 34 more of any kind.
        wanted = [5] * 6 + [34]
        kept: list[list[tuple[dict[str, np.ndarray], dict[str, Any]]]] = [[] for _ in wanted]
        for _ in range(1000):
            batch, sample_info = buf.sample(1000, return_info=True)
            info: dict[str, Any] = dict(sample_info)
            now, _ = demo.read_stamps(batch["obs"][:, -1])
            nxt, _ = demo.read_stamps(batch["next_obs"][:, -1])
            k = nxt["position"].astype(int) - now["position"].astype(int)
            ended = batch["terminated"] | batch["truncated"]
            cases = [
                (k == 3) & ~ended,
                (k < 3) & batch["terminated"],
                (k < 3) & batch["truncated"],
                (k == 3) & ended,
                now["position"] == 0,
                now["position"] == 2,
                np.ones(len(k), bool),
            ]
            for case, items, n in zip(cases, kept, wanted):
                for i in np.flatnonzero(case)[: n - len(items)]:
                    items.append(({key: v[i] for key, v in batch.items()}, {key: v[i] for key, v in info.items()}))
            if all(len(items) == n for items, n in zip(kept, wanted)):
                break
        assert [len(items) for items in kept] == wanted
    rows = [row for items in kept for row in items]
    return (
        {key: np.stack([b[key] for b, _ in rows]) for key in rows[0][0]},
        {key: np.stack([i[key] for _, i in rows]) for key in rows[0][1]},
    )


def test_check_batch_accepts_every_sampled_item(sampled: tuple[dict[str, np.ndarray], dict[str, Any]]) -> None:
    batch, info = sampled
    assert demo.check_batch(batch, info, batch_size=64, **CHECK_ARGS) is None


def _restamp(frames: np.ndarray, **changes: Any) -> None:
    stamps, _ = demo.read_stamps(frames[None])
    for key, value in changes.items():
        stamps[key] = value
    demo.write_stamps(frames[None], stamps)


def _other_env(batch: dict[str, np.ndarray], item: int) -> int:
    """An item of another env than ``item``'s."""
    return int(np.flatnonzero(batch["env"] != batch["env"][item])[0])


def _restamp_everywhere(batch: dict[str, np.ndarray], item: int, frame: int, **changes: Any) -> None:
    """Restamp ``obs[item, frame]`` and every copy of it in the item's two stacks, so that the
    stacks still agree where they overlap."""
    target = batch["obs"][item, frame].copy()
    for key in ("obs", "next_obs"):
        for f in batch[key][item]:
            if np.array_equal(f, target):
                _restamp(f, **changes)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda b, i: b["next_obs"][i, 3, -1].__setitem__(2, b["next_obs"][i, 3, -1, 2] ^ 1), "torn frame"),
        (lambda b, i: b["obs"][i].__setitem__(0, b["obs"][_other_env(b, i), 3]), "different episodes or envs"),
        (lambda b, i: b["next_obs"].__setitem__(i, b["next_obs"][_other_env(b, i)]), "different episodes or envs"),
        (lambda b, i: _restamp(b["obs"][i, 1], position=123_456_789), "obs stack out of order"),
        (lambda b, i: _restamp(b["next_obs"][i, 3], position=123_456_789), "next_obs"),
        (lambda b, i: b["obs"][i, 3, 40].__setitem__(40, b["obs"][i, 3, 40, 40] ^ 1), "does not continue obs"),
        (lambda b, i: b["step"].__setitem__(i, b["step"][i] + 1), "step field disagrees"),
        (lambda b, i: b["env"].__setitem__(i, (b["env"][i] + 1) % 8), "env or step field disagrees"),
        (lambda b, i: b["action"].__setitem__(i, (b["action"][i] + 1) % 6), "action is not a_t"),
        (lambda b, i: b["reward"].__setitem__(i, b["reward"][i] + 0.001), "not the n-step return"),
        (lambda b, i: b["discount"].__setitem__(i, b["discount"][i] * 0.99), "discount"),
        (lambda b, i: b["terminated"].__setitem__(i, not b["terminated"][i]), "flags of the window's last step"),
        (lambda b, i: b["truncated"].__setitem__(i, not b["truncated"][i]), "flags of the window's last step"),
        (lambda b, i: _restamp_everywhere(b, i, 2, flags=demo.TRUNCATED), "crosses an episode's end"),
    ],
)
@pytest.mark.parametrize("item", [0, 5, 10, 15, 20, 25])
def test_check_batch_catches_each_kind_of_wrong_item(
    sampled: tuple[dict[str, np.ndarray], dict[str, Any]], corrupt: Any, message: str, item: int
) -> None:
    """One wrong item of each case (a full window, windows cut by termination and by
    truncation, a full window ending an episode, stacks padded at an episode's start) is
    reported, with its slot."""
    batch, info = sampled
    bad = {key: value.copy() for key, value in batch.items()}
    corrupt(bad, item)
    error = demo.check_batch(bad, info, batch_size=64, **CHECK_ARGS) or ""
    assert message in error and f"item {item}," in error, error


def test_check_batch_catches_a_window_cut_short_in_a_running_episode(
    sampled: tuple[dict[str, np.ndarray], dict[str, Any]],
) -> None:
    batch, info = sampled
    bad = {key: value.copy() for key, value in batch.items()}
    item = 5  # a window cut short by termination: make the episode go on
    _restamp(bad["next_obs"][item, 3], flags=0)
    bad["terminated"][item] = False
    error = demo.check_batch(bad, info, batch_size=64, **CHECK_ARGS) or ""
    assert "shorter than 3 steps" in error, error


def test_check_batch_checks_the_schema(sampled: tuple[dict[str, np.ndarray], dict[str, Any]]) -> None:
    batch, info = sampled
    args = dict(batch_size=64, **CHECK_ARGS)
    assert "terminated" in (demo.check_batch(dict(batch, terminated=batch["terminated"].astype(np.uint8)), info, **args) or "")
    assert "batch keys" in (demo.check_batch({k: v for k, v in batch.items() if k != "discount"}, info, **args) or "")
    assert "batch keys" in (demo.check_batch(dict(batch, done=batch["terminated"]), info, **args) or "")
    assert "field 'obs'" in (demo.check_batch(dict(batch, obs=batch["obs"][:, 1:]), info, **args) or "")
    assert "actor out of range" in (demo.check_batch(batch, info, **dict(args, num_actors=3)) or "")
    assert "env out of range" in (demo.check_batch(batch, info, **dict(args, num_envs=4)) or "")
    assert "index out of range" in (demo.check_batch(batch, info, **dict(args, capacity=10)) or "")
