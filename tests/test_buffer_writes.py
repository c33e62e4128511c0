"""A fresh buffer filled by slice writes (`passes/buffer_writes.py`): rewritten as a concatenation when the writes
tile it, left alone (and refused by the analysis, saying why) otherwise; the toy DiT of the class end to end."""
import operator

import pytest
import torch
import torch.nn as nn

from buffer_models import TEXT, make_buffer_joint_dit
from helpers import call_model, compile_pf, raised, sample_loop
from pipefusion_compile.passes.buffer_writes import NOT_CONCATENATION, NotConcatenation, fold_buffer_writes
from pipefusion_compile.passes.graph_inputs import image_input_candidates
from pipefusion_compile.passes.meta import Kind, node_meta
from pipefusion_compile.passes.tokens import analyze_tokens
from reference_pipefusion import ReferencePipeFusion


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _capture(fn, *args):
    """(dynamo's graph of `fn`, for each of its inputs the position of that argument of `fn`)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, [next(i for i, a in enumerate(args) if a is e) for e in example_inputs]))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(Fn(fn), backend=backend, dynamic=False)(*args)
    (found,) = graphs
    return found


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _folded(fn, *args):
    """(graph after the pass, the buffers it rewrote); the rewritten graph computes what `fn` does."""
    gm, order = _capture(fn, *[a.clone() for a in args])
    done = fold_buffer_writes(gm)
    with torch.no_grad():
        got = gm(*[args[i].clone() for i in order])[0]
        torch.testing.assert_close(got, fn(*[a.clone() for a in args]), rtol=0, atol=0)
    return gm, done


def _refusal(fn, *args):
    gm, _ = _capture(fn, *args)
    before = [n.format_node() for n in gm.graph.nodes]
    assert fold_buffer_writes(gm) == []
    assert [n.format_node() for n in gm.graph.nodes] == before   # left exactly as it was
    (buf,) = [n for n in gm.graph.nodes if n.target in ("new_zeros", torch.zeros)]
    return node_meta(buf).extra[NOT_CONCATENATION].reason


TXT, IMG = torch.randn(2, TEXT, 8), torch.randn(2, 16, 8)


def per_sample_text_first(txt, img):
    buf = img.new_zeros(2, TEXT + 16, 8)
    for i in range(2):
        buf[i, :TEXT] = txt[i, :TEXT]
        buf[i, TEXT:] = img[i]
    return buf * 2


def test_per_sample_writes_of_whole_groups_become_one_cat_of_the_batched_values():
    """Before: new_zeros; getitem(txt, (0, :6)); setitem(buf, (0, :6), ...); getitem(img, 0); setitem(buf,
    (0, 6:), ...); the same for sample 1.  After: cat([txt, img], 1), no buffer, no write, no per-sample read."""
    gm, done = _folded(per_sample_text_first, TXT, IMG)
    assert len(done) == 1
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert [a.name for a in cat.args[0]] == ["l_args_0_", "l_args_1_"] and cat.kwargs == {"dim": 1}
    assert operator.setitem not in _targets(gm) and "new_zeros" not in _targets(gm)
    assert operator.getitem not in _targets(gm)   # the per-sample reads were merged into the inputs themselves
    (mul,) = cat.users
    assert mul.target is operator.mul


def test_image_first_and_batched_writes():
    def batched_image_first(txt, img):
        buf = torch.zeros(2, 16 + TEXT, 8)
        buf[:, :16] = img
        buf[:, 16:] = txt
        return buf + 1

    gm, _ = _folded(batched_image_first, TXT, IMG)
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert [a.name for a in cat.args[0]] == ["l_args_1_", "l_args_0_"]


def test_writes_that_cannot_be_merged_across_samples_are_concatenated_per_sample():
    """Sample 0 of the buffer from sample 1 of the sources and the reverse: no batched slice says that, so each
    sample's part gets its batch dim back (unsqueeze) and the samples are concatenated along the batch."""
    def swapped(txt, img):
        buf = img.new_zeros(2, TEXT + 16, 8)
        for i in range(2):
            buf[i, :TEXT] = txt[1 - i]
            buf[i, TEXT:] = img[1 - i]
        return buf * 2

    gm, _ = _folded(swapped, TXT, IMG)
    cats = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert [c.kwargs["dim"] for c in cats] == [1, 1, 0]
    assert _targets(gm).count(torch.unsqueeze) == 4


def test_one_write_of_everything_is_a_copy():
    def whole(img):
        buf = torch.zeros(2, 16, 8)
        buf[:] = img
        img.mul_(2)       # after the write: the buffer keeps the old values
        return buf + img

    gm, _ = _folded(whole, IMG)
    assert "clone" in _targets(gm)


def gaps(txt, img):   # sample 1 has a shorter prompt: zeros left between its text and the end
    buf = img.new_zeros(2, TEXT + 16, 8)
    buf[0, :TEXT] = txt[0]
    buf[0, TEXT:] = img[0]
    buf[1, :TEXT - 2] = txt[1, :TEXT - 2]
    buf[1, TEXT - 2:TEXT + 14] = img[1]
    return buf * 2


def overlap(txt, img):
    buf = img.new_zeros(2, 16, 8)
    buf[:, :10] = img[:, :10]
    buf[:, 6:] = img[:, 6:]
    return buf * 2


def read_before_filled(txt, img):
    buf = img.new_zeros(2, TEXT + 16, 8)
    buf[:, :TEXT] = txt
    early = buf.sum()
    buf[:, TEXT:] = img
    return buf * early


def broadcast(txt, img):
    buf = img.new_zeros(2, TEXT + 16, 8)
    buf[:, :TEXT] = txt[:1]
    buf[:, TEXT:] = img
    return buf * 2


def mutated(txt, img):
    buf = img.new_zeros(2, TEXT + 16, 8)
    buf[:, :TEXT] = txt
    txt.mul_(3)
    buf[:, TEXT:] = img
    return buf * 2


def number(txt, img):
    buf = img.new_zeros(2, TEXT + 16, 8)
    buf[:, :TEXT] = 1.0
    buf[:, TEXT:] = img
    return buf * 2


def pinwheel(txt, img):   # five boxes tiling a 3 x 3 grid, no straight cut through it
    buf = img.new_zeros(3, 3, 8)
    x = img[0, :9].view(3, 3, 8)
    buf[0:1, 0:2] = x[0:1, 0:2]
    buf[0:2, 2:3] = x[0:2, 2:3]
    buf[2:3, 1:3] = x[2:3, 1:3]
    buf[1:3, 0:1] = x[1:3, 0:1]
    buf[1:2, 1:2] = x[1:2, 1:2]
    return buf * 2


@pytest.mark.parametrize(("fn", "reason"), [
    (gaps, NotConcatenation.GAPS), (overlap, NotConcatenation.OVERLAP),
    (read_before_filled, NotConcatenation.READ_BEFORE_FILLED), (broadcast, NotConcatenation.BROADCAST),
    (mutated, NotConcatenation.MUTATED), (number, NotConcatenation.NOT_TENSOR), (pinwheel, NotConcatenation.NO_CUT),
])
def test_writes_that_are_not_a_concatenation_are_left_alone(fn, reason):
    assert _refusal(fn, TXT.clone(), IMG.clone()) is reason


# ----------------------------------------------------------------------------------------------------------
# the toy DiT of the class (tests/buffer_models.py): analysis, then end to end


def _main_graph(model, kwargs):
    """The graph after the `.tolist()` break (the one with the attention), analyzed inside the backend."""
    seen = []

    def backend(gm, example_inputs):
        if any(n.target is torch._C._nn.scaled_dot_product_attention for n in gm.graph.nodes):
            fold_buffer_writes(gm)
            seen.append((gm, image_input_candidates(gm, example_inputs)[1], analyze_tokens(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**kwargs)
    (found,) = seen
    return found


@pytest.mark.parametrize("order", ["text_first", "image_first"])
def test_analysis_reads_the_rewritten_buffer_as_a_joint_sequence(order):
    gm, candidates, analysis = _main_graph(*make_buffer_joint_dit(order))
    # the patchified latent comes from the resume function's stack (what `prepare` returned): an input like any
    assert analysis.token_input == "l_stack0_0_"
    assert any(c.name == "l_stack0_0_" and c.match is not None for c in candidates)
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    info = node_meta(cat).token
    assert (info.rule, info.axis, info.prefix, info.suffix) == (
        ("cat-joint", 1, TEXT, 0) if order == "text_first" else ("cat-joint", 1, 0, TEXT))
    table = node_meta(next(n for n in gm.graph.nodes if n.name == "l_stack0_1_")).token
    assert (table.kind, table.axis, table.prefix + table.suffix) == (Kind.POSITIONAL, 1, TEXT)
    assert len(analysis.self_attention) == 2
    out = next(n for n in gm.graph.nodes if n.target is torch.stack)
    assert (node_meta(out).token.axis, node_meta(out).token.joint) == (2, False)   # [B, C, H, W]: rows on 2


@pytest.mark.parametrize(("order", "writes"), [("text_first", "per_sample"), ("image_first", "batched")])
def test_buffer_joint_dit_one_patch_equals_plain_and_four_equal_the_reference(order, writes):
    model, kwargs = make_buffer_joint_dit(order, writes)
    torch._dynamo.reset()
    plain, _ = sample_loop(call_model(model), kwargs, steps=3)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=3)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)

    reference = ReferencePipeFusion(model, num_patches=4, warmup_steps=1, text_tokens=TEXT,
                                    text_first=order == "text_first")
    want, _ = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=3)
    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=3)
    (program,) = [p for p in programs if hasattr(p, "plan")]
    assert program.plan.num_patches == 4 and program.stats["pipelined_calls"] == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4   # stale K/V really differ from the plain model


def test_prompts_of_different_lengths_leave_padding_and_are_refused_saying_so():
    model, kwargs = make_buffer_joint_dit(valid=(TEXT, TEXT - 2))
    torch._dynamo.reset()
    compiled, _ = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    error = str(raised(compiled, **kwargs))
    assert "writing image tokens into a global tensor" in error
    assert NotConcatenation.GAPS.value in error and "64 of 4480 elements" in error
