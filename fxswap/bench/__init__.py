"""Benchmark and sizing tooling around the compiler; nothing in the core imports it.

The core (capture, ir, passes, plan, ops, runtime, compiled module, api) runs without this
package. Two front doors reach into it, lazily: the ``fxswap`` command (its ``bench``,
``calibrate`` and ``recommend`` subcommands, ``plan --card`` and ``plan --plot``) and the public
name ``fxswap.recommend``, which the package resolves on first use. ``tests/test_layers.py`` holds
that rule. Nothing here is imported by ``import fxswap``.

- :mod:`~fxswap.bench.hardware`: card profiles (compute, memory and link figures, each sourced).
- :mod:`~fxswap.bench.costmodel`: a captured graph and a card profile to milliseconds; the physical bound.
- :mod:`~fxswap.bench.calibrate`: ``fxswap calibrate``, a card profile measured on this GPU.
- :mod:`~fxswap.bench.peers`: other offloaders' policies as schedules on fxswap's own simulator.
- :mod:`~fxswap.bench.graphs`: WAN captured on meta tensors, cached as JSON; fp8 resizing.
- :mod:`~fxswap.bench.rows`: one row per policy and setting (``BenchRow``, ``bench_graph``).
- :mod:`~fxswap.bench.report`: rows to JSON / CSV / markdown and back, the table and the summary.
- :mod:`~fxswap.bench.gpu_compare`: predictions against a GPU check's measurements.
- :mod:`~fxswap.bench.plots`: the plan timeline and the bench chart (matplotlib, optional).
- :mod:`~fxswap.bench.runner`: ``fxswap bench --sim``.
- :mod:`~fxswap.bench.recommendations`: ``fxswap.recommend`` / ``fxswap recommend``.
"""
