"""Time for examples/apex_dqn.py to learn CartPole-v1, fed by shmreplay or by a single-process
NumPy buffer (same learner, network, envs and hyper-parameters), and its throughput on Pong.

    make bench-apex                              # 3 seeds x 2 buffers (10 min budget each) + Pong
    .venv/bin/python benches/apex.py --seeds 0 1 2 --pong-minutes 3 --out benches/results

Runs one after another (each run uses both cores). Prints a table; writes apex.json (every run's
summary and score curve) and apex_cartpole.png (score against wall time, every run) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "examples", "apex_dqn.py")
sys.path.insert(0, HERE)

from sysinfo import cpu_info, describe_cpu  # noqa: E402


def run(args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, EXAMPLE, "--plot", "", "--json-out", out, *args]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
    result["args"] = args
    return result


def plot(runs: list[dict[str, Any]], path: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"shmreplay": "tab:blue", "numpy": "tab:orange"}
    for r in runs:
        if r["curve"]:
            t, s = zip(*r["curve"])
            ax.plot(t, s, color=colors[r["buffer"]], alpha=0.8, label=f"{r['buffer']}, seed {r['seed']}")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("mean return, last 20 greedy-end episodes")
    ax.set_title("Ape-X DQN on CartPole-v1, 2 actors x 4 envs (shmreplay) vs one process (numpy)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0, help="budget of each CartPole run")
    p.add_argument("--pong-minutes", type=float, default=3.0, help="0: no Pong run")
    p.add_argument("--quick", action="store_true", help="one seed, 1 minute, no Pong (a smoke run)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.minutes, args.pong_minutes = args.seeds[:1], 1.0, 0.0
    os.makedirs(args.out, exist_ok=True)
    runs = [
        run(["--buffer", buffer, "--seed", str(seed), "--minutes", str(args.minutes)])
        for seed in args.seeds
        for buffer in ("shmreplay", "numpy")
    ]
    pong = run(["--env", "ALE/Pong-v5", "--no-target", "--minutes", str(args.pong_minutes)]) if args.pong_minutes > 0 else None

    cpu = cpu_info()
    print(f"\nCartPole-v1, time to a mean return >= 475 (budget {args.minutes:g} min); {describe_cpu(cpu)}")
    print(f"{'buffer':<10} {'seed':>4} {'reached':>9} {'env steps/s':>12} {'updates/s':>10}")
    medians = {}
    for buffer in ("shmreplay", "numpy"):
        mine = [r for r in runs if r["buffer"] == buffer]
        for r in mine:
            reached = "no" if r["reached_target_s"] is None else f"{r['reached_target_s']:.0f} s"
            print(f"{buffer:<10} {r['seed']:>4} {reached:>9} {r['env_steps_per_s']:>12,.0f} {r['updates_per_s']:>10,.0f}")
        # a run that did not reach the target counts as the whole budget (a lower bound)
        times = [args.minutes * 60 if r["reached_target_s"] is None else r["reached_target_s"] for r in mine]
        medians[buffer] = statistics.median(times)
        print(f"{buffer:<10} median {medians[buffer]:.0f} s")
    if pong is not None:
        print(
            f"\nALE/Pong-v5 for {args.pong_minutes:g} min: {pong['env_steps_per_s']:,.0f} env steps/s, "
            f"{pong['updates_per_s']:,.1f} updates/s of batch 128, score {pong['score']:.1f}"
        )
    with open(os.path.join(args.out, "apex.json"), "w") as f:
        json.dump({"cpu": cpu, "minutes": args.minutes, "median_s": medians, "runs": runs, "pong": pong}, f, indent=1)
    plot(runs, os.path.join(args.out, "apex_cartpole.png"), 475.0)
    print(f"wrote {os.path.join(args.out, 'apex.json')} and apex_cartpole.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
