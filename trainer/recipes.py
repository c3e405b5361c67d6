"""Recipes: YAML files in `recipes/`, found by name (`recipe=llama_debug`) or path, each a mapping of config keys
that may extend another (`base: NAME`). trainer/config.py merges the chain, base first, over the schema."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from models.args import ConfigError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _recipe_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"recipe={name}: no such file")
        return path
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = list_recipes()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"recipe={name}: unknown recipe.{hint} Known recipes: {', '.join(known)}")
    return path


def _recipe_chain(name: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """The recipe and its bases, base first. YAML is loaded safely: recipes hold data, never code."""
    path = _recipe_path(name)
    if str(path) in seen:
        raise ConfigError(f"recipe={name}: 'base' chain loops: {' -> '.join(seen + (str(path),))}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"recipe {path}: not valid YAML{at}: {what}; fix the file (recipes are YAML mappings of "
            f"the keys `--help` lists)"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _recipe_chain(str(base), seen + (str(path),)) if base else []
    return chain + [data]
