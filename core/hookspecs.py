"""Every hook a plugin can implement. These docstrings are the plugin reference.

Each hook receives a ``register`` callback::

    register(name, factory, *, config=None, description=None)

- ``name``: the component's name in recipes (``kl.estimator=<name>``); unique within its kind.
- ``factory``: called as ``factory(config, ctx)`` with the validated config dataclass instance
  (or ``None`` when ``config`` is ``None``) and a :class:`~instructrl.core.registry.BuildContext`;
  returns the component.
- ``config``: a dataclass whose fields are the component's recipe keys (types, defaults and
  ``__post_init__`` range checks). Describe each field with ``instructrl.core.config.param``.
- ``description``: one line for ``instructrl plugins``; defaults to the first line of the
  factory's docstring.

Built-in components register through these same hooks (``instructrl.plugins.DEFAULT_PLUGINS``).
Third-party packages expose a module under the entry-point group ``instructrl``.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("instructrl")
hookimpl = pluggy.HookimplMarker("instructrl")

Register = Any  # Callable[..., None]; see the module docstring for its signature.


@hookspec
def register_tasks(register: Register) -> None:
    """Register Tasks (kind ``task``, recipe key ``task.name``).

    A task supplies RL and held-out prompts, SFT demonstrations, reward-model rankings and
    pretraining text, and optionally a gold judge. See :class:`instructrl.core.protocols.Task`.
    """


@hookspec
def register_policies(register: Register) -> None:
    """Register Policies (kind ``policy``, recipe key ``policy.name``).

    A policy generates responses and returns per-token logprobs and entropy of given responses at a
    temperature. See :class:`instructrl.core.protocols.Policy`.
    """


@hookspec
def register_value_models(register: Register) -> None:
    """Register value models (kind ``value_model``, recipe key ``value.name``).

    A value model returns a per-token value for every response position. Critic-free advantage
    estimators build none. See :class:`instructrl.core.protocols.ValueModel`.
    """


@hookspec
def register_reward_models(register: Register) -> None:
    """Register reward models (kind ``reward_model``, recipe key ``reward.name``).

    A reward model returns one scalar per (prompt, response). See
    :class:`instructrl.core.protocols.RewardModel`.
    """


@hookspec
def register_advantage_estimators(register: Register) -> None:
    """Register advantage estimators (kind ``advantage``, recipe key ``advantage.name``).

    Every estimator takes an :class:`~instructrl.core.types.AdvantageInput` (per-token rewards,
    values or ``None``, response mask, group ids, optional baseline) and returns advantages and
    returns. See :class:`instructrl.core.protocols.AdvantageEstimator`.
    """


@hookspec
def register_objectives(register: Register) -> None:
    """Register policy objectives (kind ``objective``, recipe key ``objective.name``).

    An objective returns a per-token policy loss and its metrics; the caller aggregates it with the
    objective's ``aggregation`` mode. See :class:`instructrl.core.protocols.Objective`.
    """


@hookspec
def register_kl_estimators(register: Register) -> None:
    """Register KL estimators (kind ``kl_estimator``, recipe key ``kl.estimator``).

    An estimator maps ``Δ = log π − log π_ref`` (and, if it needs them, both logits) to a per-token
    KL estimate. See :class:`instructrl.core.protocols.KLEstimator`.
    """


@hookspec
def register_kl_controllers(register: Register) -> None:
    """Register KL controllers (kind ``kl_controller``, recipe key ``kl.controller``).

    A controller owns the KL coefficient β, updates it from the observed KL, and saves its state in
    checkpoints. See :class:`instructrl.core.protocols.KLController`.
    """


@hookspec
def register_reward_transforms(register: Register) -> None:
    """Register reward transforms (kind ``reward_transform``, recipe list ``reward_transforms``).

    A transform maps per-sequence scores to per-sequence scores; the list is applied in order before
    the per-token KL penalty is added. See :class:`instructrl.core.protocols.RewardTransform`.
    """


@hookspec
def register_extra_losses(register: Register) -> None:
    """Register extra losses (kind ``extra_loss``; configured by a top-level recipe block of the
    same name, e.g. ``ptx.coef``).

    An extra loss is added to every policy update; a block whose ``coef`` is 0 switches it off. See
    :class:`instructrl.core.protocols.ExtraLoss`.
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment loggers (kind ``logger``, recipe list ``loggers``).

    The factory returns a Lightning logger (``lightning.pytorch.loggers.Logger``) for a stage; the
    ``ctx`` gives the stage directory. ``csv`` is always added so every stage writes
    ``metrics.csv``.
    """


@hookspec
def register_stages(register: Register) -> None:
    """Register pipeline stages (kind ``stage``, recipe list ``stages``)."""


@hookspec
def register_commands(register: Register) -> None:
    """Register launcher sub-commands (kind ``command``: ``instructrl <name> ...``)."""
