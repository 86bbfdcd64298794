"""The graphs the bench runs on: WAN captured on meta tensors, cached on disk as JSON, and fp8 resizing.

A capture of WAN 14B takes tens of seconds; the IR is plain data, so it is cached as JSON keyed by
the model config, the input size and the source of the modules that shape it (:func:`load_wan_ir`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fxswap.errors import FxswapError
from fxswap.ir import BufferInfo, GraphIR, InputInfo, OpInfo, WeightInfo

__all__ = ["CASES", "case_size", "fp8_ir", "ir_from_json", "ir_to_json", "load_wan_ir"]

# case name -> (width, height, frames)
CASES: dict[str, tuple[int, int, int]] = {
    "480p81": (832, 480, 81),
    "720p81": (1280, 720, 81),
    "480p17": (832, 480, 17),
}
IR_CACHE_VERSION = 1


def ir_to_json(ir: GraphIR) -> dict[str, Any]:
    """Plain JSON of a GraphIR (tuples become lists)."""
    return {
        "ops": [asdict(o) for o in ir.ops],
        "weights": [asdict(w) for w in ir.weights],
        "buffers": [asdict(b) for b in ir.buffers],
        "inputs": [asdict(i) for i in ir.inputs],
    }


def ir_from_json(data: dict[str, Any]) -> GraphIR:
    """Inverse of :func:`ir_to_json`."""
    return GraphIR(
        ops=tuple(OpInfo(**{**o, "weights": tuple(o["weights"])}) for o in data["ops"]),
        weights=tuple(WeightInfo(**{**w, "shape": tuple(w["shape"])}) for w in data["weights"]),
        buffers=tuple(BufferInfo(**b) for b in data["buffers"]),
        inputs=tuple(InputInfo(**{**i, "shape": tuple(i["shape"])}) for i in data["inputs"]),
    )


def fp8_ir(ir: GraphIR) -> GraphIR:
    """The graph with Linear weights stored at 1 byte per element, as fp8 WAN checkpoints store them.

    The Linear weights are the 2-D ``*.weight`` tensors (in WAN every other weight is 1-D, 3-D or the
    5-D patch-embedding conv). The resizing, including the transient bf16 copy each Linear op holds
    while it upcasts its fp8 weight, is the same function ``fxswap plan --dtype fp8`` uses, so the
    bench and the CLI count fp8 memory the same way.
    """
    linears = {w.name for w in ir.weights if len(w.shape) == 2 and w.name.endswith(".weight")}
    from fxswap.passes.analyse import fp8_linear_storage  # shared with `fxswap plan --dtype fp8`

    return fp8_linear_storage(ir, linears)


def case_size(model: str, case: str) -> tuple[int, int, int]:
    """(width, height, frames) of ``case`` for ``model`` (TI2V-5B's 720p is its native 1280x704)."""
    if case not in CASES:
        raise FxswapError(f"case={case!r} is unknown; use one of {', '.join(CASES)}")
    w, h, f = CASES[case]
    if "ti2v-5b" in model and h == 720:
        h = 704
    return w, h, f


def load_wan_ir(model: str, case: str, cache_dir: Path | None = None) -> GraphIR:
    """Capture the bf16 WAN graph of ``model`` at ``case`` on meta tensors, cached on disk as JSON.

    The cache key is a hash of the model config, the input size, the IR cache version and the
    source of the capture modules, so a changed model or capture invalidates it.
    """
    import torch  # deferred: the rest of the bench is plain Python

    from fxswap.capture import trace
    from fxswap.models import wan

    if model.startswith("tiny-") and model.removeprefix("tiny-") in wan.MODEL_TYPES:
        config = wan.tiny_config(model.removeprefix("tiny-"))  # for tests: the full structure, tiny sizes
    elif model in wan.CONFIGS or model in wan.TURBOWAN_CONFIGS:
        config = wan.named_config(model)
    else:
        known = ", ".join([*wan.CONFIGS, *wan.TURBOWAN_CONFIGS])
        raise FxswapError(f"model={model!r} is unknown; use one of {known} (or tiny-t2v for a test model)")
    width, height, frames = case_size(model, case)
    key_src = json.dumps(
        [IR_CACHE_VERSION, repr(config), width, height, frames, _source_hash()], sort_keys=True
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache_dir / f"{model}-{case}-{key}.json" if cache_dir else None
    if path is not None and path.exists():
        return ir_from_json(json.loads(path.read_text()))
    net = wan.build(config, device="meta", dtype=torch.bfloat16)
    kwargs = wan.example_inputs(
        config, frames=frames, height=height, width=width, device="meta", dtype=torch.bfloat16
    )
    ir = trace(net, **kwargs).ir
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ir_to_json(ir), separators=(",", ":")))
        tmp.replace(path)
    return ir


def _source_hash() -> str:
    import fxswap.capture as trace_mod
    import fxswap.models.sla as sla_mod
    import fxswap.models.wan as wan_mod
    import fxswap.models.wan_config as wan_config_mod
    import fxswap.passes.analyse as analyse_mod

    h = hashlib.sha256()
    for mod in (wan_mod, wan_config_mod, sla_mod, analyse_mod, trace_mod):
        if mod.__file__:
            h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]

