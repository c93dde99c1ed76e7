"""Distillation of a converted hybrid from its teacher: align, kd and finetune stages from a recipe."""

from lt2convert.distill.losses import align_loss, exit_kl_loss, indexer_kl_loss, kd_loss
from lt2convert.distill.recipe import LoraSettings, Stage, load_stages, parse_stages, scale_budgets
from lt2convert.distill.train import DistillConfig, DistillResult, TrainingDiverged, config_from_run, distill

__all__ = [
    "DistillConfig",
    "DistillResult",
    "LoraSettings",
    "Stage",
    "TrainingDiverged",
    "align_loss",
    "config_from_run",
    "distill",
    "exit_kl_loss",
    "indexer_kl_loss",
    "kd_loss",
    "load_stages",
    "parse_stages",
    "scale_budgets",
]
