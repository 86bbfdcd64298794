"""``fxswap.recommend`` / ``fxswap recommend``: computed settings for a card, a model and a video size.

The model is captured once, on meta tensors (no weights, no GPU), and planned for every setting
tried: each mode (layerwise, adaptive, chunkwise at a few block sizes) at every budget from the
smallest that works up to the card's usable memory, in steps of ``step_gb``. From those plans:

- **fastest**: the lowest predicted step time; of the settings within 1% of it, the largest budget
  (most weights resident, fewest bytes over the link, least reliance on copies hiding behind compute);
- **memory-saving**: the smallest budget whose step time is within ``saving_slack`` (25%) of the fastest;
- **balanced**: the budget half way between those two (half the memory saved, about half the bytes
  moved), raised until its step time is within ``balanced_slack`` (5%) of the fastest;
- **minimum**: the smallest budget that works at all (any mode), straight from the planner.

"Usable memory" is the card's memory less ``headroom_gb`` (default 10% of it: the CUDA context,
the allocator's fragmentation, the desktop). Every figure is the planner's prediction for one
forward of the transformer (one CFG branch): peak from the memory simulator, step time from the
two-stream simulator with the card's rates. They are predictions, not measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fxswap.errors import BudgetInfeasibleError, NoCudaError

if TYPE_CHECKING:
    from fxswap.ir import GraphIR

__all__ = ["NoCudaError", "Recommendation", "Setting", "gpu_memory_bytes", "recommend"]

GiB = 2**30
MiB = 2**20
MODES = ("adaptive", "layerwise", "chunkwise")
BLOCK_SIZES_MB = (200, 300, 500)  # chunkwise candidates (the seed guide's presets use these)
DTYPES = ("bf16", "fp16", "fp32", "fp8")
# tie-break between equal predicted times: the mode that adapts first
_MODE_ORDER = {m: i for i, m in enumerate(MODES)}


@dataclass(frozen=True)
class Setting:
    """One recommended setting and the planner's predictions for it."""

    label: str
    mode: str
    max_vram_gb: float
    block_size_mb: float
    peak_bytes: int
    predicted_step_ms: float
    predicted_stall_ms: float
    resident_bytes: int
    moved_bytes_per_call: int

    def compile_call(self) -> str:
        """The ``fxswap.compile`` arguments of this setting, as Python."""
        return f'mode="{self.mode}", max_vram_gb={self.max_vram_gb:g}, block_size_mb={self.block_size_mb:g}'


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` found. ``settings`` is (balanced, memory-saving, fastest); empty when
    even the smallest working budget is above the usable memory."""

    model: str
    width: int
    height: int
    frames: int
    dtype: str
    vram_bytes: int
    vram_source: str
    usable_bytes: int
    rates: str
    min_vram_bytes: int
    min_mode: str
    settings: tuple[Setting, ...]
    plans_made: int
    capture_seconds: float
    planning_seconds: float
    min_by_mode: dict[str, int] = field(default_factory=dict)

    def setting(self, label: str) -> Setting:
        for s in self.settings:
            if s.label == label:
                return s
        raise KeyError(f"no {label!r} setting (the smallest budget does not fit the card)")

    def report(self) -> str:
        """The text ``fxswap recommend`` prints."""
        lines = [
            f"{self.model}, {self.width}x{self.height}, {self.frames} frames, {self.dtype}; card memory "
            f"{self.vram_bytes / GiB:.1f} GiB ({self.vram_source}), "
            f"usable {self.usable_bytes / GiB:.1f} GiB; "
            f"rates: {self.rates}",
            f"planned {self.plans_made} settings on one capture ({self.capture_seconds:.1f} s capture, "
            f"{self.planning_seconds:.1f} s planning)",
            "predicted by fxswap's planner and simulator (not measured), per transformer call "
            "(one CFG branch):",
            "",
            f"  {'setting':<14} {'mode':<10} {'max_vram_gb':>11} {'block_size_mb':>13} {'peak GiB':>9} "
            f"{'step ms':>9} {'waiting ms':>10} {'moved GiB':>9}",
        ]
        for s in self.settings:
            lines.append(
                f"  {s.label:<14} {s.mode:<10} {s.max_vram_gb:>11g} {s.block_size_mb:>13g} "
                f"{s.peak_bytes / GiB:>9.2f} {s.predicted_step_ms:>9.1f} {s.predicted_stall_ms:>10.1f} "
                f"{s.moved_bytes_per_call / GiB:>9.2f}"
            )
        mins = ", ".join(f"{m} {b / GiB:.2f}" for m, b in self.min_by_mode.items())
        lines += [
            "",
            f"  smallest budget that works: {self.min_vram_bytes / GiB:.2f} GiB ({self.min_mode}); "
            f"by mode: {mins}",
        ]
        if not self.settings:
            lines.append(
                f"  nothing fits the usable {self.usable_bytes / GiB:.1f} GiB. Fix: a smaller "
                "--resolution or --frames, --dtype fp8, or a card with more memory."
            )
        else:
            b = self.setting("balanced")
            lines += [
                "",
                f"  use: fxswap.compile(model, {b.compile_call()})",
                f"   or: fxswap.integrations.diffusers.enable(pipe, {b.compile_call()})",
            ]
        return "\n".join(lines)


def gpu_memory_bytes(device: int = 0) -> int:
    """Total memory of CUDA device ``device``.

    Raises:
        NoCudaError: no CUDA device is visible; the message says what to pass instead.
    """
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= device:
        raise NoCudaError(
            "no CUDA device is visible to read the card's memory from. Fix: pass the card's memory "
            "(`fxswap recommend --vram 20`, `fxswap.recommend(vram_gb=20)`) or a card profile "
            "(`--card rtx4090`)"
        )
    return int(torch.cuda.get_device_properties(device).total_memory)


def _capture(
    model: str, width: int, height: int, frames: int, dtype: str, batch: int, layers: int | None, cache: bool
) -> tuple[GraphIR, float]:
    """The graph (bf16, or with fp8 Linear storage) and the seconds its capture or cache read took."""
    import torch

    from fxswap.graph_cache import captured_ir
    from fxswap.models import wan
    from fxswap.passes.analyse import fp8_linear_storage

    torch_dtype = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "fp8": torch.bfloat16,
    }
    overrides: dict[str, Any] = {} if layers is None else {"num_layers": layers}
    m = wan.build(model, device="meta", dtype=torch_dtype[dtype], **overrides)
    inputs = wan.example_inputs(
        m.config,
        batch=batch,
        frames=frames,
        height=height,
        width=width,
        device="meta",
        dtype=torch_dtype[dtype],
    )
    graph = captured_ir(m, (), inputs, cache=cache)
    if dtype == "fp8":  # as `fxswap plan --dtype fp8`: Linear weights stored in 1 byte per element
        linears = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
        return fp8_linear_storage(graph.ir, linears), graph.seconds
    return graph.ir, graph.seconds


def recommend(
    vram_gb: float | None = None,
    *,
    model: str = "wan2.1-t2v-14b",
    resolution: tuple[int, int] = (832, 480),
    frames: int = 81,
    card: str | None = None,
    dtype: str = "bf16",
    batch: int = 1,
    headroom_gb: float | None = None,
    step_gb: float = 1.0,
    balanced_slack: float = 0.05,
    saving_slack: float = 0.25,
    reserve_mb: float | None = None,
    layers: int | None = None,
    cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Recommendation:
    """Balanced, memory-saving and fastest settings for ``model`` at this video size on this card.

    Args:
        vram_gb: the card's memory in GiB; None: the ``card`` profile's, else the CUDA device's.
        model: a WAN config name (``fxswap.models.wan.CONFIGS``).
        resolution: (width, height) in pixels.
        frames: video frames (1 + 4k).
        card: a built-in card name or a profile JSON from ``fxswap calibrate``: its copy and compute
            rates price the plans (default: the planner's default rates).
        dtype: "bf16", "fp16", "fp32" or "fp8" (Linear weights stored as float8).
        headroom_gb: memory left out of every budget (default 10% of the card's memory).
        step_gb: budget grid step in GiB.
        balanced_slack, saving_slack: how much slower than the fastest (0.05 = 5%) the balanced and
            memory-saving settings may be predicted to run.
        reserve_mb: the planner's reserve (default PlanOptions').
        layers: keep only the first N transformer blocks (quick looks and tests).
        cache: read and write the captured graph in the graph cache (``fxswap.graph_cache``); False
            captures again and writes nothing.

    Raises:
        ValueError: a bad argument (named, with the fix).
        NoCudaError: ``vram_gb`` and ``card`` are None and there is no CUDA device.
    """
    import time

    from fxswap.api import make_options
    from fxswap.models import wan
    from fxswap.passes.planner import build_plan

    if model not in wan.CONFIGS:
        raise ValueError(f"`model`={model!r} is unknown. Fix: pass one of {', '.join(sorted(wan.CONFIGS))}")
    if dtype not in DTYPES:
        raise ValueError(f"`dtype`={dtype!r} is invalid. Fix: pass one of {', '.join(DTYPES)}")
    for name, value in (
        ("step_gb", step_gb),
        ("balanced_slack", balanced_slack),
        ("saving_slack", saving_slack),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"`{name}`={value!r} is invalid. Fix: pass a finite number > 0")
    width, height = resolution
    wan.latent_shape(wan.CONFIGS[model], frames, height, width)  # ValueError naming the bad size

    rates: dict[str, float] = {}
    rates_text = "planner defaults (pass card= for a card's rates)"
    profile = None
    if card is not None:
        from fxswap.bench.costmodel import plan_rates
        from fxswap.bench.hardware import get_profile

        profile = get_profile(card)
        rates = plan_rates(profile)
        rates_text = (
            f"{profile.name}: {rates['h2d_gbps']:g} GB/s pinned H2D, "
            f"{rates['compute_tflops']:g} TFLOP/s achieved"
        )
    if vram_gb is not None:
        if not (isinstance(vram_gb, (int, float)) and math.isfinite(vram_gb) and vram_gb > 0):
            raise ValueError(f"`vram_gb`={vram_gb!r} is invalid. Fix: pass the card's memory in GiB, e.g. 20")
        vram_bytes, source = int(vram_gb * GiB), "given"
    elif profile is not None:
        vram_bytes, source = profile.vram_bytes, f"profile {profile.name}"
    else:
        import torch

        vram_bytes = gpu_memory_bytes()
        source = f"read from cuda:0, {torch.cuda.get_device_name(0)}"
    headroom = 0.1 * vram_bytes if headroom_gb is None else headroom_gb * GiB
    if headroom < 0 or headroom >= vram_bytes:
        raise ValueError(
            f"`headroom_gb`={headroom_gb!r} is invalid. Fix: pass 0 <= headroom_gb < the card's memory"
        )
    usable = int(vram_bytes - headroom)

    say = progress or (lambda _msg: None)
    say(f"capturing {model} at {width}x{height}, {frames} frames (meta tensors)")
    ir, capture_seconds = _capture(model, width, height, frames, dtype, batch, layers, cache)
    t0 = time.perf_counter()

    def plan(mode: str, budget_gb: float, block_mb: float) -> Any:
        opts = make_options(
            mode=mode,
            max_vram_gb=budget_gb,
            block_size_mb=block_mb,
            reserve_mb=reserve_mb,
            h2d_gbps=rates.get("h2d_gbps"),
            compute_tflops=rates.get("compute_tflops"),
            device_mem_gbps=rates.get("device_mem_gbps"),
        )
        return build_plan(ir, opts)

    candidates = [
        ("adaptive", 300.0),
        ("layerwise", 300.0),
        *(("chunkwise", float(b)) for b in BLOCK_SIZES_MB),
    ]
    made = 0
    min_by_cand: dict[tuple[str, float], int] = {}
    for mode, block in candidates:
        try:
            plan(mode, 1 / GiB, block)
            min_by_cand[(mode, block)] = 1  # pragma: no cover (a graph without weights or activations)
        except BudgetInfeasibleError as e:
            min_by_cand[(mode, block)] = e.min_vram_bytes
        made += 1
    (min_mode, _), min_bytes = min(min_by_cand.items(), key=lambda kv: (kv[1], _MODE_ORDER[kv[0][0]]))
    min_by_mode: dict[str, int] = {}
    for (mode, _), b in min_by_cand.items():
        min_by_mode[mode] = min(b, min_by_mode.get(mode, b))

    # the budget grid (GiB): the minimum rounded up to a multiple of the step, then every step up to
    # the usable memory, and the usable memory itself (rounded down to 0.01 GiB)
    usable_gb = math.floor(usable / GiB * 100) / 100
    budgets: list[float] = []
    k = math.ceil(min_bytes / GiB / step_gb - 1e-9)
    while round(k * step_gb, 6) <= usable_gb:
        budgets.append(round(k * step_gb, 6))
        k += 1
    if min_bytes <= usable_gb * GiB and usable_gb not in budgets:
        budgets.append(usable_gb)
    rows: list[Setting] = []
    for budget_gb in budgets:
        say(f"planning at {budget_gb:g} GiB")
        budget = int(budget_gb * GiB)
        for mode, block in candidates:
            if min_by_cand[(mode, block)] > budget:
                continue
            p = plan(mode, budget_gb, block)
            made += 1
            rows.append(
                Setting(
                    "",
                    mode,
                    budget_gb,
                    block,
                    p.peak_bytes,
                    p.predicted_step_ms,
                    p.predicted_stall_ms,
                    p.resident_bytes,
                    p.moved_bytes_per_call,
                )
            )
    settings: tuple[Setting, ...] = ()
    if rows:
        settings = _choose(rows, step_gb, balanced_slack, saving_slack)
    return Recommendation(
        model=model if layers is None else f"{model} (first {layers} blocks)",
        width=width,
        height=height,
        frames=frames,
        dtype=dtype,
        vram_bytes=vram_bytes,
        vram_source=source,
        usable_bytes=usable,
        rates=rates_text,
        min_vram_bytes=min_bytes,
        min_mode=min_mode,
        settings=settings,
        plans_made=made,
        capture_seconds=capture_seconds,
        planning_seconds=time.perf_counter() - t0,
        min_by_mode=min_by_mode,
    )


def _choose(
    rows: list[Setting], step_gb: float, balanced_slack: float, saving_slack: float
) -> tuple[Setting, ...]:
    """(balanced, memory-saving, fastest) from every planned setting (see the module docstring)."""
    import dataclasses

    best_ms = min(s.predicted_step_ms for s in rows)

    def within(slack: float) -> list[Setting]:
        return [s for s in rows if s.predicted_step_ms <= best_ms * (1 + slack) + 1e-9]

    def pick(cands: list[Setting], *, budget: str) -> Setting:
        # per budget the fastest setting (then the mode order); across budgets the smallest or largest
        sign = 1 if budget == "smallest" else -1
        return min(
            cands,
            key=lambda s: (sign * s.max_vram_gb, s.predicted_step_ms, _MODE_ORDER[s.mode], s.block_size_mb),
        )

    # fastest: of the settings tied with the best time (1%), the largest budget: most weights resident,
    # fewest bytes over the link, least reliance on the simulator's overlap
    fastest = pick(within(0.01), budget="largest")
    saving = pick(within(saving_slack), budget="smallest")
    # balanced: half way between the two budgets (half the VRAM saved for about half the bytes moved),
    # raised until it is within balanced_slack of the best time
    middle = (saving.max_vram_gb + fastest.max_vram_gb) / 2
    ok = [s for s in within(balanced_slack) if s.max_vram_gb >= middle - step_gb / 2]
    balanced = pick(ok, budget="smallest") if ok else fastest
    return (
        dataclasses.replace(balanced, label="balanced"),
        dataclasses.replace(saving, label="memory-saving"),
        dataclasses.replace(fastest, label="fastest"),
    )
