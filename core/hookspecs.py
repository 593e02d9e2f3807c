"""Every hook a plugin can implement. These docstrings are the plugin reference.

Each hook receives a ``register`` callback::

    register(name, factory, *, config=None, description=None, needs=None)

- ``name``: the component's name in recipes (``kl.estimator=<name>``); a Python identifier,
  unique within its kind (a clash is an error naming both packages).
- ``factory``: called as ``factory(config, ctx)`` with the validated config dataclass instance
  (or ``None`` when ``config`` is ``None``) and a :class:`~instructrl.core.registry.BuildContext`;
  returns the component, which is checked against the kind's Protocol. For ``stage`` and
  ``command`` pass the object itself (they are planned from, not built).
- ``config``: a dataclass whose fields are the component's recipe keys (types, defaults and
  ``__post_init__`` range checks). Describe each field with ``instructrl.core.plugin_api.param``.
- ``description``: one line for ``instructrl plugins``; defaults to the first line of the
  factory's docstring.
- ``needs``: an :class:`~instructrl.core.types.Needs` declaring what the component needs (a value
  model, logits, a greedy baseline, samples per prompt, checkpointed state); read without building.

Built-in components register through these same hooks (``instructrl.plugins.DEFAULT_PLUGINS``).
Third-party packages expose a module under the entry-point group ``instructrl``.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("instructrl")
hookimpl = pluggy.HookimplMarker("instructrl")

Register = Callable[..., None]
"""``register(name, factory, *, config=None, description=None, needs=None)``; see above."""


@hookspec
def register_tasks(register: Register) -> None:
    """Register Tasks (kind ``task``, recipe key ``task.name``).

    A task supplies RL and held-out prompts, SFT demonstrations, reward-model rankings and
    pretraining text, and optionally a gold judge. Protocol: ``Task``.
    """


@hookspec
def register_policies(register: Register) -> None:
    """Register Policies (kind ``policy``, recipe key ``policy.name``).

    A policy generates responses and returns per-token logprobs and entropy of given responses at a
    temperature. Protocol: ``Policy``. Mark the config field holding its weights with
    ``param(..., model_path="weights")`` and the KL reference with ``model_path="reference"``.
    """


@hookspec
def register_value_models(register: Register) -> None:
    """Register value models (kind ``value_model``, recipe key ``value.name``).

    A value model returns a per-token value for every response position; it is built only when the
    advantage estimator declares ``Needs(values=True)``. Protocol: ``ValueModel``.
    """


@hookspec
def register_reward_models(register: Register) -> None:
    """Register reward models (kind ``reward_model``, recipe key ``reward.name``).

    A reward model returns one scalar per (prompt, response) from a ``RewardInput``. Protocol:
    ``RewardModel``.
    """


@hookspec
def register_advantage_estimators(register: Register) -> None:
    """Register advantage estimators (kind ``advantage``, recipe key ``advantage.name``).

    Every estimator takes one ``AdvantageInput`` and returns an ``AdvantageOutput``; declare
    ``Needs(values=..., greedy_baseline=..., min_samples_per_prompt=..., default_samples_per_prompt=...)``.
    Protocol: ``AdvantageEstimator``.
    """


@hookspec
def register_objectives(register: Register) -> None:
    """Register policy objectives (kind ``objective``, recipe key ``objective.name``).

    An objective maps one ``ObjectiveInput`` to a per-token loss and its metrics; the caller
    aggregates it with the objective's ``aggregation`` mode. Protocol: ``Objective``.
    """


@hookspec
def register_kl_estimators(register: Register) -> None:
    """Register KL estimators (kind ``kl_estimator``, recipe key ``kl.estimator``).

    An estimator maps one ``KLInput`` (``Δ = log π − log π_ref``; both logits when it declares
    ``Needs(logits=True)``) to a per-token KL estimate. Protocol: ``KLEstimator``.
    """


@hookspec
def register_kl_controllers(register: Register) -> None:
    """Register KL controllers (kind ``kl_controller``, recipe key ``kl.controller``).

    A controller owns the KL coefficient β, updates it from each iteration's ``ControllerInput``
    and saves its state in checkpoints. Protocol: ``KLController``.
    """


@hookspec
def register_reward_transforms(register: Register) -> None:
    """Register reward transforms (kind ``reward_transform``, recipe list ``reward_transforms``).

    A transform maps one ``TransformInput`` to per-sequence scores; the list is applied in order
    before the per-token KL penalty is added. A transform with running statistics declares
    ``Needs(stateful=True)`` and leaves them alone when ``is_baseline`` is set. Protocol:
    ``RewardTransform``.
    """


@hookspec
def register_extra_losses(register: Register) -> None:
    """Register extra losses (kind ``extra_loss``; configured by a top-level recipe block of the
    same name, e.g. ``ptx.coef``).

    An extra loss is on when its block is in the recipe and its ``coef`` is not 0; it is called with
    an ``ExtraLossInput`` on every micro-batch and returns its share of the loss. Its name must not
    be a recipe section. Protocol: ``ExtraLoss``.
    """


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment loggers (kind ``logger``, recipe list ``loggers``).

    The factory returns a Lightning logger (``lightning.pytorch.loggers.Logger``) for a stage; the
    ``ctx`` gives the stage directory. A logger declaring ``Needs(always_on=True)`` (``csv``) is
    added to every stage whatever the list says. Protocol: ``Logger``.
    """


@hookspec
def register_stages(register: Register) -> None:
    """Register pipeline stages (kind ``stage``, recipe list ``stages``).

    ``register(name, stage)`` with an object implementing the ``Stage`` protocol: the recipe
    sections it owns, its inputs (``@stage`` references are its dependencies), its cache key, when
    it is skipped, what ``--dry-run`` shows, and ``run(ctx)``.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register launcher sub-commands (kind ``command``: ``instructrl <name> …``).

    ``register(name, command)`` with an object implementing the ``Command`` protocol:
    ``add_arguments(parser)``, ``run(args) -> exit code`` and ``key_value_options``.
    """
