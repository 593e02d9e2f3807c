"""Everything a plugin author needs, from one module::

    from instructrl.core import plugin_api as api

    @api.hookimpl
    def register_objectives(register: api.Register) -> None:
        register("example_pg", make_example_pg, config=ExamplePGConfig)

Four concepts per kind: the hook (``register_<kinds>``), ``register``, the kind's config dataclass
(fields made with :func:`param`) and the kind's input/output types below. Check
:data:`API_VERSION` if your plugin supports several releases.
"""

from __future__ import annotations

from .config import Recipe
from .errors import ConfigError, DataError, PluginError, RunFailure
from .fields import param, positive, unit_interval
from .hookspecs import Register, hookimpl
from .ops import (
    Aggregation,
    aggregate,
    all_gather,
    all_reduce_sum,
    entropy_from_logits,
    global_mean,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)
from .protocols import (
    AdvantageEstimator,
    Command,
    ExtraLoss,
    GoldJudge,
    KLController,
    KLEstimator,
    Logger,
    Objective,
    Policy,
    RewardModel,
    RewardTransform,
    SampleFn,
    Stage,
    Stateful,
    Task,
    ValueModel,
)
from .registry import KINDS, BuildContext, get_registry, make_registry
from .training import StageContext
from .types import (
    API_VERSION,
    AdvantageInput,
    AdvantageOutput,
    Completion,
    ControllerInput,
    Demonstration,
    ExtraLossInput,
    Generation,
    KLInput,
    LossOutput,
    Needs,
    ObjectiveInput,
    PolicyOutput,
    Prompt,
    Ranking,
    RewardInput,
    TokenBatch,
    TransformInput,
    scalar,
)
