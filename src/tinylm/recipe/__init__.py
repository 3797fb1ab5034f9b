"""Recipes: one TOML file per model, read into validated dataclasses.

A recipe is a name shipped in `tinylm/recipes/` or a path to the user's own TOML file. `--set section.key=value`
overrides any field. Every problem (unknown key, wrong type, impossible shape) raises TinylmError naming the field.
"""

from tinylm.recipe.checks import validate
from tinylm.recipe.loading import (
    apply_override,
    differences,
    load_recipe,
    recipe_from_dict,
    recipe_from_toml,
    recipe_names,
    recipe_text,
)
from tinylm.recipe.sections import (
    SECTIONS,
    TOP_LEVEL_KEYS,
    CardConfig,
    DataConfig,
    ModelConfig,
    Recipe,
    SampleConfig,
    Sampling,
    TokenizerConfig,
    TrainConfig,
)
from tinylm.recipe.writing import recipe_to_toml

__all__ = ["SECTIONS", "TOP_LEVEL_KEYS", "CardConfig", "DataConfig", "ModelConfig", "Recipe", "SampleConfig",
           "Sampling", "TokenizerConfig", "TrainConfig", "apply_override", "differences", "load_recipe",
           "recipe_from_dict", "recipe_from_toml", "recipe_names", "recipe_text", "recipe_to_toml", "validate"]
