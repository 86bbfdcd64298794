"""Plain-data description of a captured graph: everything the planner needs, nothing from torch.

Capture (``fxswap.trace``) produces a :class:`GraphIR`; the planning passes in ``fxswap.passes``
consume it. Keeping this module free of torch imports lets the planner be tested on generated
graphs (lists of ints) and keeps the dependency direction trace -> analyse -> plan -> rewrite -> run.

Indices: ops are numbered 0..len(ops)-1 in execution order (FX order, which is topological).
A buffer with ``start == s`` and ``end == e`` occupies memory while ops s..e (inclusive) run.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BufferInfo", "GraphIR", "InputInfo", "OpInfo", "WeightInfo"]


@dataclass(frozen=True, slots=True)
class WeightInfo:
    """One parameter (or buffer) the graph reads. Swap units are made of these."""

    name: str  # fully qualified name, as in model.named_parameters() / named_buffers()
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    nbytes: int
    module: str  # owning module path, e.g. "blocks.3.self_attn.q"; "" for the root module
    # Op ranges (a, b), merged and sorted, over which one graph value aliasing this weight (a
    # view made by op a, or the weight handed to the graph's output) is read up to op b. A second
    # load of the weight cannot start inside one: op b reads op a's view of the *first* copy.
    joined: tuple[tuple[int, int], ...] = ()
    # A weight kept as its file stores it (fxswap.passes.analyse.stored_storage): the bytes of its
    # decoded tensor and the decoder's scratch; 0 and 0 for a weight held as it is computed with.
    decoded_nbytes: int = 0
    decode_scratch_bytes: int = 0
    # Decoded once for the whole call (a resident the plan keeps decoded: fxswap.passes.decode);
    # ``nbytes`` is then the decoded size, no op decodes it, and ``stored_nbytes`` is what the
    # upload copies before decoding it.
    decoded_once: bool = False
    stored_nbytes: int = 0


@dataclass(frozen=True, slots=True)
class InputInfo:
    """One user input of the graph (not a weight)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True, slots=True)
class OpInfo:
    """One compute node of the graph, in execution order."""

    name: str  # FX node name, unique within the graph
    target: str  # printable target, e.g. "torch._C._nn.linear"
    module: str  # innermost module path from nn_module_stack; "" outside any submodule
    weights: tuple[str, ...]  # names of the weights this op reads directly
    out_bytes: int  # bytes of new storage this op allocates (0 for views and aliases)
    flops: float  # matmul / conv / attention FLOPs from shapes; 0 where not modelled
    mem_bytes: int  # bytes read plus written, for ops whose cost is memory traffic
    # Bytes the op allocates and frees again before it returns (attention statistics, norm
    # statistics, a kernel's scratch), on top of its outputs; counted while the op runs only.
    # Measured on the device where it can be (fxswap.workspace), else from documented rules.
    workspace_bytes: int = 0
    # Bytes a dequantisation run right before this op reads and writes (a weight kept as stored,
    # decoded before its first reader: fxswap.passes.analyse.stored_storage). A kernel of its own,
    # so its time adds to the op's instead of overlapping it.
    dequant_bytes: int = 0
    # A functional collective (``torch.ops._c10d_functional``, recognised by target in
    # passes.analyse): its kind ("all_to_all", "all_gather"; "wait" on the ``wait_tensor`` that
    # waits for it), the bytes this rank sends to and receives from the other ranks, and on a wait
    # the index of the collective op it waits for. The simulator runs collectives on a stream of
    # their own (passes.simulate); "" and zeros for every other op.
    collective: str = ""
    sent_bytes: int = 0
    received_bytes: int = 0
    waits_on: int = -1


@dataclass(frozen=True, slots=True)
class BufferInfo:
    """One activation storage (aliases folded into their base) and its live range."""

    name: str  # the op (or input) that allocates it
    nbytes: int
    start: int  # index of the allocating op; 0 for graph inputs
    end: int  # index of the last op that reads it (inclusive); len(ops) - 1 for outputs


@dataclass(frozen=True, slots=True)
class GraphIR:
    """A captured graph as plain data."""

    ops: tuple[OpInfo, ...]
    weights: tuple[WeightInfo, ...]  # in order of first use
    buffers: tuple[BufferInfo, ...]
    inputs: tuple[InputInfo, ...]

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights)
