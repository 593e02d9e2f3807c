"""The HF policy's rollout engine, its response-only chunked forward, the forwards the RL iteration
skips, and precision by capability."""

from __future__ import annotations

import csv
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from instructrl.core.config import load_recipe
from instructrl.core.errors import ConfigError
from instructrl.plugins import engine
from instructrl.plugins.hf import HFPolicy, load_policy
from instructrl.plugins.models import build_causal_lm, train_tokenizer
from instructrl.plugins.stages.common import encode_prompts

PROMPTS = ["reverse: abc\n", "sort: dcbafe\n", "uppercase: ab\n", "count: abcabca\n", "reverse: q\n"]


@pytest.fixture(scope="module")
def sft(smoke_pipeline):
    """The trained smoke SFT policy (it ends its responses with EOS)."""
    run_dir, _ = smoke_pipeline
    return load_policy(str(run_dir / "sft" / "model"), "policy.model")


def tiny_policy(arch: str) -> HFPolicy:
    torch.manual_seed(0)
    tok = train_tokenizer(PROMPTS + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n"])
    base = SimpleNamespace(
        arch=arch, hidden_size=32, layers=2, heads=2, intermediate_size=None, max_positions=64
    )
    return HFPolicy(build_causal_lm(base, tok).eval(), tok)


def encode(policy: HFPolicy, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompts(policy.tokenizer, prompts, 32)


def generate(policy: HFPolicy, sampler: str, prompts: list[str], **kw):
    policy.sampler = sampler
    try:
        return policy.generate(*encode(policy, prompts), **{"max_new_tokens": 12, "temperature": 1.0, **kw})
    finally:
        policy.sampler = "engine"


# --------------------------------------------------------------------------------------------
# the engine
# --------------------------------------------------------------------------------------------


class EosFrom:
    """Makes EOS the most likely next token at positions ``>= position`` (prompts of different
    lengths then end at different steps) whoever computes the logits: a forward hook on the HF
    model (``generate``, the engine's prefill and its HF step) and a wrapper of the engine's Llama
    decode step. ``calls`` counts both."""

    def __init__(self, policy: HFPolicy, position: int, monkeypatch) -> None:
        self.eos, self.position, self.calls = policy.eos_id, position, 0
        self.handle = policy.model.register_forward_hook(self.hook, with_kwargs=True)
        step = engine.LlamaDecodeStep.__call__

        def wrapped(this, tokens, positions, index, mask):
            self.calls += 1
            logits = step(this, tokens, positions, index, mask)
            logits[positions[:, -1] >= self.position, self.eos] += 1e4
            return logits

        monkeypatch.setattr(engine.LlamaDecodeStep, "__call__", wrapped)

    def hook(self, module, args, kwargs, out):
        self.calls += 1
        late = kwargs["position_ids"][:, -1] >= self.position
        out.logits[late, -1, self.eos] += 1e4
        return out

    def __enter__(self) -> EosFrom:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(params=["llama_step", "hf_step"])
def decode_step(request, monkeypatch):
    """Both per-token paths of the engine: the fused Llama step and the HF forward."""
    if request.param == "hf_step":
        monkeypatch.setattr(engine.LlamaDecodeStep, "build", classmethod(lambda cls, model, cache: None))
    return request.param


def test_the_fused_llama_step_is_taken_for_the_smoke_model(sft, monkeypatch):
    built = []
    original = engine.LlamaDecodeStep.build.__func__
    monkeypatch.setattr(engine.LlamaDecodeStep, "build", classmethod(lambda cls, m, c: built.append(original(cls, m, c)) or built[-1]))  # fmt: skip
    generate(sft, "engine", PROMPTS, greedy=True)
    assert len(built) >= 1 and all(isinstance(b, engine.LlamaDecodeStep) for b in built)


def test_engine_greedy_gives_the_tokens_of_hf_generate_on_a_trained_model(sft, decode_step, monkeypatch):
    ours = generate(sft, "engine", PROMPTS * 2, greedy=True)
    hf = generate(sft, "hf_generate", PROMPTS * 2, greedy=True)
    assert torch.equal(ours.batch.input_ids, hf.batch.input_ids)
    assert hf.logprobs is None and ours.logprobs is not None
    with EosFrom(sft, 16, monkeypatch):  # and with EOS in the responses: the same ends, padding and strings
        ours = generate(sft, "engine", PROMPTS * 2, greedy=True, max_new_tokens=20)
        hf = generate(sft, "hf_generate", PROMPTS * 2, greedy=True, max_new_tokens=20)
    assert bool(ours.ended.all()) and len(set(ours.batch.response_mask.sum(-1).tolist())) > 1
    assert torch.equal(ours.batch.input_ids, hf.batch.input_ids)
    assert torch.equal(ours.batch.attention_mask, hf.batch.attention_mask)
    assert torch.equal(ours.batch.response_mask, hf.batch.response_mask)
    assert torch.equal(ours.ended, hf.ended) and ours.completions == hf.completions


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_greedy_matches_hf_generate_for_llama_and_gpt2(arch):
    policy = tiny_policy(arch)
    ours = generate(policy, "engine", PROMPTS, greedy=True, max_new_tokens=10)
    hf = generate(policy, "hf_generate", PROMPTS, greedy=True, max_new_tokens=10)
    assert torch.equal(ours.batch.input_ids, hf.batch.input_ids)
    assert torch.equal(ours.batch.position_ids, hf.batch.position_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_fresh_forward_of_the_same_tokens(sft, temperature, decode_step):
    torch.manual_seed(0)
    gen = generate(sft, "engine", PROMPTS * 3, temperature=temperature)
    with torch.no_grad():
        out = sft.forward(gen.batch, temperature=temperature)
    torch.testing.assert_close(gen.logprobs, out.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(gen.entropy, out.entropy, atol=1e-5, rtol=1e-5)
    mask = gen.batch.response_mask
    assert bool((gen.logprobs[mask == 0] == 0).all()) and bool((gen.logprobs[mask == 1] < 0).all())


def test_left_padded_prompts_give_the_tokens_each_prompt_gets_alone(sft, decode_step):
    together = generate(sft, "engine", PROMPTS, greedy=True)
    p, r = together.batch.prompt_len, together.batch.response_ids.shape[1]
    assert len({len(sft.tokenizer(t)["input_ids"]) for t in PROMPTS}) > 1  # lengths differ: padding
    for i, text in enumerate(PROMPTS):
        alone = generate(sft, "engine", [text], greedy=True)
        n = alone.batch.response_ids.shape[1]
        assert torch.equal(together.batch.response_ids[i, :n], alone.batch.response_ids[0])
        assert bool((together.batch.response_ids[i, n:] == sft.pad_id).all()) and n <= r
        assert together.completions[i] == alone.completions[0]
        # the response continues the positions of the real prompt tokens
        last_prompt_pos = together.batch.position_ids[i, p - 1]
        assert together.batch.position_ids[i, p] == last_prompt_pos + 1


def test_the_engine_stops_when_every_row_has_ended(sft, decode_step, monkeypatch):
    with EosFrom(sft, 14, monkeypatch) as hook:
        gen = generate(sft, "engine", PROMPTS, greedy=True, max_new_tokens=48)
    steps = gen.batch.response_ids.shape[1]
    lengths = gen.batch.response_mask.sum(-1).long()
    assert bool(gen.ended.all()) and steps < 48 and len(set(lengths.tolist())) > 1
    # one prefill + one forward per new token but the last (nothing else calls the model), and the
    # loop ends at the step that drew the last EOS
    assert hook.calls == steps == sft.last_forwards == int(lengths.max())
    for row, n in zip(gen.batch.response_ids, lengths.tolist()):
        assert row[n - 1] == sft.eos_id and bool((row[n:] == sft.pad_id).all())


# --------------------------------------------------------------------------------------------
# the forward: response positions only, chunked log-softmax
# --------------------------------------------------------------------------------------------


def test_chunked_forward_equals_the_one_chunk_forward_values_and_gradients(sft):
    torch.manual_seed(1)
    batch = generate(sft, "engine", PROMPTS * 2, temperature=1.0).batch
    results = []
    for chunk_mb in (None, 0.001):  # 0.001 MB: a few positions per chunk
        sft.logits_chunk_mb = chunk_mb
        sft.model.zero_grad(set_to_none=True)
        out = sft.forward(batch, temperature=0.7)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in sft.model.parameters() if p.grad is not None]
        results.append((out.logprobs.detach(), out.entropy.detach(), grads))
    sft.logits_chunk_mb = 64.0
    sft.model.zero_grad(set_to_none=True)
    (lp0, e0, g0), (lp1, e1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    assert len(g0) == len(g1) > 0
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_shared_prompts_give_the_values_and_gradients_of_separate_rows(sft):
    from instructrl.plugins.engine import shared_prompts

    torch.manual_seed(3)
    batch = generate(sft, "engine", PROMPTS * 3, temperature=1.0).batch
    batch = batch.select(torch.randperm(len(PROMPTS) * 3))  # a micro-batch: samples of a prompt scattered
    prompt_ids, prompt_mask = (
        batch.input_ids[:, : batch.prompt_len],
        batch.attention_mask[:, : batch.prompt_len],
    )
    first, inverse = shared_prompts(prompt_ids, prompt_mask)
    assert len(first) == len(PROMPTS) and torch.equal(prompt_ids[first][inverse], prompt_ids)
    results = []
    for share in (False, True):
        sft.share_prompts = share
        sft.model.zero_grad(set_to_none=True)
        out = sft.forward(batch, temperature=0.7)
        (out.logprobs.sum() + 0.1 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in sft.model.parameters() if p.grad is not None]
        results.append((out.logprobs.detach(), out.entropy.detach(), grads))
    sft.share_prompts = True
    sft.model.zero_grad(set_to_none=True)
    (lp0, e0, g0), (lp1, e1, g1) = results
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # the engine's prefill too: the same greedy tokens with and without sharing
    greedy = []
    for share in (False, True):
        sft.share_prompts = share
        greedy.append(generate(sft, "engine", PROMPTS * 3, greedy=True))
    sft.share_prompts = True
    assert torch.equal(greedy[0].batch.input_ids, greedy[1].batch.input_ids)
    torch.testing.assert_close(greedy[0].logprobs, greedy[1].logprobs, atol=1e-5, rtol=0)


def test_forward_on_response_positions_equals_the_full_model_logits(sft):
    torch.manual_seed(2)
    batch = generate(sft, "engine", PROMPTS, temperature=1.0).batch
    with torch.no_grad():
        out = sft.forward(batch, temperature=0.7, return_logits=True)
        full = sft.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    p = batch.prompt_len
    torch.testing.assert_close(out.logits, full[:, p - 1 : -1].float() / 0.7, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# forwards the RL iteration skips
# --------------------------------------------------------------------------------------------

ON_POLICY = [
    "advantage.name=grpo", "rl.epochs=1", "rl.minibatches=1", "kl.placement=loss", "kl.estimator=k3",
    "rl.iterations=2", "eval.every=0",
]  # fmt: skip


def rows(run_dir) -> list[dict[str, float]]:
    with open(run_dir / "rl" / "metrics.csv") as f:
        return [
            {k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f) if r.get("reward/raw")
        ]


def force(monkeypatch, **changes) -> None:
    """Run the RL stage with some of its derived settings overridden (the 'without the skip' run)."""
    from instructrl.plugins.stages import rl

    original = rl.settings
    monkeypatch.setattr(rl, "settings", lambda recipe: dataclasses.replace(original(recipe), **changes))


def test_on_policy_update_uses_the_sampler_logprobs_and_results_do_not_change(
    smoke_pipeline, run_smoke, tmp_path, monkeypatch
):
    run_smoke(tmp_path / "skip", "ppo", ON_POLICY)
    with monkeypatch.context() as m:
        force(m, old_from_rollout=False)
        run_smoke(tmp_path / "forward", "ppo", ON_POLICY)
    skip, forward = rows(tmp_path / "skip"), rows(tmp_path / "forward")
    assert [r["forwards/skipped_old"] for r in skip] == [1.0, 1.0]
    assert [r["forwards/skipped_old"] for r in forward] == [0.0, 0.0]
    for r in skip:  # the ratio gate compared the training forward with the sampler: a real check
        assert r["invariant/ratio_dev"] <= 1e-4
    a, b = skip[0], forward[0]  # the same rollouts; old logprobs agree to fp32 round-off
    for key in ("reward/raw", "response/length", "advantage/mean"):
        assert a[key] == b[key], key
    for key in ("policy/loss", "kl/value", "policy/entropy_rollout", "policy/entropy"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_no_reference_forward_without_a_kl_term(smoke_pipeline, run_smoke, tmp_path, monkeypatch):
    assert not load_recipe("ppo", ["kl.coef=0"], smoke=True).derived.kl_active
    assert load_recipe("ppo", ["kl.coef=0", "kl.controller=adaptive"], smoke=True).derived.kl_active
    run_smoke(tmp_path / "skip", "ppo", [*ON_POLICY, "kl.coef=0"])
    with monkeypatch.context() as m:
        force(m, kl_active=True)
        run_smoke(tmp_path / "ref", "ppo", [*ON_POLICY, "kl.coef=0"])
    skip, ref = rows(tmp_path / "skip"), rows(tmp_path / "ref")
    assert [r["forwards/skipped_reference"] for r in skip] == [1.0, 1.0]
    assert [r["forwards/skipped_reference"] for r in ref] == [0.0, 0.0]
    for key in ("reward/raw", "policy/loss", "policy/entropy", "advantage/mean"):
        assert skip[0][key] == pytest.approx(ref[0][key], rel=1e-6, abs=1e-7), key


# --------------------------------------------------------------------------------------------
# precision by capability
# --------------------------------------------------------------------------------------------

XEON = ("AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
EPYC = ("AVX2", frozenset({"avx2", "fma"}))


@pytest.mark.parametrize(("cpu", "expected"), [(XEON, "bf16-mixed"), (EPYC, "32")])
def test_precision_auto_resolves_by_cpu_capability(monkeypatch, cpu, expected):
    from instructrl.core import precision

    monkeypatch.setattr(precision, "cpu_capability", lambda: cpu[0])
    monkeypatch.setattr(precision, "cpu_flags", lambda path="/proc/cpuinfo": cpu[1])
    assert precision.resolve_precision("auto") == expected
    assert precision.resolve_precision("32") == "32" and precision.resolve_precision(32) == "32"
    assert precision.resolve_precision("bf16-mixed") == "bf16-mixed"
    recipe = load_recipe("ppo", ["precision=auto"])
    assert recipe.derived.precision == expected == recipe.cfg.precision_resolved  # recorded in config.yaml
    assert recipe.cfg.precision == "auto"


def test_precision_errors_point_at_the_top_level_key():
    with pytest.raises(ConfigError, match=r"trainer\.precision: .*top-level precision key"):
        load_recipe("ppo", ["trainer.precision=bf16-mixed"])
    with pytest.raises(
        ConfigError, match=r"precision: must be one of 32, auto or bf16-mixed \(got '16-mixed'\)"
    ):
        load_recipe("ppo", ["precision=16-mixed"])


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    from instructrl.core.precision import cpu_flags

    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert {"avx512_bf16", "amx_bf16"} <= cpu_flags(str(x86))
    assert "bf16" in cpu_flags(str(arm))
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_bf16_mixed_rl_passes_the_ratio_gate_where_bf16_is_native(smoke_pipeline, run_smoke, tmp_path):
    from instructrl.core.precision import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("bf16 is emulated on this CPU (about 100× slower than fp32)")
    run_smoke(tmp_path / "bf16", "ppo", [*ON_POLICY, "precision=bf16-mixed"])
    got = rows(tmp_path / "bf16")
    assert [r["forwards/skipped_old"] for r in got] == [0.0, 0.0]  # bf16: the old forward is kept
    assert all(r["invariant/ratio_dev"] <= 5e-2 for r in got)
    text = (tmp_path / "bf16" / "config.yaml").read_text()
    assert "precision_resolved: bf16-mixed" in text
