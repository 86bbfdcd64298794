"""fxswap in the programs WAN users run: ``fxswap.integrations.diffusers`` (diffusers pipelines).

Submodules import their third-party package only when used, so ``import fxswap.integrations``
needs nothing beyond fxswap itself.
"""
