"""The decode-once choice on plain data (``fxswap.passes.decode``), against a brute force.

A hand-made graph of six ops and four stored weights (one read twice, one swapped). The expected
bytes per op for every subset of residents decoded once come from the formula written here, not
from fxswap's simulator::

    held      = sum(d for decoded) + sum(s for resident kept stored)
    act[i]    = base[i] + sum(d for kept stored w with first[w] <= i <= last[w])
                + max(c for kept stored w with first[w] == i, default 0)
    mem[i]    = reserve + held + swapped unit bytes at i + act[i]
    upload    = min(act) + held + max(s + c for decoded)          (0 when none is decoded)
    peak      = max(mem[i] for every i, upload)
"""

from __future__ import annotations

import itertools

import pytest

from fxswap.errors import PlanError
from fxswap.ir import BufferInfo, GraphIR, OpInfo, WeightInfo
from fxswap.passes.analyse import stored_storage
from fxswap.passes.decode import choose_decoded, decode_residents, upload_bytes
from fxswap.passes.liveness import activation_profile
from fxswap.passes.simulate import UnitWindow, simulate_memory

# weight -> (stored s, decoded d, scratch c); W1 is decoded no larger than it is stored (an F32 file
# tensor computed in bf16 would be smaller still)
SIZES = {"W0": (300, 1000, 50), "W1": (800, 800, 0), "W2": (200, 1000, 400), "W3": (250, 1000, 10)}
READS = (None, "W0", "W1", "W0", "W2", "W3")  # op i reads this weight
BASE = [100, 120, 140, 120, 110, 100]  # activation bytes per op before any decode
RESERVE = 7
SWAPPED = {"W3": (4, 5)}  # load_at 4, release after 5 (wait at 5)


def _ir() -> GraphIR:
    ops = tuple(
        OpInfo(f"op{i}", "torch._C._nn.linear", "m", (w,) if w else (), 0, 0.0, 0)
        for i, w in enumerate(READS)
    )
    weights = tuple(WeightInfo(w, (10,), "bfloat16", d, "m") for w, (_, d, _) in SIZES.items())
    # one buffer per op holding that op's base activation level
    buffers = tuple(BufferInfo(f"act{i}", b, i, i) for i, b in enumerate(BASE))
    base = GraphIR(ops=ops, weights=weights, buffers=buffers, inputs=())
    return stored_storage(base, SIZES)


def _first_last(w: str) -> tuple[int, int]:
    at = [i for i, r in enumerate(READS) if r == w]
    return at[0], at[-1]


def _units(decoded: set[str]) -> tuple[list[UnitWindow], list[tuple[str, ...]]]:
    windows, params = [], []
    for w, (s, d, _) in SIZES.items():
        if w in SWAPPED:
            a, b = SWAPPED[w]
            windows.append(UnitWindow(s, False, a, b, b))
        else:
            windows.append(UnitWindow(d if w in decoded else s, True))
        params.append((w,))
    return windows, params


def _hand_peak(decoded: set[str]) -> tuple[list[int], int]:
    held = sum(SIZES[w][1] if w in decoded else SIZES[w][0] for w in SIZES if w not in SWAPPED)
    act = []
    for i in range(len(READS)):
        a = BASE[i]
        scratch = 0
        for w, (_, d, c) in SIZES.items():
            if w in decoded:
                continue
            f, last = _first_last(w)
            if f <= i <= last:
                a += d
            if f == i:
                scratch = max(scratch, c)
        act.append(a + scratch)
    mem = []
    for i, a in enumerate(act):
        swapped = sum(SIZES[w][0] for w, (lo, hi) in SWAPPED.items() if lo <= i <= hi)
        mem.append(RESERVE + held + swapped + a)
    upload = min(act) + held + max(SIZES[w][0] + SIZES[w][2] for w in decoded) if decoded else 0
    return mem, max(*mem, upload)


RESIDENT = [w for w in SIZES if w not in SWAPPED]
SUBSETS = [set(c) for k in range(len(RESIDENT) + 1) for c in itertools.combinations(RESIDENT, k)]


@pytest.mark.parametrize("decoded", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_the_ir_with_residents_decoded_once_gives_every_ops_bytes_exactly(decoded: set[str]) -> None:
    ir = decode_residents(_ir(), decoded)
    windows, _ = _units(decoded)
    act = activation_profile(ir)
    tl = simulate_memory(act, windows, RESERVE)
    mem, peak = _hand_peak(decoded)
    assert [tl.total(i) for i in range(len(READS))] == mem
    held = sum(u.bytes for u in windows if u.resident)
    assert max(tl.peak_bytes, upload_bytes(ir, act, held)) == peak
    # the decode is no longer priced where a weight is decoded once
    for i, r in enumerate(READS):
        first = r is not None and _first_last(r)[0] == i
        want = SIZES[r][0] + SIZES[r][1] if r is not None and first and r not in decoded else 0
        assert ir.ops[i].dequant_bytes == want
    assert decode_residents(ir, decoded) == ir  # applying it twice changes nothing


def test_the_choice_fits_every_budget_takes_all_when_all_fit_and_none_when_none_fits_alone() -> None:
    ir = _ir()
    windows, params = _units(set())
    all_peak = _hand_peak(set(RESIDENT))[1]
    singles = {w: _hand_peak({w})[1] for w in RESIDENT}
    # W1 decoded is no larger and frees its activation, so decoding it alone lowers the peak: the
    # range starts below every single-weight peak to see the empty choice too
    assert singles["W1"] < _hand_peak(set())[1]
    seen = set()
    for budget in range(min(singles.values()) - 30, all_peak + 200, 7):
        chosen = choose_decoded(ir, windows, params, RESERVE, budget)
        assert chosen == choose_decoded(ir, windows, params, RESERVE, budget)  # deterministic
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(RESIDENT)
        if chosen:  # (below the stored schedule's own peak nothing else could fit either)
            assert _hand_peak(set(chosen))[1] <= budget, (budget, chosen)
        # greedy tries each weight alone while nothing is taken
        assert (chosen == ()) == all(p > budget for p in singles.values()), (budget, chosen)
        seen.add(len(chosen))
    assert seen == {0, 1, 2, 3}, seen
    assert set(
        choose_decoded(ir, windows, params, RESERVE, max(p for _, p in map(_hand_peak, SUBSETS)))
    ) == set(RESIDENT)
    # W1 (decoded no larger than stored) first, then by (s + d) / (d - s): W0 1300/700 > W2 1200/800
    assert choose_decoded(ir, windows, params, RESERVE, 10**9) == ("W1", "W0", "W2")
    # the swapped W3 is never a candidate
    assert "W3" not in choose_decoded(ir, windows, params, RESERVE, 10**9)


def test_decoding_a_weight_not_kept_as_stored_is_refused_naming_the_field() -> None:
    ir = _ir()
    with pytest.raises(
        PlanError, match=r"`decoded_residents` names 'nope', which is not a weight of this graph"
    ):
        decode_residents(ir, ["nope"])
    plain = GraphIR(
        ops=ir.ops, weights=(*ir.weights, WeightInfo("B", (4,), "bfloat16", 8, "m")), buffers=(), inputs=()
    )
    with pytest.raises(
        PlanError, match=r"`decoded_residents` names 'B', which is not a weight kept as stored"
    ):
        decode_residents(plain, ["B"])


def test_with_a_warm_start_the_steady_call_and_the_bytes_between_calls_fit_too() -> None:
    """W3's next-call load issued before op 1 (the memory model only: the tail then holds it too)::

    steady[i] = mem[i] + s3 for i >= 1;   between calls = reserve + held + act[5] + s3
    """
    ir = _ir()
    windows, params = _units(set())
    carry = [None, None, None, 1]
    s3 = SIZES["W3"][0]

    def steady_peak(decoded: set[str]) -> int:
        mem, peak = _hand_peak(decoded)
        held = sum(SIZES[w][1] if w in decoded else SIZES[w][0] for w in RESIDENT)
        act5 = mem[5] - RESERVE - held - s3  # W3 is swapped in at op 5
        return max(peak, *(m + s3 for m in mem[1:]), RESERVE + held + act5 + s3)

    fewer = False
    for budget in range(steady_peak(set()) - 200, steady_peak(set(RESIDENT)) + 100, 5):
        chosen = choose_decoded(ir, windows, params, RESERVE, budget, carry)
        if chosen:
            assert steady_peak(set(chosen)) <= budget, (budget, chosen)
        fewer |= len(chosen) < len(choose_decoded(ir, windows, params, RESERVE, budget))
    assert fewer, "the carried bytes must cost room at some budget for this test to mean anything"
