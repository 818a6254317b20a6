"""Recipes: each method as one file that composes the pipeline's stages."""

from . import augcond, baselines, dpt, ldmlr, synaug, tada, utilgen  # noqa: F401  (registers the recipes)
from .registry import RECIPES, Recipe, RecipeResult, get_recipe, register_recipe

__all__ = ["RECIPES", "Recipe", "RecipeResult", "get_recipe", "register_recipe"]
