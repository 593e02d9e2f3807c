"""Does ``torch.compile`` pay on this CPU? The rollout's fused decode step and the training
forward + backward, eager against compiled, on the two models of ``benchmarks/peer_trl.py``.

For each: eager s/call, compiled s/call (after warm-up), the compile time (first compiled calls
minus eager calls), and the calls it takes to earn the compile time back, beside the calls one RL
run makes (the GRPO job of peer_trl.py: 31 decode steps and 1 training forward per iteration;
a typical run is 100–200 iterations). Adopt only where the break-even is well inside a run.

    python benchmarks/compile.py [--threads 2] [--models small,medium] [--calls 30] [--parts decode,train]

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = {"small": (128, 2, 256, 4), "medium": (512, 6, 1024, 8)}  # hidden, layers, intermediate, heads
BATCH, PROMPT, NEW = 64, 15, 32  # peer_trl.py's job: 16 prompts × 4 samples, 15-token prompts, 32 new tokens
VOCAB = 512


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads = MODELS[name]
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
        attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def timed(fn, calls: int) -> tuple[float, float]:
    """(first call's seconds, median seconds of the next ``calls``)."""
    t0 = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t0
    times = []
    for i in range(1, calls + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def decode_case(model: torch.nn.Module, compiled: bool, calls: int) -> tuple[float, float]:
    from instructrl.plugins.engine import LlamaDecodeStep, new_kv_cache

    ids = torch.randint(0, VOCAB, (BATCH, PROMPT))
    cache, static = new_kv_cache(model, PROMPT + NEW)
    assert static, "the benchmark needs a StaticCache"
    mask = torch.ones(BATCH, PROMPT + NEW, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    step = LlamaDecodeStep.build(model, cache)
    assert step is not None
    # dynamic: the cache slot ``index`` changes every step; specialised on it, dynamo would
    # recompile per step until its recompile limit and then fall back to eager
    fn = torch.compile(step.__call__, dynamic=True) if compiled else step.__call__
    attn = torch.ones(BATCH, 1, 1, PROMPT + NEW, dtype=torch.bool)
    tok = torch.randint(0, VOCAB, (BATCH,))

    def call(i: int) -> None:
        t = i % (NEW - 1)
        with torch.no_grad():
            fn(tok, torch.full((BATCH, 1), PROMPT + t), PROMPT + t, attn)

    return timed(call, calls)


def train_case(model: torch.nn.Module, compiled: bool, calls: int) -> tuple[float, float]:
    ids = torch.randint(0, VOCAB, (BATCH, PROMPT + NEW))
    fwd = torch.compile(model) if compiled else model
    model.train()

    def call(i: int) -> None:
        logits = fwd(input_ids=ids).logits
        loss = torch.log_softmax(logits.float(), -1)[..., 0].mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    out = timed(call, calls)
    model.eval()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="small,medium")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--parts", default="decode,train", help="decode, train or both")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model_name = re.search(r"model name\s*:\s*(.+)", flags)
    present = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)]
    print(f"CPU: {model_name.group(1) if model_name else 'unknown'}; flags {' '.join(present)}; "
          f"torch {torch.__version__}; {a.threads} threads; {a.calls} timed calls per case")  # fmt: skip
    per_run = {"decode step": 31 * 150, "training forward + backward": 1 * 150}  # 150 iterations
    lines = [
        "",
        "| model | part | eager s/call | compiled s/call | speed-up | compile s | break-even calls | calls in a 150-iteration run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for name in a.models.split(","):
        model = build(name)
        cases = {"decode": ("decode step", decode_case), "train": ("training forward + backward", train_case)}
        for part, case in (cases[k] for k in a.parts.split(",")):
            torch._dynamo.reset()
            e_first, eager = case(model, False, a.calls)
            c_first, comp = case(model, True, a.calls)
            compile_s = c_first - e_first
            gain = eager - comp
            even = f"{compile_s / gain:.0f}" if gain > 0 else "never"
            lines.append(
                f"| {name} | {part} | {eager * 1e3:.2f} ms | {comp * 1e3:.2f} ms | {eager / comp:.2f}× "
                f"| {compile_s:.1f} | {even} | {per_run[part]} |"
            )
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
