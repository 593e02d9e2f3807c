"""The RL stage's numerical guard: the first non-finite reward, advantage, return, micro-batch loss
or gradient norm stops the run (RunFailure, exit 1) with one line naming the quantity, the
iteration and the last good checkpoint; no optimiser step and no checkpoint come from the poisoned
state. Plus the pure pieces: the flags helpers and a fully padded row in ``per_token_rewards``."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from instructrl.core.errors import RunFailure
from instructrl.core.types import LossOutput
from instructrl.plugins.stages.common import and_finite, finite_flags, first_non_finite
from instructrl.plugins.stages.rl_step import per_token_rewards

FAST = ["rl.checkpoint_every=1", "eval.every=0"]


def test_per_token_rewards_give_a_fully_padded_row_nothing():
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    kl = torch.tensor([[0.5, 0.25, 9.0], [7.0, 7.0, 7.0]])
    r = per_token_rewards(torch.tensor([2.0, 5.0]), kl, mask, beta=0.2)
    # row 0: -0.2·KL on its tokens and the score on its last one; row 1 (no real token): all zero
    torch.testing.assert_close(r, torch.tensor([[-0.1, 2.0 - 0.05, 0.0], [0.0, 0.0, 0.0]]))
    assert r[1].abs().sum().item() == 0.0


def test_flags_name_the_first_non_finite_quantity_in_insertion_order():
    flags = finite_flags(
        {"raw": torch.tensor([1.0, 2.0]), "skipped": None, "adv": torch.tensor([[0.0, float("nan")]])}
    )
    assert list(flags) == ["raw", "adv"] and all(
        f.dtype == torch.bool and f.dim() == 0 for f in flags.values()
    )
    assert first_non_finite(flags) == "adv"
    assert first_non_finite({}) is None and first_non_finite(finite_flags({"a": torch.ones(3)})) is None
    # and_finite accumulates over micro-batches and hands the loss back untouched
    loss = torch.tensor(1.5, requires_grad=True)
    acc: dict[str, torch.Tensor] = {}
    assert and_finite(acc, "loss", loss) is loss and first_non_finite(acc) is None
    and_finite(acc, "loss", torch.tensor(float("inf")))
    and_finite(acc, "loss", torch.tensor(0.0))  # a later finite micro-batch does not clear it
    assert first_non_finite({**finite_flags({"adv": torch.zeros(2)}), **acc}) == "loss"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_infinite_reward_at_iteration_2_stops_before_any_checkpoint_of_it(run_smoke, tmp_path, monkeypatch):
    from instructrl.plugins import hf
    from instructrl.plugins.stages import rl

    run_dir = tmp_path / "run"
    ckpts = run_dir / "rl" / "checkpoints"
    seen: dict[str, object] = {"iteration": -1}
    original_experience, original_score = rl.rl_step.experience, hf.LearnedReward.score

    def experience(c, s, prompts, iteration, rank, timer):
        seen["iteration"] = iteration
        if iteration == 2:  # the checkpoint of iteration 1 is on disk: remember it byte for byte
            seen["last"] = digest(ckpts / "last.ckpt")
        return original_experience(c, s, prompts, iteration, rank, timer)

    def score(self, inp):
        out = original_score(self, inp)
        if seen["iteration"] == 2:
            out = out.clone()
            out[0] = float("inf")  # one poisoned sample is enough
        return out

    monkeypatch.setattr(rl.rl_step, "experience", experience)
    monkeypatch.setattr(hf.LearnedReward, "score", score)
    with pytest.raises(RunFailure) as err:
        run_smoke(run_dir, "ppo", ["rl.iterations=4", *FAST])
    last = ckpts / "last.ckpt"
    message = str(err.value)
    assert message == f"rl: non-finite raw rewards at iteration 2 (last good checkpoint: {last.resolve()})"
    assert "\n" not in message and seen["iteration"] == 2
    # the last good checkpoint is untouched, from iteration 1, and nothing was saved for iteration 2
    assert digest(last) == seen["last"]
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 < 2
    assert not [p.name for p in ckpts.iterdir() if "epoch=2" in p.name or "epoch=3" in p.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run/status"] == "failed" and summary["run/error"] == message


def test_nan_loss_stops_at_the_first_minibatch_without_an_optimiser_step(run_smoke, tmp_path, monkeypatch):
    from instructrl.plugins.objectives import PPOClip

    original = PPOClip.__call__

    def nan_loss(self, inp):
        out = original(self, inp)
        return LossOutput(out.loss * float("nan"), out.metrics)

    steps: list[int] = []
    adamw_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(PPOClip, "__call__", nan_loss)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    run_dir = tmp_path / "run"
    with pytest.raises(RunFailure, match=r"^rl: non-finite loss at iteration 0 \(last good checkpoint: no checkpoint yet\)$"):  # fmt: skip
        run_smoke(run_dir, "ppo", ["rl.iterations=2", *FAST])
    assert steps == []
    assert not (run_dir / "rl" / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run_dir / "summary.json").read_text())["run/status"] == "failed"


def test_nan_gradient_of_a_finite_loss_is_caught_without_clipping(run_smoke, tmp_path, monkeypatch):
    from instructrl.plugins.objectives import PPOClip

    original = PPOClip.__call__

    def nan_gradient(self, inp):
        out = original(self, inp)
        # 0·sqrt(|x − x|): 0 forward, but d sqrt/dx at 0 is inf, so the backward gives 0·inf = NaN
        return LossOutput(out.loss + 0.0 * (inp.logprobs - inp.logprobs.detach()).abs().sqrt(), out.metrics)

    monkeypatch.setattr(PPOClip, "__call__", nan_gradient)
    with pytest.raises(RunFailure, match=r"^rl: non-finite policy gradient norm at iteration 0 "):
        run_smoke(tmp_path / "run", "ppo", ["rl.iterations=1", "rl.grad_clip=null", *FAST])
