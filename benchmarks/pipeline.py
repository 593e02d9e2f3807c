"""The InstructGPT pipeline's targets, measured.

Runs (or reads, with --reuse) two runs that share pretrain/SFT/RM through the stage cache:

1. ``instructrl run instructgpt``            — the README's main command (PPO-ptx, γ = 27.8)
2. ``instructrl run instructgpt ptx.coef=0`` — the same without ptx (the alignment-tax comparison)

and prints one table against the targets: wall time, RM accuracy vs its labeler ceiling (and by
kind of pair), win rates at T=1 and greedy, strict wins/losses, KL, and how much of the
pretraining-loss rise ptx recovers. Wall times are only meaningful on an otherwise idle machine.

    python benchmarks/pipeline.py --out runs/bench [--seeds 0 1] [--reuse] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(recipe: str, run_dir: Path, overrides: list[str], reuse: bool) -> dict:
    summary = run_dir / "summary.json"
    if reuse and summary.is_file() and json.loads(summary.read_text()).get("run/status") == "completed":
        return json.loads(summary.read_text())
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "instructrl.core.cli",
        "run",
        recipe,
        "--run-dir",
        str(run_dir),
        "--overwrite",
        "--quiet",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(summary.read_text())
    out["bench/process_s"] = time.perf_counter() - t0
    return out


def row(label: str, value: float | str | None, target: str = "", ok: bool | None = None) -> str:
    v = f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))
    mark = "" if ok is None else (" ✓" if ok else " ✗")
    return f"| {label} | {v} | {target}{mark} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--reuse", action="store_true", help="read finished runs instead of running them again")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    for seed in args.seeds:
        ptx = run("instructgpt", out / f"ptx-seed{seed}", [f"seed={seed}", *args.overrides], args.reuse)
        nop = run(
            "instructgpt",
            out / f"noptx-seed{seed}",
            [f"seed={seed}", "ptx.coef=0", *args.overrides],
            args.reuse,
        )
        g = ptx.get
        rise = nop["eval/pretrain_loss"] - nop["eval/pretrain_loss_sft"]
        recovered = (
            (nop["eval/pretrain_loss"] - ptx["eval/pretrain_loss"]) / rise if rise > 0 else float("nan")
        )
        strict_ratio = g("eval/strict_win", 0.0) / max(g("eval/strict_loss", 0.0), 1e-9)
        lines = [
            f"\n### seed {seed}\n",
            "| quantity | value | target |",
            "|---|---|---|",
            row(
                "pipeline wall time (s), `run instructgpt`",
                g("time/total_s"),
                "≤ 900",
                g("time/total_s", 1e9) <= 900,
            ),
            row(
                "RM accuracy vs gold (held out, non-tied)",
                g("rm/accuracy"),
                "≥ 0.75",
                g("rm/accuracy", 0) >= 0.75,
            ),
            row("labeler ceiling", g("rm/labeler_ceiling")),
            *[
                row(
                    f"RM accuracy, {k.split('/')[-1]} pairs (n={int(g('rm/n_pairs/' + k.split('/')[-1], 0))})",
                    v,
                )
                for k, v in sorted(ptx.items())
                if k.startswith("rm/accuracy/")
            ],
            row(
                "win rate vs SFT, T=1 (ties ½)",
                g("eval/win_rate_vs_sft"),
                "≥ 0.60",
                g("eval/win_rate_vs_sft", 0) >= 0.6,
            ),
            row(
                "strict wins / strict losses",
                f"{g('eval/strict_win'):.3f} / {g('eval/strict_loss'):.3f} = {strict_ratio:.2f}×",
                "≥ 2×",
                strict_ratio >= 2,
            ),
            row("win rate vs SFT, greedy", g("eval/win_rate_vs_sft_greedy")),
            row("gold score RL / SFT (T=1)", f"{g('eval/gold_score'):.3f} / {g('eval/gold_score_sft'):.3f}"),
            row("KL to SFT (nats / response)", g("eval/kl_to_sft")),
            row(
                "pretrain-text loss: base / SFT",
                f"{g('eval/pretrain_loss_base'):.4f} / {g('eval/pretrain_loss_sft'):.4f}",
            ),
            row("pretrain-text loss: RL without ptx", nop["eval/pretrain_loss"], "> SFT", rise > 0),
            row("pretrain-text loss: RL with ptx", ptx["eval/pretrain_loss"]),
            row("share of the rise ptx recovers", recovered, "≥ 0.5", recovered >= 0.5),
            row("win rate vs SFT without ptx, T=1", nop["eval/win_rate_vs_sft"]),
        ]
        print("\n".join(lines))
        print(f"\nruns: {out / f'ptx-seed{seed}'}  {out / f'noptx-seed{seed}'}")


if __name__ == "__main__":
    main()
