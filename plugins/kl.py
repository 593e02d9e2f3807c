"""KL estimators and KL controllers.

Estimators map ``Δ = log π(y_t) − log π_ref(y_t)`` of sampled tokens ``y_t ∼ π`` to a per-token
estimate of ``KL(π ‖ π_ref)`` (Schulman, "Approximating KL divergence", 2020). Controllers own the
coefficient β (Ziegler et al. 2019 for the adaptive one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.registry import BuildContext
from instructrl.core.types import ControllerInput, KLInput, Needs
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Pure estimators.  Shapes: (B, R) in, (B, R) out, unmasked.
# --------------------------------------------------------------------------------------------


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = Δ. Unbiased for KL(π‖π_ref) under y ∼ π, high variance, can be negative per token.

    As a loss term its gradient is ∇log π, whose expectation on-policy is 0: it does not pull π
    towards π_ref (use it in the reward, as InstructGPT does, or use k2/k3 in the loss).
    """
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = ½Δ². Biased (exact to second order when π ≈ π_ref), low variance, always ≥ 0.

    As a loss term its gradient Δ·∇log π has expectation ∇KL(π‖π_ref) on-policy: the right
    gradient for a KL penalty placed in the loss.
    """
    delta = logprobs - ref_logprobs
    return 0.5 * delta * delta


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = e^{−Δ} + Δ − 1 = (r − 1) − log r with r = π_ref/π. Unbiased, low variance, always ≥ 0.

    As a loss term (GRPO's choice) its on-policy gradient is the gradient of KL(π_ref‖π), the
    reverse direction; it explodes when π puts much less mass than π_ref on a sampled token.
    """
    delta = logprobs - ref_logprobs
    return torch.exp(-delta) + delta - 1.0


def kl_abs(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """|Δ|. Biased (an upper bound in expectation of no divergence in particular), always ≥ 0;
    its gradient sign(Δ)·∇log π pushes each token's log-ratio towards 0 at a constant rate."""
    return (logprobs - ref_logprobs).abs()


def kl_full(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact per-position KL over the vocabulary: ``Σ_v p(v) (log p(v) − log p_ref(v))``.

    No sampling error (zero variance given the position); costs a ``(B, R, V)`` reference logits
    tensor. As a loss its gradient is the exact gradient of the per-position KL.
    Shape: ``(B, R, V)`` × 2 → ``(B, R)``; computed in fp32.
    """
    logp = logits.float().log_softmax(-1)
    logq = ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


class DeltaEstimator:
    """A KL estimator that only needs the sampled tokens' logprobs."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, inp: KLInput) -> Tensor:
        return self.fn(inp.logprobs, inp.ref_logprobs)


class FullEstimator:
    """The exact KL from both models' full-vocabulary logits (registered with ``Needs(logits=True)``)."""

    def __call__(self, inp: KLInput) -> Tensor:
        if inp.logits is None or inp.ref_logits is None:
            raise ValueError(
                "kl.estimator=full needs the policy and reference logits (KLInput.logits / ref_logits)"
            )
        return kl_full(inp.logits, inp.ref_logits)


def make_k1(config: None, ctx: BuildContext) -> DeltaEstimator:
    """k1 = Δ: unbiased, high variance (InstructGPT's per-token penalty)."""
    return DeltaEstimator(kl_k1)


def make_k2(config: None, ctx: BuildContext) -> DeltaEstimator:
    """k2 = ½Δ²: biased, low variance, ≥ 0; right gradient as a loss."""
    return DeltaEstimator(kl_k2)


def make_k3(config: None, ctx: BuildContext) -> DeltaEstimator:
    """k3 = e^−Δ + Δ − 1: unbiased, low variance, ≥ 0 (GRPO's KL loss)."""
    return DeltaEstimator(kl_k3)


def make_abs(config: None, ctx: BuildContext) -> DeltaEstimator:
    """|Δ|: biased, ≥ 0."""
    return DeltaEstimator(kl_abs)


def make_full(config: None, ctx: BuildContext) -> FullEstimator:
    """Exact KL over the vocabulary from both models' logits (no sampling noise)."""
    return FullEstimator()


# --------------------------------------------------------------------------------------------
# Controllers
# --------------------------------------------------------------------------------------------


def adaptive_kl_update(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019): ``e = clip(KL/target − 1, −0.2, 0.2)``; ``β ← β·(1 + e·n/horizon)``."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@dataclass
class FixedKLConfig:
    coef: float = param(0.02, "β, the KL coefficient (InstructGPT: 0.02).")

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")


@dataclass
class AdaptiveKLConfig:
    coef: float = param(0.02, "Initial β.")
    target: float = param(
        6.0, "Target KL per sequence in nats, summed over tokens (lm-human-preferences: 6)."
    )
    horizon: int = param(
        10000, "Episodes over which β moves by at most 20 % per unit error (lm-human-preferences: 10000)."
    )

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")
        if self.target <= 0:
            raise ValueError(f"target must be > 0 (got {self.target})")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0 (got {self.horizon})")


def _penalises(config: object) -> bool:
    """A fixed controller applies a penalty unless ``coef`` is 0."""
    return not (isinstance(config, FixedKLConfig) and config.coef == 0.0)


class FixedKL:
    """A constant β."""

    def __init__(self, coef: float) -> None:
        self._coef = float(coef)

    @property
    def coef(self) -> float:
        return self._coef

    def update(self, inp: ControllerInput) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, object]:
        return {"coef": self._coef}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._coef = float(state["coef"])  # type: ignore[arg-type]


class AdaptiveKL(FixedKL):
    """β adapted towards a target KL (proportional controller with a clipped error)."""

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        super().__init__(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, inp: ControllerInput) -> None:
        """Move β by the clipped error of the mean per-sequence KL over ``n_episodes`` episodes."""
        self._coef = adaptive_kl_update(self._coef, inp.mean_kl, self.target, self.horizon, inp.n_episodes)


def make_fixed(config: FixedKLConfig, ctx: BuildContext) -> FixedKL:
    """A constant KL coefficient β."""
    return FixedKL(config.coef)


def make_adaptive(config: AdaptiveKLConfig, ctx: BuildContext) -> AdaptiveKL:
    """β adapted towards kl.target nats per sequence (Ziegler et al. 2019)."""
    return AdaptiveKL(config.coef, config.target, config.horizon)


@hookimpl
def register_kl_estimators(register: Register) -> None:
    register("k1", make_k1)
    register("k2", make_k2)
    register("k3", make_k3)
    register("abs", make_abs)
    register("full", make_full, needs=Needs(logits=True))


@hookimpl
def register_kl_controllers(register: Register) -> None:
    register("fixed", make_fixed, config=FixedKLConfig, needs=Needs(active=_penalises))
    register("adaptive", make_adaptive, config=AdaptiveKLConfig)
