"""Hugging Face models as Policy, ValueModel and learned RewardModel.

Sequences are ``[left-padded prompt | right-padded response]`` with position ids counted over real
tokens only (what ``generate`` uses), so rollout and training see identical inputs. Logprobs are
taken from ``logits / temperature`` at the sampling temperature, in fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.ops import logprobs_from_logits
from instructrl.core.registry import BuildContext
from instructrl.core.types import (
    Completion,
    Generation,
    PolicyOutput,
    RewardInput,
    TokenBatch,
    join_prompt_response,
    position_ids_from_mask,
)
from instructrl.plugins.models import (
    backbone_and_head,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    read_reward_stats,
    save_model_dir,
    score_last_token,
)
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .engine import PLAIN_HEAD_MODELS, response_hidden, sample_loop

# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


def _head_stats(head: Callable[[Tensor], Tensor], hidden: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    logp = (head(hidden).float() / temperature).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(
    head: Callable[[Tensor], Tensor], hidden: Tensor, tokens: Tensor, temperature: float, *,
    chunk_tokens: int | None = None, return_logits: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """``(logprobs, entropy, tempered logits or None)`` of ``softmax(head(hidden) / T)`` at ``tokens``,
    fp32. Shapes: ``hidden (B, R, H)``, ``tokens (B, R)`` → ``(B, R)``, ``(B, R)``, ``(B, R, V)``.

    With ``chunk_tokens`` (and without ``return_logits``) the head and the log-softmax run on at
    most that many positions at a time and, under autograd, each chunk is recomputed in the
    backward (activation checkpointing): no ``(B, R, V)`` tensor is ever held, at the price of one
    more head matmul in the backward. Same values as the one-chunk path (row-wise operations)."""
    n = tokens.numel()
    if return_logits or chunk_tokens is None or chunk_tokens >= n:
        logits = head(hidden).float() / temperature
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy, logits if return_logits else None
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_t = hidden.reshape(n, hidden.shape[-1]), tokens.reshape(n)
    stats = partial(checkpoint, _head_stats, use_reentrant=False) if torch.is_grad_enabled() else _head_stats
    parts = [
        stats(head, h, t, temperature) for h, t in zip(flat_h.split(chunk_tokens), flat_t.split(chunk_tokens))
    ]
    lp, ent = (torch.cat(x).view(tokens.shape) for x in zip(*parts))
    return lp, ent, None


@dataclass
class HFPolicyConfig:
    model: str = param(
        "@sft", "The policy's initial weights: '@sft' or an HF causal-LM dir.", model_path="weights"
    )
    ref_model: str | None = param(
        None,
        "The KL reference; null = a frozen copy of the initial weights (InstructGPT: the SFT model).",
        model_path="reference",
    )
    trust_remote_code: bool = param(False, "Allow model code from the model dir.")
    sampler: Literal["engine", "hf_generate"] = param(
        "engine",
        "Rollout sampler: 'engine' (preallocated KV cache, one forward per new token, fused sampling, "
        "the drawn tokens' logprobs from the same pass) or 'hf_generate' (transformers' generate).",
    )
    logits_chunk_mb: float | None = param(
        64.0,
        "forward computes the LM head and log-softmax in row chunks whose fp32 logits stay under this "
        "many MB, so (B, R, V) is never held at once for large vocabularies; null = one chunk.",
    )
    share_prompts: bool = param(
        True,
        "Identical prompts in a batch (the samples of one prompt) run through the model once — in forward "
        "and at the rollout's prefill — and their responses attend to the shared KV cache.",
    )

    def __post_init__(self) -> None:
        if self.logits_chunk_mb is not None and self.logits_chunk_mb <= 0:
            raise ValueError(f"logits_chunk_mb must be > 0 or null (got {self.logits_chunk_mb})")


def response_mask_from_ids(response_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """``(mask (B, R), ended (B,))``: 1 up to and including the first EOS; ended = an EOS occurred."""
    is_eos = response_ids == eos_id
    ended = is_eos.any(-1)
    # tokens strictly after the first EOS are padding
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after).float(), ended


class HFPolicy:
    """A causal LM from an HF dir (``AutoModelForCausalLM``), dropout off.

    ``sampler`` picks the rollout sampler (``engine``: :func:`~instructrl.plugins.engine.sample_loop`;
    ``hf_generate``: transformers' ``generate``); ``logits_chunk_mb`` bounds the fp32 logits
    ``forward`` holds at once; ``share_prompts`` runs identical prompts through the model once.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ref_path: str | None = None,
        trust_remote_code: bool = False,
        sampler: str = "engine",
        logits_chunk_mb: float | None = 64.0,
        share_prompts: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self._ref_path = ref_path
        self._trust_remote_code = trust_remote_code
        self.sampler = sampler
        self.logits_chunk_mb = logits_chunk_mb
        self.share_prompts = share_prompts
        self.last_forwards = 0  # model forwards of the last engine rollout (prefill included)

    @property
    def options(self) -> dict[str, object]:
        """The execution options (not weights) a reference policy inherits."""
        return {
            "sampler": self.sampler,
            "logits_chunk_mb": self.logits_chunk_mb,
            "share_prompts": self.share_prompts,
        }

    def reference(self) -> HFPolicy:
        """A frozen reference policy: ``policy.ref_model`` if set, else a copy of the current weights."""
        if self._ref_path is not None:
            ref = load_policy(self._ref_path, "policy.ref_model", self._trust_remote_code)
            vars(ref).update(self.options)
        else:
            ref = HFPolicy(copy.deepcopy(self.model), self.tokenizer, **self.options)  # type: ignore[arg-type]
        ref.model.requires_grad_(False).eval()
        return ref

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        greedy: bool = False,
    ) -> Generation:
        """Sample responses to left-padded prompts ``(B, P)``; see :class:`~instructrl.core.protocols.Policy`.
        The engine also returns the drawn tokens' logprobs and entropies at ``temperature``."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.sampler == "hf_generate":
                response, logprobs, entropy = self._hf_generate(input_ids, attention_mask, max_new_tokens, temperature, greedy)  # fmt: skip
            else:
                response, logprobs, entropy, self.last_forwards = sample_loop(
                    self.model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                    temperature=temperature, greedy=greedy, eos_id=self.eos_id, pad_id=self.pad_id,
                    share_prompts=self.share_prompts,
                )  # fmt: skip
        finally:
            self.model.train(was_training)
        mask, ended = response_mask_from_ids(response, self.eos_id)
        response = torch.where(mask.bool(), response, torch.full_like(response, self.pad_id))
        batch = join_prompt_response(input_ids, attention_mask, response, mask)
        if logprobs is not None and entropy is not None:
            logprobs, entropy = logprobs * mask, entropy * mask
        return Generation(batch, ended, self.decode(response, mask, ended), logprobs, entropy)

    def _hf_generate(
        self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, temperature: float, greedy: bool
    ) -> tuple[Tensor, None, None]:
        kwargs: dict[str, object] = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
            **kwargs,
        )
        return out[:, input_ids.shape[1] :], None, None

    def decode(self, response_ids: Tensor, mask: Tensor, ended: Tensor) -> list[Completion]:
        """Response strings (EOS and padding stripped) with their ended flags."""
        out = []
        for ids, m, e in zip(response_ids.tolist(), mask.tolist(), ended.tolist()):
            n = int(sum(m)) - (1 if e else 0)
            out.append(Completion(self.tokenizer.decode(ids[:n], skip_special_tokens=True), bool(e)))
        return out

    def forward(self, batch: TokenBatch, *, temperature: float, return_logits: bool = False) -> PolicyOutput:
        """Per-token logprobs and entropy ``(B, R)`` at ``temperature``; tempered logits on request.

        The LM head runs on the response positions only (``P − 1 … P + R − 2``: position ``P + t − 1``
        predicts token ``t``), in row chunks of at most ``logits_chunk_mb`` of fp32 logits (each chunk
        recomputed in the backward, so the autograd graph holds no ``(B, R, V)`` tensor either); the
        tempered logits are only materialised when asked for."""
        p = batch.prompt_len
        head = self.model.get_output_embeddings() if type(self.model).__name__ in PLAIN_HEAD_MODELS else None
        chunk = None
        if head is not None:
            hidden = response_hidden(self.model, batch, self.share_prompts)
            if self.logits_chunk_mb is not None:
                chunk = max(1, int(self.logits_chunk_mb * 2**20 // (4 * head.weight.shape[0])))
        else:  # any other causal LM: the full forward (the head on every position), then the slice
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids}  # fmt: skip
            hidden, head = self.model(**inputs, use_cache=False).logits[:, p - 1 : -1], torch.nn.Identity()
        logprobs, entropy, logits = logprobs_and_entropy(
            head, hidden, batch.response_ids, temperature, chunk_tokens=chunk, return_logits=return_logits
        )
        mask = batch.response_mask
        return PolicyOutput(logprobs * mask, entropy * mask, logits)

    def lm_loss(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats/token) over the real tokens of ``(B, T)`` text."""
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).logits
        target_mask = attention_mask[:, 1:].float() * attention_mask[:, :-1].float()
        logp = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])
        return -(logp * target_mask).sum() / target_mask.sum().clamp_min(1.0)

    def save(self, path: str) -> None:
        """Write an HF dir loadable by ``AutoModelForCausalLM``."""
        save_model_dir(self.model, self.tokenizer, path)


def load_policy(path: str, key: str, trust_remote_code: bool = False) -> HFPolicy:
    """An :class:`HFPolicy` from an HF dir (tokenizer from the same dir)."""
    tokenizer = load_tokenizer(path, key, trust_remote_code)
    model = load_causal_lm(path, key, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    return HFPolicy(model, tokenizer)


def make_hf_policy(config: HFPolicyConfig, ctx: BuildContext) -> HFPolicy:
    """A Hugging Face causal LM (AutoModelForCausalLM) as the policy; dropout off."""
    path = ctx.resolve(config.model, "policy.model")
    ref_path = ctx.resolve(config.ref_model, "policy.ref_model") if config.ref_model else None
    tokenizer = load_tokenizer(path, "policy.model", config.trust_remote_code)
    model = load_causal_lm(
        path, "policy.model", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code
    )
    return HFPolicy(
        model, tokenizer, ref_path, config.trust_remote_code, config.sampler, config.logits_chunk_mb,
        config.share_prompts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Value model
# --------------------------------------------------------------------------------------------


@dataclass
class HFValueConfig:
    model: str = param(
        "@rm",
        "Initial weights: '@rm' (InstructGPT: the value function starts from the RM) or an HF dir.",
        model_path="weights",
    )
    trust_remote_code: bool = param(False, "Allow model code from the model dir.")


class HFValueModel:
    """A sequence-classification model read at every position: ``score(hidden_t)`` is ``V(s_t)``."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.body, self.head = backbone_and_head(model)

    def values(self, batch: TokenBatch) -> Tensor:
        """``(B, R)`` values of the states before each response token, fp32, 0 on padding."""
        hidden = self.body(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        p = batch.prompt_len
        v = self.head(hidden[:, p - 1 : -1]).squeeze(-1).float()
        return v * batch.response_mask

    def save(self, path: str) -> None:
        """Write an HF dir loadable by ``AutoModelForSequenceClassification``."""
        save_model_dir(self.model, self.tokenizer, path)


def make_hf_value(config: HFValueConfig, ctx: BuildContext) -> HFValueModel:
    """A Hugging Face scalar-head model (AutoModelForSequenceClassification) read per token as the critic."""
    path = ctx.resolve(config.model, "value.model")
    tokenizer = ctx.tokenizer or load_tokenizer(path, "value.model", config.trust_remote_code)
    model = load_scalar_head_model(
        path, "value.model", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code
    )
    return HFValueModel(model, tokenizer)


# --------------------------------------------------------------------------------------------
# Learned reward model
# --------------------------------------------------------------------------------------------


@dataclass
class LearnedRewardConfig:
    model: str = param(
        "@rm",
        "The reward model: '@rm' (this pipeline's RM stage) or an HF sequence-classification dir.",
        model_path="weights",
    )
    trust_remote_code: bool = param(False, "Allow model code from the model dir.")


class LearnedReward:
    """A trained scalar-head model scoring the last real token of prompt + response."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stats: dict[str, float]
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.stats = stats

    @torch.no_grad()
    def score(self, inp: RewardInput) -> Tensor:
        """``(B,)`` score at the last real token (the EOS when the response ended)."""
        return score_last_token(self.model, inp.batch)

    def demo_mean(self) -> float | None:
        """The demonstrations' mean score the RM stage recorded next to the model, if any."""
        return self.stats.get("demo_mean")


def make_learned_reward(config: LearnedRewardConfig, ctx: BuildContext) -> LearnedReward:
    """A learned reward model (the RM stage's output, or any scalar-head HF dir)."""
    path = ctx.resolve(config.model, "reward.model")
    tokenizer = ctx.tokenizer or load_tokenizer(path, "reward.model", config.trust_remote_code)
    model = load_scalar_head_model(
        path, "reward.model", tokenizer=tokenizer, trust_remote_code=config.trust_remote_code
    )
    return LearnedReward(model, tokenizer, read_reward_stats(path))


@hookimpl
def register_policies(register: Register) -> None:
    register("hf", make_hf_policy, config=HFPolicyConfig)


@hookimpl
def register_value_models(register: Register) -> None:
    register("hf", make_hf_value, config=HFValueConfig)


@hookimpl
def register_reward_models(register: Register) -> None:
    register("learned", make_learned_reward, config=LearnedRewardConfig)
