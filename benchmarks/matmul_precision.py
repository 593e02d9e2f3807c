"""How much faster bf16 matmuls are than fp32 on this host, at the shapes of the 16M RL job.

The ceiling of ``precision: bf16-mixed`` over fp32 is set by the matmuls: this prints, for the
decode step of the rollout (one token for each of 64 rows), the training forward (64 × 47
positions) and a large square product, the fp32 and bf16 rates and their ratio, with the CPU
model and its bf16 flags.

    python benchmarks/matmul_precision.py [--threads 2] [--seconds 1.0]

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

# (label, m, k, n): x (m, k) @ w (k, n); the 16M job: hidden 512, MLP 1024, 64 rows, 47 positions
SHAPES = [
    ("decode: q/k/v (64 × 512 @ 512 × 1536)", 64, 512, 1536),
    ("decode: gate/up (64 × 512 @ 512 × 2048)", 64, 512, 2048),
    ("train: gate/up (3008 × 512 @ 512 × 2048)", 3008, 512, 2048),
    ("square (1024 × 1024 @ 1024 × 1024)", 1024, 1024, 1024),
]


def cpu_description() -> str:
    """The CPU model and its bf16-related flags (from /proc/cpuinfo when readable)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    bf16 = sorted(f for f in flags if "bf16" in f or f.startswith("amx"))
    return f"{model}; bf16 flags: {', '.join(bf16) or 'none'}"


def rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float) -> float:
    """GFLOP/s of ``(m, k) @ (k, n)`` in ``dtype`` over about ``seconds`` of repetitions."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        x @ w
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x @ w
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {a.threads} threads")
    print("| shape | fp32 GFLOP/s | bf16 GFLOP/s | bf16 ÷ fp32 |")
    print("|---|---|---|---|")
    for label, m, k, n in SHAPES:
        f32, b16 = rate(m, k, n, torch.float32, a.seconds), rate(m, k, n, torch.bfloat16, a.seconds)
        print(f"| {label} | {f32:.1f} | {b16:.1f} | {b16 / f32:.2f}× |")


if __name__ == "__main__":
    main()
