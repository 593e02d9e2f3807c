"""The RL smoke recipe on 2 CPU processes through the launcher.

Lightning's DDP relaunches the command line for rank 1, so this runs in a subprocess rather than
inside pytest's own process. The upstream stages come from the session's stage cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_rl_smoke_runs_on_two_cpu_processes(smoke_pipeline, cache_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "INSTRUCTRL_CACHE_DIR": cache_dir, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "instructrl.core.cli",
        "run",
        "ppo",
        "--smoke",
        "--quiet",
        "--run-dir",
        str(run_dir),
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "eval.every=0",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run/status"] == "completed"
    # each rank generates its own rollouts: 2 processes × 8 prompts × 1 sample × 2 iterations
    assert summary["rl/episodes"] == 2 * 8 * 2
    # every stage ran under DDP: trainer.devices changes the effective batch, so it is part of the
    # upstream cache key and pretrain/SFT/RM were built (once, by rank 0's lock) for 2 processes
    for stage in ("pretrain", "sft", "rm"):
        entry = (run_dir / stage).resolve()
        assert entry != (smoke_pipeline[0] / stage).resolve(), stage
        assert (entry / "complete.json").is_file() and (entry / "model" / "config.json").is_file(), stage
    assert (run_dir / "rl" / "model" / "config.json").is_file()
    assert summary["eval/n_prompts"] == 16
