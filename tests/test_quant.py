"""GGUF reading and dequantisation against the ``gguf`` package (the oracle, numpy, maintained with
llama.cpp's formats): every type bitwise equal in float32, on random blocks whose float16 scales are
finite and on blocks ``gguf.quants.quantize`` makes where it can; files written by ``gguf``'s own
``GGUFWriter`` read back tensor for tensor; damaged files refused with a ``CheckpointError``.

The float16 fields of each block (listed here from the ggml block structs, not from fxswap) are the
only bytes whose random values could be NaN or infinity; every other byte is any value.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the oracle; in the `test` extra

from fxswap import quant  # noqa: E402
from fxswap.errors import CheckpointError  # noqa: E402
from fxswap.gguf import TYPES, read_gguf  # noqa: E402
from tests.triton_env import triton_installed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GT = gguf.GGMLQuantizationType

# Byte offsets of the float16 fields of one block (ggml-common.h): d, and dmin / m where present.
F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}  # fmt: skip
BLOCK_TYPES = tuple(F16_FIELDS)
PLAIN = ("F32", "F16", "BF16")


def _random_blocks(name: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes of ``n_blocks`` blocks with finite float16 scales of every magnitude (subnormal
    to ~1e4, both signs, zero included)."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[GT[name]][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at in F16_FIELDS[name]:
        mag = np.exp2(rng.uniform(-24, 13, size=n_blocks)).astype(np.float16)
        sign = rng.choice(np.array([-1, 1], dtype=np.float16), size=n_blocks)
        v = mag * sign
        v[rng.random(n_blocks) < 0.05] = 0
        raw[:, at : at + 2] = v.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def _random_plain(name: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp2(rng.uniform(-20, 20, n))).astype(np.float32)
    if name == "F32":
        return x.view(np.uint8)
    if name == "F16":
        return np.clip(x, -6e4, 6e4).astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(x, GT.BF16).view(np.uint8)  # BF16: the oracle's own rounding


def _same_bits(a: np.ndarray, b: torch.Tensor) -> bool:
    return bool(
        np.array_equal(np.ascontiguousarray(a, dtype=np.float32).view(np.uint32), b.numpy().view(np.uint32))
    )


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_random_blocks_match_the_oracle_bitwise(name: str) -> None:
    t = TYPES[name]
    rows = 3
    raw = _random_blocks(name, rows * 5, seed=t.type_id)
    want = gguf.quants.dequantize(raw.reshape(rows, -1), GT[name])
    got = quant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), name, want.shape)
    assert got.dtype == torch.float32 and tuple(got.shape) == want.shape
    assert np.isfinite(want).all()
    assert _same_bits(want, got)


@pytest.mark.parametrize("name", PLAIN)
def test_plain_types_match_the_oracle_bitwise(name: str) -> None:
    raw = _random_plain(name, 4096, seed=7)
    want = gguf.quants.dequantize(raw.reshape(8, -1), GT[name])
    got = quant.dequantize(torch.from_numpy(raw.copy()), name, want.shape)
    assert _same_bits(want, got)


@pytest.mark.parametrize("name", ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"))
def test_quantized_by_the_oracle_round_trip_bitwise(name: str) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 1024)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    q = gguf.quants.quantize(x, GT[name])
    want = gguf.quants.dequantize(q, GT[name])
    got = quant.dequantize(torch.from_numpy(q.view(np.uint8).reshape(-1).copy()), name, x.shape)
    assert _same_bits(want, got)
    # and the round trip is a quantisation of x, not garbage: within half a step of the block's range
    assert np.abs(want - x).max() <= np.abs(x).max() / 7


def test_chunks_and_compute_dtype() -> None:
    # More blocks than one chunk (the reference decodes CHUNK_BLOCKS at a time), into bfloat16: the
    # float32 oracle rounded once by torch.
    name = "Q4_K"
    n_blocks = 3 * (quant.CHUNK_BLOCKS // 3 + 5)  # rows of 3 blocks, past one chunk
    raw = _random_blocks(name, n_blocks, seed=11)
    want = gguf.quants.dequantize(raw.reshape(n_blocks, -1), GT[name]).reshape(-1, 768)
    got = quant.dequantize(torch.from_numpy(raw.reshape(-1).copy()), name, want.shape, torch.bfloat16)
    assert torch.equal(got, torch.from_numpy(want).to(torch.bfloat16))


def test_dequantize_rejects_a_byte_count_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="needs 68 uint8 bytes"):  # 2 blocks of 34
        quant.dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (64,))
    with pytest.raises(ValueError, match="unknown GGUF type 'IQ4_XS'"):
        quant.dequantize(torch.zeros(34, dtype=torch.uint8), "IQ4_XS", (32,))


@pytest.mark.parametrize("fp8", quant.FP8_DTYPES)
def test_fp8_scaled_is_the_float32_product_rounded_once(fp8: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * 3
    data = w.to(fp8)
    scale = torch.tensor(0.0123, dtype=torch.float32)
    # the oracle, in float64 (exact: an fp8 value times a float32 has at most 4 + 24 significant bits)
    want = (data.to(torch.float64) * scale.double()).float().to(torch.bfloat16)
    got = quant.dequantize_fp8(data, scale, torch.bfloat16)
    assert torch.equal(got, want)
    assert torch.equal(quant.dequantize_fp8(data, None, torch.float16), data.to(torch.float16))


# ------------------------------------------------------------------------------------------ files
def _write(path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str = "wan") -> None:
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_array("comfy.gguf.orig_shape.x.weight", [2, 3])
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=GT[qtype])
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def small_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {
        "a.weight": (gguf.quants.quantize(x, GT.Q8_0), "Q8_0"),
        "b.weight": (_random_blocks("Q6_K", 6, 1).reshape(2, -1), "Q6_K"),
        "c.bias": (rng.standard_normal(7).astype(np.float32), "F32"),
        "d.5d": (rng.standard_normal((3, 2, 1, 2, 2)).astype(np.float32), "F32"),
    }
    path = tmp_path / "small.gguf"
    _write(path, tensors)
    want = {k: gguf.quants.dequantize(v, GT[q]) for k, (v, q) in tensors.items()}
    return path, want


def test_reader_gives_the_oracle_shapes_types_and_values(
    small_file: tuple[Path, dict[str, np.ndarray]],
) -> None:
    path, want = small_file
    with read_gguf(path, architecture="wan") as f:
        assert f.architecture == "wan" and f.version == 3
        assert f.orig_shape("x.weight") == (2, 3)
        assert list(f.tensors) == list(want)
        oracle = gguf.GGUFReader(path)
        for t in oracle.tensors:
            mine = f.tensors[t.name]
            assert mine.qtype == t.tensor_type.name
            assert mine.shape == want[t.name].shape  # torch order (ggml's dims reversed)
            assert mine.offset == int(t.data_offset) and mine.nbytes == int(t.n_bytes)
            raw = torch.frombuffer(f.raw(t.name), dtype=torch.uint8)
            got = quant.dequantize(raw, mine.qtype, mine.shape)
            assert _same_bits(want[t.name], got)
            del raw, got


def _damaged(
    small: Path, tmp_path: Path, cut: int | None = None, patch: tuple[int, bytes] | None = None
) -> Path:
    data = bytearray(small.read_bytes())
    if cut is not None:
        data = data[:cut]
    if patch is not None:
        at, b = patch
        data[at : at + len(b)] = b
    out = tmp_path / "damaged.gguf"
    out.write_bytes(bytes(data))
    return out


def test_damaged_files_are_refused_naming_the_file_and_the_fix(
    small_file: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    path, _ = small_file
    size = path.stat().st_size
    oracle = gguf.GGUFReader(path)
    last = oracle.tensors[-1]
    for cut, what in ((10, "too short"), (60, "truncated"), (size - 8, "runs past the end")):
        bad = _damaged(path, tmp_path, cut=cut)
        with pytest.raises(CheckpointError, match=what) as e:
            read_gguf(bad)
        assert str(bad) in str(e.value) and "download it again" in str(e.value)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(_damaged(path, tmp_path, patch=(0, b"PK\x03\x04")))
    with pytest.raises(CheckpointError, match="version 9 is not supported"):
        read_gguf(_damaged(path, tmp_path, patch=(4, (9).to_bytes(4, "little"))))
    with pytest.raises(CheckpointError, match="impossible in"):
        read_gguf(_damaged(path, tmp_path, patch=(8, (2**40).to_bytes(8, "little"))))
    # the type field of the last tensor record sits 12 bytes before the data section's padding:
    # find it through the oracle's field table instead of guessing.
    type_field = last.field.parts[-2]  # dims ..., type (u32), offset (u64)
    at = int(type_field.ctypes.data - oracle.data.ctypes.data)
    for type_id, name in ((23, "IQ4_XS"), (20, "IQ4_NL"), (200, "unknown ggml type id 200")):
        with pytest.raises(CheckpointError, match=f"`{last.name}` is stored as (type )?{name}"):
            read_gguf(_damaged(path, tmp_path, patch=(at, type_id.to_bytes(4, "little"))))
    with pytest.raises(CheckpointError, match="general.architecture is 'wan', not 'flux'"):
        read_gguf(path, architecture="flux")
    with pytest.raises(CheckpointError, match="cannot open GGUF file"):
        read_gguf(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------- Triton kernel
_CHILD = textwrap.dedent(
    """
    import sys, torch
    from fxswap.kernels import dequant_triton
    cases = torch.load(sys.argv[1])
    torch.save([dequant_triton.dequantize(raw, name, shape) for name, raw, shape in cases], sys.argv[2])
    """
)
KERNEL_TYPES = BLOCK_TYPES  # every block type; the plain ones are a torch cast on every device


def test_triton_kernel_matches_the_oracle_in_the_interpreter(tmp_path: Path) -> None:
    if not triton_installed():
        pytest.skip("triton is not installed (the `triton` extra); CI installs it")
    cases, wants = [], []
    for name in KERNEL_TYPES:
        # 7 blocks in rows of 7: a partial last tile for every type (the kernel's mask)
        raw = _random_blocks(name, 7, seed=100 + TYPES[name].type_id)
        want = gguf.quants.dequantize(raw.reshape(1, -1), GT[name])
        cases.append((name, torch.from_numpy(raw.reshape(-1).copy()), want.shape))
        wants.append(want)
    src, dst = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(cases, src)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst)], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(dst)
    bad = [name for (name, _, _), g, w in zip(cases, got, wants, strict=True) if not _same_bits(w, g)]
    assert not bad, f"kernel differs from gguf.quants.dequantize for {bad}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", KERNEL_TYPES)
def test_triton_kernel_matches_the_oracle_on_cuda(name: str) -> None:
    if not torch.cuda.is_available() or not triton_installed():
        pytest.skip("needs CUDA and triton")
    from fxswap.kernels import dequant_triton

    raw = _random_blocks(name, 4 * 1000 + 3, seed=1)  # many tiles, a partial last one
    want = gguf.quants.dequantize(raw.reshape(1, -1), GT[name])
    dev = torch.from_numpy(raw.reshape(-1).copy()).cuda()
    got = dequant_triton.dequantize(dev, name, want.shape)
    assert _same_bits(want, got.cpu())
    as_bf16 = dequant_triton.dequantize(dev, name, want.shape, torch.bfloat16)
    assert torch.equal(as_bf16.cpu(), torch.from_numpy(want).to(torch.bfloat16))


@pytest.mark.parametrize("name", [*BLOCK_TYPES, *PLAIN])
def test_reference_scratch_stays_within_the_planned_bound(name: str) -> None:
    # The planner counts dequant_workspace_bytes beside each decoded weight; the CPU allocator (the
    # oracle of fxswap.oracle) says what the reference really holds above its output, for a tensor
    # of two chunks and for one smaller than a chunk.
    from fxswap.oracle import measure

    t = TYPES[name]
    for rows in (quant.CHUNK_BLOCKS * 2 * t.block_elems // 4096 if t.block_elems > 1 else 64, 3):
        shape = (rows, 4096)
        raw = torch.randint(0, 256, (t.nbytes(rows * 4096),), dtype=torch.uint8)
        with measure("cpu") as m:
            out = quant.dequantize(raw, name, shape, torch.bfloat16)
        scratch = m.peak_bytes - out.numel() * out.element_size()
        assert scratch <= quant.dequant_workspace_bytes(name, shape, torch.device("cpu")), (rows, scratch)
        del out
