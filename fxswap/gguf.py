"""GGUF files read as they are stored: header, metadata, tensor table, and the raw bytes of each
tensor (memory-mapped, never copied or dequantised here). No torch: the CLI prices a GGUF type
from :data:`TYPES` without importing it.

The layout (GGUF version 2 and 3, little-endian), as llama.cpp's ``docs/gguf.md`` describes it::

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: key (string) | value type u32 | value          (string = length u64 + UTF-8 bytes;
                                                              array = element type u32 + count u64 + values)
    tensors:  name (string) | n_dims u32 | dims u64 x n_dims | ggml type u32 | offset u64
    padding to `general.alignment` (default 32), then the data section; each offset is relative to it.

``dims`` are innermost first (ggml's ``ne``): a torch shape is their reverse, and the rows of a block
quantised tensor run along ``dims[0]``, which must be a whole number of blocks.

Every defect found raises :class:`fxswap.errors.CheckpointError` naming the file, the tensor (or
field) and what to do, before anything is allocated for the model.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fxswap.errors import CheckpointError

__all__ = [
    "QK_K",
    "TYPES",
    "GGUFFile",
    "GGUFTensor",
    "QuantType",
    "quant_type",
    "read_gguf",
    "stored_nbytes",
]

QK_K = 256  # elements per super-block of the K types

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 8  # ggml itself has 4; ComfyUI-GGUF's converters add 5-D conv weights as F32


@dataclass(frozen=True, slots=True)
class QuantType:
    """One ggml storage type: ``block_elems`` values are kept in ``block_bytes`` bytes."""

    name: str
    type_id: int
    block_elems: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems

    def nbytes(self, numel: int) -> int:
        """Stored bytes of ``numel`` values (a whole number of blocks)."""
        return numel // self.block_elems * self.block_bytes


# The types fxswap dequantises. Block sizes from the ggml block structs (``ggml-common.h``):
# Q4_0 = f16 d + 16 nibble bytes; Q4_1 adds f16 m; Q5_x add a u32 of high bits; Q8_0 = f16 d + 32 i8;
# the K types hold 256 values in 16 or 8 sub-blocks with 4- or 6-bit scales.
TYPES: dict[str, QuantType] = {
    t.name: t
    for t in (
        QuantType("F32", 0, 1, 4),
        QuantType("F16", 1, 1, 2),
        QuantType("Q4_0", 2, 32, 2 + 16),
        QuantType("Q4_1", 3, 32, 2 + 2 + 16),
        QuantType("Q5_0", 6, 32, 2 + 4 + 16),
        QuantType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
        QuantType("Q8_0", 8, 32, 2 + 32),
        QuantType("Q2_K", 10, QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
        QuantType("Q3_K", 11, QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
        QuantType("Q4_K", 12, QK_K, 2 + 2 + 12 + QK_K // 2),
        QuantType("Q5_K", 13, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        QuantType("Q6_K", 14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
        QuantType("BF16", 30, 1, 2),
    )
}
_BY_ID: dict[int, QuantType] = {t.type_id: t for t in TYPES.values()}

# Types a GGUF file may hold that fxswap does not dequantise: named in the error.
_UNSUPPORTED: dict[int, str] = {
    9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
    21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4",
}  # fmt: skip

_SUPPORTED_NAMES = ", ".join(TYPES)


def quant_type(name: str) -> QuantType:
    """The :class:`QuantType` called ``name`` (case-insensitive, ``Q4_K_M`` style suffixes of mixed
    files accepted as their main type); ValueError naming the supported ones otherwise."""
    key = name.strip().upper()
    if key not in TYPES and key[-2:] in ("_S", "_M", "_L") and key[:-2] in TYPES:
        key = key[:-2]  # Q4_K_M: a file mixing Q4_K with Q6_K; priced at its main type
    if key not in TYPES:
        raise ValueError(f"unknown GGUF type {name!r}; fxswap reads {_SUPPORTED_NAMES}")
    return TYPES[key]


def stored_nbytes(qtype: str, numel: int) -> int:
    """Bytes ``numel`` values of GGUF type ``qtype`` take in the file (and in host memory)."""
    t = quant_type(qtype)
    if numel % t.block_elems:
        raise ValueError(f"{numel} values are not a whole number of {t.name} blocks of {t.block_elems}")
    return t.nbytes(numel)


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor of a GGUF file: its torch shape (outermost first), type and bytes in the file."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    offset: int  # absolute, from the start of the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header; running past the end is a
    truncated file, named with what was being read."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.size = len(buf)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: GGUF file truncated or corrupt: reading {what} needs {n} bytes at offset "
                f"{self.pos}, but the file has {self.size} bytes; download it again (compare its size "
                "or checksum with the source)"
            )
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{self.path}: {what} at offset {self.pos - n} is not UTF-8 ({e}); the GGUF file is "
                "corrupt: download it again"
            ) from None


# value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype], f"metadata `{key}`")
    if vtype == 8:
        return cur.string(f"metadata `{key}`")
    if vtype == 9 and depth < 2:
        etype = cur.unpack("I", f"the element type of metadata array `{key}`")
        count = cur.unpack("Q", f"the length of metadata array `{key}`")
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            raw = cur.take(count * struct.calcsize(fmt), f"metadata array `{key}`")
            return list(struct.unpack(f"<{count}{fmt}", raw))
        if count > cur.size:  # each element takes at least a byte
            raise CheckpointError(
                f"{cur.path}: metadata array `{key}` claims {count} elements, more than the file's "
                f"{cur.size} bytes; the GGUF file is corrupt: download it again"
            )
        return [_value(cur, etype, key, depth + 1) for _ in range(count)]
    raise CheckpointError(
        f"{cur.path}: metadata `{key}` has value type {vtype}, which GGUF does not define; the file "
        "is corrupt or not a GGUF file: download it again"
    )


class GGUFFile:
    """An open GGUF file: :attr:`metadata`, :attr:`tensors` (by name, file order) and :meth:`raw`.

    The file is memory-mapped copy-on-write, so :meth:`raw` hands out writable buffers over the
    file's pages without reading them (torch.frombuffer needs a writable buffer; writes would stay
    private to this process and fxswap makes none).
    """

    def __init__(self, path: Path, buf: mmap.mmap, version: int, metadata: dict[str, Any],
                 tensors: dict[str, GGUFTensor], data_offset: int) -> None:  # fmt: skip
        self.path = path
        self._buf: mmap.mmap | None = buf
        self.version = version
        self.metadata = metadata
        self.tensors = tensors
        self.data_offset = data_offset

    @property
    def architecture(self) -> str | None:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def raw(self, name: str) -> memoryview:
        """The bytes of tensor ``name`` as stored (a view of the mapping, nothing read yet)."""
        if self._buf is None:
            raise ValueError(f"{self.path}: the GGUF file is closed")
        t = self.tensors[name]
        return memoryview(self._buf)[t.offset : t.offset + t.nbytes]

    def orig_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape ComfyUI-GGUF's converter recorded for a tensor it flattened to rows of 256
        (``comfy.gguf.orig_shape.<name>``), or None."""
        v = self.metadata.get(f"comfy.gguf.orig_shape.{name}")
        return tuple(int(x) for x in v) if isinstance(v, list) else None

    def close(self) -> None:
        """Drop the mapping (views handed out keep it alive until they go)."""
        buf, self._buf = self._buf, None
        if buf is not None:
            # Tensors still viewing it keep the mapping until the last of them goes.
            with contextlib.suppress(BufferError):
                buf.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[GGUFTensor]:
        return iter(self.tensors.values())


def read_gguf(path: str | os.PathLike[str], *, architecture: str | None = None) -> GGUFFile:
    """Open ``path`` and check its header and tensor table.

    Args:
        path: a ``.gguf`` file.
        architecture: if given, ``general.architecture`` must equal it (e.g. ``"wan"``).

    Raises:
        CheckpointError: not a GGUF file, an unsupported version, a truncated or corrupt header or
            data section, a tensor of a type fxswap does not dequantise (IQ and ternary types, named),
            or another architecture.
    """
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 (the mapping outlives the file object)
    except OSError as e:
        raise CheckpointError(f"cannot open GGUF file {p}: {e}; pass the path of a .gguf file") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise CheckpointError(
                f"{p}: {size} bytes is too short for a GGUF header (24 bytes); the file is truncated: "
                "download it again"
            )
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        return _parse(p, buf, size, architecture)
    except BaseException:
        buf.close()
        raise


def _parse(p: Path, buf: mmap.mmap, size: int, architecture: str | None) -> GGUFFile:
    cur = _Cursor(buf, p)
    magic = cur.take(4, "the magic")
    if magic != _MAGIC:
        raise CheckpointError(
            f"{p}: not a GGUF file (starts with {magic!r}, not b'GGUF'); pass a .gguf file, or a "
            ".safetensors file to the safetensors loader"
        )
    version = cur.unpack("I", "the version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise CheckpointError(
            f"{p}: GGUF version {version}{hint} is not supported; fxswap reads little-endian versions 2 "
            "and 3 (re-convert the file with a current gguf / ComfyUI-GGUF converter)"
        )
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata count")
    # Each tensor record and metadata entry takes at least 8 bytes: a larger count is corruption.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise CheckpointError(
            f"{p}: header claims {n_tensors} tensors and {n_kv} metadata entries, impossible in "
            f"{size} bytes; the GGUF file is corrupt: download it again"
        )
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        vtype = cur.unpack("I", f"the type of metadata `{key}`")
        metadata[key] = _value(cur, vtype, key)
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(
            f"{p}: general.alignment = {alignment!r} is not a power of two; the GGUF file is corrupt"
        )
    if architecture is not None:
        arch = metadata.get("general.architecture")
        if arch != architecture:
            raise CheckpointError(
                f"{p}: general.architecture is {arch!r}, not {architecture!r}: this GGUF file holds "
                f"another model; pass a {architecture!r} GGUF file (e.g. one written by ComfyUI-GGUF's "
                "tools/convert.py from a WAN checkpoint)"
            )
    records = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        n_dims = cur.unpack("I", f"the rank of tensor `{name}`")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise CheckpointError(
                f"{p}: tensor `{name}` has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS}); the "
                "file is corrupt: download it again"
            )
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"the dimensions of tensor `{name}`"))
        type_id = cur.unpack("I", f"the type of tensor `{name}`")
        offset = cur.unpack("Q", f"the offset of tensor `{name}`")
        records.append((name, dims, type_id, offset))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, type_id, offset in records:
        qt = _BY_ID.get(type_id)
        if qt is None:
            known = _UNSUPPORTED.get(type_id)
            what = f"type {known}" if known else f"unknown ggml type id {type_id}"
            raise CheckpointError(
                f"{p}: tensor `{name}` is stored as {what}, which fxswap does not dequantise; use a "
                f"file quantised to one of {_SUPPORTED_NAMES} (e.g. a Q4_K_M or Q8_0 file instead of "
                "an IQ one)"
            )
        if any(d == 0 for d in dims) or dims[0] % qt.block_elems:
            raise CheckpointError(
                f"{p}: tensor `{name}` of type {qt.name} has dimensions {list(dims)}: its rows "
                f"(dimension 0) must be a positive multiple of {qt.block_elems}; the file is corrupt"
            )
        numel = 1
        for d in dims:
            numel *= d
        nbytes = qt.nbytes(numel)
        start = data_offset + offset
        if offset % alignment or start + nbytes > size:
            raise CheckpointError(
                f"{p}: tensor `{name}` ({qt.name}, {nbytes} bytes at offset {start}) "
                + (
                    "is not aligned"
                    if offset % alignment
                    else f"runs past the end of the file ({size} bytes)"
                )
                + "; the GGUF file is truncated or corrupt: download it again"
            )
        if name in tensors:
            raise CheckpointError(f"{p}: tensor `{name}` appears twice; the GGUF file is corrupt")
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), qt.name, start, nbytes)
    return GGUFFile(p, buf, version, metadata, tensors, data_offset)
