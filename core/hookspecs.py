"""Every hook a plugin can implement. These docstrings are the plugin reference.

Each hook receives a ``register`` callback::

    register(name, factory, *, config=None, description=None, needs=None)

- ``name``: the component's recipe name (``kl.estimator=<name>``), an identifier unique per kind.
- ``factory``: ``factory(config, ctx)`` with the validated config (or ``None``) and a
  ``BuildContext``; returns the component, checked against the kind's Protocol. ``stage`` and
  ``command`` register the object itself (they are planned from, not built).
- ``config``: a dataclass of the component's recipe keys, fields made with ``plugin_api.param``.
- ``description``: one line for ``instructrl plugins`` (default: the factory's docstring).
- ``needs``: a ``Needs`` declaring values, logits, greedy baseline, samples per prompt, state.

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
    """Register Tasks (kind ``task``, recipe key ``task.name``): prompts, demonstrations,
    rankings, pretraining text and optionally a gold judge. Protocol: ``Task``."""


@hookspec
def register_policies(register: Register) -> None:
    """Register Policies (kind ``policy``, recipe key ``policy.name``): sample responses, score given
    ones. Protocol: ``Policy``; mark the weights field ``param(..., model_path="weights")`` and the
    KL reference ``model_path="reference"``."""


@hookspec
def register_value_models(register: Register) -> None:
    """Register value models (kind ``value_model``, recipe key ``value.name``): a per-token value,
    built only when the estimator declares ``Needs(values=True)``. Protocol: ``ValueModel``."""


@hookspec
def register_reward_models(register: Register) -> None:
    """Register reward models (kind ``reward_model``, recipe key ``reward.name``): one scalar per
    row of a ``RewardInput``. Protocol: ``RewardModel``."""


@hookspec
def register_advantage_estimators(register: Register) -> None:
    """Register advantage estimators (kind ``advantage``, recipe key ``advantage.name``):
    ``AdvantageInput`` → ``AdvantageOutput``; declare values, greedy baseline and samples per prompt
    in ``Needs``. Protocol: ``AdvantageEstimator``."""


@hookspec
def register_objectives(register: Register) -> None:
    """Register policy objectives (kind ``objective``, recipe key ``objective.name``):
    ``ObjectiveInput`` → per-token loss, aggregated by the caller with the objective's
    ``aggregation``. Protocol: ``Objective``."""


@hookspec
def register_kl_estimators(register: Register) -> None:
    """Register KL estimators (kind ``kl_estimator``, recipe key ``kl.estimator``): ``KLInput``
    (``Δ = log π − log π_ref``; logits with ``Needs(logits=True)``) → per-token KL. Protocol:
    ``KLEstimator``."""


@hookspec
def register_kl_controllers(register: Register) -> None:
    """Register KL controllers (kind ``kl_controller``, recipe key ``kl.controller``): own β, update it
    from each iteration's ``ControllerInput``, checkpoint it. Protocol: ``KLController``."""


@hookspec
def register_reward_transforms(register: Register) -> None:
    """Register reward transforms (kind ``reward_transform``, recipe list ``reward_transforms``):
    ``TransformInput`` → per-sequence scores, in list order before the KL penalty; running
    statistics declare ``Needs(stateful=True)`` and skip ``is_baseline`` batches. Protocol:
    ``RewardTransform``."""


@hookspec
def register_extra_losses(register: Register) -> None:
    """Register extra losses (kind ``extra_loss``, a top-level recipe block of the same name, e.g.
    ``ptx.coef``): on when the block is present and ``coef`` ≠ 0; called on every micro-batch with an
    ``ExtraLossInput``, returning its share. The name must not be a recipe section. Protocol:
    ``ExtraLoss``."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register experiment loggers (kind ``logger``, recipe list ``loggers``): a Lightning logger per
    stage; ``Needs(always_on=True)`` (``csv``) adds it to every stage. Protocol: ``Logger``."""


@hookspec
def register_stages(register: Register) -> None:
    """Register pipeline stages (kind ``stage``, recipe list ``stages``) as objects: the sections
    they own, their inputs (``@stage`` references are dependencies), cache key, skip, check,
    describe and ``run(ctx)``. Protocol: ``Stage``."""


@hookspec
def register_commands(register: Register) -> None:
    """Register launcher sub-commands (kind ``command``, ``instructrl <name> …``) as objects:
    ``add_arguments(parser)``, ``run(args) -> exit code``, ``key_value_options``. Protocol:
    ``Command``."""
