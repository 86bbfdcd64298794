"""What the target device's allocator and libraries add to the graph's byte counts (plain data).

The capture counts storages in ``nbytes``. On a CUDA device the memory they take is what PyTorch's
caching allocator hands out for them, and the libraries the ops call keep buffers of their own.
:class:`DeviceRules` describes both for one target; :func:`apply_rules` turns a captured
:class:`fxswap.ir.GraphIR` into the IR the planner plans for that target. The CPU's rules are the
identity (``CPU_RULES``): nothing here changes a CPU plan.

Every figure below is read from PyTorch's source (file and function named at each constant;
``docs/memory_model.md`` has the derivation). What the source does not settle is marked
**estimate**.

1. **Rounding** (``c10/cuda/CUDACachingAllocator.cpp``, ``DeviceCachingAllocator``):

   - ``round_size``: a request is rounded up to a multiple of ``kMinBlockSize`` = 512 bytes (and
     at least 512). With ``roundup_power2_divisions`` set in ``PYTORCH_CUDA_ALLOC_CONF`` it rounds
     to power-of-two divisions instead; that option is not modelled (default off).
   - ``get_pool``: requests of at most ``kSmallSize`` = 1 MiB go to the small pool, packed into
     2 MiB segments (``kSmallBuffer``); larger ones to the large pool.
   - ``get_allocation_size``: a new large segment is ``kLargeBuffer`` = 20 MiB for requests under
     ``kMinLargeAlloc`` = 10 MiB, else the request rounded up to ``kRoundLarge`` = 2 MiB.
   - ``should_split``: a large block is split only if more than ``kSmallSize`` (1 MiB) would
     remain (small blocks, and every block under ``expandable_segments``, split when 512 bytes or
     more remain). An unsplit block is handed out whole, and the allocator's ``allocated_bytes``
     (what ``max_memory_allocated`` reports) counts the whole block.

   So a request of ``n`` bytes, served from a fresh segment, counts ``r = round_size(n)`` bytes,
   except a request of 10 MiB or more whose 2 MiB-rounded segment leaves 1 MiB or less: it counts
   the whole segment. A request served from a cached block larger than that can count up to 1 MiB
   more (the same split rule); that depends on the order of past frees, is fragmentation, and is
   left to the reserve.

2. **Library workspace kept** (``aten/src/ATen/cuda/CublasHandlePool.cpp``): the first cuBLAS call
   on a (handle, stream) allocates a workspace through the caching allocator and keeps it for the
   life of the process (``setWorkspaceForHandle``); its size is ``parseChosenWorkspaceSize``: the
   sum of ``SIZE KiB * COUNT`` over the ``:SIZE:COUNT`` pairs of ``CUBLAS_WORKSPACE_CONFIG``, else
   ``4096 * 8 KiB`` (32 MiB) on compute capability 9.0 and ``4096 KiB * 2 + 16 KiB * 8``
   (8,519,680 bytes) elsewhere. cuBLASLt (``addmm`` with a bias, the Lt path) keeps one more per
   (handle, stream), ``getCUDABlasLtWorkspaceSize``: ``CUBLASLT_WORKSPACE_SIZE`` KiB, default
   1024 KiB, capped at the cuBLAS size; with ``TORCH_CUBLASLT_UNIFIED_WORKSPACE=1`` it shares the
   cuBLAS workspace (``getCUDABlasLtWorkspace``) and adds nothing. fxswap runs every matmul on one
   stream (copies run on their own stream, and copies call no cuBLAS), so a graph with a matmul
   keeps one of each: the plan counts them from the first op to the last.

3. **SDPA workspace** (``aten/src/ATen/native/transformers``): see :func:`sdpa_backend` and
   :func:`sdpa_workspace_bytes`. ``fxswap.compile`` on CUDA measures every op's workspace on the
   device instead (``fxswap.workspace.probe_workspace``); these rules are for ``fxswap plan``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from fxswap.ir import BufferInfo, GraphIR

__all__ = [
    "CARD_CAPABILITY",
    "CPU_RULES",
    "DEFAULT_CAPABILITY",
    "KEPT_WORKSPACE",
    "DeviceRules",
    "RuleTerms",
    "apply_rules",
    "cublas_workspace_bytes",
    "cublaslt_workspace_bytes",
    "cuda_rules",
    "rule_terms",
    "sdpa_backend",
    "sdpa_workspace_bytes",
]

KiB = 1024
MiB = 2**20

# c10/cuda/CUDACachingAllocator.cpp (constants at the top of the file; c10/core/AllocatorConfig.h
# in newer versions): the caching allocator's size classes.
K_MIN_BLOCK_SIZE = 512  # round_size: all sizes are rounded to at least 512 bytes
K_SMALL_SIZE = 1 * MiB  # get_pool: the largest "small" allocation; should_split: large threshold
K_SMALL_BUFFER = 2 * MiB  # get_allocation_size: "small" allocations are packed in 2 MiB segments
K_LARGE_BUFFER = 20 * MiB  # get_allocation_size: requests under kMinLargeAlloc take 20 MiB segments
K_MIN_LARGE_ALLOC = 10 * MiB  # get_allocation_size
K_ROUND_LARGE = 2 * MiB  # get_allocation_size: larger segments are rounded up to 2 MiB

# The buffer apply_rules adds for the library workspace kept across calls (cuBLAS, cuBLASLt).
KEPT_WORKSPACE = "<cuda library workspace>"

# Compute capability of the built-in card profiles (fxswap.bench.hardware), for `fxswap plan --card`.
CARD_CAPABILITY: dict[str, tuple[int, int]] = {
    "rtx3090": (8, 6),
    "rtx4080": (8, 9),
    "rtx4090": (8, 9),
    "rtx5090": (12, 0),
    "a100-40gb": (8, 0),
    "a100-80gb": (8, 0),
    "h100-pcie": (9, 0),
    "h100-sxm": (9, 0),
    "h200": (9, 0),
    "generic-20gb": (8, 9),
}
# A CUDA target named without a card: an sm_89-class card (the consumer cards fxswap is for).
DEFAULT_CAPABILITY = (8, 9)

# Op names that call cuBLAS on CUDA, matched against the parts of the IR's printable target
# ("torch._C._nn.linear", "aten.addmm.default", "<built-in function matmul>").
_MATMUL_NAMES = frozenset({"linear", "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "einsum"})


def cublas_workspace_bytes(capability: tuple[int, int], config: str | None) -> int:
    """cuBLAS's workspace per (handle, stream): ``parseChosenWorkspaceSize`` in
    ``aten/src/ATen/cuda/CublasHandlePool.cpp``.

    ``config`` is ``CUBLAS_WORKSPACE_CONFIG`` (None: unset). Each ``:SIZE:COUNT`` pair adds
    ``SIZE * 1024 * COUNT`` bytes; a value without any pair falls back to the default (torch warns).
    """
    # Hopper and Blackwell (majors 9 to 12) get 32 MiB in current PyTorch (sm_90 only in older
    # releases): the larger figure is the one that keeps a plan within its budget on either.
    default = 4096 * 8 * KiB if capability[0] in (9, 10, 11, 12) else 4096 * KiB * 2 + 16 * KiB * 8
    if config is None:
        return default
    pairs = re.findall(r":([0-9]+):([0-9]+)", config)
    if not pairs:
        return default
    return sum(int(size) * KiB * int(count) for size, count in pairs)


def cublaslt_workspace_bytes(cublas_bytes: int, size_kib: str | None, unified: str | None) -> int:
    """cuBLASLt's own workspace per (handle, stream): ``getCUDABlasLtWorkspaceSize`` /
    ``getCUDABlasLtWorkspace`` in ``CublasHandlePool.cpp``.

    ``size_kib`` is ``CUBLASLT_WORKSPACE_SIZE`` (KiB, default 1024); ``unified`` is
    ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``. Unified is the default of open-source CUDA builds
    (``torch.backends.cuda.blas_workspace_size``'s note): the Lt calls use the cuBLAS workspace and
    nothing more is allocated. Only set false does cuBLASLt keep its own, ``size_kib`` uncapped.
    """
    if unified is None or unified.strip().lower() not in ("0", "false", "off", "no", "n"):
        return 0
    kib = 1024
    if size_kib is not None:
        try:
            kib = int(size_kib)
        except ValueError:
            kib = 1024  # torch warns and keeps the default
    return kib * KiB


@dataclass(frozen=True, slots=True)
class DeviceRules:
    """How a target device sizes allocations and what its libraries keep (see the module docstring).

    Attributes:
        target: "cpu" or "cuda".
        rounding: apply the CUDA caching allocator's rounding and split rule to every allocation.
        expandable_segments: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (every block is
            split when 512 bytes or more remain: no whole-segment counting).
        capability: the CUDA compute capability the rules were made for (None on the CPU).
        cublas_bytes, cublaslt_bytes: the library workspace one matmul stream keeps (each as
            requested; :meth:`kept_bytes` rounds them).
        matmul_streams: streams that run matmuls (fxswap: the compute stream only).
    """

    target: str = "cpu"
    rounding: bool = False
    expandable_segments: bool = False
    capability: tuple[int, int] | None = None
    cublas_bytes: int = 0
    cublaslt_bytes: int = 0
    matmul_streams: int = 1

    def alloc_bytes(self, n: int) -> int:
        """The bytes the allocator counts for a request of ``n`` bytes (served from a fresh segment)."""
        if not self.rounding or n <= 0:
            return n  # a 0-byte request allocates nothing
        r = max(K_MIN_BLOCK_SIZE, -(-n // K_MIN_BLOCK_SIZE) * K_MIN_BLOCK_SIZE)
        if r <= K_SMALL_SIZE or self.expandable_segments or r < K_MIN_LARGE_ALLOC:
            return r  # small pool, or split off a 20 MiB segment with more than 1 MiB left
        segment = -(-r // K_ROUND_LARGE) * K_ROUND_LARGE
        return segment if segment - r <= K_SMALL_SIZE else r

    def kept_bytes(self) -> int:
        """Library workspace kept by the matmul streams, as the allocator counts it."""
        return self.matmul_streams * (
            self.alloc_bytes(self.cublas_bytes) + self.alloc_bytes(self.cublaslt_bytes)
        )


CPU_RULES = DeviceRules()


def cuda_rules(
    capability: tuple[int, int] = DEFAULT_CAPABILITY,
    *,
    cublas_config: str | None = None,
    cublaslt_size: str | None = None,
    cublaslt_unified: str | None = None,
    alloc_conf: str | None = None,
) -> DeviceRules:
    """The rules of a CUDA device of ``capability`` under these environment settings
    (``CUBLAS_WORKSPACE_CONFIG``, ``CUBLASLT_WORKSPACE_SIZE``, ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``,
    ``PYTORCH_CUDA_ALLOC_CONF``; None: unset)."""
    cublas = cublas_workspace_bytes(capability, cublas_config)
    expandable = bool(alloc_conf) and bool(
        re.search(r"expandable_segments\s*:\s*(true|True|1)", alloc_conf or "")
    )
    return DeviceRules(
        target="cuda",
        rounding=True,
        expandable_segments=expandable,
        capability=tuple(capability),  # type: ignore[arg-type]
        cublas_bytes=cublas,
        cublaslt_bytes=cublaslt_workspace_bytes(cublas, cublaslt_size, cublaslt_unified),
    )


def sdpa_backend(
    capability: tuple[int, int] | None,
    dtype: str,
    head_dim: int,
    head_dim_v: int,
    has_mask: bool,
) -> str:
    """The SDPA backend PyTorch picks on CUDA, as predicted here (``sdp_utils.cpp``,
    ``select_sdp_backend``: the first backend in priority order whose checks pass).

    - flash (``use_flash_attention``): fp16/bf16, sm80 or newer, head dims equal, at most 256 and a
      multiple of 8 (``check_head_dim_size_flash``), no explicit mask (``check_for_attn_mask``).
    - memory-efficient (``use_mem_efficient_attention``): sm50 or newer, head dims a multiple of 8
      for fp16/bf16 and of 4 for fp32 (``check_head_dim_size_mem_efficient``); masks allowed.
    - math otherwise. **Estimate**: cuDNN attention is not predicted (whether it runs first
      depends on the torch and cuDNN versions' priority order, not on the graph).
    """
    half = dtype in ("float16", "bfloat16")
    cap = capability or DEFAULT_CAPABILITY
    flash_dims = head_dim == head_dim_v and head_dim <= 256 and head_dim % 8 == 0
    if half and cap >= (8, 0) and flash_dims and not has_mask:
        return "flash"
    align = 8 if half else 4
    if cap >= (5, 0) and head_dim % align == 0 and head_dim_v % align == 0:
        return "efficient"
    return "math"


def sdpa_workspace_bytes(
    backend: str,
    *,
    batch: int,
    heads: int,
    lq: int,
    lk: int,
    head_dim: int,
    head_dim_v: int,
    itemsize: int,
) -> int:
    """Bytes an SDPA call allocates beside its output and frees before returning (inference).

    - flash: the fp32 log-sum-exp, ``batch * heads * lq * 4`` (``flash_api.cpp``, ``mha_fwd``:
      ``softmax_lse`` of shape (batch, heads, seqlen_q), float). **Estimate**: the split-KV
      accumulators ``mha_fwd`` adds when batch * heads * ceil(lq / 64) is small against the SM
      count (``num_splits_heuristic``) are not counted; they occur for short sequences only.
    - memory-efficient: no log-sum-exp without grad (``compute_log_sumexp`` false: a 0-length
      tensor); an fp32 output accumulator ``batch * lq * heads * head_dim_v * 4`` when the kernel
      cannot keep the output in registers (``kernel_forward.h``: ``kNeedsOutputAccumulatorBuffer``,
      i.e. head_dim_v above the kernel's ``kKeysPerBlock``, 128 for the largest single-iteration
      kernel; **estimate** of the dispatch table).
    - math (``attention.cpp``, ``_scaled_dot_product_attention_math``): the scaled query and key
      copies and the attention matrix with its softmax, live together:
      ``(batch*heads*(lq + lk)*head_dim + 2*batch*heads*lq*lk) * itemsize``. **Estimate**: a
      half-precision input upcast to fp32 for the reduction is not counted.
    """
    if backend == "flash":
        return batch * heads * lq * 4
    if backend == "efficient":
        return batch * lq * heads * head_dim_v * 4 if head_dim_v > 128 else 0
    return (batch * heads * (lq + lk) * head_dim + 2 * batch * heads * lq * lk) * itemsize


def _has_matmul(ir: GraphIR) -> bool:
    return any(_MATMUL_NAMES.intersection(re.split(r"[.\s<>]+", op.target)) for op in ir.ops)


def apply_rules(ir: GraphIR, rules: DeviceRules) -> GraphIR:
    """``ir`` as the target holds it: every allocation (activation buffer, weight copy, op
    workspace) as the allocator counts it, and the library workspace kept (a buffer named
    :data:`KEPT_WORKSPACE` over the whole call, when the graph runs a matmul). The CPU's rules
    return ``ir`` itself."""
    if not rules.rounding and not rules.kept_bytes():
        return ir
    a = rules.alloc_bytes
    ops = tuple(dataclasses.replace(o, workspace_bytes=a(o.workspace_bytes)) for o in ir.ops)
    weights = tuple(dataclasses.replace(w, nbytes=a(w.nbytes)) for w in ir.weights)
    buffers = [dataclasses.replace(b, nbytes=a(b.nbytes)) for b in ir.buffers]
    kept = rules.kept_bytes()
    if kept and ir.ops and _has_matmul(ir):
        buffers.insert(0, BufferInfo(KEPT_WORKSPACE, kept, 0, len(ir.ops) - 1))
    return dataclasses.replace(ir, ops=ops, weights=weights, buffers=tuple(buffers))


@dataclass(frozen=True, slots=True)
class RuleTerms:
    """What :func:`apply_rules` added, in bytes: ``rounding`` over the weights, and over the
    activations and workspace live at op ``at``; ``kept`` the library workspace."""

    at: int
    weights_rounding: int
    activation_rounding: int
    kept: int

    @property
    def total(self) -> int:
        return self.weights_rounding + self.activation_rounding + self.kept


def rule_terms(raw: GraphIR, ruled: GraphIR, at: int) -> RuleTerms:
    """The terms :func:`apply_rules` added to ``raw`` (giving ``ruled``), at op ``at``: every weight
    (all of them are on the device at some point), the buffers live at ``at`` and ``at``'s
    workspace."""
    kept = sum(b.nbytes for b in ruled.buffers if b.name == KEPT_WORKSPACE)

    def live(ir: GraphIR) -> int:
        act = sum(b.nbytes for b in ir.buffers if b.start <= at <= b.end and b.name != KEPT_WORKSPACE)
        return act + (ir.ops[at].workspace_bytes if 0 <= at < len(ir.ops) else 0)

    return RuleTerms(
        at=at,
        weights_rounding=ruled.weight_bytes - raw.weight_bytes,
        activation_rounding=live(ruled) - live(raw),
        kept=kept,
    )
