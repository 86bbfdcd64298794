"""Write a tiny random WAN checkpoint, load it back with fxswap, run one forward pass.

    python examples/wan_tiny.py

Shows the whole loading path on something that runs in seconds on a CPU: the checkpoint is written
as sharded safetensors in the diffusers layout (so the loader has to detect the layout, map the keys
and read across shards), then ``fxswap.models.wan.load`` (the public loader) returns a ready WanModel.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from fxswap.models import wan
from fxswap.models.wan_checkpoint import load_state_dict, save


def main() -> None:
    torch.manual_seed(0)
    config = wan.tiny_config("t2v")
    source = wan.build(config)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny-wan-diffusers"
        files = save(source, folder, layout="diffusers", max_shard_bytes=64_000)
        size = sum(f.stat().st_size for f in files)
        print(f"wrote {len(files) - 1} shards + index, {size / 1e3:.0f} kB, to {folder}")

        _, info = load_state_dict(folder)
        assert info.config is not None
        c = info.config
        print(f"detected layout: {info.layout}; storage dtypes: {info.storage_dtypes}")
        print(
            f"detected config: {c.name} dim={c.dim} heads={c.num_heads} layers={c.num_layers} "
            f"ffn={c.ffn_dim} in={c.in_dim} out={c.out_dim} type={c.model_type} "
            f"(heads from {info.num_heads_source})"
        )

        start = time.perf_counter()
        model = wan.load(folder, dtype=torch.float32)
        print(
            f"loaded {sum(p.numel() for p in model.parameters()):,} parameters in "
            f"{(time.perf_counter() - start) * 1e3:.0f} ms"
        )

        inputs = wan.example_inputs(config, frames=5, height=64, width=64)
        with torch.no_grad():
            out = model(**inputs)
            ref = source(**inputs)
        for name, t in inputs.items():
            print(f"input  {name:9s} {list(t.shape)}")
        print(f"output x         {list(out.shape)}")
        same = all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
        print(f"weights bitwise equal to the source: {same}")
        # Not necessarily 0: the loaded weights are views of the mapped file, at other alignments,
        # and CPU BLAS may pick another kernel (summation order) for them.
        print(f"max |loaded - source| output difference = {(out - ref).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
