"""Run a tiny WAN transformer sequence-parallel over several processes, each swapping within its budget.

    torchrun --nproc-per-node 2 examples/sequence_parallel_torchrun.py
    torchrun --nproc-per-node 2 examples/sequence_parallel_torchrun.py --backend inductor

Every rank builds the same model and inputs, calls the compiled model with them, and gets the whole
output; inside the call each rank computes its share of the video's tokens, with all-to-alls around
self-attention (``docs/sequence_parallel.md``). With CUDA each rank uses the GPU of its local rank
and NCCL; without, the CPU and gloo, so this runs anywhere. Rank 0 prints each rank's plan and
checks the output against the unsharded model run in the same process (bitwise under eager).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import fxswap
from fxswap.models import wan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("eager", "inductor"), default="eager")
    parser.add_argument("--max-vram-gb", type=float, default=0.0006, help="budget per rank (GiB)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A timeout: a rank that dies or hangs makes the others fail with fxswap.ParallelCallError
    # instead of waiting for torch's default of 30 minutes (10 on NCCL).
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if cuda else "cpu"

    torch.manual_seed(0)  # the same weights and inputs on every rank
    config = wan.tiny_config("t2v", num_layers=4)
    model = wan.build(config).eval()
    # 5 frames at 32 x 64: 2 * 2 * 4 = 16 tokens, divisible by 2 and 4 ranks; 2 heads for 2 ranks
    inputs = wan.example_inputs(config, frames=5, height=32, width=64)
    with torch.no_grad():
        reference = model(**inputs)

    swapped = fxswap.compile(
        model,
        max_vram_gb=args.max_vram_gb,
        reserve_mb=0,
        block_size_mb=0.05,
        backend=args.backend,
        device=device,
        ulysses_degree=world,
    )
    with torch.no_grad():
        out = swapped(**{k: v.to(device) for k, v in inputs.items()}).cpu()
    plan = swapped.plan
    assert plan is not None
    line = (
        f"rank {plan.ulysses_rank}/{plan.ulysses_degree}: peak {plan.peak_bytes / 2**10:.0f} KiB of "
        f"budget {plan.max_vram_bytes / 2**10:.0f} KiB, activations {plan.activation_peak_bytes / 2**10:.0f} "
        f"KiB, {sum(not u.resident for u in plan.units)} units swapped"
    )
    lines: list[str | None] = [None] * world
    dist.all_gather_object(lines, line)
    same = torch.equal(out, reference)
    max_abs = float((out - reference).abs().max())
    results: list[tuple[bool, float] | None] = [None] * world
    dist.all_gather_object(results, (same, max_abs))
    if rank == 0:
        for text in lines:
            print(text)
        for r, res in enumerate(results):
            assert res is not None
            print(f"rank {r}: output equal to the unsharded model: {res[0]} (max |diff| {res[1]:.3g})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
