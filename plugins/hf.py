"""Hugging Face models as Policy, ValueModel and learned RewardModel.

Sequences are ``[left-padded prompt | right-padded response]`` with position ids counted over real
tokens only (what ``generate`` uses), so rollout and training see identical inputs. Logprobs are
taken from ``logits / temperature`` at the sampling temperature, in fp32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.models import (
    backbone_and_head,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    read_reward_stats,
    save_model_dir,
    score_last_token,
)
from instructrl.core.ops import entropy_from_logits, logprobs_from_logits
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
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------


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


def response_mask_from_ids(response_ids: Tensor, eos_id: int) -> tuple[Tensor, Tensor]:
    """``(mask (B, R), ended (B,))``: 1 up to and including the first EOS; ended = an EOS occurred."""
    is_eos = response_ids == eos_id
    ended = is_eos.any(-1)
    # tokens strictly after the first EOS are padding
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after).float(), ended


class HFPolicy:
    """A causal LM from an HF dir (``AutoModelForCausalLM``), dropout off."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ref_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id)
        self._ref_path = ref_path
        self._trust_remote_code = trust_remote_code

    def reference(self) -> HFPolicy:
        """A frozen reference policy: ``policy.ref_model`` if set, else a copy of the current weights."""
        if self._ref_path is not None:
            ref = load_policy(self._ref_path, "policy.ref_model", self._trust_remote_code)
        else:
            ref = HFPolicy(copy.deepcopy(self.model), self.tokenizer)
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
        """Sample responses to left-padded prompts ``(B, P)``; see :class:`~instructrl.core.protocols.Policy`."""
        was_training = self.model.training
        self.model.eval()
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
        self.model.train(was_training)
        response = out[:, input_ids.shape[1] :]
        mask, ended = response_mask_from_ids(response, self.eos_id)
        response = torch.where(mask.bool(), response, torch.full_like(response, self.pad_id))
        batch = join_prompt_response(input_ids, attention_mask, response, mask)
        return Generation(batch, ended, self.decode(response, mask, ended))

    def decode(self, response_ids: Tensor, mask: Tensor, ended: Tensor) -> list[Completion]:
        """Response strings (EOS and padding stripped) with their ended flags."""
        out = []
        for ids, m, e in zip(response_ids.tolist(), mask.tolist(), ended.tolist()):
            n = int(sum(m)) - (1 if e else 0)
            out.append(Completion(self.tokenizer.decode(ids[:n], skip_special_tokens=True), bool(e)))
        return out

    def forward(self, batch: TokenBatch, *, temperature: float, return_logits: bool = False) -> PolicyOutput:
        """Per-token logprobs and entropy ``(B, R)`` at ``temperature``; tempered logits on request."""
        logits = self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits
        p = batch.prompt_len
        logits = logits[:, p - 1 : -1].float() / temperature  # (B, R, V): position P+t-1 predicts token t
        mask = batch.response_mask
        logprobs = logprobs_from_logits(logits, batch.response_ids) * mask
        entropy = entropy_from_logits(logits) * mask
        return PolicyOutput(logprobs, entropy, logits if return_logits else None)

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
    return HFPolicy(model, tokenizer, ref_path, config.trust_remote_code)


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
