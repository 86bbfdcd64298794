"""Progress bars for the slow everyday steps (checkpoint loading, pinning, compiling).

tqdm draws on stderr only when it is a terminal (``disable=None``), so logs, CI and tests stay
quiet; ``FXSWAP_PROGRESS=0`` turns the bars off everywhere, ``FXSWAP_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress"]

_T = TypeVar("_T")


def _disable() -> bool | None:
    flag = os.environ.get("FXSWAP_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return True
    if flag in ("1", "true", "yes", "on"):
        return False
    return None  # tqdm: off when stderr is not a TTY


def progress(
    iterable: Iterable[_T], *, desc: str, unit: str = "it", total: int | None = None, **kw: Any
) -> Iterator[_T]:
    """``iterable`` with a tqdm bar named ``desc`` (quiet when not a TTY or FXSWAP_PROGRESS=0)."""
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, unit=unit, total=total, disable=_disable(), leave=False, **kw)
