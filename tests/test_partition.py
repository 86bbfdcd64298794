"""passes/partition.py: layerwise units per block, chunkwise cuts, oversized tensors."""

from __future__ import annotations

import pytest

from fxswap.passes.liveness import analyse_liveness
from fxswap.passes.partition import block_key, partition_chunkwise, partition_layerwise
from tests.graphs import chain_graph

MiB = 2**20


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("blocks.3.self_attn.q.weight", "blocks.3"),
        ("layers.0.weight", "layers.0"),
        ("0.weight", "0"),
        ("head.head.weight", "head"),
        ("text_embedding.0.weight", "text_embedding.0"),
        ("pos_embed", "pos_embed"),
    ],
)
def test_block_key(name: str, key: str) -> None:
    assert block_key(name) == key


def test_layerwise_units_per_block_and_top_module() -> None:
    g = chain_graph(3)
    live = analyse_liveness(g)
    units = partition_layerwise(live.order, dict(live.nbytes))
    assert [u.name for u in units] == ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert units[1].params == ("blocks.0.attn.weight", "blocks.0.ffn.weight")


def test_layerwise_without_numbered_containers() -> None:
    sizes = {"conv1.weight": 1, "conv1.bias": 1, "fc.weight": 2, "scale": 3}
    units = partition_layerwise(list(sizes), sizes)
    assert [(u.name, u.bytes) for u in units] == [("conv1", 2), ("fc", 2), ("scale", 3)]


@pytest.mark.parametrize(
    ("block", "names"),
    [
        (1000 * MiB, ["embed..head"]),
        (300 * MiB, ["embed..blocks.0", "blocks.1", "blocks.2..head"]),
        (249 * MiB, ["embed", "blocks.0", "blocks.1", "blocks.2", "head"]),
        (450 * MiB, ["embed..blocks.1", "blocks.2..head"]),
        (150 * MiB, ["embed", *[f"blocks.{b}.{s}" for b in range(3) for s in ("attn", "ffn")], "head"]),
    ],
)
def test_chunkwise_cuts(block: int, names: list[str]) -> None:
    g = chain_graph(3, weight_bytes=100 * MiB, embed_bytes=50 * MiB, head_bytes=50 * MiB)
    live = analyse_liveness(g)
    units = partition_chunkwise(live.order, dict(live.nbytes), block)
    assert [u.name for u in units] == names
    assert all(u.bytes <= block for u in units)
    assert [p for u in units for p in u.params] == list(live.order)


def test_chunkwise_numbered_range_and_oversized() -> None:
    sizes = {f"blocks.{b}.w": 10 for b in range(6)} | {"big.weight": 500, "big.bias": 1}
    order = [*sizes]
    units = partition_chunkwise(order, sizes, 30)
    assert [u.name for u in units] == ["blocks.0-2", "blocks.3-5", "big.weight", "big.bias"]
    assert [u.oversized for u in units] == [False, False, True, False]


def test_chunkwise_recurses_into_children() -> None:
    sizes = {"blocks.0.ffn.0.weight": 60, "blocks.0.ffn.2.weight": 60, "blocks.0.attn.q": 30}
    units = partition_chunkwise(list(sizes), sizes, 70)
    assert [u.name for u in units] == ["blocks.0.ffn.0", "blocks.0.ffn.2", "blocks.0.attn"]
