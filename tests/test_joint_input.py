"""A graph after a graph break that receives a joint token sequence as one input (`passes/joint_input.py`), and
a graph whose self-attention mixes only tokens returned inside a joint context (`passes/context_graphs.py`)."""
import pytest
import torch

import pipefusion_compile
from helpers import call_model, compile_pf, raised, sample_loop
from joint_input_models import ContextRefiner, make_joint_input_dit
from pipefusion_compile.passes.graph_inputs import image_input_candidates, output_shape
from pipefusion_compile.passes.joint_input import JointInput, find_joint_inputs
from pipefusion_compile.passes.meta import node_meta
from pipefusion_compile.passes.pieces import BAND, HEAD, TAIL, Piece
from pipefusion_compile.passes.tokens import analyze_tokens
from reference_pipefusion import ImageLayout, ReferencePipeFusion

OTHERS = 3  # two registers and the time token


def _block_graph(model, kwargs):
    """The dynamo graph after the break (the one that holds the blocks) and its example inputs."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**kwargs)
    return next((gm, ex) for gm, ex in seen
                if any(n.target is torch._C._nn.scaled_dot_product_attention for n in gm.graph.nodes))


@pytest.mark.parametrize("first", [True, False])
def test_analysis_seeds_the_joint_input_with_the_other_tokens_as_a_group(first):
    gm, ex = _block_graph(*make_joint_input_dit(first))
    out, candidates = image_input_candidates(gm, ex)
    (joint,) = find_joint_inputs(gm, candidates, out)
    assert joint == JointInput(joint.name, 1, OTHERS if first else 0, 0 if first else OTHERS, joint.evidence,
                               64 + OTHERS)
    assert joint.image_tokens == 64
    analysis = analyze_tokens(gm, ex, num_patches=4)
    assert analysis.joint_input == joint and analysis.token_input == joint.name
    assert analysis.input_rows == 64 and analysis.token_rows == 8 and len(analysis.self_attention) == 2
    ph = next(n for n in gm.graph.nodes if n.name == joint.name)
    info = node_meta(ph).token
    assert (info.prefix, info.suffix) == ((OTHERS, 0) if first else (0, OTHERS))
    # the per-joint-token tables are positional over the whole joint sequence, sliced per piece like it
    positional = [node_meta(n).token for n in gm.graph.nodes if n.name in analysis.positional]
    assert positional and all(p.prefix + p.suffix == OTHERS for p in positional)
    # the slice the output reads is exactly the image group
    evidence = node_meta(next(n for n in gm.graph.nodes if n.name == joint.evidence)).token
    assert not evidence.joint and evidence.epr == 1


def test_a_slice_through_the_middle_is_no_joint_input():
    model, kwargs = make_joint_input_dit(True, image_slice=slice(1, 65))
    gm, ex = _block_graph(model, kwargs)
    out, candidates = image_input_candidates(gm, ex)
    assert find_joint_inputs(gm, candidates, out) == []
    compiled, _ = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    torch._dynamo.reset()
    raised(compiled, **kwargs)


@pytest.mark.parametrize("first", [True, False])
def test_pieces_read_their_part_of_the_joint_input(first):
    model, kwargs = make_joint_input_dit(first)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(**kwargs)
    (program,) = [p for p in programs if hasattr(p, "plan")]
    assert program.plan.text == ("first" if first else "last")
    stage0 = program.stages[0].lowered
    band = stage0.piece_graph(Piece(BAND, 2, 2))
    (image,) = [i for i in band.inputs if i.source == "image"]
    assert (image.prefix, image.suffix) == ((OTHERS, 0) if first else (0, OTHERS))
    assert image.token_range(8, Piece(BAND, 2, 2)) == ((OTHERS if first else 0) + 16, 16)
    side = HEAD if first else TAIL
    other = stage0.piece_graph(next(p for p in program.plan.pieces(pipelined=True) if p.kind == side))
    (image,) = [i for i in other.inputs if i.source == "image"]
    x = torch.arange(64 + OTHERS)[None, :, None]
    want = x[:, :OTHERS] if first else x[:, 64:]
    assert torch.equal(image.narrow(x, 8, next(p for p in program.plan.pieces(True) if p.kind == side)), want)


@pytest.mark.parametrize("first", [True, False])
def test_m1_equals_the_plain_model(first):
    model, kwargs = make_joint_input_dit(first)
    _, want = sample_loop(call_model(model), kwargs, steps=3)
    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, got = sample_loop(call_model(compiled), kwargs, steps=3)
    assert [p for p in programs if hasattr(p, "plan")]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first", [True, False])
def test_m4_equals_the_eager_reference(first):
    model, kwargs = make_joint_input_dit(first)
    reference = ReferencePipeFusion(model, num_patches=4, warmup_steps=1, text_tokens=OTHERS, text_first=first,
                                    layout=ImageLayout(8, 8, 2, 2))
    _, want = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=4)
    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    _, got = sample_loop(call_model(compiled), kwargs, steps=4)
    (program,) = [p for p in programs if hasattr(p, "plan")]
    assert program.stats["pipelined_calls"] == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_graph_refining_only_a_joint_context_runs_unchanged():
    torch.manual_seed(0)
    model = ContextRefiner().eval()
    kwargs = dict(hidden_states=torch.randn(2, 4, 16, 16), prompt=torch.randn(2, 6, 16),
                  image_embeds=torch.randn(2, 4, 8))
    want = model(**kwargs)
    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    with torch.no_grad():
        got = compiled(**kwargs)
    assert not [p for p in programs if hasattr(p, "plan")]
    (record,) = pipefusion_compile.declined(compiled)
    assert "only inside a joint sequence" in record.reason
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_a_joint_attention_graph_returning_a_joint_stream_still_fails():
    """A graph whose self-attention is over [other tokens | image] and that returns that joint sequence (a
    break in the middle of the blocks) is the image stream: refused, not run unchanged."""

    class JointStream(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.refiner = ContextRefiner()

        def forward(self, hidden_states, prompt, image_embeds):
            context, image = self.refiner(hidden_states, prompt, image_embeds)
            joint = torch.cat([context, image], dim=1)
            q = k = v = joint.unflatten(-1, (2, -1)).transpose(1, 2)
            return joint + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    torch.manual_seed(0)
    compiled, _ = compile_pf(JointStream().eval(), num_stages=1, num_patches=4, stage_backend="eager")
    torch._dynamo.reset()
    err = raised(compiled, hidden_states=torch.randn(2, 4, 16, 16), prompt=torch.randn(2, 6, 16),
                 image_embeds=torch.randn(2, 4, 8))
    assert "text tokens of a joint sequence" in str(err)
