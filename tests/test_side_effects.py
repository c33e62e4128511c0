"""In-place writes (`setitem`, `copy_`, `add_`, ...) survive every extraction: analyses, graph passes and
end-to-end numerics against the plain model (issue: dropped writes gave silently wrong results)."""
import operator

import pytest
import torch

from graph_utils import capture_model
from helpers import call_model, compile_pf, sample_loop
from pipefusion_compile.errors import PipefusionError
from pipefusion_compile.models import cogvideox, ltx_video
from pipefusion_compile.options import PipefusionOptions
from pipefusion_compile.passes.lower import lower
from pipefusion_compile.passes.side_effects import alias_root, check_kept, is_mutating, mutated_operand
from pipefusion_compile.plan import build_plan
from toy_models import ToyDiTCountingCalls, ToyDiTWritingItsTable


def _ltx_with_rope_scale(**kw):
    model, kwargs = ltx_video(**kw)
    kwargs["rope_interpolation_scale"] = (0.5, 1.0, 1.0)  # as LTXPipeline passes it: the RoPE grid is scaled in place
    return model, kwargs


def _cogvideox_other_resolution(**kw):
    model, _ = cogvideox()                  # built for 8 x 8 latents
    _, kwargs = cogvideox(height=12, **kw)  # called at 12 x 8: the joint positional table is rebuilt in place
    return model, kwargs


def _toy(cls):
    def make(**_):
        torch.manual_seed(0)
        return cls().eval(), {"hidden_states": torch.randn(1, 4, 16, 16)}
    return make


CASES = {
    "ltx_rope_scale": (_ltx_with_rope_scale, {}),
    "cogvideox_new_resolution": (_cogvideox_other_resolution, {"token_axis": 1}),
    "toy_table": (_toy(ToyDiTWritingItsTable), {}),
}


def _lowered(make, options, stages):
    model, kwargs = make()
    gm, example_inputs = capture_model(model, kwargs)
    opts = PipefusionOptions.from_dict({"num_stages": stages, "num_patches": 2, **options}).resolve()
    plan, analysis = build_plan(gm, example_inputs, opts)
    return gm, lower(gm, plan, analysis, shared_inputs=True)


# --------------------------------------------------------------------------------------------- analysis


def test_mutation_targets_and_alias_roots():
    gm, _ = capture_model(*_cogvideox_other_resolution())
    writes = [n for n in gm.graph.nodes if mutated_operand(n) is not None]
    assert [w.target for w in writes] == ["copy_"]
    root = alias_root(mutated_operand(writes[0]))   # copy_(getitem(_get_data_attr(new_zeros(...))))
    assert root.target == "new_zeros"
    gm, _ = capture_model(*_ltx_with_rope_scale())
    writes = [n for n in gm.graph.nodes if mutated_operand(n) is not None]
    assert len(writes) == 3 and all(w.target is operator.setitem for w in writes)
    assert len({alias_root(mutated_operand(w)) for w in writes}) == 1  # the one RoPE grid


# --------------------------------------------------------------------------------------------- passes


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("stages", [2, 3])
def test_every_write_is_in_the_globals_of_each_stage_that_reads_its_target(name, stages):
    make, options = CASES[name]
    gm, lowered = _lowered(make, options, stages)
    writes = {n.name for n in gm.graph.nodes if mutated_operand(n) is not None}
    assert writes
    for st in lowered:
        kept = {n.name for n in st.globals_gm.graph.nodes}
        roots = {alias_root(mutated_operand(n)).name for n in gm.graph.nodes if n.name in writes}
        if roots & kept:
            assert writes <= kept, f"stage {st.index} reads a written table but lost {writes - kept}"
            order = [n.name for n in st.globals_gm.graph.nodes]
            readers = [i for i, n in enumerate(st.globals_gm.graph.nodes)
                       if any(a.name in roots for a in n.all_input_nodes) and not is_mutating(n)]
            assert max(order.index(w) for w in writes) < max(readers), "a write must stay before the last read"
    assert any(writes <= {n.name for n in st.globals_gm.graph.nodes} for st in lowered)


def test_write_into_a_buffer_is_applied_once_per_step_in_simulate_mode():
    model, kwargs = _toy(ToyDiTCountingCalls)()
    gm, example_inputs = capture_model(model, kwargs)
    opts = PipefusionOptions.from_dict({"num_stages": 3, "num_patches": 2}).resolve()
    plan, analysis = build_plan(gm, example_inputs, opts)
    for shared, expected in ((True, 1), (False, 3)):
        stages = lower(gm, plan, analysis, shared_inputs=shared)
        count = sum(1 for st in stages for n in st.globals_gm.graph.nodes if n.target == "add_")
        assert count == expected  # one process: once; one process per stage: each applies it to its copy


def test_verifier_fails_loudly_when_a_write_is_dropped():
    make, options = CASES["ltx_rope_scale"]
    gm, lowered = _lowered(make, options, 2)
    check_kept(gm, [g for st in lowered for g in (st.globals_gm, st.stage_gm)], "test")  # the real lowering: ok
    dropped = next(n for n in lowered[0].globals_gm.graph.nodes if n.target is operator.setitem)
    lowered[0].globals_gm.graph.erase_node(dropped)
    for st in lowered[1:]:
        for n in list(st.globals_gm.graph.nodes):
            if n.name == dropped.name:
                st.globals_gm.graph.erase_node(n)
    with pytest.raises(PipefusionError, match=f"in-place write {dropped.name} was dropped"):
        check_kept(gm, [g for st in lowered for g in (st.globals_gm, st.stage_gm)], "test")


# --------------------------------------------------------------------------------------------- numerics


# LTXPipeline and CogVideoXPipeline at a second resolution run the same models in tests/test_pipelines.py
@pytest.mark.parametrize("name", ["toy_table"])
@pytest.mark.parametrize("stages", [1, 3])
def test_one_patch_equals_plain_model_with_writes(name, stages):
    make, options = CASES[name]
    model, kwargs = make()
    if "timestep" not in kwargs:
        with torch.no_grad():
            want = model(**kwargs, return_dict=False)[0]
        compiled, _ = compile_pf(model, num_stages=stages, num_patches=1, stage_backend="eager", **options)
        with torch.no_grad():
            got = compiled(**kwargs, return_dict=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    _, want = sample_loop(call_model(model), kwargs, steps=3)
    compiled, _ = compile_pf(model, num_stages=stages, num_patches=1, stage_backend="eager", **options)
    _, got = sample_loop(call_model(compiled), kwargs, steps=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages", [2, 3])
def test_counting_buffer_matches_eager_call_by_call(stages):
    model, kwargs = _toy(ToyDiTCountingCalls)()
    plain, _ = _toy(ToyDiTCountingCalls)()
    compiled, programs = compile_pf(model, num_stages=stages, num_patches=1, stage_backend="eager")
    with torch.no_grad():
        for _ in range(3):
            want = plain(**kwargs, return_dict=False)[0]
            got = compiled(**kwargs, return_dict=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert model.calls.item() == plain.calls.item()
    assert programs and programs[0].plan.num_stages == stages
