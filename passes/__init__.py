"""Compiler passes of fxswap, installed as ``fxswap.passes``.

Stage order, as a graph goes through them::

    capture -> analyse -> liveness -> occurrence -> partition -> schedule -> simulate -> warmstart
            -> validate -> rewrite -> dequant -> regions

- capture (:mod:`fxswap.capture`, not a pass): Dynamo records one FX graph of the model.
- :mod:`~fxswap.passes.analyse`: the FX graph to :class:`fxswap.ir.GraphIR` (ops, weights with
  their bytes, activation buffers with their live ranges, FLOPs), called by capture.
- :mod:`~fxswap.passes.device_rules`: the IR sized as the target device holds it (the CUDA caching
  allocator's rounding, cuBLAS's kept workspace, SDPA workspace; the CPU: unchanged).
- :mod:`~fxswap.passes.liveness`: first and last use of every weight, activation bytes per op.
- :mod:`~fxswap.passes.occurrence`: a weight read in separate places seen as one weight per place,
  so that the planner may load it once per place (reloads).
- :mod:`~fxswap.passes.partition`: weights grouped into swap units (one block, or runs up to a size).
- :mod:`~fxswap.passes.schedule`: which units stay resident, where each load is issued and waited for.
- :mod:`~fxswap.passes.simulate`: the one memory simulator and the two-stream time model that pick
  among schedules.
- :mod:`~fxswap.passes.warmstart`: the schedule as a cycle over a sampling loop: the next call's
  first units loaded in this call's tail, within the budget, where that makes calls faster.
- :mod:`~fxswap.passes.validate`: the chosen plan checked against the graph (no use before its
  wait or after its release, peak within the budget).
- :mod:`~fxswap.passes.planner` runs liveness to validate for each candidate and returns the
  :class:`fxswap.swapplan.SwapPlan`.
- :mod:`~fxswap.passes.rewrite`: the load / wait / release (and carry) ops inserted into the FX graph at the
  plan's points.
- :mod:`~fxswap.passes.dequant`: a weight kept as its file stores it (GGUF, fp8) decoded by
  ``fxswap::dequant`` right before its first reader.
- :mod:`~fxswap.passes.regions`: the rewritten graph cut into regions (prologue, each repeated block,
  epilogue) in canonical form, so that ``fxswap.regional`` compiles each distinct block program once.

Each pass is a typed function with no global state. The planning passes work on plain data
(:class:`fxswap.ir.GraphIR`) and never import ``torch.fx``; analyse and rewrite take an FX graph.
Nothing here imports the runtime, the compiled module or the tooling (``tests/test_layers.py``).
"""
