"""The language-model stages: the pretraining mix of ``sft`` / ``rl_init`` (the paper's RL init)."""

from __future__ import annotations

import csv

import pytest
import torch
from instructrl.core.config import load_recipe
from instructrl.core.errors import ConfigError
from instructrl.plugins.stages.lm import Demos, MixedDemos, RLInitSection, SFTSection, text_rows


class CharTokenizer:
    """One id per character (offset past the specials), BOS/EOS/pad like the stages' tokenizers."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [10 + (ord(c) % 50) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def mixed(per_batch: int = 2, seed: int = 0) -> MixedDemos:
    demos = Demos(CharTokenizer(), [("ab", "cde"), ("fgh", "ij"), ("k", "lmnop")], 64, response_only=True)
    text = torch.arange(5 * 8).view(5, 8) + 100  # five packed pretraining sequences of 8 tokens
    return MixedDemos(demos, text, per_batch, seed)


def test_text_rows_rounds_and_keeps_a_demonstration():
    assert text_rows(32, 0.1) == 3  # round(3.2)
    assert text_rows(16, 0.1) == 2  # round(1.6)
    assert text_rows(4, 0.9) == 3  # never the whole batch


def test_a_mixed_batch_appends_text_rows_with_loss_on_every_token():
    data = mixed(per_batch=2)
    batch = data.collate([data[0], data[2]])
    assert batch["is_text"].tolist() == [False, False, True, True]
    # demonstration rows: the loss covers the response + EOS only (row 0: BOS a b | c d e EOS)
    assert batch["loss_mask"][0].tolist()[:7] == [0, 0, 0, 1, 1, 1, 1]
    # text rows: every token after the first is a target, and the rows are pretraining sequences
    for row in (2, 3):
        assert batch["loss_mask"][row, 1:8].tolist() == [1] * 7 and batch["loss_mask"][row, 0] == 0
        assert int(batch["input_ids"][row, 0]) >= 100 and int(batch["input_ids"][row, 0]) % 8 == 4
        assert int(batch["attention_mask"][row].sum()) == 8


def test_the_text_rows_of_a_batch_depend_only_on_seed_and_indices():
    a, b = mixed(seed=0), mixed(seed=0)
    first = a.collate([a[1], a[2]])["input_ids"]
    assert torch.equal(first, b.collate([b[1], b[2]])["input_ids"])  # a resumed run draws the same
    picks = {tuple(mixed(seed=s).collate([a[1], a[2]])["input_ids"][2:, 0].tolist()) for s in range(8)}
    assert len(picks) > 1  # and the seed matters


def test_the_rl_init_defaults_are_the_papers():
    cfg = RLInitSection()
    assert (cfg.model, cfg.epochs, cfg.pretrain_mix, cfg.min_lr_ratio, cfg.schedule) == (
        "@pretrain", 2, 0.1, 0.1, "cosine"
    )  # fmt: skip
    assert SFTSection().pretrain_mix == 0.0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("rl_init.pretrain_mix=1.0", "rl_init.pretrain_mix must be in [0, 1) (got 1.0)"),
        (
            "rl_init.pretrain_mix=0.01",
            "rl_init.pretrain_mix: 0.01 of batch_size 16 rounds to no pretraining sequence",
        ),
    ],
)
def test_a_bad_mix_is_a_one_line_error_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_recipe("instructgpt", [override], smoke=True)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_pipeline_starts_rl_from_the_rl_init_and_compares_with_sft():
    recipe = load_recipe("instructgpt", smoke=True)
    assert recipe.choice("policy").config.model == "@rl_init"
    assert recipe.section("eval").against == "@sft"
    from instructrl.core.runner import stage_order

    order = stage_order(recipe)
    assert order.index("pretrain") < order.index("rl_init") < order.index("rl")


def test_the_smoke_pipeline_trains_the_rl_init_on_both_parts(smoke_pipeline):
    run_dir, summary = smoke_pipeline
    assert summary["rl_init/text_rows_per_batch"] == 2  # round(0.1 × 16)
    rows = list(csv.DictReader(open(run_dir / "rl_init" / "metrics.csv")))
    logged = [r for r in rows if r.get("rl_init/loss_text")]
    assert logged, "rl_init/loss_text is never logged"
    for r in logged:  # the total is the token mean of both parts: between the two part means
        total, demo, text = (float(r[f"rl_init/{k}"]) for k in ("loss", "loss_demo", "loss_text"))
        assert min(demo, text) - 1e-5 <= total <= max(demo, text) + 1e-5
    # the RL init's own numbers beside the RL policy's, against the same SFT baseline
    for key in ("gold_score", "win_rate_vs_sft", "kl_to_sft"):
        assert f"eval/rl_start/{key}" in summary, key
    assert summary["eval/rl_start/kl_to_sft"] > 0  # the RL init is not the SFT model


def test_the_periodic_evaluation_compares_with_sft_and_tracks_the_alignment_tax(smoke_pipeline):
    run_dir, summary = smoke_pipeline
    rows = [r for r in csv.DictReader(open(run_dir / "rl" / "metrics.csv")) if r.get("eval/kl_to_ref")]
    assert rows, "the periodic evaluation logs no eval/kl_to_ref"
    for r in rows:  # the KL reference (the RL init) is not the baseline (SFT): two different KLs
        assert r["eval/pretrain_loss"] and r["eval/kl_to_sft"]
        assert float(r["eval/kl_to_ref"]) != float(r["eval/kl_to_sft"])
    # the last periodic evaluation sees the final weights and the eval stage's documents
    assert float(rows[-1]["eval/pretrain_loss"]) == pytest.approx(summary["eval/pretrain_loss"], rel=1e-4)
