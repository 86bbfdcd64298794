"""``ulysses_degree``: what ``fxswap.compile`` checks before sequence parallelism, and what it
stamps on each rank's plan.

The graph rewrite itself is the pass :mod:`fxswap.passes.sequence_parallel`, applied to each
capture before analyse (``fxswap.build.capture_call``), so every rank plans its own sharded
program against ``max_vram_gb``. See ``docs/sequence_parallel.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fxswap.errors import ParallelCallError, PlanMismatchError
from fxswap.ir import GraphIR
from fxswap.passes.sequence_parallel import SequenceParallel
from fxswap.swapplan import SwapPlan

__all__ = [
    "check_ranks_agree",
    "sharded_ir",
    "SequenceParallel",
    "collective_failed",
    "resolve_parallel",
    "stamp_plan",
]


def collective_failed(error: RuntimeError, sp: SequenceParallel, model: str) -> ParallelCallError:
    """The error a rank raises when its call fails (the original is chained as its cause)."""
    return ParallelCallError(
        f"{model} compiled by fxswap with ulysses_degree={sp.degree} failed on rank {sp.rank}: "
        f"{type(error).__name__}: {error}. In a sequence-parallel call every rank takes part in each "
        "all-to-all, so a rank that died, was killed or is stuck makes the others fail here (a lost "
        "connection at once; a stuck rank after the process group's timeout, "
        "init_process_group(timeout=...)). Fix: look at the other ranks' logs for the first error, "
        "then restart all ranks",
        rank=sp.rank,
        degree=sp.degree,
    )


def resolve_parallel(ulysses_degree: int | None) -> SequenceParallel | None:
    """The sequence parallelism ``fxswap.compile(..., ulysses_degree=N)`` asks for, on the default
    process group; None for plain compilation (no argument, or 1 without a process group).

    Raises:
        ValueError: ``ulysses_degree`` is not an int >= 1; no initialised ``torch.distributed``
            process group; its world size is not ``ulysses_degree`` (each named, with the fix).
    """
    if ulysses_degree is None:
        return None
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int) or ulysses_degree < 1:
        raise ValueError(
            f"`ulysses_degree`={ulysses_degree!r} is invalid: pass an int >= 1 (the number of ranks "
            "that share each sequence), or leave it out"
        )
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if ulysses_degree == 1:
            return None
        raise ValueError(
            f"`ulysses_degree`={ulysses_degree} needs an initialised torch.distributed process group, "
            "and none is. Fix: start the script with `torchrun --nproc-per-node "
            f"{ulysses_degree} ...` and call torch.distributed.init_process_group() before fxswap.compile"
        )
    world = dist.get_world_size()
    if world != ulysses_degree:
        raise ValueError(
            f"`ulysses_degree`={ulysses_degree} but the process group has {world} ranks; fxswap shards "
            f"each sequence over the whole default group. Fix: pass ulysses_degree={world}, or start "
            f"{ulysses_degree} processes"
        )
    if ulysses_degree == 1:
        return None
    group = dist.group.WORLD
    assert group is not None  # narrowing: is_initialized() above
    return SequenceParallel(ulysses_degree, dist.get_rank(), group.group_name)


def stamp_plan(plan: SwapPlan, sp: SequenceParallel | None, given: bool) -> SwapPlan:
    """``plan`` recording the degree and rank it was made for; a ``given`` plan must already say so.

    Raises:
        PlanMismatchError: a given plan made for another degree or rank.
    """
    degree, rank = (1, 0) if sp is None else (sp.degree, sp.rank)
    if given and (plan.ulysses_degree, plan.ulysses_rank) != (degree, rank):
        raise PlanMismatchError(
            f"`plan` was made for ulysses_degree={plan.ulysses_degree} rank {plan.ulysses_rank}, but this "
            f"process runs ulysses_degree={degree} rank {rank}: each rank plans its own shard. Fix: give "
            "each rank the plan made for it (`fxswap plan ... --ulysses-degree N --rank R`), or compile "
            "without `plan`"
        )
    return dataclasses.replace(plan, ulysses_degree=degree, ulysses_rank=rank)


def sharded_ir(
    model: Any, inputs: dict[str, Any], degree: int, rank: int = 0
) -> tuple[GraphIR, GraphIR, Any]:
    """The IR of one process and of rank ``rank`` of ``degree`` for ``model(**inputs)``, captured
    once (meta tensors allowed: nothing runs), each with the documented workspace rules; and the
    pass's :class:`~fxswap.passes.sequence_parallel.ShardReport`. What ``fxswap plan
    --ulysses-degree N`` plans (the ranks differ only in which tokens they hold)."""
    import copy

    from fxswap.capture import trace
    from fxswap.passes.analyse import PlaceholderRole, graph_ir
    from fxswap.passes.sequence_parallel import shard_sequence
    from fxswap.workspace import rules_for, with_workspace

    traced = trace(model, **inputs)
    roles = [
        PlaceholderRole(w, n)
        for w, n in zip(traced.placeholder_params, traced.placeholder_names, strict=True)
    ]
    gm = copy.deepcopy(traced.gm)
    report = shard_sequence(gm, SequenceParallel(degree, rank, "plan"))
    return traced.ir, with_workspace(graph_ir(gm, roles), rules_for(gm)), report


def check_ranks_agree(plan: SwapPlan, sp: SequenceParallel | None) -> None:
    """Refuse a build whose graph differs between ranks (another model, input shape or dtype on
    some rank): their collectives would not pair up, and a call would hang or mix unrelated
    tensors. Every rank builds a signature on its first call with it, so all take part here.

    Budgets and options may differ between ranks (cards of different sizes): they are not compared.

    Raises:
        PlanMismatchError: naming the ranks and which of graph, weights and inputs differ.
    """
    if sp is None:
        return
    import torch.distributed as dist

    mine = {k: v for k, v in plan.fingerprint_parts if k in ("graph", "params", "inputs")}
    everyone: list[dict[str, str] | None] = [None] * sp.degree
    dist.all_gather_object(everyone, mine)
    differ = {
        rank: sorted(k for k in mine if other is None or other.get(k) != mine[k])
        for rank, other in enumerate(everyone)
    }
    differ = {rank: parts for rank, parts in differ.items() if parts}
    if differ:
        detail = "; ".join(f"rank {r}: {', '.join(p)}" for r, p in sorted(differ.items()))
        raise PlanMismatchError(
            f"ulysses_degree={sp.degree}: rank {sp.rank}'s sharded graph differs from other ranks' ({detail} "
            "differ from this rank's). Every rank must call the compiled model with the same model, input "
            "shapes and dtypes. Fix: give every rank the same inputs (e.g. the same seed and sizes)"
        )
