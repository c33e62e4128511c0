"""Graphs with unbacked (data-dependent) sizes: a prompt cut to `int(mask.sum())` tokens or gathered by
`torch.nonzero(mask)` (tests/unbacked_models.py), traced into one graph under dynamo's
`capture_scalar_outputs` / `capture_dynamic_output_shape_ops`. The backend specializes the graph to the sizes
of each call and guards them: every call computes them again from the mask, and a call with other sizes gets
its own program."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

import handwritten_dits as hd
import unbacked_models as um
from graph_utils import capture_graphs
from helpers import call_model, compile_pf, raised, sample_loop
from pipefusion_compile.errors import UnsupportedGraphError
from pipefusion_compile.passes.specialize import specialize
from pipefusion_compile.passes.unbacked import UnbackedGuard, UnbackedSizeError, has_unbacked
from pipefusion_compile.shapes import ShapeDispatcher
from reference_pipefusion import ReferencePipeFusion, bands

MAKERS = {"mask_sum": um.make_mask_sum_dit, "nonzero": um.make_nonzero_dit}
STEPS = 4  # one warmup step, then three pipelined


@pytest.fixture(autouse=True)
def unbacked_config():
    with torch._dynamo.config.patch(**um.UNBACKED_CONFIG):
        yield


def graph_of(model, kwargs):
    (gm, example_inputs), = capture_graphs(model, **kwargs)
    return gm, example_inputs


def call_args(gm, example_inputs, kwargs):
    """The graph's inputs for a call with `kwargs` (the parameters as dynamo passed them)."""
    user = {f"l_{k}_": v for k, v in kwargs.items()}
    return [user.get(ph.name, ex) for ph, ex in zip(gm.graph.find_nodes(op="placeholder"), example_inputs)]


def unbacked_sizes(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if isinstance(n.meta.get("example_value"), torch.Tensor)
            and any(not isinstance(s, int) for s in n.meta["example_value"].shape)]


# ---------------------------------------------------------------------------------------------------------
# the graph: the guard's slice, the specialized graph


def test_mask_sum_graph_specializes_to_the_calls_prompt_length():
    model, kwargs = um.make_mask_sum_dit(keep=4)
    gm, example_inputs = graph_of(model, kwargs)
    assert has_unbacked(gm) and unbacked_sizes(gm)
    guard = UnbackedGuard(gm)
    # the slice: the mask's sum and max, its item(), the prompt's slice; nothing of the transformer
    assert [n.name for n in guard.slice if n.op not in ("placeholder",)] == ["sum_1", "max_1", "item", "getitem"]
    assert [s.node.name for s in guard.symbols] == ["item", "getitem"]
    args = call_args(gm, example_inputs, kwargs)
    values = guard.values(args)
    assert values.key == (4, 4)
    static = specialize(gm, args, values)
    assert not has_unbacked(static) and not unbacked_sizes(static)
    nodes = {n.name: n for n in static.graph.nodes}
    assert not {"item", "sum_1", "max_1", "sym_size_int"} & set(nodes)  # folded, and what fed them removed
    assert not any(n.target is torch.ops.aten._assert_scalar.default for n in static.graph.nodes)
    assert nodes["getitem"].args[1] == (slice(None), slice(None, 4))
    assert list(nodes["txt"].meta["example_value"].shape) == [2, 4, hd.DIM]
    with torch.no_grad():
        torch.testing.assert_close(static(*args)[0], gm(*args)[0], rtol=0, atol=0)
    # other values of the mask: another key, another graph (the guard's values, never the first call's)
    other = call_args(gm, example_inputs, {**kwargs, "encoder_attention_mask": um.prompt_mask(2)})
    assert guard.values(other).key == (2, 2)
    assert specialize(gm, other, guard.values(other)).graph.find_nodes(
        op="call_function", target=torch.ops.aten.sym_size.int) == []


def test_nonzero_stays_in_the_graph_with_a_static_size():
    model, kwargs = um.make_nonzero_dit(keep=4)
    gm, example_inputs = graph_of(model, kwargs)
    guard = UnbackedGuard(gm)
    assert [s.node.name for s in guard.symbols] == ["nonzero"]
    assert [n.name for n in guard.slice if n.op != "placeholder"] == ["getitem", "nonzero"]
    args = call_args(gm, example_inputs, kwargs)
    static = specialize(gm, args, guard.values(args))
    assert not unbacked_sizes(static)
    (nonzero,) = static.graph.find_nodes(op="call_function", target=torch.nonzero)  # its output is data
    assert list(nonzero.meta["example_value"].shape) == [4, 1]
    with torch.no_grad():
        torch.testing.assert_close(static(*args)[0], gm(*args)[0], rtol=0, atol=0)


def test_specializing_without_the_guards_values_is_refused():
    model, kwargs = um.make_nonzero_dit()
    gm, example_inputs = graph_of(model, kwargs)
    with pytest.raises(UnsupportedGraphError, match="guard did not evaluate"):
        specialize(gm, call_args(gm, example_inputs, kwargs))


# ---------------------------------------------------------------------------------------------------------
# numerics


def dispatcher(programs) -> ShapeDispatcher:
    (fn,) = programs  # one dynamo graph for every mask
    assert isinstance(fn, ShapeDispatcher)
    return fn


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_one_patch_equals_plain_model_every_step(name):
    model, kwargs = MAKERS[name]()
    _, want_steps = sample_loop(call_model(model), kwargs, steps=STEPS)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, got_steps = sample_loop(call_model(compiled), kwargs, steps=STEPS)
    (program,) = dispatcher(programs).programs.values()
    assert program.stats["pipelined_calls"] > 0
    for got, want in zip(got_steps, want_steps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_stale_kv_equals_eager_reference(name):
    model, kwargs = MAKERS[name](keep=4)
    reference = ReferencePipeFusion(model, num_patches=4, text_tokens=4, text_first=True)
    want_final, want_steps = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=STEPS)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    got_final, got_steps = sample_loop(call_model(compiled), kwargs, steps=STEPS)
    (program,) = dispatcher(programs).programs.values()
    assert program.stats["pipelined_calls"] > 0 and program.plan.patches == tuple(bands(8, 4))
    for got, want in zip(got_steps, want_steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the guard: other masks, other programs


def cfg_loop(cond_fn, uncond_fn, kwargs, steps=STEPS, guidance=3.0):
    """Two calls per step with the same timestep, the second with a shorter prompt mask (a negative prompt)."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    latents = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    outs = []
    with torch.no_grad():
        for t in sched.timesteps:
            tt = t.expand(latents.shape[0]).to(kwargs["timestep"].dtype)
            cond = cond_fn(latents, tt, **rest)
            uncond = uncond_fn(latents, tt, **{**rest, "encoder_attention_mask": um.prompt_mask(2)})
            outs += [cond, uncond]
            latents = sched.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
    return latents, outs


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_two_masks_two_programs_both_equal_plain_model(name):
    model, kwargs = MAKERS[name](keep=4)
    want_final, want = cfg_loop(call_model(model), call_model(model), kwargs)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    got_final, got = cfg_loop(call_model(compiled), call_model(compiled), kwargs)
    found = dispatcher(programs).programs
    assert len(found) == 2  # prompt lengths 4 and 2
    assert sorted(p.stats["pipelined_calls"] for p in found.values()) == [STEPS - 1, STEPS - 1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_final, want_final, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_two_masks_pipelined_equal_a_reference_per_mask(name):
    model, kwargs = MAKERS[name](keep=4)
    refs = [ReferencePipeFusion(model, num_patches=4, text_tokens=n, text_first=True) for n in (4, 2)]
    want_final, want = cfg_loop(*(lambda x, t, _r=r, **kw: _r(x, timestep=t, **kw) for r in refs), kwargs)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    got_final, got = cfg_loop(call_model(compiled), call_model(compiled), kwargs)
    assert len(dispatcher(programs).programs) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)


def test_same_sizes_other_mask_reuses_the_program_and_reads_the_new_mask():
    """`nonzero` of a mask keeping other tokens, as many: the same sizes, so the same program, which computes the
    nonzero again (it is data): the result is the plain model's at the new mask, not at the first."""
    model, kwargs = um.make_nonzero_dit(keep=4)
    moved = torch.zeros_like(kwargs["encoder_attention_mask"])
    moved[:, 2:] = True  # tokens 2..5 instead of 0..3
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    with torch.no_grad():
        for mask in (kwargs["encoder_attention_mask"], moved):
            call = {**kwargs, "encoder_attention_mask": mask}
            torch.testing.assert_close(compiled(**call, return_dict=False)[0], model(**call, return_dict=False)[0],
                                       rtol=1e-5, atol=1e-6)
    assert len(dispatcher(programs).programs) == 1


def test_coverage_case_runs_under_its_dynamo_config():
    """A coverage Case's `dynamo_config` is what its compiled calls run under: with the unbacked-size flags the
    toy is one graph, pipelined and equal to the reference; without them dynamo breaks the graph at the item()."""
    from coverage_cases import UNBACKED_SIZES, Case
    from coverage_runner import run_case

    case = Case("MaskSumDiT", um.make_mask_sum_dit, text_tokens=4, text_first=True, dynamo_config=UNBACKED_SIZES)
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        row = run_case(case, stages=2, patches=4, steps=2)
        assert row.graphs == "1 graph, 0 breaks", row
        assert (row.m1_equal_plain, row.m4_equal_reference) == ("yes", "yes"), row.error
        plain = run_case(Case("MaskSumDiT", um.make_mask_sum_dit, text_tokens=4, text_first=True), stages=2,
                         patches=4, steps=2)
    assert plain.graphs != "1 graph, 0 breaks", plain


# ---------------------------------------------------------------------------------------------------------
# refusals


class FloatScalarDiT(hd.HandMMDiT):
    """Reads a tensor's value as a float that scales the prompt (data, not a size)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        scale = encoder_attention_mask.float().mean().item()
        return super().forward(hidden_states, timestep, encoder_hidden_states * scale, return_dict)


def test_an_unbacked_float_is_refused_naming_its_node():
    torch.manual_seed(0)
    model = FloatScalarDiT().eval()
    _, kwargs = um.make_mask_sum_dit()
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    err = raised(compiled, **kwargs)
    assert isinstance(err, UnbackedSizeError)
    assert "Python float" in str(err) and "item" in str(err) and "capture_scalar_outputs" in str(err)
    assert "encoder_attention_mask.float().mean().item()" in str(err)
