"""Distillation of a converted hybrid from its teacher: align, kd and finetune stages from a recipe.

The names below load their modules on first use, so that reading a recipe (`lt2convert.distill.recipe`, used by
`plan` and `--dry-run`) does not import the training code.
"""

import importlib

_EXPORTS = {
    "align_loss": "losses",
    "exit_kl_loss": "losses",
    "indexer_kl_loss": "losses",
    "kd_loss": "losses",
    "LoraSettings": "recipe",
    "Stage": "recipe",
    "load_stages": "recipe",
    "parse_stages": "recipe",
    "scale_budgets": "recipe",
    "DistillConfig": "train",
    "DistillResult": "train",
    "TrainingDiverged": "train",
    "config_from_run": "train",
    "run_distillation": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
