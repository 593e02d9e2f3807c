"""Recipes, split by job: :mod:`.schema` (the keys the core owns), :mod:`.load` (bundled names,
``extends``, smoke overlay, overrides), :mod:`.validate` (every block before anything is built) and
:mod:`.hashing` (stage-cache keys).

A recipe is an OmegaConf YAML file. Component blocks (``task``, ``policy``, ``value``, ``reward``,
``advantage``, ``objective``, ``kl``, ``reward_transforms``, ``loggers``) select a registered
component by name and carry that component's own keys; stage sections (``sft``, ``rl`` …) belong
to the stages that register them; one top-level block per active extra loss (``ptx:``). Stage
inputs that another stage produces are written ``@<stage>`` (``policy.model: "@sft"``).
"""

from .hashing import stable_hash
from .load import bundled_recipes, bundled_sweeps, compose, load_yaml, parse_overrides, recipe_path
from .schema import LIST_SLOTS, SLOTS, RecipeSchema
from .validate import Choice, Derived, Recipe, load_recipe, stage_sections, validate_recipe

__all__ = [
    "LIST_SLOTS",
    "SLOTS",
    "Choice",
    "Derived",
    "Recipe",
    "RecipeSchema",
    "bundled_recipes",
    "bundled_sweeps",
    "compose",
    "load_recipe",
    "load_yaml",
    "parse_overrides",
    "recipe_path",
    "stable_hash",
    "stage_sections",
    "validate_recipe",
]
