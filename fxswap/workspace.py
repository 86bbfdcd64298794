"""Op workspace: bytes an op allocates and frees before it returns, beside its inputs and outputs.

The plan counts them at the op that needs them (``OpInfo.workspace_bytes``), so that the planned
peak is the peak of what really runs, not only of the tensors the graph names. Two sources:

- :func:`probe_workspace` **measures** them on the device the model will run on: every distinct
  op of the graph (target, argument shapes, strides and dtypes, constants) runs once on zero-filled
  tensors under :func:`fxswap.alloc_probe.pieces` (the planner's own probe, not the test oracle);
  its workspace is the measured peak minus the bytes of the outputs the graph keeps.
  ``fxswap.compile`` does this once per captured signature (a few ms per distinct op; a WAN block
  repeats the same ops, so a 40-block model probes about as many ops as one block). Examples
  measured on this project's CPU machine (torch 2.13): CPU flash attention's per-thread blocks and
  log-sum-exp; ``layer_norm``'s mean and rstd; oneDNN convolutions' reordered input and weight;
  the 0-dim tensors of Python-scalar arithmetic.
- :func:`rule_workspace` **predicts** them where nothing can run (planning on ``meta`` tensors,
  ``fxswap plan``), for a CUDA device. The rules (each the size of a documented temporary):

  ====================================  ===================================================
  op                                    workspace
  ====================================  ===================================================
  ``scaled_dot_product_attention``      that of the backend CUDA would pick at these shapes
                                        (``passes.device_rules.sdpa_backend`` and
                                        ``sdpa_workspace_bytes``: flash's fp32 log-sum-exp,
                                        memory-efficient's output accumulator, math's
                                        attention matrices)
  ``layer_norm`` / ``group_norm``       mean and rstd, fp32: 2 * rows * 4 bytes
  everything else                       0 (cuBLAS's workspace is allocated once per stream
                                        and kept: ``passes.device_rules`` plans it as a
                                        buffer over the whole call)
  ====================================  ===================================================

:func:`device_rules_for` reads the target's allocator and library rules
(:class:`fxswap.passes.device_rules.DeviceRules`) from the device and the environment.

NOTE: probing runs the op on zeros, not on the call's values. Ops whose allocations depend on the
values (``nonzero``, ``unique``) cannot be in a graph fxswap captures (``fullgraph=True`` with
static shapes refuses them), so zeros allocate what the real values would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxswap.alloc_probe import Measurements, PieceProbe, pieces, profiler_running
from fxswap.ir import GraphIR
from fxswap.passes.analyse import target_name
from fxswap.passes.device_rules import CPU_RULES, DEFAULT_CAPABILITY, DeviceRules, cuda_rules, sdpa_backend
from fxswap.passes.device_rules import sdpa_workspace_bytes as _sdpa_bytes
from fxswap.passes.sequence_parallel import COLLECTIVES, collective_workspace

__all__ = ["device_rules_for", "probe_workspace", "rule_workspace", "rules_for", "with_workspace"]

logger = logging.getLogger("fxswap.workspace")

_SDPA = ("scaled_dot_product_attention",)
_NORM = ("layer_norm", "group_norm")
_COMPUTE_OPS = ("call_function", "call_method", "call_module")


def _example(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def device_rules_for(device: torch.device | str) -> DeviceRules:
    """The allocator and library rules of ``device``: the CPU's are the identity; a CUDA device's
    are made for its compute capability and this process's environment (``CUBLAS_WORKSPACE_CONFIG``,
    ``CUBLASLT_WORKSPACE_SIZE``, ``TORCH_CUBLASLT_UNIFIED_WORKSPACE``, ``PYTORCH_CUDA_ALLOC_CONF``),
    which torch reads the same way when it allocates."""
    import os

    dev = torch.device(device)
    if dev.type != "cuda":
        return CPU_RULES
    capability = tuple(torch.cuda.get_device_capability(dev))
    env = os.environ.get
    return cuda_rules(
        (int(capability[0]), int(capability[1])),
        cublas_config=env("CUBLAS_WORKSPACE_CONFIG"),
        cublaslt_size=env("CUBLASLT_WORKSPACE_SIZE"),
        cublaslt_unified=env("TORCH_CUBLASLT_UNIFIED_WORKSPACE"),
        alloc_conf=env("PYTORCH_CUDA_ALLOC_CONF") or env("PYTORCH_ALLOC_CONF"),
    )


def _new_storage_bytes(node: fx.Node, seen: set[int], rules: DeviceRules = CPU_RULES) -> int:
    # Bytes of output storages that no earlier node produced (views of an input are not new), as
    # the allocator counts them (the probe's peak counts them so).
    total = 0
    for t in _tensors(_example(node)):
        key = int(t.untyped_storage()._cdata)
        if key not in seen:
            seen.add(key)
            total += rules.alloc_bytes(int(t.untyped_storage().nbytes()))
    return total


def _sdpa_rule(node: fx.Node, q: torch.Tensor, capability: tuple[int, int]) -> int:
    k = _example(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
    v = _example(node.args[2]) if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
    k = k if isinstance(k, torch.Tensor) else q
    v = v if isinstance(v, torch.Tensor) else k
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    lead = math.prod(q.shape[:-3]) if q.dim() >= 4 else 1
    heads = q.shape[-3] if q.dim() >= 3 else 1
    dtype = str(q.dtype).replace("torch.", "")
    backend = sdpa_backend(capability, dtype, int(q.shape[-1]), int(v.shape[-1]), mask is not None)
    return _sdpa_bytes(
        backend,
        batch=int(lead),
        heads=int(heads),
        lq=int(q.shape[-2]),
        lk=int(k.shape[-2]),
        head_dim=int(q.shape[-1]),
        head_dim_v=int(v.shape[-1]),
        itemsize=q.dtype.itemsize,
    )


def rule_workspace(node: fx.Node, capability: tuple[int, int] = DEFAULT_CAPABILITY) -> int:
    """The predicted workspace of ``node`` on a CUDA device of ``capability`` (see the module
    docstring's table; as requested: ``passes.device_rules.apply_rules`` rounds it)."""
    if node.op not in _COMPUTE_OPS:
        return 0
    name = target_name(node).rsplit(".", 1)[-1]
    args = [_example(a) if isinstance(a, fx.Node) else a for a in node.args]
    if name in _SDPA and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return _sdpa_rule(node, args[0], capability)
    if name in _NORM and args and isinstance(args[0], torch.Tensor):
        x = args[0]
        if name == "layer_norm":
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape", ())
            rows = x.numel() // max(1, math.prod(shape)) if isinstance(shape, (list, tuple)) else 0
        else:
            groups = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_groups", 1)
            rows = x.shape[0] * groups if x.dim() and isinstance(groups, int) else 0
        return 2 * rows * 4
    return 0


def _materialise(value: Any, device: torch.device) -> Any:
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            t = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=device)
            return t.zero_() if t.numel() else t
        return v

    return pytree.tree_map(one, value)


def _signature(node: fx.Node, args: Any, kwargs: Any) -> Any:
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("T", tuple(v.shape), tuple(v.stride()), v.dtype)
        return repr(v)

    leaves, spec = pytree.tree_flatten((args, kwargs))
    return (node.op, str(node.target), str(spec), tuple(one(v) for v in leaves))


# The peak each distinct op reached when probed, per (device, rules, op signature), for every
# capture of the process (WAN's text and time embeddings keep their shapes at a new video size).
_PEAKS = Measurements()


def probe_workspace(gm: fx.GraphModule, device: torch.device) -> dict[str, int]:
    """Measured workspace of every op of ``gm`` on ``device``, by node name (ops without any: absent).

    ``gm`` must carry Dynamo's ``example_value`` metadata (a capture's GraphModule, retargeted to
    ``device``). Ops whose arguments are not all tensors or constants (a shape read at run time)
    are not probed. Each distinct op runs once.

    Raises:
        ValueError: ``device`` is neither CPU nor CUDA (no allocator to read).
    """
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"`device`={device}: workspace can be probed on 'cpu' or 'cuda' devices only")
    if device.type == "cpu" and profiler_running():
        # The CPU probe reads a profiler of its own, and profilers do not nest (the caller is
        # profiling this very call, e.g. with the test oracle): fall back to the rules.
        logger.warning(
            "fxswap: a torch profiler is running, so op workspace is not measured for this capture; "
            "the documented rules are used instead (run the first call outside the profiler to measure)"
        )
        return rules_for(gm)
    rules = device_rules_for(device)
    seen_storages: set[int] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            _new_storage_bytes(n, seen_storages, rules)
    modules = dict(gm.named_modules())
    todo: dict[Any, tuple[fx.Node, Any, Any]] = {}
    probed: list[tuple[fx.Node, Any, int]] = []
    collective_ws: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op not in _COMPUTE_OPS:
            continue
        new_bytes = _new_storage_bytes(node, seen_storages, rules)
        if node.target is operator.getitem or not _tensors(_example(node)):
            continue
        if node.target in COLLECTIVES:
            # Run alone, a collective would wait for the other ranks' probes: its workspace is
            # the measured rule of passes.sequence_parallel instead.
            if ws := collective_workspace(node, device):
                collective_ws[node.name] = ws
            continue
        metas_ok = True

        def arg_value(a: fx.Node) -> Any:
            nonlocal metas_ok
            v = _example(a)
            leaves = pytree.tree_leaves(v)
            if v is None or any(not isinstance(x, (torch.Tensor, int, float, bool)) for x in leaves):
                metas_ok = False
            return v

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg_value)
        if not metas_ok:
            continue
        key = _signature(node, args, kwargs)
        todo.setdefault(key, (node, args, kwargs))
        probed.append((node, key, new_bytes))
    where = (str(device), rules)
    # a module's call depends on the module, not only on its path: measured each time
    shareable = {key for key, (node, _, _) in todo.items() if node.op != "call_module"}
    peak = {key: v for key in shareable if (v := _PEAKS.get((where, key))) is not None}
    keys = [key for key in todo if key not in peak]
    if keys:
        if device.type == "cuda":
            _warm_libraries(device)
        with torch.no_grad(), pieces(device) as probe:
            for k, key in enumerate(keys):
                node, args, kwargs = todo[key]
                _run(probe, str(k), node, modules, args, kwargs, device)
        measured = {key: probe.peak.get(str(k), 0) for k, key in enumerate(keys)}
        peak.update(measured)
        for key, value in measured.items():
            if key in shareable:
                _PEAKS.put((where, key), value)
    out: dict[str, int] = dict(collective_ws)
    for node, key, new_bytes in probed:
        ws = peak[key] - new_bytes
        if ws > 0:
            out[node.name] = ws
    return out


def _warm_libraries(device: torch.device) -> None:
    """Make cuBLAS and cuBLASLt allocate their kept workspace on this stream before anything is
    measured: it is planned once for the whole call (``passes.device_rules``), not as the workspace
    of whichever op happens to be probed first."""
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.ones(16, 16, device=device, dtype=dtype)
            torch.nn.functional.linear(a, a, a[0])  # addmm with a bias: the cuBLASLt path
            torch.mm(a, a)  # the cuBLAS path
    torch.cuda.synchronize(device)


def _run(
    probe: PieceProbe,
    label: str,
    node: fx.Node,
    modules: Mapping[str, torch.nn.Module],
    args: Any,
    kwargs: Any,
    device: torch.device,
) -> None:
    real_args, real_kwargs = _materialise((args, kwargs), device)
    if node.op == "call_function":
        fn: Any = node.target
    elif node.op == "call_method":
        self_obj, *rest = real_args
        fn, real_args = getattr(self_obj, str(node.target)), tuple(rest)
    else:
        fn = modules[str(node.target)]
    try:
        with probe.piece(label):
            result = fn(*real_args, **real_kwargs)
            del result
    except Exception as e:
        # An op that cannot run on these inputs (mixed dtypes the meta capture let through) fails
        # the first real call too, which reports it against the signature; nothing to measure.
        logger.debug("fxswap: workspace probe of %s failed: %s", node.name, e)


def with_workspace(ir: GraphIR, workspace: Mapping[str, int]) -> GraphIR:
    """``ir`` with each op's ``workspace_bytes`` set from ``workspace`` (by op name; others 0)."""
    ops = tuple(dataclasses.replace(op, workspace_bytes=int(workspace.get(op.name, 0))) for op in ir.ops)
    return dataclasses.replace(ir, ops=ops)


def rules_for(gm: fx.GraphModule) -> dict[str, int]:
    """:func:`rule_workspace` for every op of ``gm`` that has some, by node name."""
    return {n.name: ws for n in gm.graph.nodes if (ws := rule_workspace(n)) > 0}
