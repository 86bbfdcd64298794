"""Predicted effect of reloads: a weight read in two places loaded once per place.

A decoder LM whose output head is tied to its input embedding reads one large tensor at the first
op and at the last. Without a reload it stays on the device for the whole call; loaded twice it
frees room in between. For two tied LMs shaped like public small models (vocabulary, width, depth
and feed-forward width of Qwen2.5-1.5B and -3B, which tie their embeddings; random weights, built on
meta tensors) and several budgets, the adaptive plan is made twice from the same captured graph:

- "no reloads": every weight marked as one copy across all its reads (``WeightInfo.joined`` spans
  its first to last read, which is how the planner learns that a view crosses blocks), so the
  planner cannot load it twice;
- "planner's choice": the graph as captured, the planner choosing by its cost model.

Reported: the smallest budget of each, the predicted step and bytes moved per call, and whether the
chosen plan reloads. Every figure is a PREDICTION of fxswap's cost model at the card profile's
rates, not a measurement. WAN is listed too: its graph reads no weight in two separate places, so
its plans do not change (the count is printed).

Usage: ``python benchmarks/bench_reload.py [--out benchmarks/results]`` (a few minutes: captures on
meta tensors).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

GiB = 2**30
TOKENS = 512
CARD = "rtx4090"
# name: (vocab, width, layers, feed-forward width, heads)
MODELS = {
    "tied-lm-1.5b (Qwen2.5-1.5B shape)": (151936, 1536, 28, 8960, 12),
    "tied-lm-3b (Qwen2.5-3B shape)": (151936, 2048, 36, 11008, 16),
}


class Block(nn.Module):
    def __init__(self, d: int, ffn: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, ffn, bias=False), nn.Linear(d, ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + self.o(a)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TiedLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, ffn: int, heads: int, last_only: bool) -> None:
        super().__init__()
        self.last_only = last_only
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, ffn, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        if self.last_only:  # a generation step's prefill: only the next token's logits
            h = h[:, -1:]
        return self.head(self.norm(h))


def without_reloads(ir: Any) -> Any:
    """The graph with every weight held as one copy from its first read to its last."""
    reads: dict[str, list[int]] = {}
    for i, op in enumerate(ir.ops):
        for w in op.weights:
            reads.setdefault(w, []).append(i)
    weights = tuple(
        dataclasses.replace(w, joined=((reads[w.name][0], reads[w.name][-1]),)) if w.name in reads else w
        for w in ir.weights
    )
    return dataclasses.replace(ir, weights=weights)


def rows() -> list[dict[str, Any]]:
    from fxswap.bench.costmodel import plan_rates
    from fxswap.bench.graphs import wan_ir
    from fxswap.bench.hardware import get_profile
    from fxswap.capture import trace
    from fxswap.options import PlanOptions
    from fxswap.passes.occurrence import find_occurrences
    from fxswap.passes.planner import build_plan, mode_min_vram_bytes

    hw = get_profile(CARD)
    out: list[dict[str, Any]] = []
    for (name, dims), last_only in ((m, lo) for m in MODELS.items() for lo in (False, True)):
        logits = "next-token logits" if last_only else "logits for every token"
        with torch.device("meta"):
            model = TiedLM(*dims, last_only=last_only).to(torch.bfloat16).eval()
            ids = torch.zeros(1, TOKENS, dtype=torch.long)
        ir = trace(model, ids).ir
        plain = without_reloads(ir)
        base = PlanOptions.from_user(mode="adaptive", max_vram_gb=1, **plan_rates(hw))
        low = {k: mode_min_vram_bytes(g, base) for k, g in (("no_reloads", plain), ("choice", ir))}
        weights_gib = ir.weight_bytes / GiB
        # the smallest budget with reloads (below the one without them, where reloads pay), then
        # fractions of the weights
        budgets = [low["choice"]] + [
            int(weights_gib * frac * 100) * GiB // 100 for frac in (0.25, 0.4, 0.6, 0.8)
        ]
        for budget_bytes in budgets:
            budget = round(budget_bytes / GiB, 3)
            o = dataclasses.replace(base, max_vram_bytes=budget_bytes)
            row: dict[str, Any] = {
                "model": name,
                "logits": logits,
                "tokens": TOKENS,
                "card": CARD,
                "weights_gib": round(weights_gib, 2),
                "budget_gb": budget,
                "min_no_reloads_gib": round(low["no_reloads"] / GiB, 3),
                "min_choice_gib": round(low["choice"] / GiB, 3),
            }
            for key, g in (("no_reloads", plain), ("choice", ir)):
                if o.max_vram_bytes < low[key]:
                    row[f"{key}_step_ms"] = None
                    row[f"{key}_moved_gib"] = None
                    continue
                plan = build_plan(g, o)
                row[f"{key}_step_ms"] = round(plan.predicted_step_ms, 1)
                row[f"{key}_moved_gib"] = round(plan.moved_bytes_per_call / GiB, 2)
                if key == "choice":
                    row["reloads"] = sum(bool(u.spans) for u in plan.units)
            out.append(row)
    wan = wan_ir("wan2.1-t2v-14b", 832, 480, 81)
    out.append({"model": "wan2.1-t2v-14b 480p81", "weights_read_in_separate_places": len(
        {o.weight for o in find_occurrences(wan)}
    )})  # fmt: skip
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    def cell(v: Any) -> str:
        return "does not fit" if v is None else str(v)

    head = (
        "| model | logits | budget GiB | min GiB (no reloads / choice) | step ms (no reloads / choice) "
        "| moved GiB (no reloads / choice) | reloaded units |\n|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in table:
        if "budget_gb" not in r:
            continue
        body += (
            f"| {r['model']} | {r['logits']} | {r['budget_gb']} | "
            f"{r['min_no_reloads_gib']} / {r['min_choice_gib']} | "
            f"{cell(r['no_reloads_step_ms'])} / {cell(r['choice_step_ms'])} | "
            f"{cell(r['no_reloads_moved_gib'])} / {cell(r['choice_moved_gib'])} | {r.get('reloads', 0)} |\n"
        )
    tail = "".join(
        f"\n{r['model']}: {r['weights_read_in_separate_places']} weights read in separate places.\n"
        for r in table
        if "weights_read_in_separate_places" in r
    )
    return head + body + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for bench_reload.{json,md}")
    args = parser.parse_args()
    table = rows()
    text = (
        f"Predicted by fxswap's cost model (not measured): adaptive plans of tied LMs ({TOKENS} tokens, "
        f"bf16, random weights on meta) at the {CARD} profile's rates, without reloads and with the "
        "planner's choice.\nCommand: `python benchmarks/bench_reload.py --out benchmarks/results`.\n\n"
        + markdown(table)
    )
    print(text)
    if args.out:
        from fxswap.bench.report import write_prediction

        write_prediction(args.out, "bench_reload", text, table)


if __name__ == "__main__":
    main()
