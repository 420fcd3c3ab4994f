"""The ``shmreplay`` command line, run as a real subprocess against real segments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shmreplay

FIELDS: dict[str, tuple[tuple[int, ...], Any]] = {
    "obs": ((4, 8, 8), np.uint8),
    "action": ((), np.int32),
    "reward": ((), "float32"),
    "done": ((), np.bool_),
}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shmreplay.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def fill(buf: shmreplay.ReplayBuffer, n: int) -> None:
    buf.extend(
        {
            "obs": np.full((n, 4, 8, 8), 7, np.uint8),
            "action": np.arange(n, dtype=np.int32),
            "reward": np.ones(n, np.float32),
            "done": np.zeros(n, bool),
        }
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("shmreplay: error:"), lines
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def two_buffers(tmp_path: Path) -> Iterator[tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]]:
    """``alpha``: 100 slots, 25 rows; ``beta``: 64 slots, wrapped around (74 inserts)."""
    alpha = shmreplay.ReplayBuffer.create("alpha", capacity=100, fields=FIELDS, path=tmp_path)
    beta = shmreplay.ReplayBuffer.create("beta", capacity=64, fields=FIELDS, path=tmp_path)
    try:
        fill(alpha, 25)
        fill(beta, 64)
        fill(beta, 10)  # wraps around; separate calls, so every row is really written
        yield alpha, beta
    finally:
        for buf in (alpha, beta):
            try:
                buf.unlink()
            except FileNotFoundError:
                pass
            buf.close()


def test_ls_table(tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]) -> None:
    proc = cli("ls", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "CAPACITY", "FILL", "SIZE", "ATTACHED", "SAMPLER", "KIND", "STATUS"]
    rows = {
        line.split()[0]: line for line in lines[1:] if line.split() and line.split()[0] in ("alpha", "beta")
    }
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"].split()[1:4] == ["100", "25", "(25.0%)"]
    assert rows["beta"].split()[1:4] == ["64", "64", "(100.0%)"]
    for line in rows.values():
        assert line.split()[-1] == "live"  # this test process is attached to both
        assert "MB" in line or "kB" in line
    assert "2 buffers in" in proc.stdout


def test_ls_json(tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]) -> None:
    alpha, beta = two_buffers
    proc = cli("ls", "--json", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    listed = {b["name"]: b for b in json.loads(proc.stdout)}
    assert set(listed) == {"alpha", "beta"}
    for buf, size in ((alpha, 25), (beta, 64)):
        entry = listed[buf.name]
        assert entry["capacity"] == buf.capacity
        assert entry["size"] == size
        assert entry["bytes"] == buf.nbytes
        assert entry["record_bytes"] == buf.record_bytes
        assert os.path.samefile(entry["path"], buf.path)
        assert entry["attached"] >= 1
        assert entry["stale"] is False


def test_ls_empty(tmp_path: Path) -> None:
    proc = cli("ls", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"No shmreplay buffers in {tmp_path}."
    proc = cli("ls", "--json", "--path", str(tmp_path))
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_info_text(
    tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]
) -> None:
    alpha, _ = two_buffers
    alpha.sample(10)
    proc = cli("info", "alpha", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "alpha" in out and alpha.path in out
    assert "100 records" in out and "25 (25.0%)" in out
    assert f"{alpha.record_bytes:,}" in out
    schema = {
        line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in FIELDS
    }
    assert set(schema) == set(FIELDS)
    assert "uint8" in schema["obs"] and "(4, 8, 8)" in schema["obs"] and "256" in schema["obs"]
    assert "int32" in schema["action"] and "()" in schema["action"]
    assert "float32" in schema["reward"] and "bool" in schema["done"]
    counters = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  ")}
    assert counters["inserts"] == "25"
    assert counters["samples"] == "10"
    assert counters["capacity"] == "100"
    assert str(os.getpid()) in out.split("attached processes")[-1]


def test_info_json(
    tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]
) -> None:
    _, beta = two_buffers
    proc = cli("info", "beta", "--json", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["name"] == "beta"
    assert info["capacity"] == 64 and info["size"] == 64
    assert info["record_bytes"] == beta.record_bytes and info["segment_bytes"] == beta.nbytes
    assert [f["name"] for f in info["fields"]] == list(FIELDS)
    obs = info["fields"][0]
    assert obs == {"name": "obs", "dtype": "uint8", "shape": [4, 8, 8], "bytes": 256}
    assert info["stats"]["inserts"] == 74
    assert set(info["stats"]) >= {
        "capacity",
        "size",
        "inserts",
        "samples",
        "retries",
        "recovered",
        "attached",
    }
    assert os.getpid() in info["processes"]


def test_rm(tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]) -> None:
    alpha, beta = two_buffers
    proc = cli("rm", "beta", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "removed beta"
    assert not os.path.exists(beta.path)
    assert os.path.exists(alpha.path)
    names = [b["name"] for b in json.loads(cli("ls", "--json", "--path", str(tmp_path)).stdout)]
    assert names == ["alpha"]


def test_rm_unknown_and_known(
    tmp_path: Path, two_buffers: tuple[shmreplay.ReplayBuffer, shmreplay.ReplayBuffer]
) -> None:
    alpha, _ = two_buffers
    proc = cli("rm", "nosuch", "alpha", "--path", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("shmreplay: error:")]
    assert len(errors) == 1 and "'nosuch'" in errors[0]
    assert "was still attached by 1 process" in proc.stderr  # this test holds alpha open
    assert "removed alpha" in proc.stdout
    assert not os.path.exists(alpha.path)


@pytest.mark.parametrize("command", [["info", "nosuch"], ["info", "nosuch", "--json"], ["rm", "nosuch"]])
def test_unknown_name(tmp_path: Path, command: list[str]) -> None:
    proc = cli(*command, "--path", str(tmp_path))
    assert_one_line_error(proc, "'nosuch'")
    assert proc.stdout == ""


def test_missing_directory_is_not_a_traceback(tmp_path: Path) -> None:
    for command in (["info", "x"], ["ls"], ["rm", "x"], ["demo", "--synthetic"]):
        proc = cli(*command, "--path", str(tmp_path / "missing"))
        assert_one_line_error(proc, "no such directory")


def test_default_directory() -> None:
    name = f"clitest-{uuid.uuid4().hex[:12]}"
    buf = shmreplay.ReplayBuffer.create(name, capacity=16, fields=FIELDS)
    try:
        assert os.path.dirname(buf.path) == shmreplay.DEFAULT_DIR
        fill(buf, 3)
        listed = {b["name"]: b for b in json.loads(cli("ls", "--json").stdout)}
        assert listed[name]["size"] == 3 and listed[name]["capacity"] == 16
        assert name in cli("ls").stdout
        info = json.loads(cli("info", name, "--json").stdout)
        assert info["stats"]["inserts"] == 3
        proc = cli("rm", name)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.exists(buf.path)
        assert_one_line_error(cli("rm", name), name)
    finally:
        try:
            buf.unlink()
        except FileNotFoundError:
            pass
        buf.close()


def test_stale_buffer_is_marked_and_removed(tmp_path: Path) -> None:
    """A creator that dies without cleaning up leaves a stale segment that ``rm --stale`` removes."""
    script = textwrap.dedent(
        f"""
        import os, shmreplay
        fields = {{"x": ((), "int64")}}
        buf = shmreplay.ReplayBuffer.create("orphan", capacity=8, fields=fields, path={str(tmp_path)!r})
        buf.add(x=1)
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    listed = json.loads(cli("ls", "--json", "--path", str(tmp_path)).stdout)
    assert [(b["name"], b["stale"], b["attached"]) for b in listed] == [("orphan", True, 0)]
    assert cli("ls", "--path", str(tmp_path)).stdout.splitlines()[1].split()[-1] == "stale"
    proc = cli("rm", "--stale", "--path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "removed orphan"
    assert os.listdir(tmp_path) == []


def test_help_and_usage_errors() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("ls", "info", "gc", "rm", "demo"):
        assert command in proc.stdout
    proc = cli("demo", "--help")
    assert proc.returncode == 0 and "--synthetic" in proc.stdout and "--start-method" in proc.stdout
    proc = cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# hostile file names: anybody can create files in /dev/shm
# --------------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "evil\nname live 0 0",  # a newline that would forge a second row
    "\x1b[31mred",  # a terminal escape sequence
    "clear\x1b[2J\x1b[H",  # clears the screen
    "cr\rover",  # carriage return: overwrites the row on a terminal
    "rtl\u202eevil",  # bidirectional override
    "sep\u2028line",  # a Unicode line separator
    "bell\x07tab\there",
]


def assert_no_raw_control(text: str) -> list[str]:
    """Only printable characters and the newlines that end lines; returns the lines."""
    raw = sorted({ch for ch in text if not ch.isprintable() and ch != "\n"})
    assert not raw, f"raw control characters in the output: {raw!r}\n{text!r}"
    assert "\x1b" not in text
    return text.rstrip("\n").split("\n") if text else []


def make_orphan(directory: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, shmreplay
        fields = {{"x": ((), "int64")}}
        buf = shmreplay.ReplayBuffer.create("orphan", capacity=8, fields=fields, path={str(directory)!r})
        buf.add(x=1)
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


@pytest.fixture
def hostile_dir(tmp_path: Path) -> Iterator[tuple[Path, shmreplay.ReplayBuffer]]:
    """A directory with a live buffer (``alpha``), a stale one (``orphan``, its creator exited)
    and files whose names try to forge rows."""
    make_orphan(tmp_path)
    for name in HOSTILE_NAMES:
        fd = os.open(os.path.join(tmp_path, "shmreplay." + name), os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x" * 64)
        os.close(fd)
    buf = shmreplay.ReplayBuffer.create("alpha", capacity=8, fields=FIELDS, path=tmp_path)
    try:
        fill(buf, 3)
        yield tmp_path, buf
    finally:
        buf.close()


def test_ls_escapes_hostile_names(hostile_dir: tuple[Path, shmreplay.ReplayBuffer]) -> None:
    directory, _ = hostile_dir
    proc = cli("ls", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    lines = assert_no_raw_control(proc.stdout)
    # header, one row per file (alpha, orphan and every hostile one), footer: nothing forged
    assert len(lines) == 1 + 2 + len(HOSTILE_NAMES) + 1, proc.stdout
    assert lines[0].split() == ["NAME", "CAPACITY", "FILL", "SIZE", "ATTACHED", "SAMPLER", "KIND", "STATUS"]
    body = lines[1:-1]
    assert [line for line in body if line.split()[-1] == "live"] == [
        line for line in body if line.startswith("alpha ")
    ]
    assert sum(1 for line in body if "corrupt:" in line) == len(HOSTILE_NAMES)
    # each hostile name is shown escaped, on its own row
    for name in HOSTILE_NAMES:
        shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in name)
        assert any(line.startswith(shown + " ") for line in body), (shown, body)
    assert [line.split()[-1] for line in body if line.startswith("orphan ")] == ["stale"]
    assert lines[-1].startswith("2 buffers in ")
    assert f"{len(HOSTILE_NAMES)} corrupt" in lines[-1]


def test_ls_json_keeps_hostile_names_exact(hostile_dir: tuple[Path, shmreplay.ReplayBuffer]) -> None:
    directory, _ = hostile_dir
    proc = cli("ls", "--json", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert_no_raw_control(proc.stdout)
    listed = json.loads(proc.stdout)
    assert sorted(b["name"] for b in listed) == sorted(["alpha", "orphan", *HOSTILE_NAMES])
    status = {b["name"]: b["status"] for b in listed}
    assert status["alpha"] == "live" and status["orphan"] == "stale"
    assert all(status[name] == "corrupt" for name in HOSTILE_NAMES)


def test_other_commands_escape_hostile_names(hostile_dir: tuple[Path, shmreplay.ReplayBuffer]) -> None:
    directory, _ = hostile_dir
    proc = cli("info", "alpha", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert_no_raw_control(proc.stdout)
    proc = cli("gc", "--dry-run", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert assert_no_raw_control(proc.stdout) == ["would remove orphan"]
    assert len(os.listdir(directory)) == 2 + len(HOSTILE_NAMES)
    for name in HOSTILE_NAMES:
        for command in (["info", name], ["rm", name]):
            proc = cli(*command, "--path", str(directory))
            assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
            assert_no_raw_control(proc.stdout)
            lines = assert_no_raw_control(proc.stderr)
            assert len(lines) == 1 and lines[0].startswith("shmreplay: error:"), (command, proc.stderr)
    # a hostile directory name in an error
    proc = cli("ls", "--path", str(directory / "no\nsuch\x1b[2J"))
    assert_one_line_error(proc, "no such directory")
    assert_no_raw_control(proc.stderr)
    # only the stale buffer is removed; the live one and the unreadable files stay
    proc = cli("rm", "--stale", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert assert_no_raw_control(proc.stdout) == ["removed orphan"]
    assert_no_raw_control(proc.stderr)
    proc = cli("gc", "--path", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert assert_no_raw_control(proc.stdout) == [f"No stale buffers in {directory}."]
    assert sorted(os.listdir(directory)) == sorted(f"shmreplay.{n}" for n in ["alpha", *HOSTILE_NAMES])


def test_escaping_function() -> None:
    from shmreplay._format import printable

    assert printable("alpha-1.b_2") == "alpha-1.b_2"
    assert printable("café au lait") == "café au lait"
    assert printable("a\nb") == "a\\nb"
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("r\u202el") == "r\\u202el"
    assert printable("\udcff") == "\\udcff"  # an undecodable byte (surrogateescape)
    for ch in map(chr, range(0x110000)):
        shown = printable(ch)
        assert shown.isprintable(), repr(ch)
