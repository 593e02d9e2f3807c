"""Masked tensor statistics and loss aggregation: pure, typed functions.

Statistics that whiten or normalise (mean, variance) are computed **across processes** when
``torch.distributed`` is initialised (Lightning's DDP), so every rank whitens with the same global
numbers; in a single process they are plain masked statistics.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = typing.get_args(Aggregation)


def distributed() -> bool:
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum of ``x`` over processes (identity in a single process). Differentiable-free: use on stats."""
    if not distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, *, global_: bool = False) -> Tensor:
    """Mean of ``x`` where ``mask`` (same shape, float or bool) is 1: over ``dim`` only (local), or
    over everything when ``dim`` is ``None`` — and over all processes too with ``global_``."""
    mask = mask.to(x.dtype)
    if dim is not None:
        return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)
    total = torch.stack([(x * mask).sum(), mask.sum()])
    if global_:
        total = all_reduce_sum(total)
    return total[0] / total[1].clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True, global_: bool = False) -> Tensor:
    """Variance of the masked elements of ``x`` (scalar); Bessel-corrected when ``unbiased``."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, global_=global_)
    stats = torch.stack([((x - mean) ** 2 * mask).sum(), mask.sum()])
    if global_:
        stats = all_reduce_sum(stats)
    sq, n = stats[0], stats[1]
    if unbiased:
        if n <= 1:
            return torch.zeros((), dtype=x.dtype)
        return sq / (n - 1)
    return sq / n.clamp_min(1.0)


def masked_whiten(
    x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8, global_: bool = True
) -> Tensor:
    """``(x − mean) / std`` over the masked elements (global over processes by default).

    With ``shift_mean=False`` the mean is added back (scale only), as in lm-human-preferences'
    reward whitening option. Masked-out elements are returned as 0.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, global_=global_)
    var = masked_var(x, mask, global_=global_)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def aggregate(
    loss: Tensor, mask: Tensor, mode: str, *, num_seqs: int | None = None, num_tokens: float | Tensor | None = None,
    norm_len: int | None = None,
) -> Tensor:  # fmt: skip
    """Reduce a per-token loss ``(B, R)`` to a scalar.

    Modes (``n_i`` = real tokens of sequence ``i``, ``N`` = sequences, ``T`` = tokens):

    - ``token_mean``: ``Σ_i Σ_t l / T`` (every token weighs the same; PPO in TRL, DAPO).
    - ``seq_mean_token_mean``: ``Σ_i (Σ_t l / n_i) / N`` (every sequence weighs the same; GRPO paper).
    - ``seq_mean_token_sum``: ``Σ_i Σ_t l / N``.
    - ``seq_mean_token_sum_norm``: ``Σ_i Σ_t l / (N · L)`` with a constant ``L`` (Dr. GRPO).

    ``loss`` and ``mask`` are ``(B, R)``; ``N``, ``T`` and ``L`` default to ``B``, ``mask.sum()`` and
    ``R``. For gradient accumulation pass the **minibatch** totals (``num_seqs``, ``num_tokens``)
    while ``loss`` holds one micro-batch: the micro-batch losses then sum to the minibatch loss.
    """
    mask = mask.to(loss.dtype)
    n_seqs = float(num_seqs if num_seqs is not None else loss.shape[0])
    if mode == "token_mean":
        denom = num_tokens if num_tokens is not None else mask.sum().clamp_min(1.0)
        return (loss * mask).sum() / denom
    if mode == "seq_mean_token_mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
        return per_seq.sum() / n_seqs
    if mode == "seq_mean_token_sum":
        return (loss * mask).sum() / n_seqs
    if mode == "seq_mean_token_sum_norm":
        length = float(norm_len if norm_len is not None else loss.shape[-1])
        return (loss * mask).sum() / (n_seqs * length)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)} (got {mode!r})")


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """``(B, R)`` log-softmax of ``logits (B, R, V)`` gathered at ``tokens (B, R)``; fp32."""
    logits = logits.float()
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """``(B, R)`` entropy of ``softmax(logits)`` for ``logits (B, R, V)``; fp32."""
    logits = logits.float()
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def all_gather(x: Tensor) -> Tensor:
    """``x`` from every process concatenated along dim 0 (``x`` itself in a single process).

    Every process must pass the same shape except dim 0 is allowed to differ; not differentiable.
    """
    if not distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    biggest = int(max(int(s) for s in sizes))
    padded = torch.zeros((biggest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def global_mean(x: Tensor) -> float:
    """Mean of all elements of ``x`` over all processes (``nan`` when there are none)."""
    x = x.detach().float().reshape(-1)
    s = all_reduce_sum(torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return float(s[0] / s[1]) if float(s[1]) > 0 else float("nan")
