"""Spawned gloo ranks for the multi-process tests: started together, joined under one deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def run_ranks(
    target: Callable[..., Any], args_of: Callable[[int], tuple[Any, ...]], world: int, timeout_s: float
) -> None:
    """Start ``target(*args_of(rank))`` in ``world`` spawned processes and join them; ranks still
    running after ``timeout_s`` are killed, and the test fails naming them."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(r)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout_s} s"
