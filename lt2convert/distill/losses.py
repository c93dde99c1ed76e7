"""Distillation losses: pure functions of tensors, each returning a scalar (computed in float32)."""

from __future__ import annotations

import torch


def align_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    normalize: bool = False,
    mean_square: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between a student mixer's output and the teacher attention's output.

    normalize: divide by the teacher output's mean square (a relative error, comparable across layers whose
    outputs differ in scale), or by `mean_square` when given (the whole batch's, when processes split it); the
    teacher is a target, so no gradient flows through it."""
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"align_loss: student shape {list(student_out.shape)} != teacher {list(teacher_out.shape)}")
    teacher = teacher_out.detach().float()
    mse = (student_out.float() - teacher).pow(2).mean()
    if normalize:
        scale = teacher.pow(2).mean() if mean_square is None else mean_square.detach().float()
        return mse / scale.clamp(min=torch.finfo(torch.float32).tiny)
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


def exit_kl_loss(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) between exit distributions over loop steps ([steps, ...] each), averaged over the
    other positions. Probabilities are clamped away from 0 so a step the student never exits at stays finite."""
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(f"exit_kl_loss: student shape {list(student_probs.shape)} != {list(teacher_probs.shape)}")
    tiny = torch.finfo(torch.float32).tiny
    p = teacher_probs.detach().float().clamp(min=tiny)
    q = student_probs.float().clamp(min=tiny)
    return (p * (p.log() - q.log())).sum(0).mean()


def indexer_kl_loss(index_logits: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Dense warm-up of a DSA lightning indexer: KL(attention ‖ softmax(index_logits)) over the causal keys of each
    query ([B, S, S] both; `attention` is the teacher's head-averaged causal attention distribution)."""
    if index_logits.shape != attention.shape:
        raise ValueError(f"indexer_kl_loss: logits shape {list(index_logits.shape)} != {list(attention.shape)}")
    seq = index_logits.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=index_logits.device).tril()
    log_q = index_logits.float().masked_fill(~causal, float("-inf")).log_softmax(-1)
    p = attention.detach().float()
    terms = torch.where(p > 0, p * (p.clamp(min=torch.finfo(torch.float32).tiny).log() - log_q), 0.0)
    return terms.sum(-1).mean()
