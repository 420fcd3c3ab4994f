"""Access control: who can open a segment, and where a segment can be written.

* Segment files are created with mode exactly 0600 (whatever the umask), owned by the
  creator, and exclusively: concurrent creators of one name get one winner and
  ``FileExistsError`` for the rest, and an existing file under the name is never replaced.
* A process of another user (a child that dropped root privileges to ``nobody``) can neither
  attach, inspect, remove, read nor write a segment, and does not see it listed; and a
  segment owned by another user is refused even to root.
* Names are validated (no ``/``, no leading ``.``, no ``..``, NUL, empty, > 200 characters,
  non-str) before anything touches the filesystem: nothing is created anywhere, even where a
  planted directory would make a traversal resolve.
* ``path=`` names the directory the segment goes directly into; a missing directory or a file
  is an error; a symlink planted at a segment's name (or at the hidden name a create uses
  while building the segment) is never followed and its target is never touched.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shmreplay
from helpers import SHM_DIR, row_for_key, rows_for_keys, run_forked, segment_path
from shmreplay import ReplayBuffer

FIELDS = {"x": ((2,), np.float32), "k": ((), np.int64)}
NOBODY = (65534, 65534)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


def _digest(path) -> tuple[str, float, int]:
    st_ = os.stat(path, follow_symlinks=False)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), st_.st_mtime, st_.st_size


def _listing(*dirs) -> dict[str, list[str]]:
    return {str(d): sorted(os.listdir(d)) for d in dirs}


# --------------------------------------------------------------------------- mode and ownership


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o777])
@pytest.mark.parametrize("where", ["dev-shm", "path"])
def test_segment_mode_is_exactly_0600(shm_name, shm_dir, umask, where):
    directory = None if where == "dev-shm" else shm_dir
    old = os.umask(umask)
    try:
        buf = ReplayBuffer.create(shm_name, capacity=4, fields=FIELDS, path=directory)
    finally:
        os.umask(old)
    with buf:
        st_ = os.stat(buf.path, follow_symlinks=False)
        assert stat.S_ISREG(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o600, oct(st_.st_mode)
        assert st_.st_uid == os.geteuid() and st_.st_gid == os.getegid()
        assert st_.st_nlink == 1
        buf.add(**row_for_key(FIELDS, 0))
        assert len(buf) == 1


def test_create_never_replaces_an_existing_file(shm_name, shm_dir):
    """Whatever sits under the name (a foreign file, an empty file) is left exactly as it was."""
    path = segment_path(shm_name, shm_dir)
    for content in (b"precious data, not a segment", b""):
        with open(path, "wb") as f:
            f.write(content)
        before = _digest(path)
        with pytest.raises(FileExistsError):
            ReplayBuffer.create(shm_name, capacity=4, fields=FIELDS, path=shm_dir)
        assert _digest(path) == before
        assert sorted(os.listdir(shm_dir)) == [os.path.basename(path)], "a temporary was left behind"
        os.unlink(path)


def test_concurrent_creators_of_one_name_get_one_winner(shm_name, shm_dir):
    """Four processes create the same name at the same instant: exactly one wins, the others
    get FileExistsError, and the winner's segment is intact (no replaced or torn file)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    results = ctx.Queue()

    def racer(i: int) -> None:
        go.wait(30)
        try:
            buf = ReplayBuffer.create(shm_name, capacity=16, fields=FIELDS, path=str(shm_dir))
        except FileExistsError:
            results.put((i, "exists"))
            return
        except BaseException as e:  # noqa: BLE001
            results.put((i, repr(e)))
            return
        buf.add(**row_for_key(FIELDS, i))
        results.put((i, "won"))
        buf.close()  # not unlinked: the parent checks it

    procs = [ctx.Process(target=racer, args=(i,)) for i in range(4)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.2)
        go.set()
        got = dict(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert sorted(got.values()) == ["exists", "exists", "exists", "won"], got
    winner = next(i for i, r in got.items() if r == "won")
    assert sorted(os.listdir(shm_dir)) == [f"shmreplay.{shm_name}"], "temporaries left behind"
    with ReplayBuffer.attach(shm_name, path=shm_dir) as buf:
        assert buf.capacity == 16 and len(buf) == 1
        assert int(buf[0]["k"]) == row_for_key(FIELDS, winner)["k"]


# --------------------------------------------------------------------------- another user


def _as_nobody(name: str, path: str) -> dict:
    """Runs in a child that dropped root to nobody: tries everything on root's segment."""
    out = {}

    def attempt(label, fn):
        try:
            value = fn()
            out[label] = ("ok", value)
        except BaseException as e:  # noqa: BLE001
            out[label] = (type(e).__name__, str(e))

    attempt("uid", os.geteuid)
    attempt("attach", lambda: ReplayBuffer.attach(name).close())
    attempt("inspect", lambda: ReplayBuffer.inspect(name).close())
    attempt("remove", lambda: shmreplay.remove(name))
    attempt("read", lambda: open(path, "rb").read(8))
    attempt("write", lambda: open(path, "r+b").close())
    attempt("unlink", lambda: os.unlink(path))
    attempt("chmod", lambda: os.chmod(path, 0o666))
    attempt("create", lambda: ReplayBuffer.create(name, capacity=2, fields=FIELDS).close())
    attempt("list", lambda: [b["name"] for b in shmreplay.list_buffers()])
    attempt("gc", lambda: shmreplay.gc(dry_run=True))
    return out


@needs_root
def test_other_user_cannot_touch_a_segment(shm_name):
    with ReplayBuffer.create(shm_name, capacity=8, fields=FIELDS) as buf:
        buf.extend(rows_for_keys(FIELDS, range(5)))
        before = _digest(buf.path)
        out = run_forked(lambda: _as_nobody(shm_name, buf.path), timeout=60, as_user=NOBODY)
        assert out["uid"] == ("ok", NOBODY[0])
        for op in ("attach", "inspect", "remove", "read", "write", "unlink", "chmod"):
            assert out[op][0] == "PermissionError", (op, out[op])
        assert shm_name in out["attach"][1], "the message should name the buffer's file"
        assert out["create"][0] == "FileExistsError", out["create"]
        assert out["list"][0] == "ok" and shm_name not in out["list"][1], out["list"]
        assert out["gc"][0] == "ok" and shm_name not in out["gc"][1], out["gc"]
        # untouched: same bytes, same mode, no handle registered by the other user
        assert _digest(buf.path) == before
        assert stat.S_IMODE(os.stat(buf.path).st_mode) == 0o600
        assert len(buf) == 5 and buf.stats()["inserts"] == 5
        assert buf.stats()["attached"] == 1 and buf.processes() == [os.getpid()]


@needs_root
def test_segment_of_another_user_is_refused_even_to_root(name_factory):
    """A segment created by nobody: root can open the file, but attach refuses it by owner."""
    name = name_factory()

    def create_as_nobody():
        buf = ReplayBuffer.create(name, capacity=4, fields=FIELDS)
        buf.add(**row_for_key(FIELDS, 1))
        path = buf.path
        buf.close()
        return path

    path = run_forked(create_as_nobody, timeout=60, as_user=NOBODY)
    try:
        assert os.stat(path).st_uid == NOBODY[0]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        before = _digest(path)
        for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
            with pytest.raises(PermissionError, match="uid"):
                open_(name)
        assert name not in [b["name"] for b in shmreplay.list_buffers()]
        assert name not in shmreplay.gc(dry_run=True)
        assert _digest(path) == before
    finally:
        os.unlink(path)


# --------------------------------------------------------------------------- names

BAD_NAMES = [
    "a/b",
    "/abs",
    "../escape",
    "a/../../escape",
    "./x",
    ".",
    "..",
    "...",
    ".hidden",
    "..a",
    "a\0b",
    "\0",
    "",
    "x" * 201,
    "x" * 4096,
    "a b",
    "a\nb",
    "a\\b",
    "é",
    "a*",
    "~root",
    "$HOME",
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_invalid_names_create_nothing_anywhere(bad, shm_dir):
    """Every entry point refuses the name with ValueError, even where a directory planted as
    ``shmreplay.a`` (or ``shmreplay..``) would let a ``..`` in the name resolve outside."""
    sub = shm_dir / "sub"
    sub.mkdir()
    (sub / "shmreplay.a").mkdir()  # "shmreplay.a/../../escape" would resolve to shm_dir/escape
    (sub / "shmreplay.").mkdir()  # "shmreplay../x" likewise
    before = _listing(shm_dir, sub, shm_dir.parent)
    shm_before = set(os.listdir(SHM_DIR))
    for directory in (sub, None):
        with pytest.raises(ValueError):
            ReplayBuffer.create(bad, capacity=4, fields=FIELDS, path=directory)
        with pytest.raises(ValueError):
            ReplayBuffer.attach(bad, path=directory)
        with pytest.raises(ValueError):
            ReplayBuffer.inspect(bad, path=directory)
        with pytest.raises(ValueError):
            shmreplay.remove(bad, path=directory)
    assert _listing(shm_dir, sub, shm_dir.parent) == before
    new_in_shm = set(os.listdir(SHM_DIR)) - shm_before  # other processes may add their own
    assert not {e for e in new_in_shm if "escape" in e or e == "shmreplay." + bad.split("/")[0]}
    assert not os.path.exists(shm_dir / "escape")
    assert not os.path.exists(shm_dir.parent / "escape")


@pytest.mark.parametrize("bad", [5, 1.5, b"name", bytearray(b"n"), ["n"], ("n",), object()], ids=repr)
def test_non_str_names_are_type_errors(bad, shm_dir):
    with pytest.raises(TypeError):
        ReplayBuffer.create(bad, capacity=4, fields=FIELDS, path=shm_dir)
    with pytest.raises(TypeError):
        ReplayBuffer.attach(bad, path=shm_dir)
    with pytest.raises(TypeError):
        ReplayBuffer.inspect(bad, path=shm_dir)
    with pytest.raises(TypeError):
        shmreplay.remove(bad, path=shm_dir)
    assert os.listdir(shm_dir) == []


def test_longest_and_odd_but_valid_names_stay_inside(shm_dir):
    for name in ("a" * 200, "a..b", "a.", "-", "_", "A-z_0.9", "a" + "." * 199):
        with ReplayBuffer.create(name, capacity=2, fields=FIELDS, path=shm_dir) as buf:
            assert buf.path == os.path.join(str(shm_dir), "shmreplay." + name)
            assert os.listdir(shm_dir) == ["shmreplay." + name]
        assert os.listdir(shm_dir) == []


# --------------------------------------------------------------------------- path=


def test_path_must_be_an_existing_directory(shm_name, shm_dir):
    missing = shm_dir / "missing"
    for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
        with pytest.raises(FileNotFoundError):
            open_(shm_name, path=missing)
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.create(shm_name, capacity=4, fields=FIELDS, path=missing)
    assert not missing.exists()
    a_file = shm_dir / "plain-file"
    a_file.write_bytes(b"content")
    with pytest.raises((FileNotFoundError, NotADirectoryError)):
        ReplayBuffer.create(shm_name, capacity=4, fields=FIELDS, path=a_file)
    with pytest.raises((FileNotFoundError, NotADirectoryError)):
        ReplayBuffer.attach(shm_name, path=a_file)
    assert a_file.read_bytes() == b"content"
    assert sorted(os.listdir(shm_dir)) == ["plain-file"]


def test_path_that_is_a_file_says_not_a_directory(shm_name, shm_dir):
    a_file = shm_dir / "plain-file"
    a_file.write_bytes(b"content")
    with pytest.raises(NotADirectoryError, match="directory"):
        ReplayBuffer.create(shm_name, capacity=4, fields=FIELDS, path=a_file)


def test_segment_goes_directly_into_path(shm_name, shm_dir, monkeypatch):
    """Whatever spelling of the directory (trailing slash, ``sub/..``, relative, a symlink to
    it, a Path), the file is ``<that directory>/shmreplay.<name>`` and nowhere else."""
    (shm_dir / "sub").mkdir()
    os.symlink(shm_dir, shm_dir.parent / "dir-link")
    monkeypatch.chdir(shm_dir.parent)
    spellings = [
        str(shm_dir) + "/",
        str(shm_dir / "sub" / ".."),
        os.path.relpath(shm_dir),
        str(shm_dir.parent / "dir-link"),
        shm_dir,
    ]
    for spelling in spellings:
        with ReplayBuffer.create(shm_name, capacity=2, fields=FIELDS, path=spelling) as buf:
            assert os.path.dirname(os.path.realpath(buf.path)) == os.path.realpath(shm_dir)
            assert os.path.basename(buf.path) == f"shmreplay.{shm_name}"
            assert sorted(os.listdir(shm_dir)) == [f"shmreplay.{shm_name}", "sub"]
            assert os.listdir(shm_dir / "sub") == []
            with ReplayBuffer.attach(shm_name, path=spelling) as other:
                assert other.path == buf.path
        assert sorted(os.listdir(shm_dir)) == ["sub"]


# --------------------------------------------------------------------------- symlinks


@pytest.fixture
def elsewhere(tmp_path):
    """A real segment and a plain file in another directory: targets of planted links."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    buf = ReplayBuffer.create("target", capacity=4, fields=FIELDS, path=d)
    buf.extend(rows_for_keys(FIELDS, range(3)))
    buf.close()
    secret = d / "secret"
    secret.write_bytes(b"do not touch " * 1000)
    os.chmod(secret, 0o600)
    return d


@pytest.mark.parametrize("target", ["segment", "plain-file", "dangling", "dev-zero"])
def test_symlink_at_segment_name_is_never_followed(shm_dir, elsewhere, target):
    targets = {
        "segment": elsewhere / "shmreplay.target",
        "plain-file": elsewhere / "secret",
        "dangling": elsewhere / "does-not-exist",
        "dev-zero": "/dev/zero",
    }
    dest = targets[target]
    link = shm_dir / "shmreplay.victim"
    os.symlink(dest, link)
    watched = [elsewhere / "shmreplay.target", elsewhere / "secret"]
    before = {p: _digest(p) for p in watched}
    for open_ in (ReplayBuffer.attach, ReplayBuffer.inspect):
        with pytest.raises(PermissionError, match="symbolic link"):
            open_("victim", path=shm_dir)
    with pytest.raises((PermissionError, FileExistsError)):
        ReplayBuffer.create("victim", capacity=4, fields=FIELDS, path=shm_dir)
    assert "victim" not in [b["name"] for b in shmreplay.list_buffers(shm_dir)]
    assert shmreplay.gc(shm_dir, dry_run=True) == []
    assert {p: _digest(p) for p in watched} == before
    assert not os.path.exists(elsewhere / "does-not-exist")
    assert os.path.islink(link) and os.readlink(link) == str(dest)
    assert sorted(os.listdir(shm_dir)) == ["shmreplay.victim"]
    # the real segment behind the link saw no handle
    with ReplayBuffer.inspect("target", path=elsewhere) as real:
        assert real.stats()["attached"] == 0 and len(real) == 3


def test_remove_of_a_planted_symlink_removes_only_the_link(shm_dir, elsewhere):
    os.symlink(elsewhere / "shmreplay.target", shm_dir / "shmreplay.victim")
    before = _digest(elsewhere / "shmreplay.target")
    try:
        shmreplay.remove("victim", path=shm_dir)
    except (PermissionError, FileNotFoundError):
        pass  # refusing is fine too; following is not
    assert _digest(elsewhere / "shmreplay.target") == before


def test_symlink_planted_at_the_creation_name_is_not_written_through(tmp_path):
    """create builds the segment under a predictable hidden name
    (``.shmreplay.<name>.<pid>-<n>.creating``) in a directory others may write (/dev/shm is
    world-writable). A link planted there must not make create write to its target."""
    d = tmp_path / "shared"
    d.mkdir()
    victim = tmp_path / "victim-file"
    victim.write_bytes(b"original")
    script = textwrap.dedent(
        f"""
        import os, shmreplay
        d = {str(d)!r}
        for n in range(4):
            os.symlink({str(victim)!r}, os.path.join(d, f".shmreplay.buf.{{os.getpid()}}-{{n}}.creating"))
            os.symlink({str(tmp_path / 'created-through-link')!r}, os.path.join(d, f".shmreplay.new.{{os.getpid()}}-{{n}}.creating"))
        for name in ("buf", "new"):
            try:
                b = shmreplay.ReplayBuffer.create(name, capacity=4, fields={{"x": ((), "int64")}}, path=d)
                b.add(x=7)
                print(name, "created", b.path)
                b.close()
            except OSError as e:
                print(name, type(e).__name__)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"original"
    assert not (tmp_path / "created-through-link").exists()
    for line in proc.stdout.splitlines():
        name, outcome = line.split()[:2]
        if outcome == "created":
            seg = d / f"shmreplay.{name}"
            assert seg.is_file() and not seg.is_symlink()
            assert stat.S_IMODE(seg.stat().st_mode) == 0o600


def test_planted_creation_names_do_not_stop_create(tmp_path):
    """In a shared directory (/dev/shm is world-writable) anyone can plant files at
    ``.shmreplay.<name>.<pid>-<n>.creating`` for a victim's pid: create should pick another
    hidden name (e.g. a random suffix, O_EXCL) instead of failing."""
    d = tmp_path / "shared"
    d.mkdir()
    script = textwrap.dedent(
        f"""
        import os, shmreplay
        d = {str(d)!r}
        for n in range(4):
            os.symlink("/nonexistent", os.path.join(d, f".shmreplay.buf.{{os.getpid()}}-{{n}}.creating"))
        b = shmreplay.ReplayBuffer.create("buf", capacity=4, fields={{"x": ((), "int64")}}, path=d)
        b.close()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (d / "shmreplay.buf").is_file()
