"""Partition pass: group the weights of a graph into swap units.

A swap unit is the granule of transfer: it is loaded, waited for and released as one piece. The
partition only decides *which weights go together*; residency and timing are the schedule's job.
Input: weight names in first-use order with their sizes (from :mod:`fxswap.passes.liveness`).
Output: a tuple of :class:`UnitSpec` in first-use order, covering every weight exactly once::

    weights (first-use order)          layerwise          chunkwise, block_size 300 MiB
    patch_embedding.weight   10 MiB    patch_embedding    patch_embedding..blocks.0 (?)
    blocks.0.self_attn.q.weight ...    blocks.0           blocks.0.self_attn, blocks.0.ffn, ...
    blocks.1....                        blocks.1           ...
    head.head.weight                    head               head

Modes:

- ``layerwise``: one unit per *block*. The block of a weight is the shortest prefix of its dotted
  name that ends in a numeric component ("blocks.3" from "blocks.3.self_attn.q.weight",
  "layers.0" for an MLP stack, "0" for an ``nn.Sequential`` child). Weights outside any numbered
  container form one unit per top-level module ("patch_embedding", "head"); a parameter that sits
  directly on the root module is its own unit. Nothing here knows about WAN.
- ``chunkwise``: runs of weights contiguous in first-use order, each at most ``block_size_bytes``.
  Consecutive blocks (as defined above) are packed greedily, so cuts fall on block boundaries. A
  block larger than ``block_size_bytes`` is cut into its child modules (self_attn, cross_attn,
  ffn, ...), recursively deeper where a child is still too large; the children of a cut block are
  packed among themselves only, so no unit straddles half of one block and half of the next. A
  single tensor larger than ``block_size_bytes`` becomes a unit of its own with ``oversized=True``.
- ``adaptive``: the planner tries the layerwise partition and chunkwise partitions at the sizes of
  :func:`adaptive_block_sizes` (see :mod:`fxswap.passes.planner`).

NOTE: greedy packing of a sequence into contiguous bins of bounded size gives the fewest bins, so
there is no need for a DP here; the cost model in adaptive mode is what trades unit size against
prefetch overlap. Unit names are deterministic and unique: the block or module path
("blocks.3", "blocks.3.self_attn"), a numbered range for packed siblings ("blocks.0-2"), "A..B"
for other packed runs, the tensor name for an oversized tensor, and a "#2" suffix should the same
path form two separate runs (weights of one module used in two separate places).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fxswap.errors import PlanError

__all__ = [
    "UnitSpec",
    "adaptive_block_sizes",
    "block_key",
    "block_labels",
    "partition_chunkwise",
    "partition_layerwise",
]

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True, slots=True)
class UnitSpec:
    """One swap unit as the partition sees it: a name, its weights and their total size."""

    name: str
    params: tuple[str, ...]
    bytes: int
    oversized: bool = False


def block_key(name: str) -> str:
    """The layerwise block of a weight: shortest dotted prefix ending in a number, else top module.

    >>> block_key("blocks.3.self_attn.q.weight"), block_key("head.head.weight"), block_key("0.bias")
    ('blocks.3', 'head', '0')
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def block_labels(modules: Sequence[str | None]) -> list[str]:
    """The repeated block each op runs in, from the innermost module of each op in execution order
    (``""`` or None: no module recorded): the op's :func:`block_key` when it has a numbered
    component (``"blocks.3"``), else ``""`` (between blocks). An op with no module between two ops
    of one block belongs to that block; at the edges, or between two blocks, to ``""``.

    What the regions pass cuts compiled regions by, and what the planner aligns units' swap ops
    to, so that both see the same edges.

    >>> block_labels(["embed", "blocks.0.attn", None, "blocks.0.ffn", None, "blocks.1.attn", "head"])
    ['', 'blocks.0', 'blocks.0', 'blocks.0', '', 'blocks.1', '']
    """
    raw: list[str | None] = []
    for m in modules:
        if not m:
            raw.append(None)
            continue
        key = block_key(m)
        raw.append(key if any(part.isdigit() for part in key.split(".")) else "")
    out = [lab if lab is not None else "" for lab in raw]
    known = [i for i, lab in enumerate(raw) if lab is not None]
    k = 0
    for i, lab in enumerate(raw):
        if lab is not None:
            continue
        while k < len(known) and known[k] < i:
            k += 1
        before = raw[known[k - 1]] if k > 0 else None
        after = raw[known[k]] if k < len(known) else None
        out[i] = before if before is not None and before == after else ""
    return out


def _child_key(name: str, prefix: str) -> str:
    """The path of the child of ``prefix`` that holds weight ``name`` (``name`` itself if a leaf)."""
    rest = name[len(prefix) + 1 :] if prefix else name
    head = rest.split(".", 1)[0]
    return f"{prefix}.{head}" if prefix else head


def _runs(names: Sequence[str], key_of: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Split ``names`` into maximal runs of consecutive names with the same key."""
    runs: list[tuple[str, list[str]]] = []
    for n in names:
        k = key_of[n]
        if runs and runs[-1][0] == k:
            runs[-1][1].append(n)
        else:
            runs.append((k, [n]))
    return runs


def _check_inputs(order: Sequence[str], nbytes: dict[str, int]) -> None:
    if len(set(order)) != len(order):
        raise PlanError("weight order lists a weight twice; each weight must appear once")
    missing = [n for n in order if n not in nbytes]
    if missing:
        raise PlanError(f"no size for weights {missing[:3]}; pass every weight's nbytes")


def partition_layerwise(order: Sequence[str], nbytes: dict[str, int]) -> tuple[UnitSpec, ...]:
    """One unit per block (see the module docstring), in order of each block's first weight.

    Args:
        order: weight names in first-use order.
        nbytes: size of every weight.

    Returns:
        Units covering every weight once, in first-use order of their first weight.
    """
    _check_inputs(order, nbytes)
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(block_key(n), []).append(n)
    return tuple(UnitSpec(k, tuple(ps), sum(nbytes[p] for p in ps)) for k, ps in groups.items())


def _range_name(keys: Sequence[str]) -> str:
    """Name of a packed run of sibling keys: "blocks.0-2" for numbered siblings, else "A..B"."""
    if len(keys) == 1:
        return keys[0]
    first, last = keys[0], keys[-1]
    fp, _, fl = first.rpartition(".")
    lp, _, ll = last.rpartition(".")
    if fp == lp and fl.isdigit() and ll.isdigit():
        return f"{fp}.{fl}-{ll}" if fp else f"{fl}-{ll}"
    return f"{first}..{last}"


def _split(prefix: str, names: list[str], nbytes: dict[str, int], limit: int, top: bool) -> list[UnitSpec]:
    """Cut a contiguous run of weights sharing ``prefix`` into units of at most ``limit`` bytes."""
    if not top and sum(nbytes[n] for n in names) <= limit:
        return [UnitSpec(prefix, tuple(names), sum(nbytes[n] for n in names))]
    if not top and len(names) == 1 and names[0] == prefix:
        return [UnitSpec(prefix, (prefix,), nbytes[prefix], oversized=nbytes[prefix] > limit)]
    key_of = {n: (block_key(n) if top else _child_key(n, prefix)) for n in names}
    out: list[UnitSpec] = []
    # Pending whole children waiting to be packed together: (key, names, bytes).
    pending: list[tuple[str, list[str], int]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        if pending:
            params = tuple(n for _, ns, _ in pending for n in ns)
            out.append(UnitSpec(_range_name([k for k, _, _ in pending]), params, pending_bytes))
            pending.clear()
            pending_bytes = 0

    for key, run in _runs(names, key_of):
        size = sum(nbytes[n] for n in run)
        if size > limit:
            flush()
            if len(run) == 1 and run[0] == key:
                out.append(UnitSpec(key, (key,), size, oversized=True))
            else:
                out.extend(_split(key, run, nbytes, limit, top=False))
            continue
        if pending and pending_bytes + size > limit:
            flush()
        pending.append((key, run, size))
        pending_bytes += size
    flush()
    return out


def _unique(units: list[UnitSpec]) -> tuple[UnitSpec, ...]:
    seen: dict[str, int] = {}
    out = []
    for u in units:
        count = seen.get(u.name, 0) + 1
        seen[u.name] = count
        out.append(u if count == 1 else UnitSpec(f"{u.name}#{count}", u.params, u.bytes, u.oversized))
    return tuple(out)


def partition_chunkwise(
    order: Sequence[str], nbytes: dict[str, int], block_size_bytes: int
) -> tuple[UnitSpec, ...]:
    """Contiguous runs of at most ``block_size_bytes``, cut at block, then sub-layer boundaries.

    Args:
        order: weight names in first-use order.
        nbytes: size of every weight.
        block_size_bytes: the largest unit, except single tensors that are larger (``oversized``).

    Returns:
        Units covering every weight once, in first-use order.

    Raises:
        PlanError: ``block_size_bytes`` is not positive.
    """
    _check_inputs(order, nbytes)
    if block_size_bytes <= 0:
        raise PlanError(f"block_size_bytes={block_size_bytes}; it must be a positive number of bytes")
    if not order:
        return ()
    return _unique(_split("", list(order), nbytes, block_size_bytes, top=True))


def adaptive_block_sizes(user_block_size_bytes: int) -> tuple[int, ...]:
    """Chunk sizes adaptive mode tries: 64 MiB, 128 MiB, ..., 2 GiB, plus the user's block size.

    NOTE: a fixed geometric ladder rather than one derived from the model keeps the candidate set
    small (7 chunk sizes + layerwise) and predictable; identical partitions are deduplicated.
    """
    sizes = {64 * MiB * 2**k for k in range(6)} | {user_block_size_bytes}
    return tuple(sorted(sizes))
