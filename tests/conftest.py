"""Shared test configuration: hypothesis profiles and the `gpu` marker."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" is the default: sized so that the whole default suite stays well under 10 minutes on a
# 2-core machine. "nightly" runs the large case counts (>= 10,000 per property).
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "nightly", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("FXSWAP_HYPOTHESIS_PROFILE", "ci"))

# The run's graph cache (fxswap.graph_cache) lives in a fresh folder, inherited by the CLI
# subprocesses: tests neither read nor fill the user's ~/.cache.
os.environ["FXSWAP_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxswap-test-graphs-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
