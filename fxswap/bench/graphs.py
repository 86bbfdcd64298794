"""The graphs the bench runs on: WAN captured on meta tensors (through the graph cache,
:mod:`fxswap.graph_cache`), and fp8 resizing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fxswap.errors import FxswapError
from fxswap.ir import GraphIR

if TYPE_CHECKING:
    from fxswap.models.wan_config import WanConfig

__all__ = ["CASES", "case_size", "fp8_ir", "load_wan_ir", "wan_ir"]

# case name -> (width, height, frames)
CASES: dict[str, tuple[int, int, int]] = {
    "480p81": (832, 480, 81),
    "720p81": (1280, 720, 81),
    "480p17": (832, 480, 17),
}


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


def _config(model: str) -> WanConfig:
    from fxswap.models import wan

    if model.startswith("tiny-") and model.removeprefix("tiny-") in wan.MODEL_TYPES:
        return wan.tiny_config(model.removeprefix("tiny-"))  # for tests: the full structure, tiny sizes
    if model in wan.CONFIGS or model in wan.TURBOWAN_CONFIGS:
        return wan.named_config(model)
    known = ", ".join([*wan.CONFIGS, *wan.TURBOWAN_CONFIGS])
    raise FxswapError(f"model={model!r} is unknown; use one of {known} (or tiny-t2v for a test model)")


def _capture(config: WanConfig, width: int, height: int, frames: int, cache_dir: Path | None) -> GraphIR:
    import torch  # deferred: the rest of the bench is plain Python

    from fxswap.graph_cache import captured_ir
    from fxswap.models import wan

    net = wan.build(config, device="meta", dtype=torch.bfloat16)
    kwargs = wan.example_inputs(
        config, frames=frames, height=height, width=width, device="meta", dtype=torch.bfloat16
    )
    return captured_ir(net, (), kwargs, cache=cache_dir if cache_dir is not None else True).ir


def load_wan_ir(model: str, case: str, cache_dir: Path | None = None) -> GraphIR:
    """Capture the bf16 WAN graph of ``model`` at ``case`` on meta tensors, through the graph cache
    (:mod:`fxswap.graph_cache`: ``cache_dir``, else its default location)."""
    config = _config(model)
    return _capture(config, *case_size(model, case), cache_dir)


def wan_ir(model: str, width: int, height: int, frames: int, cache_dir: Path | None = None) -> GraphIR:
    """:func:`load_wan_ir` at any video size rather than a named case."""
    return _capture(_config(model), width, height, frames, cache_dir)
