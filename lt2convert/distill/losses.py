"""Distillation losses: pure functions of tensors, each returning a scalar (computed in float32)."""

from __future__ import annotations

import torch


def align_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """Mean squared error between a student mixer's output and the teacher attention's output.

    normalize: divide by the teacher output's mean square (a relative error, comparable across layers whose
    outputs differ in scale); the teacher is a target, so no gradient flows through it."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"align_loss: student shape {list(student_out.shape)} != teacher {list(teacher_out.shape)}")
    teacher = teacher_out.detach().float()
    mse = (student_out.float() - teacher).pow(2).mean()
    if normalize:
        return mse / teacher.pow(2).mean().clamp(min=torch.finfo(torch.float32).tiny)
    return mse


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) of the softened distributions over the last dim, averaged over every other
    position, times temperature² (so gradient scale does not depend on the temperature)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student shape {list(student_logits.shape)} != teacher {list(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be positive, got {temperature}")
    log_p_teacher = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p_student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * temperature**2
