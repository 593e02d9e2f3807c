"""Exact, complete and safe resume (docs/reliability.md).

A real ``kill -9`` comes from the test-only switch ``INSTRUCTRL_FAULT_KILL_AT`` (core/faults.py) in
a subprocess; the finished run is compared with an uninterrupted one of the same seed: every
``metrics.csv`` row (without ``time/*`` columns), ``summary.json`` (without ``time/*``) and the
final ``model.safetensors`` bytes. The upstream stages of the RL runs come from the session cache.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from instructrl.core import faults
from instructrl.core.cli import main
from omegaconf import OmegaConf

RL = ["rl.iterations=4", "rl.checkpoint_every=1", "eval.every=0", "stages=[rl]"]
SFT = [
    "pretrain.steps=8",
    "task.n_demos=64",
    "sft.epochs=3",
]  # sft: 3 epochs of 3 steps, after a short pretrain
PLAIN = (torch.Tensor, int, float, str, bool, type(None))


def rows(stage_dir: Path) -> list[dict[str, str]]:
    with open(stage_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def weights(stage_dir: Path) -> bytes:
    return (stage_dir / "model" / "model.safetensors").read_bytes()


def summary(run_dir: Path) -> dict[str, object]:
    data = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("time/")}


def assert_same_run(a: Path, b: Path, stages: list[str]) -> None:
    for stage in stages:
        ra, rb = rows(a / stage), rows(b / stage)
        assert len(ra) == len(rb) and ra == rb, stage
        assert weights(a / stage) == weights(b / stage), stage
    assert summary(a) == summary(b)
    assert summary(b)["run/status"] == "completed"


def tree_hash(root: Path) -> str:
    """Names, bytes and link targets of everything under ``root`` (links are not followed)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def launch(run_dir: Path, recipe: str, overrides: list[str], kill_at: str, *, resume: bool, env=None):
    """``instructrl run`` in a subprocess that kills itself at ``kill_at`` (same torch threads as here)."""
    env = {
        **os.environ,
        **(env or {}),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        faults.KILL_AT_ENV: kill_at,
    }
    cmd = [
        sys.executable,
        "-m",
        "instructrl.core.cli",
        "run",
        recipe,
        "--smoke",
        "--quiet",
        "--run-dir",
        str(run_dir),
    ]
    proc = subprocess.run(
        cmd + overrides + (["--resume"] if resume else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc


def cli(capsys, *argv: str) -> tuple[int, str]:
    faults.reset()
    code = main(list(argv))
    return code, capsys.readouterr().err


def run_in_process(capsys, run_dir: Path, recipe: str, overrides: list[str], *extra: str) -> tuple[int, str]:
    return cli(capsys, "run", recipe, "--smoke", "--quiet", "--run-dir", str(run_dir), *overrides, *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted RL smoke run (seed 0) every resumed run is compared with."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    faults.reset()
    assert main(["run", "ppo", "--smoke", "--quiet", "--run-dir", str(run_dir), *RL]) == 0
    return run_dir


def test_kill_9_mid_iteration_and_mid_checkpoint_write_then_a_full_disk_resume_bitwise(
    straight, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    ckpts = run / "rl" / "checkpoints"
    # 1. killed after the 6th optimiser step (iteration 1 of 4 steps each): mid-iteration
    proc = launch(run, "ppo", RL, "rl:batch:6", resume=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(rows(run / "rl")) == 1 and torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 0
    # 2. resumed, killed half way through its 2nd checkpoint write (the one after iteration 2)
    proc = launch(run, "ppo", RL, "checkpoint:write:2", resume=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in ckpts.iterdir() if ".tmp-" in p.name], "the killed write left its temp file"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["epoch"] == 1  # the previous one, intact
    assert [r["iteration"] for r in rows(run / "rl")] == ["0.0", "1.0", "2.0"]  # a row past the checkpoint
    # 3. resumed on a "full disk": its first checkpoint write fails cleanly
    monkeypatch.setenv(faults.ENOSPC_ENV, "1@last.ckpt")
    code, err = run_in_process(capsys, run, "ppo", RL, "--resume")
    assert code == 1, err
    assert "cannot write" in err and str(ckpts / "last.ckpt") in err and "No space left" in err, err
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name], "nothing half-written stays"
    assert json.loads((run / "summary.json").read_text())["run/status"] == "failed"
    monkeypatch.delenv(faults.ENOSPC_ENV)
    # 4. resumed to the end: identical to the uninterrupted run, no row lost or duplicated
    code, err = run_in_process(capsys, run, "ppo", RL, "--resume")
    assert code == 0, err
    assert_same_run(straight, run, ["rl"])
    history = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))["resume_history"]
    assert len(history) == 3 and all(h["changed"] == {} for h in history)


def test_sft_killed_between_stages_and_mid_epoch_resumes_from_the_stage_cache_bitwise(
    tmp_path, capsys, monkeypatch
):
    straight = tmp_path / "straight"
    code, err = run_in_process(capsys, straight, "sft", SFT, "--no-cache")
    assert code == 0, err
    cache = tmp_path / "cache"  # the killed run builds its stages in a cache of its own
    env = {"INSTRUCTRL_CACHE_DIR": str(cache)}
    run = tmp_path / "run"
    # killed after pretrain returned, before its cache entry was marked complete
    proc = launch(run, "sft", SFT, "stage:pretrain:done", resume=False, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (entry,) = [p for p in cache.glob("pretrain-*") if p.is_dir()]
    assert not (entry / "complete.json").exists() and (entry / "checkpoints" / "last.ckpt").is_file()
    # resumed: pretrain continues from its final checkpoint; SFT is killed mid-epoch 2 (step 5 of 9)
    proc = launch(run, "sft", SFT, "sft:batch:5", resume=True, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (entry / "complete.json").is_file()
    (sft_entry,) = [p for p in cache.glob("sft-*") if p.is_dir()]
    assert not (sft_entry / "complete.json").exists()
    ckpt = torch.load(sft_entry / "checkpoints" / "last.ckpt", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 4)  # after the 1st of epoch 1's 3 steps
    monkeypatch.setenv("INSTRUCTRL_CACHE_DIR", str(cache))
    code, err = run_in_process(capsys, run, "sft", SFT, "--resume")
    assert code == 0, err
    assert_same_run(straight, run, ["pretrain", "sft"])


def test_resume_refuses_a_different_config_and_changes_nothing(straight, capsys):
    before = tree_hash(straight)
    code, err = run_in_process(capsys, straight, "ppo", [*RL, "rl.lr=0.5", "seed=3"], "--resume")
    assert code == 2, err
    assert "rl.lr (0.0001 → 0.5)" in err and "seed (0 → 3)" in err and "rl.iterations" in err, err
    assert tree_hash(straight) == before


def test_resume_may_extend_a_run_and_records_the_change(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run, symlinks=True)
    code, err = run_in_process(capsys, run, "ppo", [*RL, "rl.iterations=5"], "--resume")
    assert code == 0, err
    record = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))["resume_history"][-1]
    assert record["changed"] == {"rl.iterations": [4, 5]} and "--resume" in record["command"]
    assert rows(run / "rl")[:4] == rows(straight / "rl") and len(rows(run / "rl")) == 5
    assert summary(run)["rl/iterations"] == 5


def test_nothing_to_resume_is_bad_input(tmp_path, capsys):
    code, err = run_in_process(capsys, tmp_path / "never", "ppo", RL, "--resume")
    assert code == 2 and "nothing to resume" in err and "without --resume" in err, err
    assert not (tmp_path / "never").exists()


def test_a_run_dir_locked_by_a_live_run_is_refused_untouched(straight, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(straight, run, symlinks=True)
    before = tree_hash(run)
    with FileLock(str(run / ".instructrl.lock")):  # "another live run"
        code, err = run_in_process(capsys, run, "ppo", RL, "--overwrite")
    assert code == 2 and str(run / ".instructrl.lock") in err and "another live run" in err, err
    assert tree_hash(run) == before


def test_a_full_disk_at_the_first_write_fails_naming_the_path_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(faults.ENOSPC_ENV, "1")
    code, err = run_in_process(capsys, tmp_path / "run", "ppo", RL)
    assert code == 1 and f"cannot write {tmp_path / 'run' / 'config.yaml'}: No space left" in err, err
    assert not (tmp_path / "run").exists()  # no config.yaml, no temp file, no lock left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_dir_fails_naming_the_path(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, err = run_in_process(capsys, parent / "run", "ppo", RL)
    finally:
        parent.chmod(0o755)
    assert code == 1 and str(parent / "run") in err and "cannot write" in err, err


def test_checkpoints_load_with_weights_only_and_hold_plain_data(straight):
    ckpt = torch.load(straight / "rl" / "checkpoints" / "last.ckpt", weights_only=True)

    def leaves(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    assert all(isinstance(v, PLAIN) for v in leaves(ckpt))
    assert "hyper_parameters" not in ckpt and ckpt["epoch"] == 3
    assert ckpt["instructrl"]["kl_controller"]["coef"] > 0
    state = ckpt["callbacks"]["StageCheckpoint"]
    assert set(state["rng"]) >= {"torch", "python", "numpy"} and "reward/raw" in state["metrics"]


def test_model_code_from_a_model_dir_is_off_by_default(registry):
    import inspect

    from instructrl.core.config import stage_sections
    from instructrl.plugins import models

    for fn in (models.load_tokenizer, models.load_causal_lm, models.load_scalar_head_model):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__
    from instructrl.core.registry import KINDS

    configs = [registry.get(kind, name).config for kind in KINDS for name in registry.names(kind)]
    configs += list(stage_sections(registry).values())
    fields = [
        getattr(c, "__dataclass_fields__", {}).get("trust_remote_code") for c in configs if c is not None
    ]
    defaults = [f.default for f in fields if f is not None]
    assert len(defaults) >= 2 and not any(defaults)
