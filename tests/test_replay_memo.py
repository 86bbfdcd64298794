"""The replay's memo (fxswap.replay._StepMemo) against full replays of the same programs.

A region replayed once per distinct situation and its effect repeated after that must give the
replay's result exactly: every allocation level and every fxswap event at the same index. Each
build below replays its program both ways, the full replay being the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxswap
import fxswap.replay as replay_mod
from fxswap.regional import clear_programs

COMMON: dict[str, Any] = dict(reserve_mb=0, device="cpu")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.norm(x))
        return x + self.down(F.gelu(h) * torch.sigmoid(h))


class Blocks(nn.Module):
    def __init__(self, n: int = 8, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _weights(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _both_ways(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any, int]]:
    """Make every replay fxswap runs happen twice, full and memoised; returns what each gave and
    how many region calls the memo served without replaying them."""
    seen: list[tuple[Any, Any, int]] = []
    real = replay_mod.replay
    applied = [0]
    real_apply = replay_mod._StepMemo._apply

    def counting_apply(self: Any, effect: Any, args: list[Any]) -> Any:
        applied[0] += 1
        return real_apply(self, effect, args)

    def both(compiled: Any, inputs: Any, device: Any, rules: Any = None) -> Any:
        monkeypatch.setattr(replay_mod, "MEMO", False)
        full = real(compiled, list(inputs), device, rules)
        monkeypatch.setattr(replay_mod, "MEMO", True)
        before = applied[0]
        memo = real(compiled, list(inputs), device, rules)
        seen.append((full, memo, applied[0] - before))
        return memo

    monkeypatch.setattr(replay_mod, "replay", both)
    monkeypatch.setattr(replay_mod._StepMemo, "_apply", counting_apply)
    return seen


def _check(seen: list[tuple[Any, Any, int]], blocks: int) -> None:
    assert seen, "no replay ran"
    for full, memo, served in seen:
        assert memo.levels == full.levels
        assert memo.events == full.events
        # the memo did serve: every block after the first ones of each situation
        assert served >= blocks - 3, [s for _, _, s in seen]


@pytest.mark.parametrize("mode", ["layerwise", "chunkwise"])
def test_memo_gives_the_full_replay_for_a_swapping_build(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_programs()
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(16, 32)
    seen = _both_ways(monkeypatch)
    sm = fxswap.compile(
        model,
        mode=mode,
        max_vram_gb=0.55 * _weights(model) / 2**30,
        block_size_mb=0.02,
        backend="inductor",
        **COMMON,
    )
    with torch.no_grad():
        sm(x)
    assert sm.plan is not None and sum(not u.resident for u in sm.plan.units) >= 3
    _check(seen, 8)


def test_memo_gives_the_full_replay_with_swap_ops_inside_the_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # A plan made for the eager backend keeps exact positions: a chunk's wait and release sit
    # between a block's matmuls, inside its compiled program, so the memo repeats fxswap events.
    clear_programs()
    torch.manual_seed(0)
    model = Blocks().eval()
    x = torch.randn(16, 32)
    eager = fxswap.compile(
        model,
        mode="chunkwise",
        max_vram_gb=0.55 * _weights(model) / 2**30,
        block_size_mb=0.02,
        backend="eager",
        **COMMON,
    )
    with torch.no_grad():
        eager(x)
    plan = eager.plan
    assert plan is not None
    inside = [
        u for u in plan.units if not u.resident and u.name.startswith("blocks.") and u.name.endswith(".down")
    ]
    assert inside, "the plan must wait for a block's second matmul's weights inside the block"
    seen = _both_ways(monkeypatch)
    ind = fxswap.compile(model, plan=plan, backend="inductor", **COMMON)
    with torch.no_grad():
        ind(x)
    _check(seen, 8)
    assert any(full.events for full, _, _ in seen)
