"""Compiler passes of fxswap, installed as ``fxswap.passes``.

Each pass is a typed function with no global state. The planning passes work on plain data
(:class:`fxswap.ir.GraphIR`) and never import ``torch.fx``; the rewrite pass takes an FX graph.
"""
