"""``shmreplay demo``: real actor and learner processes, a real segment, real Ctrl-C."""

from __future__ import annotations

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
from shmreplay import atari, demo


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
    ):
        assert row in stdout
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    assert summary["inserts"] > 0
    assert summary["sampled_rows"] > 0
    assert summary["batches"] > 0
    assert summary["bad_batches"] == 0, summary["first_error"]
    assert summary["child_failures"] == []
    return summary


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_synthetic_demo(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "3", "--capacity", "2000", "--path", str(shm), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["source"] == "synthetic frames"
    assert summary["actors"] == 2 and summary["learners"] == 1
    assert summary["capacity"] == 2000
    assert 0 < summary["final_size"] <= 2000
    assert summary["episodes"] >= 0 and summary["gb_moved"] > 0
    assert "[" in proc.stdout and "inserts" in proc.stdout  # at least one progress line
    assert os.listdir(shm) == []  # the segment is gone


def test_prioritized_demo_updates_priorities(tmp_path: Path) -> None:
    """``--prioritized``: the learner samples by priority, weights its TD step, and sets each
    sampled row's priority to its TD error; the summary reports the updates and the total."""
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "3", "--capacity", "2000", "--prioritized",
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
        "--synthetic", "--seconds", "3", "--capacity", "2000", "--samples-per-insert", str(spi),
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
        "--synthetic", "--seconds", "2", "--capacity", "1000", "--actors", "1",
        "--path", str(tmp_path), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["priority_total"] is None and summary["priority_updates"] == 0
    assert "priorities" not in proc.stdout


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_other_start_methods(tmp_path: Path, method: str) -> None:
    out = tmp_path / "summary.json"
    proc = run_demo(
        "--synthetic", "--seconds", "2", "--capacity", "1000", "--start-method", method,
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
    proc = run_demo("--seconds", "5", "--capacity", "2000", "--path", str(shm), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = check_summary(proc.stdout, out)
    assert summary["source"] == "ALE/Pong-v5"
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


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    proc = run_demo("--synthetic", "--capacity", "8", "--batch-size", "32", "--path", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("shmreplay: error:") and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Pieces, in process
# ---------------------------------------------------------------------------------------------


def test_synthetic_frames_do_not_import_gymnasium() -> None:
    code = textwrap.dedent(
        """
        import sys
        from shmreplay import atari, demo
        frames = atari.SyntheticFrames(0, stamp=1)
        frames.reset(); frames.step(0)
        assert "gymnasium" not in sys.modules and "ale_py" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_synthetic_frames_interface() -> None:
    frames = atari.SyntheticFrames(3, stamp=7)
    obs = frames.reset()
    assert obs.shape == atari.OBS_SHAPE and obs.dtype == np.uint8
    episodes = 0
    for step in range(3000):
        nxt, reward, done = frames.step(step % frames.num_actions)
        assert nxt.shape == atari.OBS_SHAPE and isinstance(reward, float) and isinstance(done, bool)
        assert np.array_equal(nxt[:-1], obs[1:])
        (count, who), (next_count, next_who) = atari.read_stamp(obs[-1]), atari.read_stamp(nxt[-1])
        assert next_count == count + 1 and who == next_who == 7
        if done:
            episodes += 1
            obs = frames.reset()
        else:
            obs = nxt
    assert episodes >= 1


def test_downsampler() -> None:
    image = np.arange(210 * 160, dtype=np.int64).reshape(210, 160) % 251
    frame = atari.Downsampler(210, 160)(image.astype(np.uint8))
    assert frame.shape == (84, 84) and frame.dtype == np.uint8
    flat = atari.Downsampler(210, 160)(np.full((210, 160), 200, np.uint8))
    assert np.all(flat == 200)


def test_env_id() -> None:
    assert atari.atari_env_id("Pong") == "ALE/Pong-v5"
    assert atari.atari_env_id("ALE/Breakout-v5") == "ALE/Breakout-v5"


def _batch(n: int = 8) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    frames = atari.SyntheticFrames(0, stamp=1)
    obs = frames.reset()
    rows: dict[str, list[Any]] = {k: [] for k in demo.demo_fields()}
    for step in range(n):
        nxt, reward, done = frames.step(1)
        for key, value in (("obs", obs), ("next_obs", nxt), ("action", 1), ("reward", reward),
                           ("done", done), ("actor", 1), ("step", step)):  # fmt: skip
            rows[key].append(value)
        obs = nxt
    batch = {k: np.asarray(v, dtype=demo.demo_fields()[k][1]) for k, v in rows.items()}
    info = {"index": np.arange(n, dtype=np.int64), "key": np.arange(n, dtype=np.uint64)}
    return batch, info


def test_check_batch_accepts_whole_records_and_catches_torn_ones() -> None:
    kwargs: dict[str, Any] = dict(batch_size=8, capacity=100, num_actors=2, num_actions=6, synthetic=True)
    batch, info = _batch()
    assert demo.check_batch(batch, info, **kwargs) is None

    torn = dict(batch, next_obs=batch["next_obs"].copy())
    torn["next_obs"][3] = batch["next_obs"][4]  # next_obs from another transition
    assert "torn record" in (demo.check_batch(torn, info, **kwargs) or "")

    wrong_actor = dict(batch, actor=np.zeros(8, np.int32))  # the stamp says actor 1
    assert "torn record" in (demo.check_batch(wrong_actor, info, **kwargs) or "")

    bad_dtype = dict(batch, done=batch["done"].astype(np.uint8))
    assert "done" in (demo.check_batch(bad_dtype, info, **kwargs) or "")

    out_of_range = dict(batch, actor=np.full(8, 5, np.int32))
    assert "actor id" in (demo.check_batch(out_of_range, info, **dict(kwargs, synthetic=False)) or "")
