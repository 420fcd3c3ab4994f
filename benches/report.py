"""Medians, ratios to the limit, the issue's targets, the printed table, JSON and the chart.

    .venv/bin/python benches/report.py benches/results/full.json   # print a results file's report

Every report opens with the CPU (model, family/model/stepping, erms/fsrm/avx2/avx512 flags) and
the copy kernels shmreplay chose (see sysinfo.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict
from typing import Any

import contenders
import sysinfo
from workloads import WORKLOADS

SINGLE = ["insert_b1", "insert_b64", "sample_b32", "sample_b256"]
PARALLEL = ["insert_b64_x2", "sample_b256_x2"]
TITLES = {
    "insert_b1": "insert 1 row/call",
    "insert_b64": "insert b=64",
    "sample_b32": "sample b=32",
    "sample_b256": "sample b=256",
    "insert_b64_x2": "2 procs insert b=64",
    "sample_b256_x2": "2 procs sample b=256",
}

CHART_LABELS = {
    "insert_b64": "insert\nb=64",
    "sample_b32": "sample\nb=32",
    "sample_b256": "sample\nb=256",
    "insert_b64_x2": "insert b=64\n2 procs",
    "sample_b256_x2": "sample b=256\n2 procs",
}


def machine_info() -> dict:
    """The machine, the CPU (model, family/model/stepping, the copy-relevant flags), the copy
    kernels shmreplay chose in this process and ``SHMREPLAY_COPY_KERNEL``, package versions."""
    cpu = sysinfo.cpu_info()
    versions = {}
    for pkg in ("numpy", "shmreplay", "cpprb", "torch", "tensordict", "torchrl", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu["model_name"],
        "cpu_info": cpu,
        "shmreplay_kernels": sysinfo.kernels_info(),
        "SHMREPLAY_COPY_KERNEL": sysinfo.copy_kernel_env(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": versions,
        "git_commit": commit,
        "load_avg_start": os.getloadavg(),
    }


def header(doc: dict) -> str:
    """The lines that open every printed report: run, CPU, copy kernels, machine.

    Works on result files written before the CPU details and kernels were recorded (it says
    "not recorded")."""
    mi = doc["machine"]
    run = f"shmreplay benches, {doc.get('mode', '?')} mode"
    if doc.get("started"):
        run += f", started {doc['started']}"
    if mi.get("git_commit"):
        run += f", commit {mi['git_commit']}"
    cpu = sysinfo.describe_cpu(mi.get("cpu_info") or mi.get("cpu"))
    if "shmreplay_kernels" in mi:
        kernels = sysinfo.describe_kernels(mi["shmreplay_kernels"], mi.get("SHMREPLAY_COPY_KERNEL"))
    else:
        kernels = "not recorded (result file from an older suite)"
    v = mi.get("versions", {})
    lines = [
        run,
        f"cpu: {cpu}",
        f"copy kernels: {kernels}",
        f"machine: {mi.get('cores_usable', '?')} of {mi.get('cores', '?')} cores, {mi.get('memory_gb', '?')} GB, "
        f"kernel {mi.get('kernel', '?')}, Python {mi.get('python', '?')}, numpy {v.get('numpy')}, shmreplay {v.get('shmreplay')}",
    ]
    seen = [k for k in doc.get("kernels_in_jobs", []) if k != mi.get("shmreplay_kernels")]
    for k in seen:  # a job process that saw other kernels than the orchestrator (a rebuild mid-run?)
        lines.append(f"copy kernels in shmreplay's measuring processes: {sysinfo.describe_kernels(k, mi.get('SHMREPLAY_COPY_KERNEL'))}")
    return "\n".join(lines)


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(doc: dict) -> None:
    """Adds ``medians``, ``targets`` and ``errors`` to ``doc`` from its ``raw`` results."""
    rates: dict[tuple, list[float]] = defaultdict(list)
    conc: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    scale: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    owner: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    errors = []
    kernels_in_jobs: list = []
    for entry in doc["raw"]:
        job, res = entry["job"], entry["result"]
        if "shmreplay_kernels" in res and res["shmreplay_kernels"] not in kernels_in_jobs:
            kernels_in_jobs.append(res["shmreplay_kernels"])
        k, wl, cap = job["contender"], job["workload"], job["capacity"]
        if not res["ok"]:
            errors.append({"rep": entry["rep"], "scenario": job["scenario"], "workload": wl, "capacity": cap, "contender": k, "error": res["error"]})
            continue
        if job["kind"] == "single":
            for scen, fig in res["scenarios"].items():
                rates[(wl, cap, scen, k)].append(fig["rows_per_s"])
            for f in ("fds", "maps", "create_s", "fill_s"):
                owner[(wl, cap, k)][f].append(res[f])
        elif job["kind"] == "scale":
            for f in ("sample_us", "fds", "maps"):
                scale[(k, cap)][f].append(res[f])
        elif job["scenario"] == "concurrent":
            for f in ("inserts_per_s", "sampled_per_s", "rows_per_s", "torn", "checked"):
                conc[(wl, cap, k)][f].append(res[f])
            if res["first_torn"]:
                conc[(wl, cap, k)]["first_torn"].append(res["first_torn"])
        else:
            rates[(wl, cap, job["scenario"], k)].append(res["rows_per_s"])

    single = []
    for (wl, cap, scen, k), xs in rates.items():
        med = _median(xs)
        single.append({
            "workload": wl, "capacity": cap, "scenario": scen, "contender": k, "reps": len(xs),
            "rows_per_s": med, "gb_per_s": med * WORKLOADS[wl].row_bytes / 1e9,
            "ratio_to_limit": _ratio(med, _median(rates.get((wl, cap, scen, "limit"), []))),
            "all_rows_per_s": xs,
        })
    concurrent = []
    for (wl, cap, k), d in conc.items():
        total = _median(d["rows_per_s"])
        limit = _median(conc[(wl, cap, "limit")]["rows_per_s"]) if (wl, cap, "limit") in conc else None
        concurrent.append({
            "workload": wl, "capacity": cap, "contender": k, "reps": len(d["rows_per_s"]),
            "inserts_per_s": _median(d["inserts_per_s"]), "sampled_per_s": _median(d["sampled_per_s"]),
            "rows_per_s": total, "gb_per_s": total * WORKLOADS[wl].row_bytes / 1e9,
            "ratio_to_limit": _ratio(total, limit),
            "torn_rows": sum(d["torn"]), "checked_rows": sum(d["checked"]),
            "first_torn": d["first_torn"][0] if d["first_torn"] else "",
            "all_rows_per_s": d["rows_per_s"],
        })
    scale_rows = []
    for (k, cap), d in sorted(scale.items()):
        smallest = min(c for (kk, c) in scale if kk == k)
        us = _median(d["sample_us"])
        scale_rows.append({
            "contender": k, "capacity": cap, "reps": len(d["sample_us"]), "sample_us": us,
            "cost_vs_smallest": _ratio(us, _median(scale[(k, smallest)]["sample_us"])),
            "fds": sorted(set(d["fds"])), "maps": sorted(set(d["maps"])),
        })
    owners = [
        {"workload": wl, "capacity": cap, "contender": k, "fds": sorted(set(d["fds"])), "maps": sorted(set(d["maps"])),
         "create_s": _median(d["create_s"]), "fill_s": _median(d["fill_s"])}
        for (wl, cap, k), d in owner.items()
    ]
    doc["medians"] = {"single": single, "concurrent": concurrent, "scale": scale_rows, "owner": owners}
    doc["errors"] = errors
    doc["kernels_in_jobs"] = kernels_in_jobs
    doc["targets"] = targets(doc["medians"])


def targets(m: dict) -> list[dict]:
    """The issue's targets, each with the measured value (None when not measured in this run)."""
    single = {(r["workload"], r["capacity"], r["scenario"], r["contender"]): r for r in m["single"]}
    out = []

    def add(name: str, value: float | None, required: float) -> None:
        out.append({"target": name, "value": value, "required_text": f">= {required:g}x",
                    "pass": None if value is None else value >= required})

    def vs(wl: str, cap: int, scen: str, other: str) -> float | None:
        a, b = single.get((wl, cap, scen, "shmreplay")), single.get((wl, cap, scen, other))
        return _ratio(a and a["rows_per_s"], b and b["rows_per_s"])

    caps = defaultdict(set)
    for wl, cap, _, _ in single:
        caps[wl].add(cap)
    # Issue 10's targets (the performance-kernels issue).
    for cap in sorted(caps["atari"]):
        add(f"atari {cap:,}: insert b=64 vs numpy+1 lock", vs("atari", cap, "insert_b64", "numpy_lock"), 1.0)
        add(f"atari {cap:,}: insert b=64 vs write limit", vs("atari", cap, "insert_b64", "limit"), 0.90)
        add(f"atari {cap:,}: insert 1 row vs numpy+1 lock", vs("atari", cap, "insert_b1", "numpy_lock"), 1.2)
        for b in (32, 256):
            add(f"atari {cap:,}: sample b={b} vs gather limit", vs("atari", cap, f"sample_b{b}", "limit"), 1.0)
    for cap in sorted(caps["control"]):
        if cap >= 10_000_000:
            add(f"control {cap:,}: sample b=256 vs numpy+1 lock", vs("control", cap, "sample_b256", "numpy_lock"), 1.2)
    for r in m["concurrent"]:
        if r["contender"] != "shmreplay" or r["workload"] != "atari":
            continue
        peers = [p for p in m["concurrent"] if (p["workload"], p["capacity"]) == (r["workload"], r["capacity"])
                 and p["contender"] not in ("shmreplay", "limit") and p["torn_rows"] == 0]
        best = max(peers, key=lambda p: p["rows_per_s"], default=None)
        name = f"concurrent atari {r['capacity']:,}: aggregate vs best correct peer" + (f" ({best['contender']})" if best else "")
        numpy_lock = next((p for p in peers if p["contender"] == "numpy_lock"), None)
        add(f"concurrent atari {r['capacity']:,}: aggregate vs numpy+1 lock",
            _ratio(r["rows_per_s"], numpy_lock and numpy_lock["rows_per_s"]), 2.0)
        add(name, _ratio(r["rows_per_s"], best and best["rows_per_s"]), 1.5)
        out.append({"target": f"concurrent atari {r['capacity']:,}: torn rows (of {r['checked_rows']:,} checked)",
                    "value": r["torn_rows"], "required_text": "0", "pass": r["torn_rows"] == 0})
    sc = [r for r in m["scale"] if r["contender"] == "shmreplay"]
    if len(sc) > 1:
        lo, hi = sc[0], sc[-1]
        cost = _ratio(hi["sample_us"], lo["sample_us"])
        out.append({"target": f"scale: sample cost at {hi['capacity']:,} vs {lo['capacity']:,} slots", "value": cost,
                    "required_text": "<= 1.3x", "pass": None if cost is None else cost <= 1.3})
        same = len({tuple(r["fds"]) for r in sc}) == 1 and len({tuple(r["maps"]) for r in sc}) == 1 and all(len(r["fds"]) == 1 and len(r["maps"]) == 1 for r in sc)
        out.append({"target": "scale: fds and mappings per process the same at every capacity",
                    "value": f"fds {[r['fds'] for r in sc]}, maps {[r['maps'] for r in sc]}", "required_text": "equal",
                    "pass": same})
    return out


# ---------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------


def _rate(rows_per_s: float, wl: str) -> str:
    if wl == "atari":
        return f"{rows_per_s * WORKLOADS[wl].row_bytes / 1e9:.2f} GB/s"
    for div, unit in ((1e6, "M"), (1e3, "k")):
        if rows_per_s >= div:
            return f"{rows_per_s / div:.2f}{unit}/s"
    return f"{rows_per_s:.0f}/s"


def _fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"({r:.2f})"


def targets_grid(targets: list[dict]) -> str:
    """The table of targets: each one's measured value, what it requires, PASS/FAIL/n/a."""
    body = []
    for t in targets:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        body.append([t["target"], shown, t["required_text"], verdict])
    return _grid(["target", "measured", "required", ""], body)


def _grid(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def table(doc: dict) -> str:
    m, out = doc["medians"], [header(doc)]
    order = {k: i for i, k in enumerate(contenders.ORDER)}
    rn = lambda k: contenders.label(k)  # noqa: E731
    groups = sorted({(r["workload"], r["capacity"]) for r in m["single"]}, key=lambda x: (x[0], x[1]))
    for wl, cap in groups:
        rows = {}
        for r in m["single"]:
            if (r["workload"], r["capacity"]) == (wl, cap):
                rows.setdefault(r["contender"], {})[r["scenario"]] = r
        scens = [s for s in SINGLE + PARALLEL if any(s in v for v in rows.values())]
        unit = "GB/s" if wl == "atari" else "rows/s"
        out.append(f"\n{wl}, capacity {cap:,} ({WORKLOADS[wl].row_bytes:,} B rows): {unit}, (ratio to the limit); medians of {max(r['reps'] for v in rows.values() for r in v.values())} round(s)")
        body = []
        for k in sorted(rows, key=order.get):
            body.append([rn(k)] + [f"{_rate(rows[k][s]['rows_per_s'], wl)} {_fmt_ratio(rows[k][s]['ratio_to_limit'])}" if s in rows[k] else "-" for s in scens])
        out.append(_grid(["contender"] + [TITLES[s] for s in scens], body))
    for wl in sorted({r["workload"] for r in m["concurrent"]}):
        rows = sorted((r for r in m["concurrent"] if r["workload"] == wl), key=lambda r: order[r["contender"]])
        cap = rows[0]["capacity"]
        cfg = doc["config"]
        out.append(f"\nconcurrent {wl}, capacity {cap:,}: 2 writer processes (batches of {cfg['writer_batch']}) + 1 sampler process "
                   f"(batches of {cfg['conc_sample_batch'][wl]}, every row checked) for {cfg['conc_seconds']:g} s")
        body = [[rn(r["contender"]), f"{r['inserts_per_s']:,.0f}", f"{r['sampled_per_s']:,.0f}", f"{r['gb_per_s']:.2f}",
                 _fmt_ratio(r["ratio_to_limit"]), f"{r['torn_rows']:,}", f"{r['checked_rows']:,}"] for r in rows]
        out.append(_grid(["contender", "inserts/s", "sampled rows/s", "GB/s", "vs limit", "torn rows", "rows checked"], body))
    if m["scale"]:
        out.append("\nscale (control): sample(256) in a freshly attached process; its file descriptors and mappings beyond a process with the same imports")
        body = [[rn(r["contender"]), f"{r['capacity']:,}", f"{r['sample_us']:.1f}", _fmt_ratio(r["cost_vs_smallest"]),
                 ",".join(map(str, r["fds"])), ",".join(map(str, r["maps"]))] for r in sorted(m["scale"], key=lambda r: (order[r["contender"]], r["capacity"]))]
        out.append(_grid(["contender", "capacity", "us/sample", "vs smallest", "fds", "shared mappings"], body))
    if doc["targets"]:
        out.append("\ntargets (issue 10), shmreplay:")
        out.append(targets_grid(doc["targets"]))
    for k, why in doc["skipped"].items():
        out.append(f"\nskipped {rn(k)}: {why}")
    for e in doc["errors"]:
        out.append(f"\nERROR round {e['rep'] + 1} {e['scenario']} {e['workload']} {e['capacity']:,} {e['contender']}: {e['error'].strip().splitlines()[-1]}")
    for r in m["concurrent"]:
        if r["torn_rows"]:
            out.append(f"\ntorn rows seen with {rn(r['contender'])} ({r['workload']}): {r['torn_rows']:,}; first: {r['first_torn']}")
    for n in doc["notes"]:
        out.append(f"\nnote: {n}")
    mi = doc["machine"]
    out.append(f"\nmachine: {mi['cpu']}, {mi['cores_usable']} cores, kernel {mi['kernel']}, Python {mi['python']}, numpy {mi['versions']['numpy']}; "
               f"load average {mi['load_avg_start'][0]:.1f} at start, {mi['load_avg_end'][0]:.1f} at end")
    return "\n".join(out)


def write_json(doc: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def save(doc: dict, path: str) -> None:
    """Writes a script's results to ``path`` with the command that made them, and says so."""
    doc["command"] = " ".join([os.path.relpath(sys.executable), os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(doc, path)
    print(f"\nwrote {path}")


# ---------------------------------------------------------------------------------------
# Chart
# ---------------------------------------------------------------------------------------


def chart(doc: dict, path: str) -> str | None:
    """Bars of the ratio to the limit; returns why no chart was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "no chart: matplotlib is not installed"
    m = doc["medians"]
    order = [k for k in contenders.ORDER if k != "limit"]
    panels = []
    for wl, cap in sorted({(r["workload"], r["capacity"]) for r in m["single"]}):
        rows = [r for r in m["single"] if (r["workload"], r["capacity"]) == (wl, cap)]
        scens = [s for s in SINGLE + PARALLEL if any(r["scenario"] == s for r in rows)]
        vals = {(r["contender"], r["scenario"]): r["ratio_to_limit"] for r in rows}
        panels.append((f"{wl}, capacity {cap:,}", [CHART_LABELS.get(s, TITLES[s]) for s in scens], scens, vals))
    for wl in sorted({r["workload"] for r in m["concurrent"]}):
        rows = [r for r in m["concurrent"] if r["workload"] == wl]
        vals = {(r["contender"], "c"): r["ratio_to_limit"] for r in rows}
        torn = {r["contender"]: r["torn_rows"] for r in rows}
        panels.append((f"concurrent {wl} (2 writers + 1 sampler)", ["aggregate rows/s"], ["c"], vals, torn))
    n = len(panels) + (1 if m["scale"] else 0)
    if not n:
        return "no chart: nothing measured"
    ratios = [v for p in panels for v in p[3].values() if v]
    ylim = (10 ** math.floor(math.log10(min(ratios, default=0.1))), max(2.0, 1.3 * max(ratios, default=1.0)))
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(6 * cols, 4.2 * ((n + cols - 1) // cols)), squeeze=False)
    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(order)}
    for ax, panel in zip(axes.flat, panels):
        title, labels, scens, vals = panel[:4]
        present = [k for k in order if any(vals.get((k, s)) for s in scens)]
        width = 0.8 / max(1, len(present))
        for i, k in enumerate(present):
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(len(scens))]
            ys = [vals.get((k, s)) or 0 for s in scens]
            bars = ax.bar(xs, ys, width, label=contenders.label(k), color=colors[k])
            if len(panel) > 4 and panel[4].get(k):
                for b in bars:
                    ax.annotate(f"{panel[4][k]:,} torn rows", (b.get_x() + b.get_width() / 2, b.get_height() * 0.9),
                                ha="center", va="top", fontsize=8, color="red", rotation=90)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylim(*ylim)  # one scale for every panel: bars compare across panels
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(len(scens)), labels, fontsize=8)
        ax.set_ylabel("ratio to the limit (log)")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both")
    if m["scale"]:
        ax = axes.flat[len(panels)]
        for k in sorted({r["contender"] for r in m["scale"]}, key=order.index):
            rs = sorted((r for r in m["scale"] if r["contender"] == k), key=lambda r: r["capacity"])
            ax.plot([r["capacity"] for r in rs], [r["sample_us"] for r in rs], "o-", label=contenders.label(k), color=colors[k])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("capacity (slots)")
        ax.set_ylabel("us per sample(256)")
        ax.set_title("scale: control sample(256) cost", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=9)
    mi = doc["machine"]
    fig.suptitle(f"shmreplay benches ({doc['mode']}): medians, ratio to plain numpy on the same bytes (dashed = limit) - "
                 f"{mi['cpu']}, {mi['cores_usable']} cores", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------
# Command line: print the report of a results file (nothing is rewritten)
# ---------------------------------------------------------------------------------------



def parse_figures(text: str | None, figures: list[str], ap: argparse.ArgumentParser) -> set[str]:
    """The figures ``--only`` names (by name, or number from 1), all of them by default; an
    unknown one is an ``ap.error``."""
    if not text:
        return set(figures)
    chosen = set()
    for part in text.split(","):
        part = part.strip()
        if part.isdigit() and 1 <= int(part) <= len(figures):
            chosen.add(figures[int(part) - 1])
        elif part in figures:
            chosen.add(part)
        else:
            ap.error(f"unknown figure {part!r}; choose from {','.join(figures)} (or 1-{len(figures)})")
    return chosen


def machine_footer(mi: dict[str, Any], peer: str) -> str:
    """The last line of a report: the machine, the versions (and the peer package's), the load."""
    return (
        f"\nmachine: {mi['cpu']}, {mi['cores_usable']} cores, kernel {mi['kernel']}, Python {mi['python']}, "
        f"numpy {mi['versions']['numpy']}, {peer} {mi['versions'].get(peer)}; "
        f"load average {mi['load_avg_start'][0]:.1f} at start, {mi['load_avg_end'][0]:.1f} at end"
    )

def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Prints the report of a results file of benches/run.py (or of "
                                 "benches/hugepages.py), CPU and copy kernels first. Rewrites nothing: "
                                 "`run.py --report FILE` also redoes the JSON's medians and the chart.")
    ap.add_argument("json", nargs="+", help="results file(s), e.g. benches/results/full.json")
    args = ap.parse_args(argv)
    for i, path in enumerate(args.json):
        with open(path) as f:
            doc = json.load(f)
        if i:
            print()
        print(f"== {path}")
        if doc.get("suite") == "shmreplay hugepages":
            import hugepages

            print(hugepages.table(doc))
            continue
        summarise(doc)
        print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
