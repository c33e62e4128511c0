"""Call streams (CFG as two transformer calls per step) and several input shapes in one process, with
default torch.compile settings (dynamo's automatic dynamic shapes hand the backend symbolic sizes)."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler

import pipefusion_compile
from helpers import call_model, compile_pf, sample_loop
from pipefusion_compile.models import cogvideox, dit, flux, hunyuan_dit, ltx_video, pixart, sd3, wan
from pipefusion_compile.passes.specialize import is_symbolic, specialize
from graph_utils import capture_graphs


def cfg_two_calls(model_fn, kwargs, negative, steps=3, seed=1, guidance=3.0):
    """A DDIM loop that calls the model twice per step with the same timestep (conditional, then
    unconditional prompt), as WanPipeline and Flux's true CFG do."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    latents = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    t_dtype = kwargs["timestep"].dtype
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.expand(latents.shape[0]).to(t_dtype)
            cond = model_fn(latents, tt, **rest)
            uncond = model_fn(latents, tt, **{**rest, **negative})
            eps = uncond + guidance * (cond - uncond)
            eps = eps.chunk(2, dim=1)[0] if eps.shape[1] == 2 * latents.shape[1] else eps
            latents = sched.step(eps, t, latents).prev_sample
    return latents


class _TwoCopies:
    """Conditional calls to one compiled copy, unconditional calls to another."""

    def __init__(self, model, **options):
        self.copies = [compile_pf(copy.deepcopy(model), **options)[0] for _ in range(2)]
        self.calls = 0

    def __call__(self, latents, t, **kw):
        fn = call_model(self.copies[self.calls % 2])
        self.calls += 1
        return fn(latents, t, **kw)


# (tests/test_pipelines.py checks the same through WanPipeline and FluxPipeline's true CFG)
@pytest.mark.parametrize("name", ["wan"])
def test_two_calls_per_step_equal_two_separate_copies(name):
    model, kwargs = {"wan": wan, "flux": flux}[name]()
    negative = {"encoder_hidden_states": torch.randn_like(kwargs["encoder_hidden_states"])}
    options = dict(num_stages=2, num_patches=4 if name == "flux" else 2, stage_backend="eager")
    want = cfg_two_calls(_TwoCopies(model, **options), kwargs, negative)
    compiled, programs = compile_pf(model, **options)
    got = cfg_two_calls(call_model(compiled), kwargs, negative)
    assert torch.equal(got, want)
    stats = programs[0].stats
    assert stats["streams"] == 2 and stats["warmup_calls"] == 2 and stats["pipelined_calls"] == 4
    # one shared stream would differ (the unconditional call attended to the conditional call's K/V)
    assert programs[0].state.stream == 1
    again = cfg_two_calls(call_model(compiled), kwargs, negative)  # a new generation: warmup again per stream
    assert torch.equal(again, want)


# ------------------------------------------------------------------------------------------ shapes

def _variants(name):
    """(factory, [call configs]): the first shape, a second resolution, a batch of 2, the first again."""
    f = {"pixart": pixart, "dit": dit, "ltx_video": ltx_video, "hunyuan_dit": hunyuan_dit, "wan": wan, "sd3": sd3,
         "flux": flux, "cogvideox": cogvideox}[name]
    if name in ("pixart", "dit", "hunyuan_dit", "sd3"):
        return f, [{}, {"sample_size": 24}, {"batch": 2}, {}]
    if name == "ltx_video":
        return f, [{}, {"height": 12}, {"batch": 2}, {}]
    return f, [{}, {"height": 12, "width": 8}, {"batch": 2}, {}]


OPTIONS = {"cogvideox": {"token_axis": 1}}


# the pipelines suite runs every model's pipeline at several shapes; here the transformers alone, an image
# model and a joint [text | video] one (whose positional table is rebuilt in place at a new resolution)
@pytest.mark.parametrize("name", ["pixart", "cogvideox"])
def test_several_shapes_in_one_process_equal_plain_model(name):
    """Default torch.compile settings: the second shape makes dynamo hand over a symbolic graph."""
    factory, configs = _variants(name)
    model, _ = factory()
    compiled, _ = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager", **OPTIONS.get(name, {}))
    for cfg in configs:
        _, kwargs = factory(**cfg)
        _, want = sample_loop(call_model(model), kwargs, steps=2)
        _, got = sample_loop(call_model(compiled), kwargs, steps=2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    found = pipefusion_compile.programs(compiled)
    assert len({p.plan.input_shape for p in found}) == 3  # one program per shape; the first is reused
    assert all(p.plan.num_stages == 2 for p in found)


@pytest.mark.parametrize("name", ["pixart"])
def test_pipelined_at_a_new_shape_equals_a_fresh_compile(name):
    factory, configs = _variants(name)
    model, _ = factory()
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    results = []
    for cfg in configs[:3]:
        _, kwargs = factory(**cfg)
        results.append(sample_loop(call_model(compiled), kwargs, steps=3)[0])
    for cfg, got in zip(configs[:3], results):
        torch._dynamo.reset()
        fresh, _ = compile_pf(copy.deepcopy(model), num_stages=2, num_patches=2, stage_backend="eager")
        _, kwargs = factory(**cfg)
        assert torch.equal(got, sample_loop(call_model(fresh), kwargs, steps=3)[0])


def test_specialize_folds_symbolic_sizes():
    model, kwargs = pixart()
    _, kwargs2 = pixart(batch=2, sample_size=24)
    graphs = capture_graphs(lambda **kw: model(**kw, return_dict=False), **kwargs)
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward)(**kwargs)
        torch.compile(model, backend=lambda gm, ex: graphs.append((gm, ex)) or gm.forward)(**kwargs2)
    gm, example_inputs = graphs[-1]
    assert is_symbolic(gm, example_inputs)
    # the graph's inputs at the second call, as dynamo calls it: sizes as ints, then the tensors
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    user = {"l_hidden_states_": kwargs2["hidden_states"], "l_encoder_hidden_states_": kwargs2["encoder_hidden_states"],
            "l_timestep_": kwargs2["timestep"]}
    args = []
    for ph, ex in zip(placeholders, example_inputs):
        if isinstance(ex, torch.SymInt):
            args.append(None)
        else:
            args.append(user.get(ph.name, ex))
    sizes = {}
    for ph, a in zip(placeholders, args):
        if a is not None:
            for s_sym, s in zip(ph.meta["example_value"].shape, a.shape):
                if isinstance(s_sym, torch.SymInt):
                    sizes[str(s_sym)] = s
    args = [sizes[str(ex)] if isinstance(ex, torch.SymInt) else a for ex, a in zip(example_inputs, args)]
    static = specialize(gm, args)
    assert not is_symbolic(static, args)
    for n in static.graph.nodes:
        assert not any(isinstance(a, torch.fx.Node) and isinstance(a.meta.get("example_value"), int)
                       for a in n.all_input_nodes), n.format_node()
    image = next(ph for ph in static.graph.find_nodes(op="placeholder") if ph.name == "l_hidden_states_")
    assert list(image.meta["example_value"].shape) == [2, 4, 24, 24]
    with torch.no_grad():
        torch.testing.assert_close(static(*args)[0], gm(*args)[0], rtol=0, atol=0)


def test_failed_compile_leaves_no_program():
    """A shape the backend cannot pipeline raises a clear error and leaves nothing in programs()."""
    model, kwargs = pixart()
    compiled, _ = compile_pf(model, num_stages=2, num_patches=8, stage_backend="eager")
    with torch.no_grad():
        compiled(**kwargs, return_dict=False)
        _, small = pixart(sample_size=8)  # 4 token rows: 8 patches do not fit
        with pytest.raises(pipefusion_compile.PipefusionError):
            compiled(**small, return_dict=False)
    found = pipefusion_compile.programs(compiled)
    assert [p.plan.input_shape for p in found] == [tuple(kwargs["hidden_states"].shape)]
