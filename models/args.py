"""What every layer reads off a config, kept in a leaf below them all (it imports nothing of shardwise's but the
model definition): the model's shape (`model_args_of`), whether an optional package is installed (`installed`), and
the error a config that must not start raises (`ConfigError`). The config schema (trainer/config.py), the
optimizers, the strategies and the trainer import these from here, so none of them imports another's config code.
"""

from __future__ import annotations

import importlib.util

from models.llama import args_from_config


class ConfigError(ValueError):
    """A config that must not start a run. `problems` lists every violation found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) > 1)}):\n{lines}")


def model_args_of(cfg):
    """The model shape: the flavor with the recipe's changes applied (models/llama.py args_from_config)."""
    try:
        return args_from_config(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def installed(module: str) -> bool:
    """Whether `module` can be imported here, without importing it (a blocked `sys.modules[m] = None` says no)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
