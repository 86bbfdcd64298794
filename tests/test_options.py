"""fxswap/options.py: PlanOptions and from_user validate every field and name it; binary units."""

from __future__ import annotations

import pytest

from fxswap.options import PlanOptions

MiB = 2**20
GiB = 2**30


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "blockwise"),
        ("max_vram_bytes", 0),
        ("max_vram_bytes", 1.5),
        ("block_size_bytes", -1),
        ("reserve_bytes", -1),
        ("max_prefetch_depth", -1),
        ("max_prefetch_depth", True),
        ("h2d_gbps", 0.0),
        ("compute_tflops", float("nan")),
        ("device_mem_gbps", float("inf")),
    ],
)
def test_plan_options_validation_names_field(field: str, value: object) -> None:
    kw: dict[str, object] = {"max_vram_bytes": GiB, field: value}
    with pytest.raises(ValueError, match=f"`{field}` is") as info:
        PlanOptions(**kw)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_vram_gb": 0}, "max_vram_gb"),
        ({"max_vram_gb": 16, "block_size_mb": -3}, "block_size_mb"),
        ({"max_vram_gb": 16, "reserve_mb": -1}, "reserve_mb"),
        ({"max_vram_gb": "16"}, "max_vram_gb"),
    ],
)
def test_from_user_validation_names_user_argument(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        PlanOptions.from_user(**kw)  # type: ignore[arg-type]


def test_from_user_uses_binary_units() -> None:
    o = PlanOptions.from_user(mode="layerwise", max_vram_gb=16, block_size_mb=300, reserve_mb=256)
    assert o.max_vram_bytes == 16 * GiB and o.block_size_bytes == 300 * MiB and o.reserve_bytes == 256 * MiB
    assert o.mode == "layerwise" and isinstance(o.h2d_gbps, float)
