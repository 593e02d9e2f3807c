"""A sweep of 4 RL runs with 2 workers against the same runs one after another.

The runs differ only in an RL key, so they share the cached upstream stages (built once before
the timing starts). ``--workers 1`` runs each with every core's torch threads; ``--workers 2``
runs two at a time with ``cores // 2`` threads each (never oversubscribed). Prints the wall time
of each and the speed-up.

    python benchmarks/sweep_workers.py [--out DIR] [--iterations 20] [key=value ...]

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

AXIS = "kl.coef=0.05,0.1,0.2,0.4"  # 4 arms × 1 seed


def sweep(out: Path, workers: int, overrides: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable, "-m", "instructrl.core.cli", "sweep", "ppo", "--smoke", *overrides,
        "--grid", AXIS, "--workers", str(workers), "--out", str(out),
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-sweep")
    p.add_argument("--iterations", type=int, default=20, help="RL iterations per run")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    out = Path(a.out)
    overrides = [f"rl.iterations={a.iterations}", "eval.every=0", *a.overrides]
    # build (or find) the shared upstream stages first: one RL iteration, not timed
    warm = [
        sys.executable, "-m", "instructrl.core.cli", "run", "ppo", "--smoke", *overrides, "rl.iterations=1",
        "--run-dir", str(out / "warm"), "--overwrite", "--quiet",
    ]  # fmt: skip
    subprocess.run(warm, check=True, capture_output=True)
    cores = os.cpu_count() or 1
    one = sweep(out / "workers1", 1, overrides)
    two = sweep(out / "workers2", 2, overrides)
    print(f"4 RL runs (ppo --smoke, {a.iterations} iterations each, shared upstream), {cores} cores\n")
    print("| workers × threads | wall (s) |")
    print("|---|---|")
    print(f"| 1 × {cores} (one after another) | {one:.1f} |")
    print(f"| 2 × {max(1, cores // 2)} | {two:.1f} |")
    print(f"\nspeed-up of 2 workers: {one / two:.2f}× (target ≥ 1.5×)")


if __name__ == "__main__":
    main()
