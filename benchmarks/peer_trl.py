"""instructrl against TRL's GRPOTrainer (and RLOOTrainer) on the same job, each in its own process.

The job (the one the performance issue was measured on): a random-init Llama and a 512-token
byte-level BPE tokenizer trained locally (``instructrl.plugins.models.train_tokenizer``), saved as HF
dirs; 16 prompts × 4 samples × 32 new tokens; GRPO advantages, the k3 KL in the loss at β = 0.04;
1 epoch × 1 minibatch; lr 1e-4 constant; AdamW eps 1e-5, grad-norm clip 1; fp32 (unless the row
says bf16-mixed); 2 threads. Both frameworks get the identical 16 prompts and the same Python
reward function (:func:`reward`).

Per-step cost is the slope between a short and a long run (fixed costs — imports, model loading,
saving — cancel). For every job the table gives s/step of each framework, the ratio, our per-phase
split (the RL stage's ``time/*_s`` metrics), the nominal model FLOPs per step (the same count for
both frameworks: ``2 × params × tokens`` for each forward of the job — generation, policy,
reference — and twice that for the backward) and that rate as a fraction of the host's fp32
matmul rate (a 1024×1024 matmul on the same threads, measured in this run), and the peak RSS of
each process. Then the reward after equal samples over 3 seeds with matched settings, an RLOO row
and a 32k-vocabulary memory row (peak RSS with and without the chunked log-softmax). Overheads:
per job, our per-step time outside the four phases (the Lightning loop, logging, optimiser
bookkeeping) and each framework's fixed cost (the intercept of the two runs: imports, model load,
saving); and the start-up steps of ``instructrl run`` (import, registry, validation) timed alone.

    python benchmarks/peer_trl.py [--quick] [--out DIR] [--only ours|trl] [--jobs small,medium,...] [--threads 2]

Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = int(os.environ.get("INSTRUCTRL_BENCH_THREADS", "2"))  # --threads sets it for the workers
PROMPTS, SAMPLES, NEW_TOKENS = 16, 4, 32
BETA, LR = 0.04, 1e-4
REWARD_LR = 3e-3  # the reward comparison: at 1e-4 a random-init model does not move in 40 steps

MODELS = {  # name: (hidden, layers, intermediate, heads, extra vocabulary)
    "small": (128, 2, 256, 4, 0),  # 0.39M parameters
    "medium": (512, 6, 1024, 8, 0),  # 16.0M parameters
    "vocab32k": (128, 2, 256, 4, 32_000 - 512),  # 4.4M, of which 4.1M embedding
}


# --------------------------------------------------------------------------------------------
# The reward both frameworks optimise (TRL's and instructrl's callable-reward signature)
# --------------------------------------------------------------------------------------------


def reward(prompts: list[str], completions: list[str], **fields: object) -> list[float]:
    """Share of the completion's characters that are letters of the prompt's input string (0 for an
    empty completion): learnable from random init, identical text in, identical number out."""
    inputs = fields.get("input") or [""] * len(completions)
    out = []
    for text, letters in zip(completions, inputs):  # type: ignore[call-overload]
        text = str(text)
        out.append(sum(ch in str(letters) for ch in text) / len(text) if text else 0.0)
    return out


# --------------------------------------------------------------------------------------------
# Models and prompts (built once)
# --------------------------------------------------------------------------------------------


def build_assets(out: Path) -> dict[str, object]:
    """The tokenizer, the models and the prompt file under ``out``; returns their description."""
    import torch
    from instructrl.plugins.models import count_parameters, save_model_dir, train_tokenizer
    from instructrl.plugins.tasks.world import World, WorldConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    info_file = out / "assets.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    world = World(
        WorldConfig(
            seed=0, n_pretrain_docs=2000, n_demos=10, n_rank_prompts=10, n_rank_eval_prompts=10,
            n_rl_prompts=PROMPTS, n_eval_prompts=8,
        )
    )  # fmt: skip
    prompts = world.prompts("rl")[:PROMPTS]
    for file, rows in (("prompts.jsonl", prompts), ("eval_prompts.jsonl", world.prompts("eval"))):
        with open(out / file, "w") as f:  # the eval prompts are never used (eval.every=0, stages [rl])
            for p in rows:
                f.write(json.dumps({"prompt": p.text, "input": p.fields["input"]}) + "\n")
    texts = list(world.pretraining_text("train")) + [p.text for p in prompts]
    info: dict[str, object] = {}
    for name, (hidden, layers, inter, heads, extra) in MODELS.items():
        tok = train_tokenizer(texts, "bpe", 512)
        if extra:
            tok.add_tokens([f"<x{i}>" for i in range(extra)])
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        save_model_dir(model, tok, out / name)
        ids = [tok(p.text)["input_ids"] for p in prompts]
        info[name] = {
            "params": count_parameters(model),
            "vocab": len(tok),
            "prompt_len": max(len(i) for i in ids),
            "config": f"Llama hidden {hidden}, {layers} layers, MLP {inter}, {heads} heads, vocab {len(tok)}",
        }
    info_file.write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------------------------
# Workers (one process each)
# --------------------------------------------------------------------------------------------


def ours_overrides(a: argparse.Namespace, run_dir: Path) -> list[str]:
    assets = Path(a.assets)
    out = [
        "stages=[rl]", "task.name=jsonl", f"task.prompts={assets / 'prompts.jsonl'}",
        f"task.eval_prompts={assets / 'eval_prompts.jsonl'}",
        f"policy.model={assets / a.model}", "reward.name=callable", "reward.fn=peer_trl:reward",
        "reward_transforms=[]", f"advantage.name={a.algo}", f"rollout.samples_per_prompt={SAMPLES}",
        f"rollout.prompts_per_iteration={PROMPTS}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", "kl.estimator=k3", "kl.controller=fixed", f"kl.coef={BETA}",
        "kl.placement=loss", "objective.name=ppo_clip", "objective.aggregation=token_mean", "rl.epochs=1",
        "rl.minibatches=1", f"rl.lr={a.lr}", "rl.weight_decay=0.0", "rl.grad_clip=1.0", f"rl.iterations={a.steps}",
        "rl.checkpoint_every=1000000", "eval.every=0", f"seed={a.seed}", f"precision={a.precision}",
        "loggers=[csv]", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if a.algo == "rloo":  # TRL's RLOOTrainer puts β·KL (k1, summed over the sequence) in the reward
        out += ["kl.placement=reward", "kl.estimator=k1"]
    return out + list(a.extra or [])


def worker_ours(a: argparse.Namespace) -> dict[str, object]:
    import csv

    import torch

    torch.set_num_threads(THREADS)
    sys.path.insert(0, str(HERE))
    from instructrl.core.api import run
    from instructrl.core.cli import quiet_libraries

    quiet_libraries()
    run_dir = Path(tempfile.mkdtemp(prefix="peer-ours-"))
    t0, c0 = time.perf_counter(), time.process_time()
    run("ppo", ours_overrides(a, run_dir), run_dir=run_dir / "run", log=lambda *x: None, overwrite=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = list(csv.DictReader(open(run_dir / "run" / "rl" / "metrics.csv")))
    rows = [r for r in rows if r.get("reward/raw")]
    phases = {}
    for key in rows[0]:
        if key.startswith("time/"):
            vals = [float(r[key]) for r in rows[1:] if r.get(key)] or [float(rows[0][key] or 0)]
            phases[key[5:-2]] = sum(vals) / len(vals)
    keep = ("invariant/ratio_dev", "forwards/skipped_old", "forwards/skipped_reference")
    return {
        "wall": wall,
        "cpu": cpu,
        "rewards": [float(r["reward/raw"]) for r in rows],
        "phases": phases,
        "extra": {k: float(rows[-1][k]) for k in keep if rows[-1].get(k)},
    }


def worker_trl(a: argparse.Namespace) -> dict[str, object]:
    import torch

    torch.set_num_threads(THREADS)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = Path(a.assets)
    rows = [json.loads(line) for line in open(assets / "prompts.jsonl")]
    data = datasets.Dataset.from_list(rows)
    model_dir = str(assets / a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="peer-trl-"), per_device_train_batch_size=PROMPTS * SAMPLES,
        gradient_accumulation_steps=1, num_generations=SAMPLES, max_completion_length=NEW_TOKENS,
        temperature=1.0, top_k=0, top_p=1.0, beta=BETA, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, adam_epsilon=1e-5, weight_decay=0.0, max_grad_norm=1.0, num_iterations=1,
        epsilon=0.2, max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        bf16=a.precision == "bf16-mixed", seed=a.seed, data_seed=a.seed, dataloader_num_workers=0,
        disable_dropout=True, disable_tqdm=True, loss_type="dapo",
    )  # fmt: skip
    for item in (
        a.extra or []
    ):  # key=value (JSON values) on top of TRL's defaults, e.g. gradient_checkpointing=false
        key, _, value = item.partition("=")
        common[key] = json.loads(value)
    if a.algo == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

        common.pop("loss_type")  # RLOO: the KL (k1, β) in the reward, like ours below
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

        common["scale_rewards"] = "group"
    config = Config(**common)
    trainer = Trainer(
        model=model, reward_funcs=[reward], args=config, train_dataset=data, processing_class=tok
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "wall": wall,
        "cpu": cpu,
        "rewards": [float(h["reward"]) for h in logs],
        "phases": {},
        "extra": {},
    }


# --------------------------------------------------------------------------------------------
# The parent: runs workers, takes slopes, prints the table
# --------------------------------------------------------------------------------------------


def spawn(framework: str, model: str, steps: int, seed: int, args: argparse.Namespace, **kw: object) -> dict:
    """Run one worker process; its result plus its peak RSS (MB, from ``wait4``)."""
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", framework, "--assets", str(args.assets_dir),
        "--model", model, "--steps", str(steps), "--seed", str(seed), "--result", str(result),
        "--algo", str(kw.get("algo", "grpo")), "--precision", str(kw.get("precision", "32")),
        "--lr", str(kw.get("lr", LR)),
    ]  # fmt: skip
    for e in kw.get("extra", ()):  # type: ignore[attr-defined]
        cmd += ["--extra", str(e)]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    env.update({"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    log = open(result.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = result.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{tail}")
    out = json.loads(result.read_text())
    out["rss_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return out


def slope(framework: str, model: str, short: int, long: int, args: argparse.Namespace, **kw: object) -> dict:
    a = spawn(framework, model, short, 0, args, **kw)
    b = spawn(framework, model, long, 0, args, **kw)
    per_step = (b["wall"] - a["wall"]) / (long - short)
    return {
        "s_per_step": per_step,
        "fixed_s": a["wall"] - short * per_step,  # the intercept: start-up, model load, save
        "rss_mb": max(a["rss_mb"], b["rss_mb"]),
        "phases": b["phases"],
        "extra": b["extra"],
    }


STARTUP = [  # (label, command after the interpreter): start-up costs of the launcher, each a fresh process
    ("import the package (`import instructrl.core.cli`)", ["-c", "import instructrl.core.cli"]),
    ("load the registry (`instructrl plugins --json`)", ["-m", "instructrl.core.cli", "plugins", "--json"]),
    ("resolve and validate a recipe (`instructrl run ppo --smoke --dry-run`)",
     ["-m", "instructrl.core.cli", "run", "ppo", "--smoke", "--dry-run", "--quiet"]),
]  # fmt: skip


def startup_lines(repeats: int) -> list[str]:
    """Wall seconds (median of ``repeats`` fresh processes) of each start-up step of ``instructrl run``."""
    lines = ["", "Start-up of `instructrl run` (fresh processes, median of " f"{repeats}):", "",
             "| step | wall (s) |", "|---|---|"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "PYTHONWARNINGS": "ignore"}
    for label, argv in STARTUP:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *argv], capture_output=True, env=env, check=True)
            times.append(time.perf_counter() - t0)
        lines.append(f"| {label} | {sorted(times)[len(times) // 2]:.2f} |")
        print(lines[-1], flush=True)
    return lines


def matmul_rate() -> float:
    """The host's fp32 matmul rate (FLOP/s): 1024×1024 @ 1024×1024 on ``THREADS`` threads."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0)


def nominal_flops(params: int, prompt_len: int) -> float:
    """Model FLOPs of one step: generation, policy and reference forwards (2·N·T each) and the
    policy backward (4·N·T), ``T`` = sequences × (prompt + response) tokens."""
    tokens = PROMPTS * SAMPLES * (prompt_len + NEW_TOKENS)
    return (2 + 2 + 2 + 4) * params * tokens


def header() -> list[str]:
    import torch
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()  # type: ignore[union-attr]
    except Exception:
        cpu = platform.processor() or "unknown"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if re.search(rf"\b{f}\b", flags)]
    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    return [
        f"CPU: {cpu}; bf16 flags: {', '.join(bf16) or 'none (bf16 emulated)'}; "
        f"torch capability {torch.backends.cpu.get_cpu_capability()}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_v}; {THREADS} threads",
    ]


JOBS = [  # (key, label, model, framework → worker options)
    ("small", "GRPO 0.39M fp32", "small", {"ours": {}, "trl": {}}),
    ("medium", "GRPO 16M fp32", "medium", {
        "ours": {}, "trl": {}, "trl, no act. ckpt": {"extra": ["gradient_checkpointing=false"]},
        "ours, 2 micro-batches": {"extra": ["rl.micro_batch_size=32"]},
    }),
    ("bf16", "GRPO 16M bf16-mixed", "medium", {"ours": {"precision": "bf16-mixed"}, "trl": {"precision": "bf16-mixed"}}),
    ("rloo", "RLOO 0.39M fp32", "small", {"ours": {"algo": "rloo"}, "trl": {"algo": "rloo"}}),
    ("vocab32k", "GRPO 4.4M, 32k vocab", "vocab32k", {
        "ours": {}, "ours, full logits": {"extra": ["policy.logits_chunk_mb=null"]}, "trl": {},
    }),
]  # fmt: skip


def main() -> None:
    global THREADS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and seeds (checks the benchmark runs)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "instructrl-peer-trl"))
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one framework's rows only")
    p.add_argument(
        "--jobs", default=",".join([k for k, *_ in JOBS] + ["startup", "reward"]), help="comma-separated"
    )
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads per worker (default 2)")
    # worker mode
    p.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--algo", default="grpo", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="32", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=LR, help=argparse.SUPPRESS)
    p.add_argument("--extra", action="append", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = (worker_ours if args.worker == "ours" else worker_trl)(args)
        Path(args.result).write_text(json.dumps(out))
        return

    THREADS = args.threads
    os.environ["INSTRUCTRL_BENCH_THREADS"] = str(args.threads)
    jobs = args.jobs.split(",")
    args.assets_dir = Path(args.out) / "assets"
    head = header()
    print("\n".join(head), flush=True)
    info = build_assets(args.assets_dir)
    rate = matmul_rate()
    head.append(f"fp32 matmul rate (1024×1024, {THREADS} threads): {rate / 1e9:.1f} GFLOP/s")
    print(head[-1], flush=True)
    short, long = (2, 4) if args.quick else (3, 13)
    lines = [
        "",
        f"Per step: {PROMPTS} prompts × {SAMPLES} samples × {NEW_TOKENS} new tokens; s/step = slope between "
        f"{short} and {long} steps.",
        "",
        "| job | framework | s/step | TRL s/step ÷ ours | ours: rollout / score / reference / train (s) "
        "| ours: untimed per step (s) | fixed cost (s) | nominal GFLOP/step | share of fp32 matmul rate "
        "| peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_medium = None
    for key, label, model, runs in JOBS:
        if key not in jobs:
            continue
        m = info[model]  # type: ignore[index]
        flops = nominal_flops(m["params"], m["prompt_len"])
        results: dict[str, dict] = {}
        for fw, kw in runs.items():
            worker = fw.split(",")[0]
            if args.only and worker != args.only:
                continue
            results[fw] = r = slope(worker, model, short, long, args, **kw)
            ph = r["phases"]
            split = " / ".join(f"{ph.get(k, 0):.3f}" for k in ("rollout", "score", "reference", "train"))
            ratio = ""
            if worker == "ours" and "trl" in runs and not args.only:
                ratio = "(below)"
            if worker == "trl" and "ours" in results:
                ratio = f"{r['s_per_step'] / results['ours']['s_per_step']:.2f}×"
            # what the phases do not cover: the Trainer loop, logging, the optimiser step's bookkeeping
            untimed = r["s_per_step"] - sum(ph.get(k, 0) for k in ("rollout", "score", "reference", "train"))
            lines.append(
                f"| {label} ({m['params'] / 1e6:.2f}M params) | {fw} | {r['s_per_step']:.3f} | {ratio} "
                f"| {split if worker == 'ours' else '–'} | {f'{untimed:.3f}' if worker == 'ours' else '–'} "
                f"| {r['fixed_s']:.1f} | {flops / 1e9:.1f} "
                f"| {flops / r['s_per_step'] / rate:.1%} | {r['rss_mb']:.0f} |"
            )
            print(lines[-1], flush=True)
        if key == "medium" and "ours" in results:
            fp32_medium = results["ours"]["s_per_step"]
        if key == "bf16" and "ours" in results and fp32_medium:
            lines.append(
                f"| (bf16-mixed vs our fp32) | ours | | {fp32_medium / results['ours']['s_per_step']:.2f}× faster | | | | |"
            )
    if "startup" in jobs:
        lines += startup_lines(1 if args.quick else 3)
    if "reward" in jobs:
        steps = 6 if args.quick else 40
        seeds = [0] if args.quick else [0, 1, 2]
        lines += [
            "",
            f"Reward after {steps} steps × {PROMPTS * SAMPLES} samples (GRPO 0.39M, matched settings, lr "
            f"{REWARD_LR:g}; mean training reward of the last 5 steps; the first step's is ~0.095):",
            "",
        ]
        for fw in ["ours", "trl"] if not args.only else [args.only]:
            finals = []
            for seed in seeds:
                rewards = spawn(fw, "small", steps, seed, args, lr=REWARD_LR)["rewards"]
                finals.append(sum(rewards[-5:]) / len(rewards[-5:]))
            per_seed = ", ".join(f"seed {s}: {v:.4f}" for s, v in zip(seeds, finals))
            lines.append(f"- {fw}: {per_seed}; mean {sum(finals) / len(finals):.4f}")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(head + lines))


if __name__ == "__main__":
    main()
