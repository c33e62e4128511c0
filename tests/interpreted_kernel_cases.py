"""Triton kernels vs their torch references, run on CPU by the Triton interpreter.

Not collected by the main run (the interpreter must be chosen before triton is imported): `test_kernels.py`
runs this file in a subprocess with TRITON_INTERPRET=1. Every comparison is `torch.equal`: the kernels move
data, so they must reproduce the reference bit for bit.
"""
import os

import pytest
import torch

from pipefusion_compile.kernels import DTYPE_CODE
from pipefusion_compile.kernels.strided_copy import _multi_copy_kernel
from pipefusion_compile.kernels.triton_support import is_interpreted

P = torch.ops.pipefusion
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

pytestmark = pytest.mark.skipif(not is_interpreted(_multi_copy_kernel),
                                reason="needs TRITON_INTERPRET=1 before triton is imported (test_kernels.py)")


def rand(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def both(fn):
    """Run `fn(kernels)` for the kernel and the reference; each gets its own copy of the inputs."""
    return fn("triton"), fn("torch")


# ---------------------------------------------------------------------------------------------- K/V cache
LAYOUTS = {  # name: (k/v patch maker, cache maker, token axis); B=batch, H=heads, L=patch tokens, S=cache tokens
    "bhsd": (lambda b, h, n, d, dt: rand(b, h, n, d, dtype=dt), lambda b, h, s, d, dt: rand(b, h, s, d, dtype=dt), 2),
    "bhsd_from_bshd": (lambda b, h, n, d, dt: rand(b, n, h, d, dtype=dt).transpose(1, 2),
                       lambda b, h, s, d, dt: rand(b, h, s, d, dtype=dt), 2),
    "bshd": (lambda b, h, n, d, dt: rand(b, n, h, d, dtype=dt), lambda b, h, s, d, dt: rand(b, s, h, d, dtype=dt), 1),
    "strided_cache": (lambda b, h, n, d, dt: rand(b, h, d, n, dtype=dt).transpose(2, 3),
                      lambda b, h, s, d, dt: rand(b, s, h, d, dtype=dt).transpose(1, 2), 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_kv_cache_update(dtype, layout, batch):
    make_patch, make_cache, axis = LAYOUTS[layout]
    per_row, rows_total, offset = 3, 5, 2                   # 2 text tokens first, then 5 rows of 3 tokens
    tokens = offset + rows_total * per_row
    for row0, rows in ((0, 2), (2, 2), (4, 1)):              # the last patch is ragged
        ck, cv = make_cache(batch, 2, tokens, 5, dtype), make_cache(batch, 2, tokens, 5, dtype)
        k, v = make_patch(batch, 2, rows * per_row, 5, dtype), make_patch(batch, 2, rows * per_row, 5, dtype)

        def run(kernels, ck=ck, cv=cv, k=k, v=v, row0=row0):
            ck_ = torch.empty_strided(ck.shape, ck.stride(), dtype=dtype).copy_(ck)
            cv_ = torch.empty_strided(cv.shape, cv.stride(), dtype=dtype).copy_(cv)
            P.kv_cache_update(ck_, cv_, k, v, torch.tensor(row0), axis, per_row, offset, kernels)
            return ck_, cv_

        (gk, gv), (rk, rv) = both(run)
        assert torch.equal(gk, rk) and torch.equal(gv, rv)
        start = offset + row0 * per_row
        assert torch.equal(gk.narrow(axis, start, rows * per_row), k)


# ---------------------------------------------------------------------------------------------- pack
def crossing(dtype, batch, n):
    """What may cross a cut: a transposed hidden state, a sliced skip, a contiguous tensor of another dtype, ..."""
    tensors = [rand(batch, 7, 6, dtype=dtype).transpose(1, 2), rand(batch, 6, 10, dtype=dtype)[:, :, ::2],
               torch.arange(batch * 3, dtype=torch.int64).view(batch, 3), rand(batch, 4, dtype=torch.float32),
               rand(batch, 2, 3, dtype=dtype).permute(2, 0, 1)]
    return tensors[:n]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("n", [1, 3, 5])                   # 5 > MAX_JOBS: two launches
def test_pack_unpack(dtype, batch, n):
    tensors = crossing(dtype, batch, n)
    got, want = both(lambda kernels: P.pack(tensors, kernels))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    shapes, ranks = [s for t in tensors for s in t.shape], [t.dim() for t in tensors]
    codes = [DTYPE_CODE[t.dtype] for t in tensors]
    for out, t in zip(P.unpack(got, shapes, ranks, codes, kernels="triton"), tensors):
        assert torch.equal(out, t) and out.is_contiguous()
    views = [torch.zeros(*reversed(t.shape), dtype=t.dtype).permute(*reversed(range(t.dim()))) for t in tensors]
    P.unpack_into(got, views, "triton")
    assert all(torch.equal(v, t) for v, t in zip(views, tensors))


def test_pack_misaligned_layout_uses_the_reference():
    tensors = [torch.tensor([True, False, True]), rand(2, 3, dtype=torch.float32)]   # fp32 at byte 3
    got, want = both(lambda kernels: P.pack(tensors, kernels))
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 2])
def test_write_band(dtype, batch):
    for axis, band in ((1, rand(batch, 9, 3, dtype=dtype).transpose(1, 2)[:, :2]),      # [B, S, C] strided
                       (2, rand(batch, 4, 3, 6, dtype=dtype))):                         # [B, C, H, W]
        def run(kernels, axis=axis, band=band):
            out = torch.zeros(batch, 4, 8, 6, dtype=dtype) if axis == 2 else torch.zeros(batch, 7, 9, dtype=dtype)
            P.write_band(out, band, axis, out.shape[axis] - band.shape[axis], kernels)   # ragged last band
            return out

        got, want = both(run)
        assert torch.equal(got, want) and got.abs().sum() > 0


def diffusers_unpatchify(x, h, w, p, c):
    """What PixArt/DiT do after the last projection (the op must equal this)."""
    x = x.reshape(-1, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, c, h * p, w * p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 2])
def test_write_unpatchified(dtype, batch):
    p, c, h, w = 2, 3, 5, 4
    full = rand(batch, h * w, p * p * c, dtype=dtype)
    want = diffusers_unpatchify(full, h, w, p, c)
    for kernels in ("triton", "torch"):
        out = torch.full((batch, c, h * p, w * p), float("nan"), dtype=dtype)
        for row0, rows in ((0, 2), (2, 2), (4, 1)):          # ragged last band
            patch = full[:, row0 * w:(row0 + rows) * w]
            P.write_unpatchified(out, patch, row0, p, kernels)
        assert torch.equal(out, want), kernels


# ---------------------------------------------------------------------------------------------- end to end
def test_pipeline_with_kernels_equals_reference():
    from helpers import call_model, compile_pf, sample_loop

    from pipefusion_compile.models import pixart

    results = {}
    for kernels in ("triton", "torch"):
        torch._dynamo.reset()
        model, kwargs = pixart(batch=2)
        compiled, _ = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager", kernels=kernels)
        results[kernels] = sample_loop(call_model(compiled), kwargs, steps=3)
    (gf, gs), (rf, rs) = results["triton"], results["torch"]
    assert torch.equal(gf, rf) and all(torch.equal(a, b) for a, b in zip(gs, rs))


def test_inductor_compiles_the_interpreted_kv_update():
    """Under the interpreter the K/V kernel runs inside the opaque host op, so inductor still compiles."""
    def f(ck, cv, k, v, row_start):
        torch.ops.pipefusion.kv_cache_update(ck, cv, k * 2, v, row_start, 2, 2, 0, "triton")
        return ck.sum(dim=2) + cv.sum(dim=2)

    args = [torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)]
    want_args = [a.clone() for a in args]
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    got = compiled(*args, torch.tensor(1))
    want = f(*want_args, torch.tensor(1))
    assert torch.equal(got, want) and torch.equal(args[0], want_args[0])


@pytest.mark.slow
def test_distributed_pipeline_with_kernels_equals_simulate_reference(tmp_path):
    from dist_utils import run_ranks
    from dist_workers import generate, run_job

    assert os.environ.get("TRITON_INTERPRET") == "1"        # the spawned ranks inherit it
    job = ("PixArtTransformer2DModel", {}, {"num_patches": 4, "kernels": "triton"})
    ranks = run_ranks(generate, 2, [job], 3, tmp_path=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = run_job("PixArtTransformer2DModel", {}, {"num_patches": 4, "kernels": "torch", "simulate": True,
                                                         "num_stages": 2}, 3)
    finally:
        torch.set_num_threads(threads)
    for r in ranks:
        got = r["value"][0]
        assert torch.equal(got["final"], want["final"])
        assert all(torch.equal(a, b) for a, b in zip(got["steps"], want["steps"]))
