"""DiTs written by hand in plain PyTorch (tests/handwritten_dits.py), compiled with the backend: with one
patch they equal the plain model every step; with M = 4 patches they equal the eager reference (fp32).

The reference is checked on its own first (it runs the model, finds the layers it should, equals the plain
model with one patch, and differs from it with four), so a failure of the compiled comparisons is the
backend's.

Today (before the backend learns these models) the compiled tests pass for timm_dit, hand_mmdit and
packed_rope, and for uvit with one patch; the others fail at compile time with UnsupportedGraphError:
manual_* (hand-written softmax attention not recognized), mha_dit (F.multi_head_attention_forward not
recognized), uvit with 4 patches (two operands of the extra token group in one cat), uvit_registers (extra
tokens on both sides of the image), factorized_video (reshape folding the token axis into the batch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import handwritten_dits as hd
from helpers import call_model, compile_pf, sample_loop
from reference_pipefusion import ImageLayout, ReferencePipeFusion, bands

# every hand-written attention entry point, intercepted by the reference wherever it is used
ATTENTION_FNS = [(hd, name) for name in hd.ATTENTION_FNS.values()]


@dataclass(frozen=True)
class Case:
    make: Callable
    layers: int                   # self-attention layers the reference assembles from fresh/stale K/V
    local: int = 0                # attention calls local to a band (spatial attention within a frame)
    convs: int = 0                # convs over the token rows whose input the reference assembles
    reductions: int = 0           # matmuls over the tokens whose operands the reference assembles
    reference: dict = field(default_factory=dict)  # extra ReferencePipeFusion arguments
    layout: ImageLayout | None = None  # None: from the input's shape and config.patch_size
    rewritten: bool = False       # attention the backend rewrites to SDPA: the same function summed in another
                                  # order (fp32, ~1e-7 per call), so vs the plain model a looser tolerance


CASES = {
    "timm_dit": Case(hd.make_timm_dit, 4),
    "manual_softmax": Case(lambda: hd.make_manual_attention_dit("softmax"), 4, rewritten=True),
    "manual_bmm": Case(lambda: hd.make_manual_attention_dit("bmm"), 4, rewritten=True),
    "manual_einsum": Case(lambda: hd.make_manual_attention_dit("einsum"), 4, rewritten=True),
    "mha_dit": Case(hd.make_mha_dit, 4),  # plus 4 cross-attentions over the prompt (not assembled)
    # [time token, class token | image]
    "uvit": Case(hd.make_uvit, 4, reference=dict(text_tokens=2, text_first=True)),
    # [time token, class token | image | 4 registers]
    "uvit_registers": Case(lambda: hd.make_uvit(registers=4), 4,
                           reference=dict(text_tokens=2, text_first=True, after_tokens=4)),
    # the same, the sequence made by nested concatenations: cat([time, cat([class, image])]), registers after
    "uvit_nested": Case(lambda: hd.make_uvit(registers=4, nested=True), 4,
                        reference=dict(text_tokens=2, text_first=True, after_tokens=4)),
    "hand_mmdit": Case(hd.make_hand_mmdit, 4, reference=dict(text_tokens=hd.PROMPT, text_first=True)),
    # the same, RoPE written in place into the image part of `cat([text, image])`
    "hand_mmdit_rope": Case(hd.make_hand_mmdit_rope, 4, reference=dict(text_tokens=hd.PROMPT, text_first=True)),
    # bands of whole frames: 4 frames of 8 x 8 tokens; 2 temporal (assembled) and 2 spatial (local) layers
    "factorized_video": Case(hd.make_factorized_video_dit, 2, local=2, layout=ImageLayout(4, 64, 2, 1)),
    "packed_rope": Case(hd.make_packed_rope_dit, 4),  # [B, 64, C]: one token per row
    "conv_ffn": Case(hd.make_conv_ffn_dit, 4, convs=4),  # a depthwise 3x3 conv per block (halo rows)
    # Sana's block by hand: ReLU linear attention (a matmul over the tokens) and the conv FFN, no softmax
    "linear_attention": Case(hd.make_linear_attention_dit, 0, convs=4, reductions=4,
                             reference=dict(reductions=True)),
    # image queries over [image | text] keys and over [text | image] keys (with a key mask); no text queries
    "text_keys": Case(hd.make_text_keys_dit, 4, reference=dict(key_text_tokens=hd.PROMPT)),
    "text_keys_first": Case(lambda: hd.make_text_keys_dit(text_first=True), 4,
                            reference=dict(key_text_tokens=hd.PROMPT, text_first=True)),
    # joint [text | image] blocks (a text piece) alternating with image queries over the prompt's keys
    "mixed_keys": Case(hd.make_mixed_keys_dit, 4,
                       reference=dict(text_tokens=hd.PROMPT, text_first=True, key_text_tokens=hd.PROMPT)),
}
NAMES = sorted(CASES)
STEPS = 5  # one warmup step, then four pipelined


def make_reference(case: Case, model, patches: int) -> ReferencePipeFusion:
    return ReferencePipeFusion(model, num_patches=patches, layout=case.layout, attention_fns=ATTENTION_FNS,
                               **case.reference)


def reference_loop(reference: ReferencePipeFusion, kwargs: dict):
    return sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=STEPS)


def token_rows(case: Case, model, kwargs) -> int:
    return (case.layout or ImageLayout.of(model, kwargs["hidden_states"])).rows


@pytest.mark.parametrize("name", NAMES)
def test_reference_on_its_own(name):
    """The model runs eagerly; the reference finds its attention layers; with one patch it is the plain
    model, with four it differs from it (so the stale path is exercised and the tests below can fail)."""
    case = CASES[name]
    model, kwargs = case.make()
    plain_final, plain_steps = sample_loop(call_model(model), kwargs, steps=STEPS)
    one = make_reference(case, model, 1)
    _, one_steps = reference_loop(one, kwargs)
    assert (one.layers_seen, one.local_calls, one.convs_seen, one.reductions_seen) == (
        case.layers, case.local, case.convs, case.reductions)
    for got, want in zip(one_steps, plain_steps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    four = make_reference(case, model, 4)
    four_final, _ = reference_loop(four, kwargs)
    assert (four.layers_seen, four.local_calls, four.convs_seen, four.reductions_seen) == (
        case.layers, case.local, case.convs, case.reductions)
    assert (four_final - plain_final).abs().max() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_one_patch_equals_plain_model_every_step(name):
    case = CASES[name]
    model, kwargs = case.make()
    _, want_steps = sample_loop(call_model(model), kwargs, steps=STEPS)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, got_steps = sample_loop(call_model(compiled), kwargs, steps=STEPS)
    assert len(programs) == 1
    assert programs[0].stats["pipelined_calls"] > 0
    tol = dict(rtol=1e-4, atol=1e-5) if case.rewritten else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(got_steps, want_steps):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("stages", [2, 4])  # every model here has 4 attention layers (4 blocks)
@pytest.mark.parametrize("name", NAMES)
def test_stale_kv_equals_eager_reference(name, stages):
    case = CASES[name]
    model, kwargs = case.make()
    want_final, want_steps = reference_loop(make_reference(case, model, 4), kwargs)
    compiled, programs = compile_pf(model, num_stages=stages, num_patches=4, stage_backend="eager")
    got_final, got_steps = sample_loop(call_model(compiled), kwargs, steps=STEPS)
    assert len(programs) == 1
    assert programs[0].stats["pipelined_calls"] > 0
    assert programs[0].plan.patches == tuple(bands(token_rows(case, model, kwargs), 4))
    for got, want in zip(got_steps, want_steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)


def test_reference_pieces_and_attention_kinds():
    """The reference's own bookkeeping: extra token groups are pieces in sequence order with the bands;
    attention is told apart by its sequence length (folded rows only where rows != tokens per row)."""
    model, _ = hd.make_uvit(registers=4)
    ref = ReferencePipeFusion(model, num_patches=4, text_tokens=2, text_first=True, after_tokens=4)
    layout = ImageLayout(8, 8, 2, 2)
    got = [(p.row0, p.n, p.lo, p.hi) for p in ref._pieces(layout, warmup=False)]
    assert got == [(None, None, 0, 2), (0, 2, 2, 18), (2, 2, 18, 34), (4, 2, 34, 50), (6, 2, 50, 66),
                   (None, None, 66, 70)]
    assert [(p.lo, p.hi) for p in ref._pieces(layout, warmup=True)] == [(0, 70)]

    video = ImageLayout(4, 64, 2, 1)  # 4 frames of 64 tokens, batch 2, 2 heads of 16
    ref = ReferencePipeFusion(model, num_patches=4, layout=video)
    assert [(p.r0, p.r1) for p in ref._pieces(video, warmup=False)] == [(0, 1), (1, 2), (2, 3), (3, 4)]

    def kind(q_shape, k_len, layout=video, tokens=256):
        q = torch.zeros(q_shape)
        k = torch.zeros(*q_shape[:-2], k_len, q_shape[-1])
        return ref._kind(q, k, layout, tokens)

    assert kind((2, 2, 256, 16), 256) == "joint"
    assert kind((2 * 64, 2, 4, 16), 4) == "rows"      # temporal: per position, over the frames
    assert kind((2 * 64 * 2, 4, 16), 4) == "rows"     # the same with heads folded into the batch (bmm)
    assert kind((2 * 4, 2, 64, 16), 64) == "local"    # spatial: within a frame
    assert kind((2, 2, 256, 16), 6) is None           # cross-attention over a prompt
    square = ImageLayout(8, 8, 2, 2)
    assert kind((2, 2, 64, 16), 64, square, 64) == "joint"
    with pytest.raises(ValueError, match="look alike"):
        kind((2 * 8, 2, 8, 16), 8, square, 64)
