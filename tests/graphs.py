"""Synthetic GraphIR builders and hypothesis strategies for planner tests (no torch).

- :func:`build_graph`: a GraphIR from a list of ops, each with the weights it reads, its output
  bytes and the index of its output's last reader (skip connections are long ranges).
- :func:`chain_graph`: a small deterministic transformer-like chain (embed, blocks, head).
- :func:`transformer_graph`: a WAN-14B-sized graph (40 blocks, ~7,000 ops, ~1,100 weights, bf16
  sizes of a 5120-wide DiT at 480p/81 frames) for the planner timing check.
- :func:`graphs`: a hypothesis strategy of random graphs: chains and DAGs with skip connections,
  weights read twice far apart (sometimes joined by a view), random weight and activation sizes
  (MiB granularity so that the adaptive chunk sizes of 64 MiB .. 2 GiB cut them in different
  ways), zero-sized weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from fxswap.ir import BufferInfo, GraphIR, InputInfo, OpInfo, WeightInfo

__all__ = ["OpSpec", "build_graph", "chain_graph", "graphs", "transformer_graph"]

MiB = 2**20


@dataclass(frozen=True)
class OpSpec:
    """One op to build: the weights it reads, its output bytes and its output's last reader."""

    weights: tuple[str, ...] = ()
    out_bytes: int = 0
    end: int | None = None  # last op reading the output; None: the next op (or itself if last)
    flops: float = 0.0
    mem_bytes: int = 0
    target: str = "aten.op"
    module: str | None = None  # None: the module of the first weight read ("" when none)


def build_graph(
    weights: Sequence[tuple[str, int]],
    ops: Sequence[OpSpec],
    *,
    inputs: Sequence[tuple[str, tuple[int, ...], str]] = (("x", (1, 16), "bfloat16"),),
    input_bytes: int = 0,
    dtype: str = "bfloat16",
    joined: dict[str, tuple[tuple[int, int], ...]] | None = None,
) -> GraphIR:
    """Assemble a GraphIR; ``weights`` may be in any order (the IR lists them by first use)."""
    n = len(ops)
    sizes = dict(weights)
    first: dict[str, int] = {}
    for i, op in enumerate(ops):
        for w in op.weights:
            first.setdefault(w, i)
    declared = [name for name, _ in weights]
    ordered = sorted(declared, key=lambda w: (first.get(w, n), declared.index(w)))
    winfos = tuple(
        WeightInfo(
            name=w,
            shape=(sizes[w],),
            dtype=dtype,
            nbytes=sizes[w],
            module=w.rpartition(".")[0],
            joined=(joined or {}).get(w, ()),
        )
        for w in ordered
    )
    opinfos = []
    buffers = []
    if input_bytes and n:
        buffers.append(BufferInfo("x", input_bytes, 0, min(1, n - 1)))
    for i, op in enumerate(ops):
        name = f"op{i}"
        module = (
            op.module if op.module is not None else op.weights[0].rpartition(".")[0] if op.weights else ""
        )
        opinfos.append(OpInfo(name, op.target, module, op.weights, op.out_bytes, op.flops, op.mem_bytes))
        if op.out_bytes:
            end = min(n - 1, i + 1) if op.end is None else min(n - 1, max(i, op.end))
            buffers.append(BufferInfo(name, op.out_bytes, i, end))
    return GraphIR(
        ops=tuple(opinfos),
        weights=winfos,
        buffers=tuple(buffers),
        inputs=tuple(InputInfo(name, shape, dt) for name, shape, dt in inputs),
    )


def chain_graph(
    n_blocks: int = 3,
    *,
    sublayers: Sequence[str] = ("attn", "ffn"),
    weight_bytes: int = 100 * MiB,
    act_bytes: int = 10 * MiB,
    embed_bytes: int = 50 * MiB,
    head_bytes: int = 50 * MiB,
    flops: float = 1e12,
) -> GraphIR:
    """embed -> blocks.i.{sublayer}.weight (one linear + one add each) -> head.

    Each block's input is a residual buffer live across the whole block (a skip connection).
    """
    weights: list[tuple[str, int]] = []
    ops: list[OpSpec] = []
    if embed_bytes:
        weights.append(("embed.weight", embed_bytes))
        ops.append(OpSpec(("embed.weight",), act_bytes, flops=flops))
    for b in range(n_blocks):
        block_start = len(ops)
        per_block = 2 * len(sublayers)
        for s in sublayers:
            name = f"blocks.{b}.{s}.weight"
            weights.append((name, weight_bytes))
            ops.append(OpSpec((name,), act_bytes, flops=flops))
            ops.append(OpSpec((), act_bytes, mem_bytes=3 * act_bytes))
        # the block's residual input stays live until its last op
        ops[block_start] = OpSpec(
            ops[block_start].weights, act_bytes, end=block_start + per_block - 1, flops=flops
        )
    if head_bytes:
        weights.append(("head.weight", head_bytes))
        ops.append(OpSpec(("head.weight",), act_bytes, flops=flops))
    return build_graph(weights, ops, input_bytes=act_bytes)


def transformer_graph(
    n_blocks: int = 40,
    *,
    dim: int = 5120,
    ffn_dim: int = 13824,
    tokens: int = 32760,
    text_tokens: int = 512,
    ops_per_block: int = 172,
) -> GraphIR:
    """A WAN-14B-sized synthetic DiT: ~7,000 ops, ~1,100 weights, bf16 sizes.

    Per block: self_attn (q, k, v, o + biases, norm_q, norm_k), cross_attn (same), norm3, ffn.0 and
    ffn.2 (+ biases), modulation: 27 weights, ~0.8 GB. Activation buffers: hidden states of
    ``tokens x dim`` bf16 live between ops, one ``tokens x ffn_dim`` intermediate, and the block
    input kept live across the block (residual).
    """
    bf16 = 2
    h = tokens * dim * bf16
    weights: list[tuple[str, int]] = []
    ops: list[OpSpec] = []

    def linear(name: str, fan_in: int, fan_out: int, out: int, bias: bool = True) -> None:
        weights.append((f"{name}.weight", fan_in * fan_out * bf16))
        names: tuple[str, ...] = (f"{name}.weight",)
        if bias:
            weights.append((f"{name}.bias", fan_out * bf16))
            names += (f"{name}.bias",)
        rows = text_tokens if "cross_attn.k" in name or "cross_attn.v" in name else tokens
        ops.append(OpSpec(names, out, flops=2.0 * rows * fan_in * fan_out, target="torch._C._nn.linear"))

    def pointwise(count: int, out: int = h) -> None:
        for _ in range(count):
            ops.append(OpSpec((), out, mem_bytes=3 * out, target="aten.add"))

    linear("patch_embedding", 16 * 4 * 2 * 2, dim, h)
    linear("text_embedding.0", 4096, dim, text_tokens * dim * bf16)
    linear("text_embedding.2", dim, dim, text_tokens * dim * bf16)
    linear("time_embedding.0", 256, dim, dim * bf16)
    linear("time_embedding.2", dim, dim, dim * bf16)
    linear("time_projection.1", dim, 6 * dim, 6 * dim * bf16)
    for b in range(n_blocks):
        start = len(ops)
        p = f"blocks.{b}"
        weights.append((f"{p}.modulation", 6 * dim * bf16))
        ops.append(OpSpec((f"{p}.modulation",), 6 * dim * bf16, mem_bytes=12 * dim * bf16))
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v"):
                linear(f"{p}.{attn}.{proj}", dim, dim, h)
            for nrm in ("norm_q", "norm_k"):
                weights.append((f"{p}.{attn}.{nrm}.weight", dim * bf16))
                ops.append(OpSpec((f"{p}.{attn}.{nrm}.weight",), h, mem_bytes=2 * h))
            ops.append(OpSpec((), h, flops=4.0 * tokens * tokens * dim, target="aten.sdpa"))
            linear(f"{p}.{attn}.o", dim, dim, h)
        for nrm in ("norm3",):
            weights.append((f"{p}.{nrm}.weight", dim * 4))
            weights.append((f"{p}.{nrm}.bias", dim * 4))
            ops.append(OpSpec((f"{p}.{nrm}.weight", f"{p}.{nrm}.bias"), h, mem_bytes=2 * h))
        linear(f"{p}.ffn.0", dim, ffn_dim, tokens * ffn_dim * bf16)
        pointwise(1, tokens * ffn_dim * bf16)
        linear(f"{p}.ffn.2", ffn_dim, dim, h)
        pointwise(ops_per_block - (len(ops) - start))
        ops[start] = OpSpec(ops[start].weights, h, end=len(ops) - 1, mem_bytes=ops[start].mem_bytes)
    weights.append(("head.modulation", 2 * dim * bf16))
    ops.append(OpSpec(("head.modulation",), h, mem_bytes=2 * h))
    linear("head.head", dim, 64, tokens * 64 * bf16)
    return build_graph(
        weights, ops, inputs=(("x", (1, 16, 21, 60, 104), "bfloat16"),), input_bytes=16 * 21 * 60 * 104 * bf16
    )


@st.composite
def graphs(draw: st.DrawFn, max_weights: int = 8, max_extra_ops: int = 6) -> GraphIR:
    """Random small graphs: blocks with sub-layers, top-level modules, root parameters, skip
    connections, shared weights read again far later, multi-weight ops and zero-sized weights."""
    names: list[str] = []
    if draw(st.booleans()):
        names.append("embed.weight")
    for b in range(draw(st.integers(0, 3))):
        for s in draw(
            st.lists(st.sampled_from(["attn", "ffn", "norm"]), min_size=1, max_size=2, unique=True)
        ):
            names += [f"blocks.{b}.{s}.w{j}" for j in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):
        names.append("head.0.weight")
    if draw(st.booleans()):
        names.append("pos")
    names = names[:max_weights]
    sizes = draw(st.lists(st.integers(0, 700), min_size=len(names), max_size=len(names)))
    weights = [(n, s * MiB) for n, s in zip(names, sizes, strict=True)]
    act = st.integers(0, 300).map(lambda v: v * MiB)
    ops: list[OpSpec] = []

    def extra() -> None:
        for _ in range(draw(st.integers(0, 2))):
            if sum(1 for o in ops if not o.weights) < max_extra_ops:
                ops.append(OpSpec((), draw(act), flops=float(draw(st.integers(0, 10**12)))))

    extra()
    i = 0
    while i < len(names):
        # one op may read a weight and its neighbour (weight + bias)
        k = 2 if i + 1 < len(names) and draw(st.booleans()) and draw(st.booleans()) else 1
        ops.append(OpSpec(tuple(names[i : i + k]), draw(act), flops=float(draw(st.integers(0, 10**13)))))
        i += k
        extra()
    joined: dict[str, tuple[tuple[int, int], ...]] = {}
    if names and draw(st.booleans()):
        # a shared (tied) weight read again near the end, sometimes through a view made at its
        # first read (one copy must then serve both: no reload between them)
        tied = draw(st.sampled_from(names))
        ops.append(OpSpec((tied,), draw(act)))
        reads = [i for i, o in enumerate(ops) if tied in o.weights]
        if len(reads) > 1 and draw(st.integers(0, 3)) == 0:
            joined[tied] = ((reads[0], reads[-1]),)
    if not ops:
        ops.append(OpSpec((), draw(act)))
    n = len(ops)
    # skip connections: some outputs live until a random later op
    skips = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3))
    for a, b in skips:
        lo, hi = min(a, b), max(a, b)
        ops[lo] = OpSpec(ops[lo].weights, ops[lo].out_bytes, end=hi, flops=ops[lo].flops)
    shape = (1, draw(st.integers(1, 4)))
    return build_graph(weights, ops, inputs=(("x", shape, "bfloat16"),), input_bytes=draw(act), joined=joined)
