"""The ``shmreplay`` command: list, inspect and remove replay buffers, and run the demo.

::

    shmreplay ls [--json]              buffers on this machine: live, stale (every process that
                                       used it is gone) or corrupt (not a readable segment)
    shmreplay info NAME [--json]       schema, sizes, counters and attached processes
    shmreplay gc [--dry-run] [--json]  remove this user's stale buffers, never a live one
    shmreplay rm NAME [NAME ...]       remove segments (``--stale``: same as ``gc``)
    shmreplay top [NAME ...]           live view: fill, inserts/s, samples/s, retries/s, time
                                       waiting, priority total, attached pids; ``q`` quits
                                       (``--once``: one frame, ``--json``: JSON Lines)
    shmreplay demo [--synthetic] ...   live actor-learner demo with Atari frames

Every subcommand takes ``--path DIR`` for buffers outside the default directory (/dev/shm).
Errors are one line on stderr and exit code 1 (a malformed option: usage and exit code 2, as
argparse does). Ctrl-C exits with code 130.

Names, paths and reasons come from a shared directory where anyone can create files, so all
text printed from the filesystem goes through :func:`~shmreplay._format.printable` (``--json``
output is escaped by ``json.dumps``): a file name cannot forge output lines or send escape
sequences to the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._format import format_bytes, printable

__all__ = ["main", "build_parser"]

PROG = "shmreplay"


class CliError(Exception):
    """An error that is reported as one line on stderr (exit code 1)."""


def _fill(size: int, capacity: int) -> str:
    pct = 100.0 * size / capacity if capacity else 0.0
    return f"{size:,} ({pct:.1f}%)"


def _directory(path: str | None) -> str:
    import shmreplay

    return printable(path if path is not None else shmreplay.DEFAULT_DIR)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(parts).rstrip()

    return [line(headers)] + [line(r) for r in rows]


# --------------------------------------------------------------------------------------------
# ls
# --------------------------------------------------------------------------------------------


def cmd_ls(args: argparse.Namespace) -> int:
    from . import _core

    buffers, unreadable = _core.scan(args.path)
    if args.json:
        listed = [{**b, "status": "stale" if b["stale"] else "live"} for b in buffers]
        listed += [{**u, "status": "corrupt"} for u in unreadable]
        print(json.dumps(listed, indent=2))
        return 0
    where = _directory(args.path)
    if not buffers and not unreadable:
        print(f"No shmreplay buffers in {where}.")
        return 0
    rows = [
        [
            printable(b["name"]),
            f"{b['capacity']:,}",
            _fill(b["size"], b["capacity"]),
            format_bytes(b["bytes"]),
            str(b["attached"]),
            _sampler_name(b["sampler"]),
            b["kind"],
            "stale" if b["stale"] else "live",
        ]
        for b in buffers
    ]
    rows += [[printable(u["name"]), "", "", "", "", "", "", f"corrupt: {printable(u['reason'])}"] for u in unreadable]
    headers = ["NAME", "CAPACITY", "FILL", "SIZE", "ATTACHED", "SAMPLER", "KIND", "STATUS"]
    for text in _table(headers, rows, [False, True, True, True, True, False, False, False]):
        print(text)
    total = sum(b["bytes"] for b in buffers)
    stale = sum(1 for b in buffers if b["stale"])
    footer = f"{len(buffers)} buffer{'s' if len(buffers) != 1 else ''} in {where}, {format_bytes(total)}"
    if stale:
        footer += f"; {stale} stale (every process that used it is gone): remove with `{PROG} gc`"
    if unreadable:
        footer += f"; {len(unreadable)} corrupt file(s): inspect, then `{PROG} rm NAME`"
    print(footer)
    return 0


def _sampler_name(sampler: Any) -> str:
    """``uniform``, ``queue`` or ``prioritized(alpha, eps)`` of the core's ``None``, ``"queue"``
    or ``(alpha, eps, stratified)``."""
    if sampler is None:
        return "uniform"
    if isinstance(sampler, str):
        return sampler
    alpha, eps, stratified = sampler
    return f"prioritized(alpha={alpha:g}, eps={eps:g}{'' if stratified else ', iid'})"


# --------------------------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    import shmreplay

    removed = shmreplay.gc(args.path, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"removed": removed, "dry_run": args.dry_run}))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for name in removed:
        print(f"{verb} {printable(name)}")
    if not removed:
        print(f"No stale buffers in {_directory(args.path)}.")
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _inspect(name: str, path: str | None) -> Any:
    import shmreplay

    try:
        return shmreplay.ReplayBuffer.inspect(name, path=path)
    except FileNotFoundError:
        raise CliError(f"no buffer named {name!r} in {_directory(path)}") from None


def _describe(buf: Any) -> dict[str, Any]:
    import numpy as np

    episodes = buf._raw.episodes
    fields = []
    for field, (shape, dtype) in buf.fields.items():
        if episodes is not None and field.startswith("__episode"):
            continue  # an episode buffer's own metadata
        dt = np.dtype(dtype)
        fields.append(
            {"name": field, "dtype": dt.name, "shape": list(shape), "bytes": dt.itemsize * math.prod(shape)}
        )
    stats = dict(buf.stats())
    limiter = stats.pop("limiter")
    sampler = buf.sampler
    described: dict[str, Any] = {"kind": type(sampler).__name__.lower()}
    if buf.priority_range is not None:
        v_max, resolution = buf.priority_range
        described.update(
            alpha=sampler.alpha,
            eps=sampler.eps,
            stratified=sampler.stratified,
            max_value=v_max,
            resolution=resolution,
        )
    return {
        "name": buf.name,
        "path": buf.path,
        "capacity": buf.capacity,
        "size": len(buf),
        "record_bytes": buf.record_bytes,
        "segment_bytes": buf.nbytes,
        "fields": fields,
        "sampler": described,
        "episodes": None if episodes is None else dict(
            zip(("observations", "reward", "frame_stack", "stack_padding", "n_step", "gamma"), episodes),
            bytes_per_step=buf.nbytes / buf.capacity,
        ),
        "limiter": limiter,
        "stats": stats,
        "processes": buf.processes(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    buf = _inspect(args.name, args.path)
    try:
        info = _describe(buf)
    finally:
        buf.close()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"buffer        {printable(info['name'])}")
    print(f"path          {printable(info['path'])}")
    episodes = info["episodes"]
    unit = "frames (steps and episode starts)" if episodes else "records"
    print(f"capacity      {info['capacity']:,} {unit}")
    print(f"fill          {_fill(info['size'], info['capacity'])}")
    print(f"record bytes  {info['record_bytes']:,}")
    print(f"segment       {format_bytes(info['segment_bytes'])} ({info['segment_bytes']:,} bytes)")
    sampler = info["sampler"]
    if sampler["kind"] == "prioritized":
        print(
            f"sampler       prioritized: alpha {sampler['alpha']:g}, eps {sampler['eps']:g}, "
            f"{'stratified' if sampler['stratified'] else 'i.i.d.'}; v = (p + eps)^alpha held "
            f"up to {sampler['max_value']:,.0f} in steps of {sampler['resolution']:.3g}"
        )
    else:
        print(f"sampler       {sampler['kind']}")
    if episodes is not None:
        print(
            f"episodes      observations {', '.join(map(printable, episodes['observations']))}; reward "
            f"{printable(str(episodes['reward']))}; frame_stack {episodes['frame_stack']} "
            f"(padding {episodes['stack_padding']}); n_step {episodes['n_step']}, gamma {episodes['gamma']:g}; "
            f"{episodes['bytes_per_step']:,.0f} bytes per step"
        )
    limiter = info["limiter"]
    if limiter is None:
        print("limiter       none (nothing waits)")
    else:
        print(
            f"limiter       {limiter['kind']}: samples_per_insert {limiter['samples_per_insert']:g}, "
            f"min_size {limiter['min_size']:,}, min_diff {limiter['min_diff']:g}, "
            f"max_diff {limiter['max_diff']:g}"
        )
    print()
    rows = [
        [printable(f["name"]), printable(f["dtype"]), str(tuple(f["shape"])), f"{f['bytes']:,}"]
        for f in info["fields"]
    ]
    for text in _table(["FIELD", "DTYPE", "SHAPE", "BYTES"], rows, [False, False, False, True]):
        print(text)
    print()
    print("counters")
    width = max(len(k) for k in info["stats"])
    for key, value in info["stats"].items():
        print(f"  {key:<{width}}  {value:,.6g}" if isinstance(value, float) else f"  {key:<{width}}  {value:,}")
    print()
    pids = info["processes"]
    if pids:
        print(f"attached processes ({len(pids)}): {', '.join(str(p) for p in pids)}")
    else:
        print("attached processes: none besides this command (the buffer is stale)")
    return 0


# --------------------------------------------------------------------------------------------
# rm
# --------------------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    import shmreplay

    if not args.names and not args.stale:
        raise CliError("rm: name at least one buffer, or pass --stale")
    for name in args.names:  # malformed names are refused before anything is removed
        shmreplay._core.validate_name(name)
    if args.stale:
        for name in shmreplay.gc(args.path):
            print(f"removed {printable(name)}")
    listed = {b["name"]: b for b in shmreplay.list_buffers(args.path)} if args.names else {}
    status = 0
    for name in args.names:
        try:
            shmreplay.remove(name, path=args.path)
        except FileNotFoundError:
            print(f"{PROG}: error: no buffer named {name!r} in {_directory(args.path)}", file=sys.stderr)
            status = 1
            continue
        print(f"removed {printable(name)}")
        entry = listed.get(name)
        if entry is not None and entry["attached"] and not entry["stale"]:
            attached = entry["attached"]
            print(
                f"{PROG}: warning: {name!r} was still attached by {attached} process(es); they keep "
                "their mapping until they close it",
                file=sys.stderr,
            )
    return status


# --------------------------------------------------------------------------------------------
# top
# --------------------------------------------------------------------------------------------


def _interval(text: str) -> float:
    from ._top import parse_interval

    try:
        return parse_interval(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def cmd_top(args: argparse.Namespace) -> int:
    import shmreplay

    from . import _core, _top

    names: list[str] = list(dict.fromkeys(args.names))  # in order, once each
    if names:
        for name in names:
            try:
                _core.validate_name(name)
            except ValueError as exc:
                raise CliError(f"{_one_line(exc)}") from None
        buffers, unreadable = _core.scan(args.path)
        present = {b["name"] for b in buffers}
        corrupt = {u["name"]: u["reason"] for u in unreadable}
        for name in names:
            if name in corrupt:
                raise CliError(f"{name!r} is not a readable buffer: {corrupt[name]}")
            if name not in present:
                raise CliError(f"no buffer named {name!r} in {_directory(args.path)}")
    return _top.run(
        args.path,
        names,
        args.path if args.path is not None else shmreplay.DEFAULT_DIR,
        interval=args.interval,
        once=args.once,
        as_json=args.json,
        count=args.count,
    )


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import shmreplay

    from . import demo
    from .atari import AtariUnavailableError

    try:
        return demo.run(demo.config_from_args(args))
    except AtariUnavailableError as exc:
        raise CliError(str(exc)) from None
    except shmreplay.InsufficientSpaceError as exc:
        raise CliError(f"{_one_line(exc)} (for the demo: a smaller --capacity, or --path DIR)") from None


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shmreplay`` command."""
    from . import demo

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Shared-memory experience replay buffers: inspect them, or run the live demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument(
            "--path", metavar="DIR", default=None, help="directory of the segments (default: /dev/shm)"
        )
        return p

    p = add("ls", "list the replay buffers on this machine")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ls)

    p = add("info", "show a buffer's schema, sizes, counters and attached processes")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = add("gc", "remove this user's stale buffers (every process that used them is gone)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_gc)

    p = add("rm", "remove replay buffers")
    p.add_argument("names", metavar="NAME", nargs="*")
    p.add_argument("--stale", action="store_true", help="also remove every stale buffer (as `gc`)")
    p.set_defaults(func=cmd_rm)

    p = add(
        "top",
        "live view of the buffers: fill, inserts/s, samples/s, retries/s, time waiting, "
        "priority total and attached pids, refreshed every interval; q or Ctrl-C quits",
    )
    p.add_argument(
        "names", metavar="NAME", nargs="*", help="only these buffers (default: every buffer in the directory)"
    )
    p.add_argument(
        "--interval",
        metavar="SECONDS",
        type=_interval,
        default=1.0,
        help="seconds between refreshes, and over which rates are measured (default: 1)",
    )
    frames = p.add_mutually_exclusive_group()
    frames.add_argument(
        "--once",
        action="store_true",
        help="print one frame and exit; its rates are measured over one interval (two readings)",
    )
    frames.add_argument("--count", metavar="N", type=_count, default=None, help="stop after N refreshes")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per refresh and line (JSON Lines); rates are null in the first",
    )
    p.epilog = (
        "Rates are per second between two refreshes (\"–\" until there are two). WAIT INS and "
        "WAIT SMP: seconds per second that inserts and samples spent blocked by flow control, "
        "summed over processes, counted when a wait ends. When stdout is not a terminal, frames "
        "are printed one after another. Exit code 0 (q, --once, --count, stdout closed), 130 on "
        "Ctrl-C; on a terminal, SIGTERM and SIGHUP restore it and exit with 143 and 129."
    )
    p.set_defaults(func=cmd_top)

    p = add(
        "demo",
        "live demo: actor processes write Atari episodes, learner processes sample n-step batches",
    )
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return printable(" ".join(text.split()))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shmreplay`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.path is not None and not os.path.isdir(args.path):
            raise CliError(f"no such directory: {printable(args.path)}")
        return int(args.func(args))
    except CliError as exc:
        print(f"{PROG}: error: {printable(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `shmreplay ls | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, ValueError, TypeError, MemoryError, RuntimeError, OverflowError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
