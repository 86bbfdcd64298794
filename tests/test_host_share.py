"""One host copy of the weights per machine (``fxswap.hostshare``; ``ulysses_degree=N`` uses it).

What the checks compare against (never fxswap's own figures):

- memory: the kernel's accounting of each process, read from ``/proc/<pid>/smaps_rollup`` by rank
  0 of the group while the ranks run: ``Pss`` (proportional set size: a page mapped by k processes
  counts 1/k in each, so the sum over the ranks counts every page once) and ``Rss``; the weights'
  bytes are summed from the model's tensors in the test; the per-rank constant comes from a rank
  process measured the same way with its model on ``meta`` (no weight bytes);
- outputs: the uncompiled model run eagerly before anything was shared (bitwise), and the
  1-process run;
- the file: the directory listing (it is gone once every rank mapped it, or the last one left).

The full check (``fxswap.compile(..., ulysses_degree=2)`` against one process, on a WAN of 3.2 GiB:
weights that large, so the per-rank constant does not decide the ratio) takes 2 to 3.5 minutes on
a 2-core machine and is marked slow; the default suite runs the sharing alone on a 0.2 GB WAN.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fxswap import hostshare
from fxswap.hostshare import region_of, share_weights
from fxswap.models import wan
from fxswap.runtime import HostStore
from tests.ranks import run_ranks

MiB = 2**20
TIMEOUT_S = 240
#: Per rank, beside the measured no-weights rank: Dynamo's capture, the planner's state and the
#: allocator's slack (stated, not measured by fxswap). The device budget is added on top: on the
#: CPU the "device" memory (resident copies, units in flight, activations) is host RAM too.
SLACK = 128 * MiB


def _small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64)).eval()


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# ----------------------------------------------------------------------------------- one process
def test_share_replaces_every_weight_by_a_view_of_one_file_and_keeps_the_values(tmp_path: Path) -> None:
    model = _small_model()
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
    values = {k: v.clone() for k, v in model.state_dict().items()}
    region = share_weights(model, directory=tmp_path)
    assert region is not None and region.wrote and region.mapping == "MAP_PRIVATE"
    assert {p.name for p in tmp_path.iterdir()} == {region.path.name, hostshare.LOCK_NAME}
    for k, v in model.state_dict().items():
        assert region_of(v) is region, k
        assert torch.equal(v, values[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # copy-on-write: a write stays in this process's page, the file keeps the original bytes
    with torch.no_grad():
        model.get_parameter("0.weight")[0, 0] += 1.0
    raw = region.path.read_bytes()
    assert torch.equal(
        torch.frombuffer(bytearray(raw[: 64 * 256 * 4]), dtype=torch.float32), values["0.weight"].reshape(-1)
    )
    region.close()
    assert [p.name for p in tmp_path.iterdir()] == [hostshare.LOCK_NAME]  # the last one out removes it
    assert torch.equal(model.get_parameter("2.weight"), values["2.weight"])  # the mapping outlives the name


def test_equal_weights_meet_in_one_file_and_different_ones_do_not(tmp_path: Path) -> None:
    a, b, c = _small_model(0), _small_model(0), _small_model(1)
    ra = share_weights(a, directory=tmp_path)
    rb = share_weights(b, directory=tmp_path)
    rc = share_weights(c, directory=tmp_path)
    assert ra is not None and rb is ra and rc is not None and rc is not ra
    # one copy in this process
    assert a.get_parameter("0.weight").data_ptr() == b.get_parameter("0.weight").data_ptr()
    assert len(list(tmp_path.glob(hostshare.PREFIX + "*"))) == 2
    assert not torch.equal(a.get_parameter("0.weight"), c.get_parameter("0.weight"))


def test_a_file_with_other_bytes_under_the_same_digest_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostshare, "weights_key", lambda items: "same")
    first = _small_model(0)
    assert share_weights(first, directory=tmp_path) is not None
    other = _small_model(1)
    values = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.warns(UserWarning, match="holds other bytes"):
        assert share_weights(other, directory=tmp_path) is None
    assert all(torch.equal(v, values[k]) and region_of(v) is None for k, v in other.state_dict().items())


def test_leftovers_nobody_holds_are_removed_and_files_in_use_are_kept(tmp_path: Path) -> None:
    stale = tmp_path / f"{hostshare.PREFIX}dead-64"  # its processes crashed: nobody holds it
    stale.write_bytes(b"\0" * 64)
    busy = tmp_path / f"{hostshare.PREFIX}busy-64"
    busy.write_bytes(b"\0" * 64)
    fd = os.open(busy, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what a live process holds while it maps the file
    try:
        region = share_weights(_small_model(), directory=tmp_path)
        assert region is not None
        names = {p.name for p in tmp_path.iterdir()}
        assert names == {busy.name, region.path.name, hostshare.LOCK_NAME}
    finally:
        os.close(fd)


def test_letting_go_while_this_process_holds_the_directory_lock_does_not_wait_for_itself(
    tmp_path: Path,
) -> None:
    # what happens when the garbage collector finalises one model's mapping in the middle of
    # share_weights for another
    region = share_weights(_small_model(), directory=tmp_path)
    assert region is not None
    done = threading.Event()

    def nested() -> None:
        with hostshare._dir_locked(tmp_path):
            region.close()
        done.set()

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "closing under the directory's lock hung"
    assert list(tmp_path.glob(hostshare.PREFIX + "*")) == []


def test_a_file_a_writer_left_incomplete_is_written_again(tmp_path: Path) -> None:
    model = _small_model()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    probe = share_weights(_small_model(), directory=tmp_path)
    assert probe is not None
    path, size = probe.path, probe.nbytes
    probe.close()
    path.write_bytes(b"\x07" * size)  # the right size, garbage, no end marker: a writer that died
    region = share_weights(model, directory=tmp_path)
    assert region is not None and region.wrote
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_a_full_shared_memory_directory_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # what a 64 MB Docker /dev/shm answers
    model = _small_model()
    values = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match=r"cannot put .* GiB of host weights into .*--shm-size"):
        share_weights(model, directory=tmp_path)
    assert list(tmp_path.glob(hostshare.PREFIX + "*")) == []  # nothing half-written left behind
    assert all(torch.equal(v, values[k]) and region_of(v) is None for k, v in model.state_dict().items())


def test_stored_weights_are_shared_at_their_stored_size(tmp_path: Path) -> None:
    from fxswap.stored import StoredWeight, attach, stored_weights

    model = nn.Linear(64, 32, bias=False, device="meta")  # as a model loaded from an fp8 file
    data = (torch.randn(32, 64) * 3).to(torch.float8_e4m3fn)
    attach(model, {"weight": StoredWeight(data, "fp8", (32, 64), torch.float32, scale=0.5)})
    region = share_weights(model, directory=tmp_path)
    assert region is not None
    w = stored_weights(model)["weight"]
    assert region_of(w.data) is region and w.data.dtype == torch.float8_e4m3fn
    assert region.nbytes == 32 * 64 + len(hostshare.MARKER)  # 1 byte per value, as stored
    assert torch.equal(w.data.view(torch.uint8), data.view(torch.uint8)) and w.scale == 0.5


def test_host_store_keeps_shared_views_and_pins_the_mapping_once(tmp_path: Path) -> None:
    model = _small_model()
    region = share_weights(model, pin=True, directory=tmp_path)
    assert region is not None and region.mapping == "MAP_SHARED"
    calls: list[tuple[int, int]] = []
    released: list[int] = []

    def pinner(buf: torch.Tensor) -> Any:
        calls.append((buf.data_ptr(), buf.numel()))
        return lambda: released.append(buf.data_ptr())

    stores = [HostStore(pin=True, pin_share=1.0, pinner=pinner) for _ in range(2)]
    named = dict(model.named_parameters())
    for store in stores:
        store.reserve(list(named.items()))  # no private arena for shared weights
        for name, t in named.items():
            assert store.put(name, t).data_ptr() == t.data_ptr()  # the view itself, no copy
            assert store.in_arena(name)
    # the whole mapping, registered once however many stores use it
    assert calls == [(region.buffer.data_ptr(), region.nbytes)]
    assert stores[0].pinned_bytes == region.nbytes and stores[0].pageable_bytes == 0
    stores[0].clear()
    assert released == []
    stores[1].clear()
    assert released == [region.buffer.data_ptr()]
    # a narrowed copy (storage dtype) cannot be the shared bytes: it is a private copy
    narrow = HostStore(pin=False)
    w = named["0.weight"]
    assert narrow.put("0.weight", w, torch.float16).data_ptr() != w.data_ptr()


# ------------------------------------------------------------------------- processes, gloo, /proc
def _smaps(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":") and parts[2] == "kB":
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


class _Sampler:
    """Rank 0 reads every rank's ``smaps_rollup`` every few ms: the largest sum of ``Pss`` over
    the ranks at one instant, and each rank's largest ``Pss`` and ``Rss``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.sum_pss = 0
        self.sum_shmem = 0
        self.pss = [0] * len(pids)
        self.rss = [0] * len(pids)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        rows = [_smaps(p) for p in self.pids]
        self.samples += 1
        total = sum(r["Pss"] for r in rows)
        if total > self.sum_pss:
            self.sum_pss = total
            self.sum_shmem = sum(r.get("Pss_Shmem", 0) for r in rows)
        for i, r in enumerate(rows):
            self.pss[i] = max(self.pss[i], r["Pss"])
            self.rss[i] = max(self.rss[i], r["Rss"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.005)

    def __enter__(self) -> _Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict[str, Any]:
        return {
            "sum_pss": self.sum_pss,
            "sum_pss_shmem": self.sum_shmem,
            "pss": self.pss,
            "rss": self.rss,
            "samples": self.samples,
        }


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def wan_config(dim: int, layers: int) -> wan.WanConfig:
    return wan.tiny_config("t2v", dim=dim, ffn_dim=4 * dim, num_heads=4, num_layers=layers, text_dim=64)


def _sampled(rank: int, pids: list[int], work: Any) -> dict[str, Any]:
    """``work()`` run on every rank between barriers while rank 0 samples every rank's memory."""
    import torch.distributed as dist

    dist.barrier()
    sampler = _Sampler(pids) if rank == 0 else None
    if sampler is not None:
        sampler.__enter__()
    work()
    dist.barrier()  # every rank still alive and holding its memory while rank 0 samples
    if sampler is None:
        return {}
    sampler.__exit__()
    return sampler.result()


def rank_main(rank: int, world: int, job: dict[str, Any]) -> dict[str, Any]:
    """One rank of a measurement (also what ``benchmarks/bench_parallel.py --rss`` runs).

    First the rank with its model on ``meta`` (no weight bytes: the baseline, ``result["base"]``),
    then with its weights: ``job["mode"]`` ``"share"`` (:func:`share_weights`, then eager calls of
    the model itself) or ``"compile"`` (``fxswap.compile``, with ``ulysses_degree=world`` when
    ``world > 1``; eager backend), ``job["calls"]`` calls sampled. Rank 0 reads every rank's
    ``smaps_rollup`` while they run; its result holds the figures."""
    import torch.distributed as dist

    import fxswap

    if job["mode"] == "compile":
        import fxswap.build  # noqa: F401  (the compile stack, in the baseline too)

    cfg = wan_config(job["dim"], job["layers"])
    inputs = wan.example_inputs(cfg, frames=5, height=32, width=64)
    pids: list[int | None] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    ranks = [int(p) for p in pids if p is not None]
    with torch.no_grad():
        meta = wan.build(cfg, device="meta").eval().requires_grad_(False)
        result: dict[str, Any] = {"base": _sampled(rank, ranks, lambda: time.sleep(0.05))}
        del meta
        torch.manual_seed(0)
        model = wan.build(cfg).eval().requires_grad_(False)
        result["weights"] = _weight_bytes(model)
        if rank == 0 and job.get("reference", False):
            result["reference"] = _digest(model(**inputs))
        if job["mode"] == "share":
            region = share_weights(model, directory=job.get("directory"))
            hostshare.unlink_when_mapped(region)
            run: Any = model
        else:
            run = fxswap.compile(
                model,
                max_vram_gb=job["budget_gb"],
                reserve_mb=0,  # the CPU keeps no CUDA context or library workspaces
                backend="eager",
                device="cpu",
                ulysses_degree=world if world > 1 else None,
            )
            run(**inputs)  # builds: capture, plan, host copies
        outs: list[torch.Tensor] = []
        result |= _sampled(rank, ranks, lambda: outs.extend(run(**inputs) for _ in range(job["calls"])))
        result["output"] = _digest(outs[-1])
        region = hostshare.shared_of(model)
        result["shared"] = region is not None
        result["file_left"] = region is not None and region.path.exists()
        dist.barrier()
    return result


def _worker(rank: int, world: int, job: dict[str, Any], tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        result = rank_main(rank, world, job)
    except BaseException as e:  # reported to the parent, which asserts on it
        result = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def spawn(world: int, job: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Run ``rank_main`` on ``world`` spawned processes (gloo); each rank's result."""
    tmp.mkdir(parents=True, exist_ok=True)
    run_ranks(_worker, lambda r: (r, world, job, str(tmp)), world, TIMEOUT_S)
    out = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(out):
        assert "error" not in res, f"rank {r}: {res.get('trace', res)}"
    return out


def test_two_ranks_hold_the_weights_once(tmp_path: Path) -> None:
    """The default suite's check: 2 ranks share a 0.2 GB WAN through one file in /dev/shm (no
    compile: the sharing alone)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    # a directory of its own on the memory file system: no other run meets this one in its file
    shm = Path(tempfile.mkdtemp(prefix="fxswap-test-", dir="/dev/shm"))
    job = {"mode": "share", "dim": 768, "layers": 5, "calls": 1, "reference": True, "directory": str(shm)}
    try:
        runs = spawn(2, job, tmp_path)
    finally:
        shutil.rmtree(shm)
    r0 = runs[0]
    weights = r0["weights"]
    assert weights > 150 * MiB
    constant = max(r0["base"]["pss"]) + SLACK
    assert r0["sum_pss"] <= 1.1 * weights + 2 * constant, (r0["sum_pss"] / MiB, weights / MiB, constant / MiB)
    # the weights are counted once over the two ranks (the kernel splits the shared pages between
    # them), not twice and not hidden: each rank maps all of them
    assert 0.95 * weights <= r0["sum_pss_shmem"] <= 1.05 * weights, (r0["sum_pss_shmem"], weights)
    assert all(rss >= weights for rss in r0["rss"])
    assert {r["output"] for r in runs} == {r0["reference"]}  # bitwise, as before sharing
    assert all(r["shared"] and not r["file_left"] for r in runs)  # unlinked once both ranks mapped it


@pytest.mark.slow
def test_ulysses_ranks_hold_the_weights_once_while_sampling(tmp_path: Path) -> None:
    """``fxswap.compile(..., ulysses_degree=2)`` against the 1-process compile, on a 3.2 GiB WAN:
    the sum of PSS within 1.1 x the weights + 2 x the constant, and within 1.15 x one rank's."""
    budget_gb = 0.1
    job: dict[str, Any] = {"mode": "compile", "dim": 1024, "layers": 50, "calls": 2, "budget_gb": budget_gb}
    one = spawn(1, job | {"reference": True}, tmp_path / "one")[0]
    two = spawn(2, job, tmp_path / "two")
    weights = one["weights"]
    constant = max(two[0]["base"]["pss"]) + int(budget_gb * 2**30) + SLACK
    total = two[0]["sum_pss"]
    assert all(r["shared"] for r in two) and not one["shared"]
    assert total <= 1.1 * weights + 2 * constant, (total / MiB, weights / MiB, constant / MiB)
    assert total <= 1.15 * one["sum_pss"], (total / MiB, one["sum_pss"] / MiB)
    assert {r["output"] for r in two} == {one["output"]} == {one["reference"]}
