"""Patch-lazy outputs (`pipefusion_compile/lazy.py`): band-by-band ops give the whole-tensor op's bits, only the
bands asked for are waited for, every other op materializes first, and no later write changes what a band
recorded earlier computes. The schedulers' own steps run here on lazy model outputs exactly as on plain ones."""
import itertools
import logging

import pytest
import torch

from pipefusion_compile import lazy
from pipefusion_compile import reset as pipefusion_reset
from pipefusion_compile.lazy import Bands, LazyTensor


def make_lazy(full: torch.Tensor, axis: int, ranges, filled: list | None = None) -> LazyTensor:
    """A lazy copy of `full` whose band j arrives (is copied from `full`) when first asked for."""
    base = torch.full_like(full, float("nan")) if full.is_floating_point() else torch.empty_like(full)
    source = full.clone()

    def fill(j):
        s, e = ranges[j]
        base.narrow(axis, s, e - s).copy_(source.narrow(axis, s, e - s))
        if filled is not None:
            filled.append(j)

    return LazyTensor.of(base, Bands(axis, ranges, fill, "a test output"), axis)


def bands_of(size: int, cuts) -> list[tuple[int, int]]:
    edges = [0, *cuts, size]
    return list(zip(edges[:-1], edges[1:]))


# (shape, band axis): an image latent banded by rows, packed tokens, a video latent banded by rows in frames
LAYOUTS = [((2, 4, 10, 6), 2), ((2, 20, 8), 1), ((2, 3, 2, 9, 4), 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
CUTS = [(1,), (3, 7), (2, 3, 5)]   # uneven band edges: bands start at offsets a vector loop does not align to


def _ops(shape, axis, dtype):
    """(name, fn(x, y, plain)) for the ops diffusers schedulers and pipelines run between transformer calls;
    `x`, `y` lazy (or plain in the reference), `plain` an ordinary full-size tensor."""
    c = torch.tensor(0.37, dtype=torch.float32)        # a 0-d scheduler coefficient (a sigma ratio)
    ch = 1 if axis != 1 else len(shape) - 1            # the channel dim: [B, C, ...] or packed [B, S, C]
    per_channel = torch.rand(shape[ch], *([1] * (len(shape) - 1 - ch)), dtype=dtype) + 0.5
    channels_from_1 = tuple(slice(None) if d != ch else slice(1, None) for d in range(len(shape)))
    return [
        ("add", lambda x, y, p: x + y), ("sub", lambda x, y, p: x - y), ("mul", lambda x, y, p: x * y),
        ("div", lambda x, y, p: x / (y.abs() + 1)), ("neg", lambda x, y, p: -x),
        ("abs/sqrt/clamp", lambda x, y, p: x.abs().sqrt() + torch.clamp(y, -0.5, 0.5) + x.square()),
        ("scalar mul/add", lambda x, y, p: 0.5 * x + 1.25), ("rsub/rdiv", lambda x, y, p: 1 - 2 / (x.abs() + 1)),
        ("0-d coefficient", lambda x, y, p: c * x - (c * 0.5) * y),
        ("broadcast", lambda x, y, p: x * per_channel), ("with plain", lambda x, y, p: p + x * 3),
        ("torch.add/mul", lambda x, y, p: torch.mul(torch.add(x, y), 2.0)),
        ("guidance", lambda x, y, p: (lambda u, t: u + 4.5 * (t - u))(*x.chunk(2))),
        ("cast up, down", lambda x, y, p: (x.to(torch.float32) * 0.3).to(dtype)),
        ("float()/type_as", lambda x, y, p: x.float().type_as(y)),
        ("cat batch", lambda x, y, p: torch.cat([x, y, x])),
        ("cat channel", lambda x, y, p: torch.cat([x, p], dim=ch)),
        ("split/narrow", lambda x, y, p: torch.split(x, 1, dim=0)[1] + x.narrow(ch, 1, 1)),
        ("slice channels", lambda x, y, p: x[channels_from_1] * 2),
        ("dpm-solver++ step", lambda x, y, p: (c / 0.9) * p - (0.8 * (torch.exp(-c) - 1.0)) * x),
        ("flow-match step", lambda x, y, p: (p.to(torch.float32) + (-0.125) * x.to(torch.float32)).to(dtype)),
    ]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "x".join(map(str, l[0])))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bandwise_op_gives_the_whole_tensor_ops_bits(layout, dtype):
    shape, axis = layout
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(shape, generator=g).to(dtype)
    y_full = torch.randn(shape, generator=g).to(dtype)
    p_full = torch.randn(shape, generator=g).to(dtype)
    for (name, fn), cuts in itertools.product(_ops(shape, axis, dtype), CUTS):
        ranges = bands_of(shape[axis], [c for c in cuts if c < shape[axis]])
        want = fn(x_full, y_full, p_full)
        before = dict(lazy.MATERIALIZED)
        got = fn(make_lazy(x_full, axis, ranges), make_lazy(y_full, axis, ranges), p_full)
        assert isinstance(got, LazyTensor) and got.pending, f"{name}: not run band by band"
        assert lazy.MATERIALIZED == before, f"{name}: materialized"
        got = got.materialize()
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), name
        assert torch.equal(got, want), f"{name} ({dtype}, bands {ranges}): differs from the whole-tensor op"


def test_a_band_waits_only_for_the_bands_it_reads():
    """The next call's patch 0 asks for band 0 of its input: only band 0 of the model output arrives."""
    shape, axis, ranges = (2, 4, 8, 8), 2, [(0, 2), (2, 4), (4, 6), (6, 8)]
    filled = []
    noise = make_lazy(torch.randn(shape), axis, ranges, filled)
    latents = torch.randn(2, 4, 8, 8)[:1].expand(2, -1, -1, -1).contiguous()
    uncond, cond = noise.chunk(2)
    guided = uncond + 4.5 * (cond - uncond)
    nxt = torch.cat([latents[:1] - 0.1 * guided] * 2)
    assert filled == []                                   # recording an op waits for nothing
    patch0 = nxt.narrow(axis, 0, 2)
    assert filled == [] and isinstance(patch0, LazyTensor)
    plain = patch0.materialize()
    assert filled == [0]
    assert nxt.shape == (2, 4, 8, 8) and nxt.dim() == 4 and len(nxt) == 2 and filled == [0]   # metadata: no wait
    nxt.narrow(axis, 5, 2).materialize()
    assert filled == [0, 2, 3]
    assert not isinstance(plain, LazyTensor)


def test_any_other_op_materializes_everything_first_and_logs_it_once(caplog):
    shape, axis = (1, 2, 6, 4), 2
    full = torch.randn(shape)
    with caplog.at_level(logging.INFO, logger="pipefusion_compile"):
        x = make_lazy(full, axis, bands_of(6, [2, 4]))
        other = make_lazy(torch.ones(shape), axis, bands_of(6, [3]))
        total = x.std()
        assert not x.pending and not other.pending        # every lazy tensor, not only the op's input
        assert torch.equal(total, full.std()) and not isinstance(total, LazyTensor)
        y = make_lazy(full, axis, bands_of(6, [2, 4]))
        torch.nn.functional.conv2d(y, torch.ones(2, 2, 1, 1))
        make_lazy(full, axis, bands_of(6, [2, 4])).std()
    logged = [r.getMessage() for r in caplog.records if "waits for all of its bands" in r.getMessage()]
    assert len(logged) == 2 and "std" in logged[0] and "conv2d" in logged[1]
    assert lazy.MATERIALIZED["TensorBase.std"] >= 2


def test_later_writes_do_not_change_what_a_recorded_band_computes():
    shape, axis = (1, 2, 6, 4), 2
    full, plain = torch.randn(shape), torch.randn(shape)
    # a plain operand written in place after the op was recorded: the band uses the value it had then
    x = make_lazy(full, axis, bands_of(6, [3]))
    y = x + plain
    want = full + plain
    plain.mul_(100)
    assert torch.equal(y.materialize(), want)
    # an in-place write to a lazy tensor that a pending op reads: everything resolves first, as eager would order it
    x = make_lazy(full, axis, bands_of(6, [3]))
    y = x * 2
    x.add_(1)
    assert torch.equal(y.materialize(), full * 2) and torch.equal(x.materialize(), full + 1)
    # a write through a plain view (returned by an op that materialized) cannot reach a pending band either
    x = make_lazy(full, axis, bands_of(6, [3]))
    y = x * 2
    view = x.detach()
    view.zero_()
    assert torch.equal(y.materialize(), full * 2)
    # views keep eager's aliasing: writing a chunk writes the tensor it is a view of
    x = make_lazy(torch.cat([full, full]), axis, bands_of(6, [3]))
    a, _ = x.chunk(2)
    a.mul_(0)
    assert torch.equal(x.materialize()[0], torch.zeros_like(full[0])) and torch.equal(x.materialize()[1], full[0])


def test_unresolved_bands_hold_nan_under_plain_storage_access():
    x = make_lazy(torch.randn(1, 2, 4, 4), 2, bands_of(4, [2]))
    with torch._C.DisableTorchFunctionSubclass():      # what code that bypasses torch functions would read
        assert torch.isnan(x).all()


def _lazy_model_outputs(shape, axis, ranges, steps, seed):
    """The model outputs of a fake denoiser, as plain tensors and as lazy ones (same values)."""
    g = torch.Generator().manual_seed(seed)
    plain = [torch.randn(shape, generator=g) for _ in range(steps)]
    return plain, [make_lazy(p, axis, ranges) for p in plain]


SCHEDULERS = {
    "DPMSolverMultistep (PixArt)": lambda d: d.DPMSolverMultistepScheduler(),
    "DDIM (DiT)": lambda d: d.DDIMScheduler(),
    "FlowMatchEulerDiscrete (SD3, Flux)": lambda d: d.FlowMatchEulerDiscreteScheduler(shift=3.0),
    "UniPCMultistep (Wan)": lambda d: d.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                                 use_flow_sigmas=True, flow_shift=3.0),
    "EulerDiscrete": lambda d: d.EulerDiscreteScheduler(),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_steps_on_lazy_outputs_equal_plain_ones_bit_for_bit(name):
    """A diffusers scheduler stepping a lazy model output gives the plain output's latents bit for bit (the
    last rank steps plain outputs, the others lazy ones); which of its ops materialize is recorded."""
    import diffusers

    shape, axis, ranges, steps = (1, 4, 8, 8), 2, [(0, 2), (2, 4), (4, 6), (6, 8)], 6
    plain_out, lazy_out = _lazy_model_outputs(shape, axis, ranges, steps, seed=3)
    results, forced = [], []
    for outs in (plain_out, lazy_out):
        sched = SCHEDULERS[name](diffusers)
        sched.set_timesteps(steps)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * getattr(sched, "init_noise_sigma", 1.0)
        before = dict(lazy.MATERIALIZED)
        for t, out in zip(sched.timesteps, outs):
            scale = getattr(sched, "scale_model_input", lambda x, t: x)
            latents = sched.step(out, t, scale(latents, t)).prev_sample
        forced.append({k: v - before.get(k, 0) for k, v in lazy.MATERIALIZED.items() if v != before.get(k, 0)})
        results.append(latents.materialize() if isinstance(latents, LazyTensor) else latents)
    assert torch.equal(results[0], results[1])
    if name != "UniPCMultistep (Wan)":   # UniPC's corrector combines past outputs with an einsum: it waits
        assert forced[1] == {}, f"{name}: {forced[1]} waited for whole outputs"


def test_compiled_graphs_resolve_lazy_inputs_themselves():
    """Dynamo runs a compiled graph with torch-function dispatch of tensor subclasses off, so neither a graph
    the backend runs unchanged nor a pipelined program may leave a lazy input to torch ops: both resolve it."""
    from helpers import compile_pf
    from pipefusion_compile.models import BUILTIN

    w = torch.randn(4, 4, 3, 3)

    def conv_net(x):
        return torch.nn.functional.conv2d(x, w, padding=1)

    x = torch.randn(1, 4, 8, 8)
    compiled, _ = compile_pf(conv_net, num_stages=1)
    compiled(x)
    assert torch.equal(compiled(make_lazy(x, 2, bands_of(8, [4]))), conv_net(x))

    model, kwargs = BUILTIN["DiTTransformer2DModel"]()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    name = next(k for k in ("hidden_states", "x") if k in kwargs)
    x0 = kwargs[name]
    x1 = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t0, t1 = torch.tensor([900]), torch.tensor([800])
    with torch.no_grad():   # warmup, then a pipelined call: with a plain input, and again with a lazy one
        compiled(**{**kwargs, "timestep": t0}, return_dict=False)
        want = compiled(**{**kwargs, name: x1, "timestep": t1}, return_dict=False)[0]
        pipefusion_reset(compiled)
        compiled(**{**kwargs, "timestep": t0}, return_dict=False)
        got = compiled(**{**kwargs, name: make_lazy(x1, 2, bands_of(x1.shape[2], [x1.shape[2] // 2])),
                          "timestep": t1}, return_dict=False)[0]
    assert programs[-1] is programs[0]   # dynamo's retrace for the lazy input got the same program
    assert programs[0].stats["pipelined_calls"] == 2
    assert not torch.isnan(got).any() and torch.equal(got, want)
