"""Model definitions that fxswap plans and runs (WAN 2.1 / 2.2)."""
