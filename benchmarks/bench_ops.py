"""Per-op CPU overhead of the fxswap ops (target: <= 3 us per op).

    python benchmarks/bench_ops.py [--n 2000] [--repeat 15] [--json out.json]

Measures, median over ``--repeat`` runs of ``--n`` calls each:

- ``ops_only``: ``load`` / ``wait`` / ``release`` through ``torch.ops`` on a one-element unit with a
  null transfer backend (no allocation, no copy): dispatcher + fxswap bookkeeping, what the ops
  add on top of the transfer they start (the CUDA configuration: no ledger finalizers);
- the same with the CPU copy backend (adds ``empty_like`` + ``copy_`` of one element), without and
  with the CPU ledger's tensor finalizers;
- references: a ``Library``-defined no-op and a ``@torch.library.custom_op`` no-op taking a tensor.
- a rewritten eager FX graph of 200 swapped units (load, wait, release each) run end to end, per op.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from fxswap import ops
from fxswap.runtime import CopyBackend, PendingTransfer, SwapRuntime, TransferBackend


class _Ready(PendingTransfer):
    def wait(self) -> None:
        return None


class NullBackend(TransferBackend):
    """Hands out the host tensors themselves: no allocation, no copy. Isolates the ops' own cost
    (dispatcher + fxswap bookkeeping) from the transfer they start."""

    def start(self, host: Sequence[torch.Tensor], device: torch.device) -> PendingTransfer:
        return _Ready(list(host))


def _per_call_us(fn: Callable[[], None], n: int, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def bench_direct(backend: TransferBackend, n: int, repeat: int, track: bool) -> dict[str, float]:
    rt = SwapRuntime("cpu", backend=backend, track=track)
    uid = rt.add_unit("u", [("w", torch.ones(1))])
    anchor = torch.zeros(1)
    load, wait, release = ops.load, ops.wait, ops.release

    def cycle() -> None:
        release(uid, wait(uid, load(uid, anchor)), anchor)

    def load_wait() -> None:
        wait(uid, load(uid, anchor))

    ws = [torch.ones(1)]
    total = _per_call_us(cycle, n, repeat)
    lw = _per_call_us(load_wait, n, repeat)
    rel = _per_call_us(lambda: release(uid, ws, anchor), n, repeat)
    rt.close()
    return {"per_op_avg_us": total / 3, "load_plus_wait_us": lw, "release_us": rel}


def bench_references(n: int, repeat: int) -> dict[str, float]:
    lib = torch.library.Library("fxswap_bench", "DEF")
    lib.define("noop(int i, Tensor t) -> Tensor")
    tok = torch.empty(0)
    lib.impl("noop", lambda i, t: tok, "CompositeExplicitAutograd")

    @torch.library.custom_op("fxswap_bench::noop_co", mutates_args=())
    def noop_co(i: int, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(0)

    x = torch.zeros(1)
    ll = torch.ops.fxswap_bench.noop.default
    co = torch.ops.fxswap_bench.noop_co.default
    return {
        "library_noop_us": _per_call_us(lambda: ll(1, x), n, repeat),
        "custom_op_noop_us": _per_call_us(lambda: co(1, x), n, repeat),
        "python_fn_us": _per_call_us(lambda: None, n, repeat),
    }


def bench_graph(units: int, repeat: int) -> dict[str, float]:
    """A rewritten eager FX graph: per unit load -> wait -> add(weight) -> release."""
    from torch import fx

    rt = SwapRuntime("cpu", backend=NullBackend(), track=False)
    g = fx.Graph()
    x = g.placeholder("x")
    h: fx.Node = x
    for i in range(units):
        uid = rt.add_unit(f"u{i}", [(f"w{i}", torch.ones(1))])
        tok = g.call_function(ops.load, (uid, h))
        ws = g.call_function(ops.wait, (uid, tok))
        w = g.call_function(lambda lst: lst[0], (ws,))
        h2 = g.call_function(torch.add, (h, w))
        g.call_function(ops.release, (uid, ws, h2))
        h = h2
    g.output(h)
    gm = fx.GraphModule(torch.nn.Module(), g)
    # baseline: the same graph without the swap ops (the weight is a constant input)
    g0 = fx.Graph()
    x0 = g0.placeholder("x")
    w0 = g0.placeholder("w")
    h0: fx.Node = x0
    for _ in range(units):
        h0 = g0.call_function(torch.add, (h0, g0.call_function(lambda t: t, (w0,))))
    g0.output(h0)
    gm0 = fx.GraphModule(torch.nn.Module(), g0)
    inp, w = torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        t_swap = _per_call_us(lambda: gm(inp), 20, repeat)
        t_base = _per_call_us(lambda: gm0(inp, w), 20, repeat)
    rt.close()
    return {"graph_units": units, "graph_per_op_us": (t_swap - t_base) / (3 * units)}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out: dict[str, object] = {
        "torch": torch.__version__,
        "ops_only": bench_direct(NullBackend(), a.n, a.repeat, track=False),
        "ops_with_cpu_copy": bench_direct(CopyBackend(), a.n, a.repeat, track=False),
        "ops_with_cpu_copy_and_ledger": bench_direct(CopyBackend(), a.n, a.repeat, track=True),
        "references": bench_references(a.n, a.repeat),
        **bench_graph(a.units, a.repeat),
    }
    # Same-process baseline: a machine under load inflates every figure; the ratio to a bare
    # Library-defined op (the dispatcher alone) is what fxswap's own code adds.
    noop = out["references"]["library_noop_us"]  # type: ignore[index]
    out["ops_only_over_library_noop"] = round(out["ops_only"]["per_op_avg_us"] / noop, 3)  # type: ignore[index]
    out["graph_per_op_over_library_noop"] = round(out["graph_per_op_us"] / noop, 3)  # type: ignore[operator]
    text = json.dumps(out, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
