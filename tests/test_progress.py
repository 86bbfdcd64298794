"""fxswap.progress: phase log lines, bar steps and the listeners other front ends (ComfyUI) drive.

The expected values come from the tests themselves: the items they iterate, the time they measure
around a phase, the tensors safetensors counts in a checkpoint file, never from fxswap's figures.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from fxswap.progress import ProgressEvent, listen, phase, progress, stage
from tests.models import MLP

DESC = "fxswap: compiling blocks"


def _steps(events: list[ProgressEvent], name: str = DESC) -> list[tuple[int, int | None]]:
    return [(e.done, e.total) for e in events if e.kind == "step" and e.name == name]


def _fxswap_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fxswap" and r.levelno == level]


# ------------------------------------------------------------------------------------------ phases
def test_phases_log_one_line_at_start_and_end_and_reach_listeners_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fxswap")
    events: list[ProgressEvent] = []
    nap = 0.05
    walls: dict[str, float] = {}
    with listen(events.append):
        for name in ("capture", "plan", "compile", "first call"):
            t0 = time.perf_counter()
            with phase(name):
                time.sleep(nap)
            walls[name] = time.perf_counter() - t0
    assert [(e.kind, e.name) for e in events] == [
        (kind, name)
        for name in ("capture", "plan", "compile", "first call")
        for kind in ("phase_start", "phase_end")
    ]
    for e in events:
        assert isinstance(e, ProgressEvent)
        if e.kind == "phase_start":
            assert e.seconds is None and e.total is None
        else:
            # the phase's time lies between the sleep inside it and the wall time around it
            assert e.seconds is not None and nap <= e.seconds <= walls[e.name], (e, walls)
    lines = _fxswap_records(caplog)
    assert lines[0::2] == [f"fxswap: {n} ..." for n in ("capture", "plan", "compile", "first call")]
    ends = [e for e in events if e.kind == "phase_end"]
    for line, end in zip(lines[1::2], ends, strict=True):
        m = re.fullmatch(r"fxswap: (.+) done in (\d+\.\d\d) s", line)
        assert m is not None, line
        assert m.group(1) == end.name
        assert end.seconds is not None and float(m.group(2)) == pytest.approx(end.seconds, abs=0.005 + 1e-9)


def test_a_failing_phase_still_ends_and_the_error_propagates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fxswap")
    events: list[ProgressEvent] = []
    with listen(events.append), pytest.raises(KeyError, match="boom"), phase("plan"):
        raise KeyError("boom")
    assert [(e.kind, e.name) for e in events] == [("phase_start", "plan"), ("phase_end", "plan")]
    lines = _fxswap_records(caplog)
    assert lines[0] == "fxswap: plan ..."
    assert re.fullmatch(r"fxswap: plan failed after \d+\.\d\d s \(KeyError\)", lines[1]), lines


# ------------------------------------------------------------------------------------------- steps
def test_progress_reports_each_item_once_its_loop_body_finished() -> None:
    items = [f"block{i}" for i in range(7)]
    events: list[ProgressEvent] = []
    seen_in_body = []
    with listen(events.append):
        out = []
        for item in progress(items, desc=DESC, unit="block", total=len(items)):
            # while the body of item k runs, k items are done
            seen_in_body.append(_steps(events)[-1])
            out.append(item)
    assert out == items
    assert seen_in_body == [(k, 7) for k in range(7)]
    assert _steps(events) == [(k, 7) for k in range(8)]  # 0 before the first item, then 1..7
    assert (3, 7) in _steps(events)
    secs = [e.seconds for e in events]
    assert all(s is not None for s in secs) and secs == sorted(secs)  # type: ignore[type-var]


def test_progress_total_from_len_or_unknown_and_an_early_break() -> None:
    events: list[ProgressEvent] = []
    with listen(events.append):
        list(progress(("a", "b", "c"), desc="sized"))
        list(progress((x for x in range(4)), desc="generator"))
        for i in progress(range(10), desc="cut"):
            if i == 2:
                break
    assert _steps(events, "sized") == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert _steps(events, "generator") == [(k, None) for k in range(5)]
    # items 0 and 1 finished; the loop left during item 2's body, so it never completed
    assert _steps(events, "cut") == [(0, 10), (1, 10), (2, 10)]


def test_stage_is_a_one_step_bar_for_listeners() -> None:
    events: list[ProgressEvent] = []
    with listen(events.append), stage("fxswap: compiling with Inductor"):
        assert _steps(events, "fxswap: compiling with Inductor") == [(0, 1)]
    assert _steps(events, "fxswap: compiling with Inductor") == [(0, 1), (1, 1)]


def test_events_are_frozen() -> None:
    e = ProgressEvent("step", DESC, 1, 2, 0.5)
    with pytest.raises(AttributeError):
        e.done = 2  # type: ignore[misc]


# --------------------------------------------------------------------------------------- listeners
def test_nested_listeners_all_hear_and_leave_when_their_block_ends() -> None:
    outer: list[ProgressEvent] = []
    inner: list[ProgressEvent] = []
    with listen(outer.append):
        with listen(inner.append), phase("capture"):
            pass
        with phase("plan"):
            pass
    with phase("compile"):  # nobody listens any more
        pass
    assert [(e.kind, e.name) for e in inner] == [("phase_start", "capture"), ("phase_end", "capture")]
    assert [(e.kind, e.name) for e in outer] == [
        ("phase_start", "capture"),
        ("phase_end", "capture"),
        ("phase_start", "plan"),
        ("phase_end", "plan"),
    ]


def test_events_from_another_thread_reach_the_listener() -> None:
    events: list[ProgressEvent] = []

    def work() -> None:
        for _ in progress(range(3), desc=DESC):
            pass

    with listen(events.append):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert _steps(events) == [(k, 3) for k in range(4)]


def test_a_raising_listener_is_warned_about_once_and_breaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fxswap")
    calls = []
    good: list[ProgressEvent] = []

    def bad(event: ProgressEvent) -> None:
        calls.append(event)
        raise RuntimeError("the display is gone")

    with listen(bad), listen(good.append), phase("compile"):
        out = list(progress(range(5), desc=DESC))
    assert out == list(range(5))
    # called for every event, and the listener after it heard every one of them too
    assert len(calls) == len(good) == 2 + 6
    warnings = _fxswap_records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "raised" in warnings[0], warnings
    raised = [r.exc_info[1] for r in caplog.records if r.levelno == logging.WARNING and r.exc_info]
    assert [type(e) for e in raised] == [RuntimeError], raised


def test_a_raising_listener_does_not_break_a_compile(caplog: pytest.LogCaptureFixture) -> None:
    """fxswap.compile's first call under a budget that swaps, with a listener raising on every event:
    the output is the unswapped model's, bitwise."""
    from fxswap.compiler import compile as fx_compile
    from fxswap.errors import BudgetInfeasibleError

    torch.manual_seed(0)
    model = MLP().eval().requires_grad_(False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    common = dict(mode="layerwise", backend="eager", device="cpu", reserve_mb=0, block_size_mb=0.004)
    with pytest.raises(BudgetInfeasibleError) as e:
        fx_compile(model, max_vram_gb=1e-9, **common)(x)  # type: ignore[arg-type]
    sm = fx_compile(model, max_vram_gb=e.value.min_vram_bytes / 2**30, **common)  # type: ignore[arg-type]
    heard = []

    def bad(event: ProgressEvent) -> None:
        heard.append(event)
        raise RuntimeError("listener bug")

    with listen(bad):
        out = sm(x)
    assert torch.equal(out, ref)
    assert heard, "the first call reported no progress at all (host copies at least run a bar)"
    assert sum(r.levelno == logging.WARNING and r.name == "fxswap" for r in caplog.records) == 1


def test_listeners_hear_when_bars_are_off(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """FXSWAP_PROGRESS decides about tqdm's bars on stderr, not about listeners."""
    for flag, drawn in (("0", False), ("1", True)):
        monkeypatch.setenv("FXSWAP_PROGRESS", flag)
        events: list[ProgressEvent] = []
        with listen(events.append):
            list(progress(range(4), desc=f"bar{flag}", total=4))
        assert _steps(events, f"bar{flag}") == [(k, 4) for k in range(5)], flag
        err = capsys.readouterr().err
        assert (f"bar{flag}" in err) is drawn, (flag, err)


def test_checkpoint_loading_reports_every_tensor_in_the_file(tmp_path: Path) -> None:
    """A real call site: wan.load's bar counts the file's tensors (counted here by safetensors)."""
    from safetensors import safe_open

    from fxswap.models import wan, wan_checkpoint

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    wan_checkpoint.save(wan.build(wan.tiny_config("t2v")), path)
    with safe_open(str(path), "pt") as f:
        n = len(list(f.keys()))  # noqa: SIM118 (safe_open has no __iter__)
    events: list[ProgressEvent] = []
    with listen(events.append):
        wan.load(path)
    assert _steps(events, f"loading {path.name}") == [(k, n) for k in range(n + 1)]
