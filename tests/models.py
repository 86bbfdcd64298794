"""Small torch models several test files share (each file keeps the models only it uses)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MLP", "Shared", "regionally_compiled"]


def regionally_compiled(model: nn.Module, blocks: str = "blocks") -> nn.Module:
    """A copy of ``model`` with each module of ``model.<blocks>`` replaced by ``torch.compile`` of
    it and everything else eager: regional compilation, as WAN users run it, and what fxswap's
    Inductor output equals by default (it compiles the repeated blocks only).

    ``torch.compile(block)``, not ``block.compile()``: the latter compiles nothing for a bare
    torch module such as ``nn.Linear`` (Dynamo skips frames in torch's own files)."""
    ref = copy.deepcopy(model)
    container = getattr(ref, blocks)
    for i in range(len(container)):
        container[i] = torch.compile(container[i])
    return ref


class MLP(nn.Module):
    """``n`` Linear(d, d) + GELU layers: one swap unit per layer in layerwise mode."""

    def __init__(self, n: int = 6, d: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = F.gelu(b(x))
        return x


class Shared(nn.Module):
    """One weight used in two places (the same Linear twice, and a tied output projection)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.Linear(d, d, bias=False)
        self.mid = nn.Linear(d, d)
        self.out = nn.Linear(d, d, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(x)
        h = self.mid(torch.tanh(h))
        h = self.mid(h)  # second use of mid
        return self.out(h), h.sum()
