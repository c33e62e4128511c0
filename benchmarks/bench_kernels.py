"""Effective bandwidth of the data-movement kernels vs the device's copy bandwidth (CUDA only).

For each kernel: bytes read + written / time (`triton.testing.do_bench`, median), next to the unfused torch
sequence it replaces (the reference: `narrow().copy_()` per tensor, `contiguous()` + `cat`, reshape + einsum +
copy) and to a plain device-to-device `copy_` of a large buffer measured in the same run. Shapes: PixArt-1024
(4096 image tokens, hidden 1152 = 16 heads x 72) and Flux-1024 (4096 image tokens, hidden 3072 = 24 x 128),
bf16, batch 2 (classifier-free guidance), M = 4 patches (1024 tokens each).

    python benchmarks/bench_kernels.py [--out benchmarks/results/kernels.md]

Without a CUDA device it prints why and exits with status 0 (there is nothing to measure on CPU: the CPU
path is the torch reference itself).
"""
from __future__ import annotations

import argparse
import sys

import torch

SHAPES = {  # name: (image tokens, heads, head dim, latent channels out, patch size, latent side)
    "PixArt-1024": (4096, 16, 72, 8, 2, 128),
    "Flux-1024": (4096, 24, 128, 64, 1, 64),
}
BATCH, PATCHES, DTYPE = 2, 4, torch.bfloat16


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3  # seconds


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def copy_bandwidth(device) -> float:
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbps(2 * src.numel(), bench(lambda: dst.copy_(src)))


def cases(name: str, device):
    """(kernel name, bytes moved, fused call, unfused torch call) for one model shape."""
    from pipefusion_compile.kernels import (
        kv_cache_update_reference,
        pack_reference,
        unpack_reference,
    )

    ops = torch.ops.pipefusion
    tokens, heads, head_dim, c_out, p, side = SHAPES[name]
    hidden, n = heads * head_dim, tokens // PATCHES

    def rand(*shape):
        return torch.randn(*shape, device=device).to(DTYPE)

    # K/V as attention sees them: [B, H, S, D] views of a [B, S, H, D] projection (not contiguous)
    k, v = rand(BATCH, n, heads, head_dim).transpose(1, 2), rand(BATCH, n, heads, head_dim).transpose(1, 2)
    ck, cv = rand(BATCH, heads, tokens, head_dim), rand(BATCH, heads, tokens, head_dim)
    row_start = torch.tensor(1, dtype=torch.int64)
    kv_bytes = 2 * 2 * k.numel() * k.element_size()
    yield ("kv_cache_update", kv_bytes,
           lambda: ops.kv_cache_update(ck, cv, k, v, row_start, 2, n // 2, 0, "triton"),
           lambda: kv_cache_update_reference(ck, cv, k, v, int(row_start) * (n // 2), 2))
    # what crosses a cut for one patch: the hidden state and a strided second stream (e.g. a skip)
    crossing = [rand(BATCH, n, hidden), rand(BATCH, hidden, n).transpose(1, 2)]
    nbytes = sum(t.numel() * t.element_size() for t in crossing)
    yield ("pack (2 tensors)", 2 * nbytes, lambda: ops.pack(crossing, "triton"), lambda: pack_reference(crossing))
    buf = pack_reference(crossing)
    shapes, ranks, codes = [s for t in crossing for s in t.shape], [3, 3], [2, 2]
    yield ("unpack (2 tensors)", 2 * nbytes, lambda: ops.unpack(buf, shapes, ranks, codes, kernels="triton"),
           lambda: unpack_reference(buf, [list(t.shape) for t in crossing], [DTYPE, DTYPE]))
    # the model output of one patch into the full output
    if p > 1:
        w = side // p
        out = rand(BATCH, c_out, side, side)
        patch = rand(BATCH, n, p * p * c_out)

        def unfused():
            x = patch.reshape(BATCH, n // w, w, p, p, c_out)
            x = torch.einsum("nhwpqc->nchpwq", x).reshape(BATCH, c_out, n // w * p, w * p)
            out.narrow(2, 0, x.shape[2]).copy_(x)

        yield ("write_unpatchified", 2 * patch.numel() * patch.element_size(),
               lambda: ops.write_unpatchified(out, patch, 0, p, "triton"), unfused)
    else:
        out, band = rand(BATCH, tokens, c_out), rand(BATCH, n, c_out)
        yield ("write_band", 2 * band.numel() * band.element_size(),
               lambda: ops.write_band(out, band, 1, n, "triton"), lambda: out.narrow(1, n, n).copy_(band))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; the Triton kernels run on CUDA (on CPU the ops use the torch "
              "reference), so there is nothing to measure. Run this on a GPU machine.")
        return 0
    import pipefusion_compile.ops  # noqa: F401

    device = torch.device("cuda")
    copy_bw = copy_bandwidth(device)
    lines = [(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; bf16, batch {BATCH}, "
              f"M={PATCHES} patches"),
             f"device-to-device copy_ (256 MiB): {copy_bw:.0f} GB/s (read + write)", "",
             "| shape | kernel | MB moved | Triton GB/s | % of copy | torch (unfused) GB/s | speedup |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in SHAPES:
        for kernel, nbytes, fused, unfused in cases(name, device):
            t_fused, t_unfused = bench(fused), bench(unfused)
            lines.append(f"| {name} | {kernel} | {nbytes / 1e6:.1f} | {gbps(nbytes, t_fused):.0f} | "
                         f"{100 * gbps(nbytes, t_fused) / copy_bw:.0f}% | {gbps(nbytes, t_unfused):.0f} | "
                         f"{t_unfused / t_fused:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
