"""A latent passed as a list of per-sample tensors (one graph input per element): every element is patched
alike, a patch being the same band of rows of each sample (tests/input_models.py: ListLatent stacks the
samples; ListTokensCat patchifies each sample, concatenates their tokens along the token axis, splits them
back and batches them with pad_sequence, and returns a list)."""
import torch

import input_models as im
from helpers import compile_pf, raised
from reference_pipefusion import ImageLayout, ReferencePipeFusion
from pipefusion_compile.errors import UnsupportedGraphError
from pipefusion_compile.passes.graph_inputs import InputMatch, image_input_candidates
from pipefusion_compile.passes.meta import node_meta
from pipefusion_compile.passes.tokens import analyze_tokens

CTX_SEED = 3


def _make(cls, batch=2):
    torch.manual_seed(0)
    model = cls().eval()
    xs = model.example(batch)
    return model, xs, torch.randn(batch, *im.CONTEXT, generator=torch.Generator().manual_seed(CTX_SEED))


def _analyzed(model, xs, ctx):
    """(candidates, analysis, graph) as the backend sees them (dynamo's sources, which say "an element of a
    list", live only while it compiles)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((image_input_candidates(gm, example_inputs)[1], analyze_tokens(gm, example_inputs), gm))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(xs, torch.full((len(xs),), 500), ctx)
    (found,) = seen
    return found


def _as_tensor(out):
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


def _loop(fn, model, xs, steps=4):
    """A sampling loop over a list latent: each step's output, the latent updated sample by sample."""
    outs = []
    with torch.no_grad():
        for t in torch.linspace(900, 100, steps).long():
            out = fn(xs, t.expand(len(xs)))
            outs.append(_as_tensor(out))
            update = _as_tensor(out) if isinstance(out, (list, tuple)) else out
            xs = [0.9 * x + 0.1 * u for x, u in zip(xs, update.unbind(0))]
    return outs


class _Adapter(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, context, return_dict=False):
        return (self.model(hidden_states, timestep, context),)


# ---------------------------------------------------------------------------------------------- analysis
def test_list_elements_are_one_image_input_patched_alike():
    model, xs, ctx = _make(im.ListLatent)
    candidates, a, _ = _analyzed(model, xs, ctx)
    (listed,) = [c for c in candidates if c.is_list]
    assert listed.argument == "hidden_states" and listed.elements == ("l_hidden_states_0_", "l_hidden_states_1_")
    assert listed.match is InputMatch.SAME_BUT_CHANNELS and listed.shape == (4, 8, 12)
    # an element [C, H, W] has no batch dim: its rows are axis 1, 4 token rows of a patch-2 embedding
    assert (a.token_input, a.input_axis, a.token_rows) == ("l_hidden_states_0_", 1, 4)
    assert a.patched_inputs == ["l_hidden_states_0_", "l_hidden_states_1_"] and len(a.self_attention) == 4


def test_samples_concatenated_on_the_token_axis_are_folded_and_split_back():
    model, xs, ctx = _make(im.ListTokensCat)
    _, a, gm = _analyzed(model, xs, ctx)
    assert (a.token_input, a.input_axis, a.token_rows, len(a.self_attention)) == ("l_hidden_states_0_", 1, 4, 4)
    infos = {n.name: node_meta(n).token for n in gm.graph.nodes if node_meta(n).token is not None}
    cat = next(n for n in gm.graph.nodes if n.target is torch.cat)
    # [2 * 24, 16]: two blocks of 24 tokens (4 rows of 6), sample-major
    assert (infos[cat.name].rule, infos[cat.name].outer, infos[cat.name].axis, infos[cat.name].epr) == (
        "cat-samples", 2, 0, 6)
    # the per-token table tiled per sample is positional, folded alike
    pos = [n for n in gm.graph.nodes if infos.get(n.name) is not None and infos[n.name].rule.startswith("positional")]
    assert [infos[n.name].outer for n in pos] == [2]
    split = next(n for n in gm.graph.nodes if infos.get(n.name) is not None and infos[n.name].rule == "split-samples")
    assert [(e.outer, e.axis, e.epr) for e in infos[split.name].elements] == [(1, 0, 3), (1, 0, 3)]
    pad = next(n for n in gm.graph.nodes if n.target is torch._C._nn.pad_sequence)
    assert (infos[pad.name].rule, infos[pad.name].axis, infos[pad.name].outer) == ("pad-sequence-stack", 1, 1)


def test_list_elements_of_different_shapes_are_refused_naming_the_argument():
    """Samples of different shapes would not be cut into bands that line up: refused, naming the list."""
    torch.manual_seed(0)
    model = im.ListLatent().eval()
    xs = [torch.randn(4, 8, 12), torch.randn(4, 8, 14)]
    ctx = torch.randn(2, *im.CONTEXT)

    def cropped(hidden_states, timestep, context):  # the wider sample cropped to the other's width
        return model([hidden_states[0], hidden_states[1][:, :, :12]], timestep, context)

    compiled, _ = compile_pf(cropped, num_stages=2, stage_backend="eager")
    err = raised(compiled, xs, torch.full((2,), 500), ctx)
    assert isinstance(err, UnsupportedGraphError)
    text = str(err)
    assert "the list argument `hidden_states`: 2 per-sample tensors" in text and "one shape" in text
    assert "hidden_states[0] [4, 8, 12], hidden_states[1] [4, 8, 14]" in text


# ---------------------------------------------------------------------------------------------- graph pass
def test_the_split_into_samples_is_lowered_without_measuring_the_blocks():
    model, xs, ctx = _make(im.ListTokensCat)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
    with torch.no_grad():
        compiled(xs, torch.full((2,), 500), ctx)
    stage = next(s for s in programs[0].stages if any(
        n.target == "unbind" for n in s.lowered.patch_graph(1).graph.nodes))
    g = stage.lowered.patch_graph(1).graph
    assert not any(n.target in ("split", "split_with_sizes", torch.split) for n in g.nodes)
    unflat = next(n for n in g.nodes if n.target == "unflatten")
    assert unflat.args[1:] == (0, (2, -1))
    unbind = next(n for n in g.nodes if n.target == "unbind")
    assert unbind.args == (unflat, 0)
    assert any(n.target is torch._C._nn.pad_sequence for n in g.nodes)


# ---------------------------------------------------------------------------------------------- numerics
def _check_numerics(cls, layout):
    model, xs, ctx = _make(cls)
    plain = _loop(lambda x, t: model(x, t, ctx), model, xs)
    for patches, warmup in ((1, 1), (4, 4)):
        compiled, programs = compile_pf(model, num_stages=2, num_patches=patches, warmup_steps=warmup,
                                        stage_backend="eager")
        got = _loop(lambda x, t: compiled(x, t, ctx), model, xs)
        assert programs and programs[0].plan.num_patches == patches
        for g, w in zip(got, plain):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    reference = ReferencePipeFusion(_Adapter(model), num_patches=4, warmup_steps=1, layout=layout)
    want = _loop(lambda x, t: reference(x, timestep=t, context=ctx), model, xs)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
    got = _loop(lambda x, t: compiled(x, t, ctx), model, xs)
    assert programs[0].stats["pipelined_calls"] == 3
    assert reference.layers_seen == 4  # the reference did assemble stale K/V for every self-attention
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # stale K/V make a difference, so equality with the reference is not equality with the plain model
    assert any((g - p).abs().max() > 1e-4 for g, p in zip(got[1:], plain[1:]))


def test_stacked_list_latent_pipelines_and_equals_the_reference():
    model = im.ListLatent()
    _check_numerics(im.ListLatent, ImageLayout(*model.layout()))


def test_list_latent_with_samples_folded_into_the_tokens_pipelines_and_equals_the_reference():
    model = im.ListTokensCat()
    _check_numerics(im.ListTokensCat, ImageLayout(*model.layout()))


def test_a_list_latent_graph_without_attention_runs_unchanged():
    """A graph piece that reads a list latent but holds no self-attention (a model cut by graph breaks: its
    embedding alone) passes the analysis on every axis without self-attention: it runs unchanged, declined."""
    import pipefusion_compile

    class Batch(torch.nn.Module):   # Z-Image's padding of its embedded samples into a batch
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((16,), 2.0))

        def forward(self, xs):
            return torch.nn.utils.rnn.pad_sequence(list(xs), batch_first=True) * self.scale

    torch.manual_seed(0)
    model = Batch().eval()
    xs = [torch.randn(24, 16), torch.randn(24, 16)]   # packed per-sample tokens (Z-Image's embedded samples)
    compiled, programs = compile_pf(model, num_stages=2, stage_backend="eager")
    with torch.no_grad():
        got, want = compiled(xs), model(xs)   # [2, 24, 16]
    assert not pipefusion_compile.programs(compiled)
    (record,) = pipefusion_compile.declined(compiled)
    assert "no self-attention over the" in record.reason, record.reason
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_list_latent_at_a_second_shape_is_still_one_image_input():
    """The second resolution makes dynamo hand over a graph with symbolic sizes, planned per shape at call
    time, when dynamo's sources are gone: the list's elements are still one image input (recorded while the
    sources lived), so it pipelines; with warmup over every step it equals the plain model."""
    import pipefusion_compile

    torch.manual_seed(0)
    model = im.ListTokensCat().eval()
    ctx = torch.randn(2, *im.CONTEXT)
    small, large = model.example(2), model.example(2, height=12)
    plain = _loop(lambda x, t: model(x, t, ctx), model, large, steps=3)
    for warmup in (1, 3):
        torch._dynamo.reset()
        compiled, _ = compile_pf(model, num_stages=2, num_patches=2, warmup_steps=warmup, stage_backend="eager")
        _loop(lambda x, t: compiled(x, t, ctx), model, small, steps=2)
        got = _loop(lambda x, t: compiled(x, t, ctx), model, large, steps=4 if warmup == 1 else 3)
        programs = pipefusion_compile.programs(compiled)
        assert {p.plan.input_shape for p in programs} == {(4, 8, 12), (4, 12, 12)}
        if warmup == 1:
            assert any(p.plan.input_shape == (4, 12, 12) and p.stats["pipelined_calls"] for p in programs)
        else:
            for g, w in zip(got, plain):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
