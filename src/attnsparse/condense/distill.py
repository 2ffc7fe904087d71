"""Language-model and distillation losses on logits (pure tensor functions, tested against brute force)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnsparse.errors import AttnsparseError


def _positions(logits: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Logits of positions that predict a next token (all but the last), and their validity mask."""
    shifted = logits[:, :-1]
    if attention_mask is None:
        return shifted, None
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    return shifted, valid


def lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy (nats) over valid positions; logits (B, T, V), input_ids (B, T)."""
    shifted, valid = _positions(logits, attention_mask)
    targets = input_ids[:, 1:]
    if valid is not None:
        targets = targets.masked_fill(~valid, -100)
    shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    attention_mask: Tensor | None = None) -> Tensor:
    """T² · mean over valid positions of KL(softmax(teacher/T) ‖ softmax(student/T)), in nats.

    The forward KL from the original model's next-token distribution keeps the condensed model's predictions
    where the original's were; T² keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    Every position predicts a next token, so all positions but the last are used (as in `lm_loss`).
    """
    if not temperature > 0:
        raise AttnsparseError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise AttnsparseError(
            f"student and teacher logits differ in shape ({tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}); the teacher must share the student's vocabulary"
        )
    student, valid = _positions(student_logits, attention_mask)
    teacher, _ = _positions(teacher_logits, attention_mask)
    dtype = torch.promote_types(student.dtype, torch.float32)  # half logits are scored in float32
    log_q = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(dtype) / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    if valid is None:
        mean = per_position.mean()
    else:
        mean = (per_position * valid).sum() / valid.sum().clamp_min(1)
    return mean * temperature**2
