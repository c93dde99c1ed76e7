"""Distillation of a converted hybrid from its teacher. Built so far: the align stage (teacher-forced mixer MSE)."""

from lt2convert.distill.data import PackedTokenStream, byte_encode
from lt2convert.distill.losses import align_loss, kd_loss
from lt2convert.distill.train import AlignConfig, AlignResult, TrainingDiverged, train_align

__all__ = [
    "AlignConfig",
    "AlignResult",
    "PackedTokenStream",
    "TrainingDiverged",
    "align_loss",
    "byte_encode",
    "kd_loss",
    "train_align",
]
