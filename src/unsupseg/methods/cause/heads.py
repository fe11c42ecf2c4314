"""CAUSE heads (docs/methods/cause.md §3.1): the two-branch projection Π, the MLP and TR segmentation heads, the
projection g, and the EMA update. Module and parameter names follow the reference
(``f1``, ``f2.0``, ``f2.2``, ``query_pos``, ``tr.self_attn`` ...) so published files map 1:1 (its
1x1 convolutions are per-token linears here).

Heads take tokens B x N x D and return B x N x r.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .losses import quantize


class Projection(nn.Module):
    """Π_{F→r}(Z) = f1(δ₁(Z)) + f2(δ₂(Z)), f2 = Lin_{F→r} ∘ ReLU ∘ Lin_{F→F}; δ₁, δ₂ independent
    dropout draws (active in train mode, for the teacher too). This is the whole MLP head."""

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1):
        super().__init__()
        self.f1 = nn.Linear(dim, reduced_dim)
        self.f2 = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, reduced_dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, z: Tensor) -> Tensor:
        return self.f1(self.drop(z)) + self.f2(self.drop(z))


MLPHead = Projection


class TRDecoder(Projection):
    """One DETR-style post-norm decoder layer (1 head by default) followed by Π on T + LN₃(t)."""

    def __init__(self, dim: int, reduced_dim: int, ffn_dim: int = 2048, heads: int = 1, dropout: float = 0.1):
        super().__init__(dim, reduced_dim, dropout)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        q = queries + pos
        t = self.norm1(queries + self.dropout1(self.self_attn(q, q, queries, need_weights=False)[0]))
        t = self.norm2(t + self.dropout2(self.multihead_attn(t + pos, memory, memory, need_weights=False)[0]))
        t = t + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t)))))
        return super().forward(memory + self.norm3(t))


class TRHead(nn.Module):
    """CAUSE-TR head: queries VQ(T) (+ a learned position table of fixed length N_q) attend to the
    raw tokens T. Carries the clusterbook M as a buffer that is not part of its state dict."""

    def __init__(self, dim: int, reduced_dim: int, codebook: Tensor, num_queries: int,
                 ffn_dim: int = 2048, heads: int = 1, dropout: float = 0.1):
        super().__init__()
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.tr = TRDecoder(dim, reduced_dim, ffn_dim, heads, dropout)
        self.register_buffer("codebook", codebook.detach().clone().float(), persistent=False)

    @property
    def num_queries(self) -> int:
        return self.query_pos.shape[0]

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] != self.num_queries:
            raise ConfigError(
                f"the CAUSE-TR head was trained on {self.num_queries} tokens per image and got {tokens.shape[1]}: "
                "use the training resolution (or let the segmenter tile windows of that size)"
            )
        return self.tr(quantize(tokens, self.codebook), tokens, self.query_pos.unsqueeze(0))


class ProjectionHead(nn.Module):
    """g: Lin_{r→P}, applied per token."""

    def __init__(self, reduced_dim: int, projection_dim: int):
        super().__init__()
        self.f = nn.Linear(reduced_dim, projection_dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.f(y)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """θ_t ← decay·θ_t + (1 - decay)·θ_s for every parameter (buffers are constants here)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t_params, decay)
    torch._foreach_add_(t_params, s_params, alpha=1 - decay)


def make_teacher(student: nn.Module) -> nn.Module:
    """An exact, gradient-free copy of ``student`` (docs/methods/cause.md §7.10)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher
