"""The rollout engine behind :class:`~instructrl.plugins.hf.HFPolicy` (``policy.sampler: engine``)
and the model-body helpers of its ``forward``.

:func:`sample_loop` is our own sampling loop: a prefill forward over the prompts (each distinct
prompt once), then one forward per new token over a preallocated KV cache (transformers'
``StaticCache``), sampling fused into the loop (``softmax(logits / T)`` over the full vocabulary,
inverse CDF with one uniform per row), early stop once every row has ended, and the drawn tokens'
fp32 logprobs and entropies from the same pass. For ``LlamaForCausalLM`` (the bundled base
architecture) the per-token forward is :class:`LlamaDecodeStep`: the model's own weights with
the q/k/v and gate/up projections fused into one matmul each and none of the per-call module
machinery — the same operations in the same order, so the logits equal the HF forward's (bitwise
in fp32 on CPU). Any other causal LM steps through its HF forward. A GPU engine (vLLM, SGLang …)
plugs in at the same seam: a Policy whose ``generate`` returns a :class:`Generation` with
``logprobs``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from instructrl.core.types import TokenBatch
from torch import Tensor
from transformers import PreTrainedModel

# Causal LMs whose forward is exactly ``lm_head(base_model(...).last_hidden_state)`` (no logit scaling
# or soft-capping after the head): forward slices the hidden states to the response before the head.
PLAIN_HEAD_MODELS = frozenset(
    {"LlamaForCausalLM", "GPT2LMHeadModel", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


def _forward_params(model: torch.nn.Module) -> frozenset[str]:
    return frozenset(inspect.signature(model.forward).parameters)


def new_kv_cache(model: PreTrainedModel, max_len: int) -> tuple[object, bool]:
    """``(cache, static)``: a preallocated ``StaticCache`` of ``max_len`` positions; a
    ``DynamicCache`` for models whose config it does not support (the loop is the same, the cache
    grows by concatenation)."""
    from transformers import DynamicCache, StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len), True
    except Exception:
        return DynamicCache(), False


def shared_prompts(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` when some rows of the left-padded prompts ``(B, P)`` are identical (the
    samples of one prompt): ``first (U,)`` one row of each distinct prompt, ``inverse (B,)`` the
    distinct prompt of each row; ``None`` when every row is distinct."""
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    uniq, inverse = torch.unique(rows, dim=0, return_inverse=True)
    b = rows.shape[0]
    if len(uniq) == b:
        return None
    index = torch.arange(b, device=rows.device)
    first = torch.full((len(uniq),), b, device=rows.device).scatter_reduce(0, inverse, index, "amin")
    return first, inverse


def _cache_kw(module: torch.nn.Module, cache: object) -> dict[str, object]:
    return {"cache" if "cache" in _forward_params(module) else "past_key_values": cache}


def response_hidden(model: PreTrainedModel, batch: TokenBatch, share_prompts: bool = True) -> Tensor:
    """``(B, R, H)`` the last hidden states at positions ``P − 1 … P + R − 2`` (those predicting the
    response tokens), from the model body without its head.

    With ``share_prompts``, identical prompts go through the body once and their responses attend to
    the shared prompt KV cache (a second pass over the response tokens): the samples of a prompt
    cost one prompt forward — and one prompt backward — instead of ``k``. Same values up to
    round-off (the attention is split at ``P``), gradients included."""
    from transformers import DynamicCache

    body, p = model.base_model, batch.prompt_len
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    shared = shared_prompts(ids[:, :p], mask[:, :p]) if share_prompts and ids.shape[1] - p > 1 else None
    if shared is None:
        out = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        return out.last_hidden_state[:, p - 1 : -1]
    first, inverse = shared
    cache = DynamicCache()
    head = body(
        input_ids=ids[first, :p], attention_mask=mask[first, :p], position_ids=pos[first, :p],
        use_cache=True, **_cache_kw(body, cache),
    ).last_hidden_state[:, -1:]  # fmt: skip
    cache.batch_select_indices(inverse)  # every row's view of its prompt's keys and values
    tail = body(
        input_ids=ids[:, p:-1], attention_mask=mask[:, :-1], position_ids=pos[:, p:-1],
        use_cache=True, **_cache_kw(body, cache),
    ).last_hidden_state  # fmt: skip
    return torch.cat([head[inverse], tail], dim=1)


def _expand_cache(cache: object, index: Tensor) -> bool:
    """Select rows ``index`` of every layer of a filled KV cache in place (``U`` rows → ``B``);
    False when the cache does not expose its layers' tensors (the caller then prefills every row)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(la, "keys", None), Tensor) for la in layers):
        return False
    for layer in layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        if hasattr(layer, "batch_size"):
            layer.batch_size = len(index)
    return True


class LlamaDecodeStep:
    """One decode step of a ``LlamaForCausalLM`` over a filled ``StaticCache``, without the HF
    module machinery: the same operations as the HF forward in the same order (RMSNorm in fp32,
    rotary embedding, SDPA with a boolean mask at ``head_dim ** -0.5``, SwiGLU), with the q/k/v
    and the gate/up projections each one matmul over the concatenated weights (built when the
    rollout starts, so they follow the training updates). :meth:`build` returns ``None`` for
    configurations it does not cover (biases, non-default RoPE, another attention implementation,
    a cache without per-layer tensors); the loop then steps through the HF forward."""

    def __init__(self, model: PreTrainedModel, keys: list[Tensor], values: list[Tensor]) -> None:
        cfg, body = model.config, model.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.inter, self.eps = cfg.intermediate_size, cfg.rms_norm_eps
        self.embed, self.norm, self.lm_head = body.embed_tokens.weight, body.norm.weight, model.lm_head.weight
        self.inv_freq, self.rope_scale = body.rotary_emb.inv_freq, body.rotary_emb.attention_scaling
        # Under autocast (bf16-mixed) the matmul weights and the cache are cast once per rollout instead
        # of at every call: autocast casts them to the same dtype anyway, so the results are the same.
        device = self.embed.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        cast = (lambda w: w.to(low)) if low is not None else (lambda w: w)
        self.lm_head = cast(self.lm_head)
        self.keys, self.values = [cast(k) for k in keys], [cast(v) for v in values]
        self.layers = [
            (
                layer.input_layernorm.weight,
                cast(torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])),
                cast(layer.self_attn.o_proj.weight),
                layer.post_attention_layernorm.weight,
                cast(torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])),
                cast(layer.mlp.down_proj.weight),
            )
            for layer in body.layers[: cfg.num_hidden_layers]
        ]  # fmt: skip

    @classmethod
    def build(cls, model: PreTrainedModel, cache: object) -> LlamaDecodeStep | None:
        cfg = model.config
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        plain = (
            type(model).__name__ == "LlamaForCausalLM" and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and cfg.hidden_act == "silu" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and getattr(cfg, "pretraining_tp", 1) == 1
            and getattr(rotary, "rope_type", None) == "default" and hasattr(rotary, "attention_scaling")
        )  # fmt: skip
        layers = getattr(cache, "layers", None)
        if not plain or not layers or not all(isinstance(getattr(la, "keys", None), Tensor) for la in layers):
            return None
        if any(type(w).__name__ == "DTensor" for w in model.parameters()):
            return None  # sharded weights (FSDP2) are gathered by the modules' hooks, which this step skips
        return cls(model, [la.keys for la in layers], [la.values for la in layers])

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def __call__(self, tokens: Tensor, positions: Tensor, index: int, mask: Tensor) -> Tensor:
        """Logits ``(B, V)`` after ``tokens (B,)`` at ``positions (B, 1)``, written to cache slot
        ``index``; ``mask (B, 1, 1, L)`` bool, the keys each row attends to."""
        b, (h, kvh, d) = tokens.shape[0], (self.heads, self.kv_heads, self.head_dim)
        x = F.embedding(tokens, self.embed)
        freqs = positions.float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(x.dtype).unsqueeze(1)  # (B, 1, d): broadcast over heads
        sin = (emb.sin() * self.rope_scale).to(x.dtype).unsqueeze(1)
        for i, (norm1, w_qkv, w_o, norm2, w_gate_up, w_down) in enumerate(self.layers):
            qkv = F.linear(self._rms(x, norm1), w_qkv)
            q = qkv[:, : h * d].view(b, h, d)
            k = qkv[:, h * d : (h + kvh) * d].view(b, kvh, d)
            v = qkv[:, (h + kvh) * d :].view(b, kvh, d)
            q = q * cos + torch.cat((-q[..., d // 2 :], q[..., : d // 2]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., d // 2 :], k[..., : d // 2]), dim=-1) * sin
            self.keys[i][:, :, index] = k
            self.values[i][:, :, index] = v
            keys, values = self.keys[i], self.values[i]
            if kvh != h:  # grouped-query attention: HF's repeat_kv
                keys, values = (
                    keys.repeat_interleave(h // kvh, dim=1),
                    values.repeat_interleave(h // kvh, dim=1),
                )
            o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=d**-0.5)
            x = x + F.linear(o.reshape(b, h * d), w_o)
            gate_up = F.linear(self._rms(x, norm2), w_gate_up)
            x = x + F.linear(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter :], w_down)
        return F.linear(self._rms(x, self.norm), self.lm_head)


@torch.no_grad()
def sample_loop(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    greedy: bool,
    eos_id: int,
    pad_id: int,
    share_prompts: bool = True,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Sample up to ``max_new_tokens`` after left-padded prompts ``(B, P)``.

    One prefill forward over the prompts (LM head on the last position only; with ``share_prompts``
    over each distinct prompt once, its cache rows then copied to its samples), then one forward per
    new token over a preallocated KV cache, nothing else per step but the sampling: ``softmax(logits
    / T)`` over the full vocabulary (no top-k / top-p) drawn from by inverse CDF with one uniform
    per row (argmax when ``greedy``). Position ids are ``cumsum(mask) − 1`` over the prompt and
    continue by one per new token. Rows that ended (EOS) get padding; the loop stops when every row
    has ended. Returns ``(tokens (B, R), logprobs (B, R), entropy (B, R), forwards)``: the
    fp32 logprob of each drawn token and the entropy of ``softmax(logits / T)`` from the same pass
    (undefined after a row's EOS), ``R ≤ max_new_tokens`` the steps taken.
    """
    b, p = input_ids.shape
    device = input_ids.device
    params = _forward_params(model)
    cache_key = "cache" if "cache" in params else "past_key_values"
    mask = torch.ones((b, p + max_new_tokens), dtype=torch.long, device=device)
    mask[:, :p] = attention_mask
    position = attention_mask.long().cumsum(-1) - 1
    prefill: dict[str, object] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    if "cache_position" in params:  # transformers < 5.x write the cache at explicit positions
        prefill["cache_position"] = torch.arange(p, device=device)
    shared = shared_prompts(input_ids, attention_mask) if share_prompts else None
    forwards = 0
    for rows in ([shared[0]] if shared is not None else []) + [torch.arange(b, device=device)]:
        cache, static = new_kv_cache(model, p + max_new_tokens)
        out = model(
            input_ids=input_ids[rows], attention_mask=(mask if static else mask[:, :p])[rows],
            position_ids=position.clamp_min(0)[rows], use_cache=True, **{cache_key: cache}, **prefill,
        )  # fmt: skip
        logits, forwards = out.logits[:, -1], forwards + 1
        if shared is not None and len(rows) < b:
            if _expand_cache(cache, shared[1]):  # each distinct prompt ran once; its samples share it
                logits = logits[shared[1]]
                break
            continue  # a cache whose rows cannot be copied: prefill every row
    step = LlamaDecodeStep.build(model, cache) if static else None
    valid = mask.bool()
    causal = (
        torch.arange(p + max_new_tokens, device=device)
        <= p + torch.arange(max_new_tokens, device=device)[:, None]
    )
    next_pos = position[:, -1:] + 1  # (B, 1): every prompt's last token is real (left padding)
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((b, max_new_tokens), dtype=torch.float, device=device)
    entropy = torch.zeros((b, max_new_tokens), dtype=torch.float, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        scaled = logits.float() / temperature
        logp = scaled.log_softmax(-1)
        probs = logp.exp()
        if greedy:
            tok = scaled.argmax(-1)
        else:  # inverse CDF: one uniform per row (a multinomial draws one exponential per vocabulary entry)
            cdf = probs.cumsum(-1)
            u = torch.rand((b, 1), device=device, dtype=cdf.dtype) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
        tok = tok.masked_fill(done, pad_id)
        tokens[:, t] = tok
        logprobs[:, t] = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        entropy[:, t] = -(probs * logp).sum(-1)
        done |= tok == eos_id
        steps = t + 1
        if steps == max_new_tokens or bool(done.all()):
            break
        forwards += 1
        if step is not None:
            logits = step(tok, next_pos + t, p + t, (valid & causal[t]).unsqueeze(1).unsqueeze(1))
            continue
        step_kw: dict[str, object] = {}
        if "cache_position" in params:
            step_kw["cache_position"] = torch.tensor([p + t], device=device)
        out = model(
            input_ids=tok.unsqueeze(-1), attention_mask=mask if static else mask[:, : p + t + 1],
            position_ids=next_pos + t, use_cache=True, **{cache_key: cache}, **step_kw,
        )  # fmt: skip
        logits = out.logits[:, -1]
    return tokens[:, :steps], logprobs[:, :steps], entropy[:, :steps], forwards
