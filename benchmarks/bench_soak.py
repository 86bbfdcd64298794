"""Soak: 300 calls of a swapped tiny WAN 2.1 t2v alternating two input shapes; prints what grew.

Series recorded after every call (see ``tests/test_soak.py``, which runs the short version):
CPU allocator bytes held (the memory oracle, one profiler session per call), fxswap's ledger, RSS,
pinned and pageable host bytes, compiled graphs, plans, registered units. "growth" is the most a
series reached after warm-up minus the most it reached in the first two calls after warm-up.

    python benchmarks/bench_soak.py                 # 300 calls, warm-up 6
    python benchmarks/bench_soak.py --calls 1000 --oracle-every 10

Writes ``benchmarks/results/bench_soak.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_soak import SHAPES, soak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--oracle-every", type=int, default=1, help="measure every N-th call with the oracle")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_soak.json")
    a = ap.parse_args()
    r = soak(a.calls, a.warmup, oracle_every=a.oracle_every)
    s = r.summary()
    s["shapes_frames_h_w"] = [list(x) for x in SHAPES]
    s["machine"] = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(json.dumps(s, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(s, indent=1) + "\n", encoding="utf-8")
    bad = {k: v for k, v in r.growth().items() if v > (8 * 2**20 if k == "rss" else 0)}
    if not r.exact or bad:
        raise SystemExit(f"soak failed: exact={r.exact}, growth={bad}")


if __name__ == "__main__":
    main()
