"""The ``fxswap`` command line. ``fxswap plan`` plans a named WAN config on meta tensors.

Nothing heavy is imported at module level so that ``fxswap --help`` stays fast: torch, the WAN
model and the planner are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fxswap.ir import GraphIR
    from fxswap.models.wan_config import WanConfig
    from fxswap.options import PlanOptions
    from fxswap.passes.device_rules import DeviceRules
    from fxswap.swapplan import SwapPlan

__all__ = ["main"]

DTYPES = ("bf16", "fp16", "fp32", "fp8")
# GGUF types a file may be quantised to (fxswap.gguf.TYPES; the _S/_M suffixes price the main type).
GGUF_DTYPES = (
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q5_K",
    "Q5_1",
    "Q5_0",
    "Q4_K_M",
    "Q4_K",
    "Q4_1",
    "Q4_0",
    "Q3_K",
    "Q2_K",
)


def _dtype_arg(text: str) -> str:
    """``--dtype``: the plain names in lower case, the GGUF ones in upper case (either accepted)."""
    return text.lower() if text.lower() in DTYPES else text.upper()


EXIT_INFEASIBLE = 2


def _resolution(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 832x480")
    return int(parts[0]), int(parts[1])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _float(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {'>=' if allow_zero else '>'} 0")
    return value


def _positive_float(text: str) -> float:
    return _float(text, allow_zero=False)


def _non_negative_float(text: str) -> float:
    return _float(text, allow_zero=True)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxswap", description="Compile-time weight swapping for large diffusion transformers."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "plan",
        help="plan weight swapping for a named WAN model on meta tensors (no weights, no GPU)",
        description=(
            "Build a named WAN config on the meta device, capture one forward at the given video size and "
            "plan which weights stay resident and how the rest are swapped under --max-vram-gb. Prints a "
            f"summary; exits {EXIT_INFEASIBLE} if the budget is below the minimum for the mode."
        ),
    )
    p.add_argument("--model", required=True, help="WAN config name, e.g. wan2.1-t2v-14b")
    p.add_argument(
        "--resolution",
        type=_resolution,
        default=(832, 480),
        metavar="WxH",
        help="video size (default 832x480)",
    )
    p.add_argument("--frames", type=_positive_int, default=81, help="video frames, 1 + 4k (default 81)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument(
        "--max-vram-gb", type=_positive_float, default=16.0, help="device budget in GiB (default 16)"
    )
    p.add_argument(
        "--block-size-mb", type=_positive_float, default=300.0, help="chunk size in MiB (default 300)"
    )
    p.add_argument(
        "--mode",
        choices=("layerwise", "chunkwise", "adaptive"),
        default="adaptive",
        help="swap unit: one block (layerwise), runs of at most --block-size-mb (chunkwise), or the "
        "planner's choice (adaptive, default)",
    )
    p.add_argument(
        "--dtype",
        type=_dtype_arg,
        choices=DTYPES + GGUF_DTYPES,
        default="bf16",
        help="weight storage dtype (default bf16); fp8 stores Linear weights as float8_e4m3fn; a GGUF "
        "type (Q8_0, Q6_K, Q5_K, Q4_K, Q4_K_M ...) prices a GGUF file of that type, weights kept "
        "quantised in host memory and over the link and decoded on the device before use",
    )
    p.add_argument(
        "--reserve-mb", type=_non_negative_float, default=None, help="workspace/allocator reserve in MiB"
    )
    p.add_argument(
        "--h2d-gbps", type=_positive_float, default=None, help="host-to-device GB/s for the cost model"
    )
    p.add_argument(
        "--compute-tflops", type=_positive_float, default=None, help="achieved TFLOP/s for the cost model"
    )
    p.add_argument(
        "--expert",
        choices=("high", "low"),
        default="high",
        help="Wan2.2 A14B: which expert to plan (both share one architecture, so one plan fits both)",
    )
    p.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help="keep only the first N transformer blocks (quick looks)",
    )
    p.add_argument(
        "--card",
        default=None,
        metavar="NAME|PROFILE.json",
        help="price the plan with a hardware profile: a card name (rtx3090, rtx4080, rtx4090, rtx5090, "
        "a100-40gb, a100-80gb, h100-pcie, h100-sxm, generic-20gb) or a file written by `fxswap calibrate`; "
        "--h2d-gbps / --compute-tflops override its figures",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="the device the plan is for: cuda (default) sizes every allocation as PyTorch's CUDA caching "
        "allocator does and counts cuBLAS's kept workspace, for the --card's compute capability (sm_89 "
        "without one) and this shell's CUBLAS_WORKSPACE_CONFIG; cpu counts plain tensor bytes",
    )
    p.add_argument(
        "--no-warm-start",
        action="store_true",
        help="plan every call cold (by default the plan is a cycle: a call's tail loads the next call's "
        "first units when that is predicted faster)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="capture the graph again instead of reading (or writing) the graph cache "
        "($FXSWAP_CACHE_DIR, default ~/.cache/fxswap/graphs)",
    )
    p.add_argument(
        "--ulysses-degree",
        type=_positive_int,
        default=1,
        metavar="N",
        help="plan one rank of N-way sequence parallelism (fxswap.compile(..., ulysses_degree=N) under "
        "torchrun): tokens sharded, all-to-alls around self-attention; prints the per-rank budget "
        "beside one process's (default 1: one process)",
    )
    p.add_argument(
        "--link-gbps",
        type=_positive_float,
        default=None,
        help="with --ulysses-degree: GB/s per direction at which each rank's all-to-alls move (NVLink, "
        "PCIe peer-to-peer or through host memory: measure it, e.g. nccl-tests' alltoall_perf); "
        "default the --card profile's, else PCIe without NVLink (16.5)",
    )
    p.add_argument(
        "--nvlink",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --ulysses-degree: the all-to-alls have a link of their own (NVLink); without it "
        "(default, or the --card profile's) they share the PCIe host-to-device direction with the "
        "weight copies",
    )
    p.add_argument("-o", "--output", default=None, metavar="PLAN.json", help="write the plan as JSON")
    p.add_argument(
        "--plot", default=None, metavar="TIMELINE.png", help="draw the memory timeline (needs matplotlib)"
    )
    p.set_defaults(handler=_cmd_plan, cmd_parser=p)

    # bench and calibrate define their own arguments next to their code, in the tooling; they are
    # imported only when the command line names them (or cannot be told apart: no command), which
    # keeps `fxswap plan` from loading the bench.
    tooling = command not in ("plan", "recommend")

    b = sub.add_parser(
        "bench",
        help="simulated step time / peak VRAM of fxswap's schedules against other offloaders' policies",
    )
    if tooling:
        from fxswap.bench.runner import add_bench_arguments

        add_bench_arguments(b)
    b.set_defaults(handler=_cmd_bench, cmd_parser=b)
    c = sub.add_parser(
        "calibrate", help="measure this GPU (H2D bandwidth, per-block compute) and save a hardware profile"
    )
    if tooling:
        from fxswap.bench.calibrate import add_calibrate_arguments

        add_calibrate_arguments(c)
    c.set_defaults(handler=_cmd_calibrate, cmd_parser=c)

    r = sub.add_parser(
        "recommend",
        help="balanced, memory-saving and fastest settings for a card, model and video size (planned)",
        description=(
            "Capture the model once on meta tensors and plan every mode at every budget from the smallest "
            "that works to the card's usable memory; print the balanced, memory-saving and fastest settings "
            "with their predicted peak and step time (simulator predictions, not measurements) and the "
            "smallest budget that works. Without --vram (and --card) it reads the CUDA device's memory."
        ),
    )
    r.add_argument(
        "--vram",
        type=_positive_float,
        default=None,
        metavar="GB",
        help="the card's memory in GiB (default: the --card profile's, else the CUDA device's)",
    )
    r.add_argument("--model", default="wan2.1-t2v-14b", help="WAN config name (default wan2.1-t2v-14b)")
    r.add_argument(
        "--resolution",
        type=_resolution,
        default=(832, 480),
        metavar="WxH",
        help="video size (default 832x480)",
    )
    r.add_argument("--frames", type=_positive_int, default=81, help="video frames, 1 + 4k (default 81)")
    r.add_argument(
        "--card",
        default=None,
        metavar="NAME|PROFILE.json",
        help="price the plans with this card's copy and compute rates (a built-in name as for `fxswap plan "
        "--card`, or a file written by `fxswap calibrate`); default: the planner's default rates",
    )
    r.add_argument("--dtype", choices=DTYPES, default="bf16", help="weight storage dtype (default bf16)")
    r.add_argument(
        "--headroom-gb",
        type=_non_negative_float,
        default=None,
        help="memory kept out of every budget (CUDA context, other programs); default 10%% of the card",
    )
    r.add_argument("--step-gb", type=_positive_float, default=1.0, help="budget grid step in GiB (default 1)")
    r.add_argument(
        "--no-cache",
        action="store_true",
        help="capture the graph again instead of reading (or writing) the graph cache "
        "($FXSWAP_CACHE_DIR, default ~/.cache/fxswap/graphs)",
    )
    r.add_argument(
        "--layers",
        type=_positive_int,
        default=None,
        help="keep only the first N transformer blocks (quick looks)",
    )
    r.set_defaults(handler=_cmd_recommend, cmd_parser=r)
    return parser


def _cmd_recommend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fxswap.bench.recommendations import NoCudaError, recommend
    from fxswap.errors import FxswapError
    from fxswap.models import wan

    if args.model not in wan.CONFIGS:
        parser.error(
            f"argument --model: unknown model {args.model!r}; known: {', '.join(sorted(wan.CONFIGS))}"
        )
    width, height = args.resolution
    try:
        wan.latent_shape(wan.CONFIGS[args.model], args.frames, height, width)
    except ValueError as e:
        parser.error(f"argument --resolution/--frames: {e}")
    if args.card is not None:
        from fxswap.bench.hardware import get_profile

        try:
            get_profile(args.card)
        except (FxswapError, OSError, ValueError) as e:
            parser.error(f"argument --card: {e}")
    try:
        rec = recommend(
            args.vram,
            model=args.model,
            resolution=(width, height),
            frames=args.frames,
            card=args.card,
            dtype=args.dtype,
            headroom_gb=args.headroom_gb,
            step_gb=args.step_gb,
            layers=args.layers,
            cache=not args.no_cache,
            progress=lambda msg: print(msg, file=sys.stderr) if sys.stderr.isatty() else None,
        )
    except NoCudaError as e:
        print(f"fxswap recommend: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        parser.error(str(e))
    print(rec.report())
    return 0 if rec.settings else EXIT_INFEASIBLE


def _cmd_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fxswap.bench.runner import run_bench

    return run_bench(args)


def _cmd_calibrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from fxswap.bench.calibrate import run_calibrate

    return run_calibrate(args)


@dataclass(frozen=True)
class _Graph:
    """The graph ``fxswap plan`` plans: fp8's re-sized weights applied, and where it came from."""

    ir: GraphIR
    seconds: float  # the cache read on a hit, the lookup and capture on a miss
    hit: bool


def _meta_wan(config: WanConfig, args: argparse.Namespace, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """``config`` built on meta tensors in ``dtype``, and its example inputs at the command line's
    batch, frames and resolution."""
    from fxswap.models import wan

    width, height = args.resolution
    model = wan.build(config, device="meta", dtype=dtype)
    inputs = wan.example_inputs(
        model.config,
        batch=args.batch,
        frames=args.frames,
        height=height,
        width=width,
        device="meta",
        dtype=dtype,
    )
    return model, inputs


def _capture_plan_graph(config: WanConfig, args: argparse.Namespace) -> _Graph | None:
    """The torch path of ``fxswap plan``: build ``config`` on meta tensors and capture it (or read it
    from the graph cache). None, with the error printed, when it does not capture."""
    import gc

    import torch

    # torch's ~1M objects live as long as the process: out of the collector's generations, the
    # full collections that the capture's allocations trigger do not walk them again.
    gc.freeze()

    from fxswap.errors import CaptureError
    from fxswap.graph_cache import captured_ir
    from fxswap.passes.analyse import fp8_linear_storage

    # fp8: the graph is captured in bf16 (activations and compute stay bf16) and the Linear weights'
    # storage is then re-sized to 1 byte per element; see fxswap.passes.analyse.fp8_linear_storage.
    build_dtype = {
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": torch.float32,
        "fp8": torch.bfloat16,
    }
    dtype = build_dtype.get(args.dtype, torch.bfloat16)  # GGUF files run in bf16
    model, inputs = _meta_wan(config, args, dtype)
    try:
        graph = captured_ir(model, (), inputs, cache=not args.no_cache)
    except CaptureError as e:
        print(f"fxswap plan: error: {e}", file=sys.stderr)
        return None
    ir = graph.ir
    if args.dtype == "fp8":
        linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        ir = fp8_linear_storage(ir, linears)
    elif args.dtype in GGUF_DTYPES:
        from fxswap.models.wan_stored import gguf_planned_sizes
        from fxswap.passes.analyse import stored_storage

        ir = stored_storage(ir, gguf_planned_sizes(model, args.dtype))
    return _Graph(ir, graph.seconds, graph.hit)


def _plan_rules(args: argparse.Namespace) -> DeviceRules:
    """The target's allocator and library rules for `fxswap plan` (``passes.device_rules``)."""
    import os

    from fxswap.passes.device_rules import CARD_CAPABILITY, CPU_RULES, DEFAULT_CAPABILITY, cuda_rules

    if args.device == "cpu":
        return CPU_RULES
    capability = DEFAULT_CAPABILITY
    if args.card is not None:
        from fxswap.bench.hardware import get_profile

        capability = CARD_CAPABILITY.get(get_profile(args.card).name, DEFAULT_CAPABILITY)
    env = os.environ.get
    return cuda_rules(
        capability,
        cublas_config=env("CUBLAS_WORKSPACE_CONFIG"),
        cublaslt_size=env("CUBLASLT_WORKSPACE_SIZE"),
        cublaslt_unified=env("TORCH_CUBLASLT_UNIFIED_WORKSPACE"),
        alloc_conf=env("PYTORCH_CUDA_ALLOC_CONF") or env("PYTORCH_ALLOC_CONF"),
    )


def _rules_line(rules: DeviceRules, raw: GraphIR, ir: GraphIR, plan: SwapPlan) -> str:
    from fxswap.passes.device_rules import rule_terms

    if rules.target == "cpu":
        return "device cpu: plain tensor bytes (no allocator rounding, no library workspace)"
    at = next((i for i, o in enumerate(ir.ops) if o.name == plan.peak_op), 0)
    t = rule_terms(raw, ir, at)
    mib = 2**20
    cap = rules.capability or (0, 0)
    return (
        f"device cuda (sm_{cap[0]}{cap[1]}): CUDA caching allocator rounding "
        f"+{t.weights_rounding / mib:.2f} MiB on weights, +{t.activation_rounding / mib:.2f} MiB on "
        "activations at the peak op; cuBLAS/cuBLASLt "
        f"workspace kept {t.kept / mib:.2f} MiB (docs/memory_model.md)"
    )


def _cmd_plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import dataclasses
    import gc

    # Nothing here imports torch until the graph is known to be missing from the cache: a repeated
    # `fxswap plan --model NAME` reads its graph through fxswap.cli_cache (a key computed from the
    # config, the arguments and the source on disk) and plans it in pure Python.
    from fxswap.errors import BudgetInfeasibleError
    from fxswap.models import wan_config
    from fxswap.options import make_options
    from fxswap.passes.planner import build_plan

    named = {**wan_config.CONFIGS, **wan_config.TURBOWAN_CONFIGS}
    if args.model not in named:
        parser.error(f"argument --model: unknown model {args.model!r}; known: {', '.join(sorted(named))}")
    config = named[args.model]
    width, height = args.resolution
    try:
        latent = wan_config.latent_shape(config, args.frames, height, width)
    except ValueError as e:
        parser.error(f"argument --resolution/--frames: {e}")
    if args.layers is not None and args.layers > config.num_layers:
        parser.error(
            f"argument --layers: {args.layers} exceeds the {config.num_layers} blocks of {args.model}"
        )
    rates: dict[str, float] = {}
    link: dict[str, float | bool] = {}
    if args.card is not None:
        from fxswap.bench.costmodel import plan_rates
        from fxswap.bench.hardware import get_profile
        from fxswap.errors import FxswapError

        try:
            profile = get_profile(args.card)
            rates = plan_rates(profile)
        except (FxswapError, OSError, ValueError) as e:
            parser.error(f"argument --card: {e}")
        if args.ulysses_degree > 1:  # the link prices collectives only: other plans keep their options
            from fxswap.bench.costmodel import link_rates

            link.update(link_rates(profile))
    if args.link_gbps is not None:
        link["p2p_gbps"] = args.link_gbps
    if args.nvlink is not None:
        link["nvlink"] = args.nvlink
    if args.h2d_gbps is not None:
        rates["h2d_gbps"] = args.h2d_gbps
    if args.compute_tflops is not None:
        rates["compute_tflops"] = args.compute_tflops
    try:
        options = make_options(
            mode=args.mode,
            max_vram_gb=args.max_vram_gb,
            block_size_mb=args.block_size_mb,
            reserve_mb=args.reserve_mb,
            h2d_gbps=rates.get("h2d_gbps"),
            compute_tflops=rates.get("compute_tflops"),
            device_mem_gbps=rates.get("device_mem_gbps"),
            warm_start=not args.no_warm_start,
            **link,
        )
    except ValueError as e:
        parser.error(str(e))
    if args.layers is not None:
        config = dataclasses.replace(config, num_layers=args.layers)

    if args.ulysses_degree > 1:
        return _plan_parallel(args, config, options)

    graph = None
    front = None
    if not args.no_cache:
        from fxswap import cli_cache

        start = time.perf_counter()
        front = cli_cache.front_key(
            config, batch=args.batch, frames=args.frames, height=height, width=width, dtype=args.dtype
        )
        cached = None if front is None else cli_cache.read(front)
        if cached is not None:
            graph = _Graph(cached, time.perf_counter() - start, True)
    if graph is None:
        captured = _capture_plan_graph(config, args)
        if captured is None:
            return 1
        graph = captured
        if front is not None:
            cli_cache.write(front, graph.ir)
    # The objects made so far (torch's ~1M on the torch path, the IR's records) live as long as the
    # process: moved out of the collector's generations, the full collections the planner's
    # allocations trigger do not walk them again.
    gc.freeze()
    rules = _plan_rules(args)
    from fxswap.passes.device_rules import apply_rules

    ir = apply_rules(graph.ir, rules)

    start = time.perf_counter()
    try:
        plan = build_plan(ir, options)
    except BudgetInfeasibleError as e:
        print(
            f"fxswap plan: error: --max-vram-gb {args.max_vram_gb:g} is infeasible for {args.model} at "
            f"{width}x{height}, {args.frames} frames, mode {args.mode}; the minimum budget is "
            f"{e.min_vram_bytes / 2**30:.2f} GiB. Details: {e}",
            file=sys.stderr,
        )
        return EXIT_INFEASIBLE
    plan_seconds = time.perf_counter() - start

    layers = "" if args.layers is None else f", first {args.layers} of {named[args.model].num_layers} blocks"
    print(
        f"model {args.model} ({config.num_layers} blocks{layers}), {width}x{height}, "
        f"{args.frames} frames, batch {args.batch}, latent {tuple(latent)}, weights {args.dtype}, "
        + (
            f"graph from the cache {graph.seconds:.2f} s"
            if graph.hit
            else f"meta capture {graph.seconds:.1f} s"
        )
        + f", planning {plan_seconds:.2f} s"
    )
    if args.dtype == "fp8":
        print(
            "dtype fp8: nn.Linear weights counted as float8_e4m3fn (1 byte/element, upcast to bf16 at "
            "use: each Linear op holds a transient bf16 copy of its weight); biases, norms, modulation, "
            "the patch embedding and all activations stay bf16"
        )
    if args.dtype in GGUF_DTYPES:
        print(
            f"dtype {args.dtype}: weights a GGUF file quantises (2-D, > 1024 values, not .modulation) "
            "counted at their stored size in host memory, over the link and in their unit; each is "
            "decoded to bf16 on the device before its first reader and held until its last; the rest "
            "stays bf16"
            + (" (priced at the main type of the mix)" if args.dtype.endswith(("_M", "_S")) else "")
        )
    if config.num_experts == 2:
        print(
            f"{args.model} has two experts: planned the {args.expert}-noise expert only. Both share one "
            "architecture, so this plan fits either; holding both under one budget is the runtime's concern"
        )
    print(_rules_line(rules, graph.ir, ir, plan))
    print(plan.summary())
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")
    if args.plot:
        from fxswap.bench.plots import plot_timeline

        plot_timeline(plan, ir, args.plot)
        print(f"memory timeline drawn to {args.plot}")
    return 0


def _plan_parallel(args: argparse.Namespace, config: WanConfig, options: PlanOptions) -> int:
    """``fxswap plan --ulysses-degree N``: rank 0's plan (every rank's shapes are the same) and the
    smallest budget per rank beside one process's. Captures on meta each time (no graph cache)."""
    import dataclasses

    import torch

    from fxswap.errors import BudgetInfeasibleError, SequenceParallelError
    from fxswap.parallel import sharded_ir
    from fxswap.passes.device_rules import apply_rules
    from fxswap.passes.planner import build_plan

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if args.dtype not in dtypes:  # fp8 and the GGUF types are priced as stored, which this path is not
        print(
            f"fxswap plan: error: --ulysses-degree does not support --dtype {args.dtype} yet; "
            f"use one of {', '.join(dtypes)}",
            file=sys.stderr,
        )
        return 2
    model, inputs = _meta_wan(config, args, dtypes[args.dtype])
    start = time.perf_counter()
    try:
        single, shard, report = sharded_ir(model, inputs, args.ulysses_degree)
    except SequenceParallelError as e:
        print(f"fxswap plan: error: --ulysses-degree {args.ulysses_degree}: {e}", file=sys.stderr)
        return 2
    capture_s = time.perf_counter() - start
    rules = _plan_rules(args)
    figures: dict[str, tuple[int, int | None, SwapPlan | None]] = {}
    for label, ir in (("1 process", single), (f"per rank of {args.ulysses_degree}", shard)):
        try:
            made = build_plan(apply_rules(ir, rules), options)
            figures[label] = (made.min_vram_bytes, made.activation_peak_bytes, made)
        except BudgetInfeasibleError as e:
            figures[label] = (e.min_vram_bytes, None, None)
    gib, mib = 2**30, 2**20
    print(
        f"model {args.model} ({config.num_layers} blocks), {args.resolution[0]}x{args.resolution[1]}, "
        f"{args.frames} frames, "
        f"batch {args.batch}, weights {args.dtype}, ulysses degree {args.ulysses_degree}: "
        f"{report.tokens} tokens, {report.tokens // args.ulysses_degree} per rank; "
        f"{len(report.self_attention)} self-attentions with all-to-alls, "
        f"{len(report.cross_attention)} cross-attentions on full keys/values, "
        f"{len({g for g, _ in report.gathered})} gather(s); meta capture {capture_s:.1f} s"
    )
    for label, (minimum, act, planned) in figures.items():
        acts = f", activation peak {act / mib:.1f} MiB" if act is not None else ""
        step = (
            f", predicted step {planned.predicted_step_ms:.1f} ms at {args.max_vram_gb:g} GiB"
            if planned is not None
            else f", no plan at {args.max_vram_gb:g} GiB"
        )
        print(f"  {label:>16}: smallest budget {minimum / gib:.3f} GiB{acts}{step}")
    one, per_rank = figures["1 process"][2], figures[f"per rank of {args.ulysses_degree}"][2]
    if one is not None and per_rank is not None:
        print(
            f"  predicted step per rank / one process's at the same budget per card: "
            f"{per_rank.predicted_step_ms / one.predicted_step_ms:.3f} (predictions of the cost model, "
            "not measured)"
        )
    sent = sum(report.alltoall_sent)
    line = f"  all-to-alls: {len(report.alltoall_sent)} per call, {sent / mib:.1f} MiB sent by each rank"
    line += (
        f"; predicted {report.alltoall_ms(options.p2p_gbps):.1f} ms per call at "
        f"{options.p2p_gbps:g} GB/s one after another "
        f"({'NVLink' if options.nvlink else 'PCIe, sharing host-to-device with the weight copies'})"
    )
    if per_rank is not None:
        from fxswap.passes.simulate import COLLECTIVE_LATENCY_MS

        line += (
            f"; the rank's plan runs them on their own stream ({COLLECTIVE_LATENCY_MS:g} ms latency "
            f"each) and compute waits {per_rank.predicted_collective_stall_ms:.1f} ms for them"
        )
    print(line)
    rank_plan = figures[f"per rank of {args.ulysses_degree}"][2]
    if rank_plan is None:
        print(
            f"fxswap plan: error: --max-vram-gb {args.max_vram_gb:g} is below the smallest budget per rank",
            file=sys.stderr,
        )
        return EXIT_INFEASIBLE
    plan = dataclasses.replace(rank_plan, ulysses_degree=args.ulysses_degree, ulysses_rank=0)
    print("rank 0's plan (the other ranks' shapes are the same); predicted times include the all-to-alls:")
    print(plan.summary())
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fxswap`` console script; returns the exit status."""
    given = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(given[0] if given else None)
    args = parser.parse_args(given)
    # errors about a command's arguments print that command's usage line, not the top-level one
    result: int = args.handler(args.cmd_parser, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
