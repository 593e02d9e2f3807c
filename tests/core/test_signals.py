"""SIGINT / SIGTERM: stop at the next safe point with a checkpoint, exit 130 / 143, resume exactly;
a second signal stops at once; a sweep forwards the signal to its runs (docs/reliability.md).

The signals are real (``os.kill`` of this process at a fixed point, through the test-only switch
``INSTRUCTRL_FAULT_KILL_AT=<point>@<SIGNAL>``), delivered to the launcher running in-process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from instructrl.core import faults
from instructrl.core.cli import main
from instructrl.core.training import Interrupted, install_stop_handlers, stop_requested
from instructrl.plugins.commands import sweep

RL = ["rl.iterations=4", "rl.checkpoint_every=1", "eval.every=0", "stages=[rl]"]


def run(capsys, monkeypatch, run_dir: Path, kill_at: str | None, *extra: str) -> tuple[int, str]:
    if kill_at:
        monkeypatch.setenv(faults.KILL_AT_ENV, kill_at)
    else:
        monkeypatch.delenv(faults.KILL_AT_ENV, raising=False)
    faults.reset()
    code = main(["run", "ppo", "--smoke", "--quiet", "--run-dir", str(run_dir), *RL, *extra])
    return code, capsys.readouterr().err


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "rl" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["run/status"]


def test_sigterm_and_sigint_stop_after_a_step_with_a_checkpoint_and_resume_to_the_same_run(
    tmp_path, capsys, monkeypatch
):
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    term, intr = tmp_path / "term", tmp_path / "int"
    # SIGTERM after the 6th optimiser step: the middle of iteration 1 (4 steps per iteration)
    code, err = run(capsys, monkeypatch, term, "rl:batch:6@SIGTERM")
    assert code == 143, err
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert line == [
        f"interrupted (SIGTERM, checkpoint written): run dir {term}; resume with: instructrl run ppo --smoke "
        f"--quiet {' '.join(RL[:3])} 'stages=[rl]' --run-dir {term} --resume"
    ], err
    assert status(term) == "interrupted"
    ckpt = torch.load(term / "rl" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["instructrl_iteration"]["micro_steps_done"] == 2  # mid-iteration
    assert len(rows(term)) == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    # SIGINT (Ctrl-C) after the 11th step: iteration 2
    code, err = run(capsys, monkeypatch, intr, "rl:batch:11@SIGINT")
    assert code == 130 and "interrupted (SIGINT, checkpoint written)" in err, err
    assert status(intr) == "interrupted" and len(rows(intr)) == 2
    # both resume to completion, to the same rows and weights (test_resume.py: = the straight run)
    for d in (term, intr):
        code, err = run(capsys, monkeypatch, d, None, "--resume")
        assert code == 0 and status(d) == "completed", err
    assert rows(term) == rows(intr) and len(rows(term)) == 4
    model = Path("rl") / "model" / "model.safetensors"
    assert (term / model).read_bytes() == (intr / model).read_bytes()


def test_a_second_signal_stops_at_once():
    restore = install_stop_handlers()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: a request, no exception
        time.sleep(0.05)
        assert stop_requested() == signal.SIGINT
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        assert info.value.at_once and info.value.exit_code == 143
    finally:
        restore()
    assert stop_requested() is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sweep_forwards_its_signal_to_each_run_group_and_records_it_interrupted(tmp_path):
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    sweep._stop([proc], grace=5, sig=signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM
    task = sweep.RunTask("r", "ppo", [], str(tmp_path / "run"), str(tmp_path / "r.log"), True, "fresh", 1, {})
    (tmp_path / "r.log").write_text("=== cmd\n")
    for rc in (130, 143, -signal.SIGINT, -signal.SIGTERM):
        assert sweep.classify(task, rc, 1.0).status == "interrupted", rc


@pytest.mark.skipif(sweep._PRCTL is None, reason="PR_SET_PDEATHSIG is Linux-only")
def test_a_run_gets_sigterm_when_the_sweep_thread_that_started_it_dies():
    started: list[subprocess.Popen[bytes]] = []

    def launcher() -> None:  # a sweep worker thread; it ends like a SIGKILLed sweep would
        started.append(subprocess.Popen(["sleep", "30"], preexec_fn=sweep._die_with_parent))

    t = threading.Thread(target=launcher)
    t.start()
    t.join()
    assert started[0].wait(timeout=10) == -signal.SIGTERM
