"""Loss terms, registered by name. A loss function takes a LossInputs and returns a scalar tensor.

Register a new term with `@register_loss("name")`; the trainer looks terms up by the names in
the config, so later capabilities (multi-token prediction, predictor losses) add terms without
touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOSSES: dict[str, Callable] = {}


@dataclass
class LossInputs:
    logits: torch.Tensor  # (B, T, V) student
    input_ids: torch.Tensor  # (B, T)
    teacher_logits: torch.Tensor | None = None
    model: torch.nn.Module | None = None


def register_loss(name: str):
    def wrap(fn):
        LOSSES[name] = fn
        return fn
    return wrap


@register_loss("lm")
def lm_loss(inputs: LossInputs) -> torch.Tensor:
    """Next-token cross-entropy, mean over predicted tokens. The labels are shifted (and the last
    position ignored) instead of slicing the logits, which would copy a (B, T, vocab) tensor."""
    labels = F.pad(inputs.input_ids[:, 1:], (0, 1), value=-100)
    logits = inputs.logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@register_loss("kd")
def kd_loss(inputs: LossInputs, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Forward KL(teacher || student) of the temperature-softened next-token distributions, times
    T² (so gradients keep their scale across temperatures), mean over tokens. With `top_k`, both
    distributions are renormalised over the teacher's k most likely tokens: the teacher's logits
    can then be kept as k values and indices instead of the whole vocabulary."""
    if inputs.teacher_logits is None:
        raise ValueError("the kd loss needs teacher logits")
    student = inputs.logits.float() / temperature
    teacher = inputs.teacher_logits.float() / temperature
    if top_k is not None:
        teacher, index = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, index)
    t_logp = F.log_softmax(teacher, dim=-1)
    s_logp = F.log_softmax(student, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * temperature**2
