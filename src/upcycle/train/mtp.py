"""Multi-token prediction as a recovery loss: a small head that predicts token t+2 from the model's
last hidden state at t and the embedding of token t+1 (DeepSeek-V3's MTP module, one step deep),
sharing the model's embeddings, final norm and LM head. Trained with MTP-LM (cross-entropy on t+2)
and, with a teacher, MTP-KD (KL to the teacher's distribution for t+2, i.e. its logits at t+1). The
head is a training aid: `detach_mtp` removes it before the model is saved.

    model = attach_mtp(model)                 # (the slim stage transform does it when asked)
    losses: [{name: kd}, {name: lm}, {name: mtp, weight: 0.3}]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.arch import adapter_for
from upcycle.errors import ConfigError
from upcycle.eval.equivalence import kl_divergence
from upcycle.train.losses import LossInputs, cross_entropy, register_loss

ATTRIBUTE = "mtp_head"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MTPHead(nn.Module):
    """h'_t = W [norm(h_t); norm(emb(x_t+1))], then a residual SwiGLU block. W starts as [I, 0] and the
    block's down projection at zero, so at the start the head predicts t+2 the way the model predicts
    t+1: it learns the difference."""

    def __init__(self, hidden: int, eps: float = 1e-6, width: int | None = None):
        super().__init__()
        width = width or hidden
        self.norm_hidden, self.norm_embed, self.norm_block = (
            RMSNorm(hidden, eps),
            RMSNorm(hidden, eps),
            RMSNorm(hidden, eps),
        )
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.gate, self.up = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden].copy_(torch.eye(hidden))
            for linear in (self.gate, self.up):
                nn.init.normal_(linear.weight, std=hidden**-0.5)
            self.down.weight.zero_()

    def forward(self, hidden: torch.Tensor, next_embedding: torch.Tensor) -> torch.Tensor:
        h = self.proj(torch.cat([self.norm_hidden(hidden), self.norm_embed(next_embedding)], dim=-1))
        x = self.norm_block(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


def attach_mtp(model):
    """Give `model` an MTP head of its hidden size (kept if it already has one of that size)."""
    adapter = adapter_for(model)
    head = getattr(model, ATTRIBUTE, None)
    if head is None or head.proj.weight.shape[0] != adapter.hidden_size:
        head = MTPHead(adapter.hidden_size, float(adapter.get_config("norm_eps")))
        setattr(model, ATTRIBUTE, head.to(next(model.parameters()).dtype))
    return model


def detach_mtp(model):
    """The model without its MTP head (what is exported: a stock model)."""
    if hasattr(model, ATTRIBUTE):
        delattr(model, ATTRIBUTE)
    return model


@register_loss("mtp")
def mtp_loss(inputs: LossInputs) -> torch.Tensor:
    """MTP-LM (cross-entropy on token t+2), averaged with MTP-KD (KL(teacher ‖ head) for token t+2)
    when the run has a teacher."""
    model = inputs.model
    head = getattr(model, ATTRIBUTE, None)
    if head is None or inputs.hidden_states is None:
        raise ConfigError(
            "the mtp loss needs an MTP head on the model (the slim stage's `mtp: true`, or "
            "upcycle.train.mtp.attach_mtp)"
        )
    adapter = adapter_for(model)
    ids = inputs.input_ids
    h = head(inputs.hidden_states[:, :-2], adapter.embedding()(ids[:, 1:-1]))
    logits = adapter.lm_head()(adapter.final_norm()(h))
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    if inputs.teacher_logits is not None:
        teacher = F.log_softmax(inputs.teacher_logits[:, 1:-1].float(), dim=-1)
        kd = kl_divergence(teacher, F.log_softmax(logits.float(), dim=-1)).mean()
        loss = 0.5 * (loss + kd)
    return loss


mtp_loss.needs_hidden_states = True
