"""The image input and its token axis are found, not asked for (tests/input_models.py: toy DiTs whose input
is packed while the output is not, or the reverse, frames before channels, an output with an extra dim, a
list latent: tests/test_list_latent.py); options image_input and token_axis override the search, with errors listing what was found."""
import re

import pytest
import torch
import torch.nn as nn

import handwritten_dits as hd
import input_models as im
from graph_utils import capture_graphs, capture_model
from helpers import compile_pf, raised
from reference_pipefusion import ImageLayout, ReferencePipeFusion
from pipefusion_compile.errors import UnsupportedGraphError
from pipefusion_compile.passes.graph_inputs import InputMatch, image_input_candidates
from pipefusion_compile.passes.tokens import AttemptOutcome, analyze_tokens

T = torch.full((1,), 500)

# name -> (matched how, token axis, token rows, the axes tried before the chosen one)
EXPECTED = {
    "packed_in": (InputMatch.PATCHIFIED, 1, 4, []),      # [1, 24, 16] -> [1, 4, 8, 12]: 24 * 2^2 = 8 * 12
    "packed_out": (InputMatch.PATCHIFIED, 2, 4, [1]),    # [1, 4, 8, 12] -> [1, 24, 16]; axis 1 = channels
    "frames_first": (InputMatch.SAME_BUT_CHANNELS, 1, 4, []),   # [1, 4, 6, 8, 8]: the frames
    "extra_dim": (InputMatch.SAME_TOKENS, 2, 4, [1]),    # [1, 4, 8, 12] -> [1, 2, 4, 8, 12]
}


def _capture(name):
    model, x, ctx = im.make(name)
    (gm, ex), = capture_graphs(model, x, T, ctx)
    return gm, ex


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_image_input_and_token_axis_are_found(name):
    match, axis, rows, failed_axes = EXPECTED[name]
    gm, ex = _capture(name)
    _, candidates = image_input_candidates(gm, ex)
    assert (candidates[0].name, candidates[0].match) == ("l_hidden_states_", match)
    # the prompt [1, 5, 12] may match weakly (12 "tokens", a patch factor from the output's): it ranks after
    context = next(c for c in candidates if c.name == "l_context_")
    assert context.match is None or context.match >= match
    a = analyze_tokens(gm, ex)
    assert (a.token_input, a.input_axis, a.token_rows, len(a.self_attention)) == ("l_hidden_states_", axis, rows, 4)
    # every input that matches is tried (the one reaching the most self-attention wins); the latent's own
    # attempts: the channel axes fail at the patch embedding, then the token axis is chosen
    own = [t for t in a.attempts if t.token_input == a.token_input]
    assert [t.axis for t in own if t.outcome is AttemptOutcome.FAILED] == failed_axes
    assert all("conv over the channels" in t.reason for t in own if t.outcome is AttemptOutcome.FAILED)
    assert own[-1].outcome is AttemptOutcome.CHOSEN and own[-1].axis == axis
    assert [t.outcome for t in a.attempts].count(AttemptOutcome.CHOSEN) == 1


def _loop(fn, model, x, ctx, steps=4):
    outs = []
    with torch.no_grad():
        for t in torch.linspace(900, 100, steps).long():
            out = fn(x, t.expand(x.shape[0]), ctx)
            outs.append(out)
            x = 0.9 * x + 0.1 * model.to_input(out)
    return outs


class _Adapter(torch.nn.Module):
    """The toy model called as the reference calls a diffusers model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, context, return_dict=False):
        return (self.model(hidden_states, timestep, context),)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pipelined_equals_plain_model_and_the_reference(name):
    """N=2: M=1, and M=4 with warmup covering every step, equal the plain model at every step; M=4 with one
    warmup step (stale K/V) equals the plainly written eager PipeFusion at every step."""
    model, x, ctx = im.make(name)
    want = _loop(model, model, x, ctx)
    for patches, warmup in ((1, 1), (4, 4)):
        compiled, _ = compile_pf(model, num_stages=2, num_patches=patches, warmup_steps=warmup, stage_backend="eager")
        for got, ref in zip(_loop(compiled, model, x, ctx), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    reference = ReferencePipeFusion(_Adapter(model), num_patches=4, warmup_steps=1,
                                    layout=ImageLayout(*model.layout()))
    want = _loop(lambda h, t, c: reference(h, timestep=t, context=c), model, x, ctx)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
    got = _loop(compiled, model, x, ctx)
    assert programs[0].stats["pipelined_calls"] == 3 and programs[0].plan.num_patches == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_list_argument_of_per_token_tables_does_not_hide_the_image_input():
    """A tuple argument whose elements match one sample's tokens (a rotary (cos, sin) pair of [S, D] tables)
    is not taken for a list latent while a tensor input passes the analysis: the list error is the answer only
    when no input does (GlmImage's block graph was refused this way)."""
    torch.manual_seed(0)
    model = im.PackedWithRotaryTuple().eval()
    x, ctx, rotary = model.example(2), torch.randn(2, *im.CONTEXT), model.rotary()
    t = torch.full((2,), 500)
    seen = []

    def backend(gm, example_inputs):  # dynamo's sources (which say "an element of a list") live during the call
        seen.append(image_input_candidates(gm, example_inputs)[1])
        seen.append(analyze_tokens(gm, example_inputs).token_input)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(x, t, ctx, rotary)
    assert any(c.per_sample_match for c in seen[0])  # the tables look like one sample's tokens
    assert seen[1] == "l_hidden_states_"
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x, t, ctx, rotary)
        compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
        got = compiled(x, t, ctx, rotary)   # the warmup step: every patch fresh, so the plain model's result
        compiled(x, t - 100, ctx, rotary)    # a pipelined step
    assert programs and programs[0].plan.num_patches == 4 and programs[0].stats["pipelined_calls"] == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_input_option_names_the_input():
    gm, ex = _capture("packed_out")
    for name in ("hidden_states", "l_hidden_states_"):
        a = analyze_tokens(gm, ex, image_input=name)
        assert (a.token_input, a.input_axis) == ("l_hidden_states_", 2)
        assert a.attempts[-1].outcome is AttemptOutcome.CHOSEN
    _, candidates = image_input_candidates(gm, ex, image_input="hidden_states")
    assert [c.match for c in candidates if c.argument == "hidden_states"] == [InputMatch.NAMED]


def test_image_input_option_naming_nothing_lists_the_inputs():
    model, x, ctx = im.make("packed_out")
    compiled, _ = compile_pf(model, num_stages=2, stage_backend="eager", image_input="latents")
    err = raised(compiled, x, T, ctx)
    text = str(err)
    assert "option image_input='latents' names no tensor input" in text
    assert "hidden_states (l_hidden_states_) [1, 4, 8, 12]: not taken: option image_input names another input" in text
    assert "context (l_context_) [1, 5, 12]" in text


def test_image_input_option_on_the_wrong_input_lists_the_axes_tried():
    gm, ex = _capture("packed_out")
    with pytest.raises(UnsupportedGraphError) as err:
        analyze_tokens(gm, ex, image_input="context")
    text = str(err.value)
    for axis in (1, 2):
        assert re.search(rf"l_context_ \[1, 5, 12\] axis {axis}: the analysis (failed|succeeded but found no self)",
                         text), text


def test_token_axis_option_overrides_and_its_failure_says_so():
    gm, ex = _capture("frames_first")
    with pytest.raises(UnsupportedGraphError) as err:
        analyze_tokens(gm, ex, token_axis=2)
    text = str(err.value)
    assert "conv over the channels" in text and "option token_axis=2 puts the token rows on axis 2" in text
    assert "l_hidden_states_ [1, 4, 6, 8, 8] axis 2: the analysis failed" in text


def test_no_matching_input_lists_each_candidate_with_its_shape():
    def f(x, y):   # the output [1, 3, 7] matches neither input's tokens
        return torch.nn.functional.scaled_dot_product_attention(x, x, x)[:, :3, :7].sum(0, keepdim=True) + y.sum()

    (gm, ex), = capture_graphs(f, torch.randn(1, 8, 16), torch.randn(2, 5))
    with pytest.raises(UnsupportedGraphError) as err:
        analyze_tokens(gm, ex)
    text = str(err.value)
    assert "could not find the image input" in text and "[1, 3, 7]" in text
    assert "x (l_x_) [1, 8, 16]: not taken: no way of reading its dims" in text
    assert "y (l_y_) [2, 5]: not taken: fewer than 3 dims" in text and "image_input" in text


def test_the_image_input_is_the_one_whose_tokens_reach_the_most_self_attention():
    """WanVACE: the control latent [B, 8, F, H, W] is larger than the latent [B, 4, F, H, W] and matches the
    output too; taken as the image input, the latent's first block was GLOBAL (run in full, never pipelined)
    and M=4 differed from the reference. The latent's tokens reach every self-attention layer."""
    from coverage_cases import case_by_name
    from graph_utils import capture_model

    model, kwargs = case_by_name("WanVACETransformer3DModel").build()
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert "control" not in a.token_input and "hidden_states" in a.token_input
    assert len(a.self_attention) == 4
    assert [t.outcome for t in a.attempts if "control" in t.token_input][-1] is AttemptOutcome.FEWER_LAYERS


@pytest.mark.parametrize("name, patches, axis, rows, outcomes", [
    # one latent frame: the frame axis passes with 1 token row, fewer than M; the H axis holds M (its rows are
    # contiguous token ranges: flattening [1, h, w] is flattening [h, w])
    ("one_frame", 4, 3, 4, [AttemptOutcome.FAILED, AttemptOutcome.FEWER_ROWS, AttemptOutcome.CHOSEN]),
    # M=1 holds in either: the leading axis, as before
    ("one_frame", 1, 2, 1, [AttemptOutcome.FAILED, AttemptOutcome.CHOSEN]),
    # four frames hold M=4: the frames, and H is not tried
    ("four_frames", 4, 2, 4, [AttemptOutcome.FAILED, AttemptOutcome.CHOSEN]),
    # two frames do not: the rows of every frame (the tokens [B, F * h * w, D] are F blocks of h rows)
    ("two_frames", 4, 3, 4, [AttemptOutcome.FAILED, AttemptOutcome.FEWER_ROWS, AttemptOutcome.CHOSEN]),
])
def test_the_axis_chosen_is_the_one_whose_rows_hold_the_patches(name, patches, axis, rows, outcomes):
    gm, ex = _capture(name)
    a = analyze_tokens(gm, ex, num_patches=patches)
    assert (a.token_input, a.input_axis, a.token_rows, len(a.self_attention)) == ("l_hidden_states_", axis, rows, 4)
    own = [t for t in a.attempts if t.token_input == a.token_input]
    assert [t.outcome for t in own] == outcomes
    assert [t.axis for t in own] == list(range(1, len(outcomes) + 1))


def test_rows_within_frames_are_folded_with_the_frames():
    """Two frames at M=4: after the patch embedding's flatten the token axis is 2 blocks (frames) of the 4 rows
    of a frame (`outer` 2); the self-attention is over that folded axis, and the per-token table is POSITIONAL
    with the same fold (sliced per frame)."""
    gm, ex = _capture("two_frames")
    a = analyze_tokens(gm, ex, num_patches=4)
    infos = {n.name: n.meta["pipefusion"].token for n in gm.graph.nodes if n.op != "output"}
    attention = [infos[name] for name in a.self_attention]
    assert {(i.outer, i.attention) for i in attention} == {(2, "self")}
    (pos,) = [infos[name] for name in a.positional]
    assert (pos.kind.value, pos.axis, pos.outer) == ("positional", 1, 2)


def test_stale_attention_writes_the_rows_of_every_frame():
    """The band graph of a two-frame video writes its K/V through views that split the frames off the cache's
    token axis: the same rows of both frames."""
    from pipefusion_compile.passes.pieces import BAND, Piece

    model, x, ctx = im.make("two_frames")
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
    with torch.no_grad():
        compiled(x, T, ctx)
    stage = programs[0].stages[0].lowered
    (cache,) = {c.outer for c in stage.caches}
    assert cache == 2
    code = stage.piece_graph(Piece(BAND, 0, 1)).gm.code
    assert "unflatten" in code and "kv_cache_update" in code
    updates = [n for n in stage.piece_graph(Piece(BAND, 0, 1)).gm.graph.nodes
               if n.target is torch.ops.pipefusion.kv_cache_update.default]
    # [B, heads, F, h * w, d] views: the rows lie on axis 3, 6 tokens per row of one frame
    assert {(n.args[0].target, n.args[5], n.args[6]) for n in updates} == {("unflatten", 3, 6)}


@pytest.mark.parametrize("name", ["one_frame", "two_frames"])
def test_video_with_fewer_frames_than_patches_equals_the_reference(name):
    """[B, C, F, H, W] with F < M=4: bands of the H rows (of every frame); M=1 and full warmup equal the plain
    model, one warmup step equals the eager reference, whose `ImageLayout.of` takes the same rows."""
    model, x, ctx = im.make(name)
    class Config:
        patch_size = (1, model.p, model.p)
    of = ImageLayout.of(type("M", (), {"config": Config})(), x, num_patches=4)
    layout = (of.rows, of.tokens_per_row, of.out_axis, of.out_per_row) + ((of.frames,) if of.frames > 1 else ())
    assert layout == model.layout() and layout[:4] == (4, 6, 3, 2)
    want = _loop(model, model, x, ctx)
    for patches, warmup in ((1, 1), (4, 4)):
        compiled, _ = compile_pf(model, num_stages=2, num_patches=patches, warmup_steps=warmup, stage_backend="eager")
        for got, ref in zip(_loop(compiled, model, x, ctx), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    reference = ReferencePipeFusion(_Adapter(model), num_patches=4, warmup_steps=1, layout=of)
    want = _loop(lambda h, t, c: reference(h, timestep=t, context=c), model, x, ctx)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=1, stage_backend="eager")
    got = _loop(compiled, model, x, ctx)
    (program,) = programs
    assert program.stats["pipelined_calls"] == 3 and program.plan.patches == ((0, 1), (1, 1), (2, 1), (3, 1))
    assert program.plan.token_axis == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


class _RefinedPromptMMDiT(hd.HandMMDiT):
    """HandMMDiT whose prompt first goes through a refiner of its own (self-attention over the prompt, then a
    mean over its tokens added back, as HunyuanImage's token refiner does) and one joint block: the prompt's
    tokens reach more self-attention layers (3 refiner + 1 joint) than the latent's (1 joint)."""

    def __init__(self):
        super().__init__(depth=1)
        self.refiner = nn.ModuleList(hd.Attention(hd.DIM, hd.HEADS) for _ in range(3))

    def embed_prompt(self, encoder_hidden_states):
        txt = self.context_embedder(encoder_hidden_states)
        for attn in self.refiner:
            txt = txt + attn(txt)
        return txt + txt.mean(dim=1, keepdim=True)


def test_the_input_closest_to_the_output_wins_over_one_reaching_more_attention():
    """Both the latent and the prompt pass the analysis (a mean over tokens has a rule); the prompt's tokens
    reach more self-attention layers, but the latent's shape is the output's but channels: it is the image
    input, and the prompt's attempt says why it lost."""
    torch.manual_seed(0)
    model = _RefinedPromptMMDiT().eval()
    _, kwargs = hd.make_hand_mmdit()
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert a.token_input == "l_hidden_states_" and a.token_rows == 8
    prompt = [t for t in a.attempts if t.token_input == "l_encoder_hidden_states_"]
    assert prompt and AttemptOutcome.WEAKER_MATCH in {t.outcome for t in prompt}, a.attempts


def test_column_bands_are_refused_not_run():
    """token_axis on the last spatial axis of [B, C, H, W] would fold the rows before it like frames, a patch
    being the same columns of every row; that ran, and differed from the eager reference by 2.3 at M=4: refused,
    and an image with fewer rows than patches is a PlanError, not column bands."""
    model, kwargs = hd.make_timm_dit()
    e = raised(compile_pf(model, stage_backend="eager", num_stages=2, num_patches=4, token_axis=3)[0], **kwargs)
    assert isinstance(e, UnsupportedGraphError) and "bands of columns are not supported" in str(e), str(e)
    torch._dynamo.reset()
    e = raised(compile_pf(model, stage_backend="eager", num_stages=2, num_patches=16)[0], **kwargs)
    assert "num_patches=16 is larger than the 8 token rows" in str(e), str(e)


def test_values_on_dynamos_resume_stack_are_inputs_not_a_list_latent():
    """After a graph break inside a call (Lumina2's rope embedder: `.tolist()`), the resumed graph takes what the
    call returned as `___stack0[i]`: the patchified latent and tables, not a list of per-sample latents; they are
    image-input candidates like any argument (tests/test_buffer_writes.py runs such a model end to end)."""
    from pipefusion_compile.passes.graph_inputs import is_resume_stack

    assert is_resume_stack("___stack0") and is_resume_stack("___stack12")
    assert not is_resume_stack("hidden_states") and not is_resume_stack("___stack") and not is_resume_stack(None)


class _RaysBesideLatent(nn.Module):
    """A latent [B, 4, H, W] and per-pixel rays [B, 6, H, W] on the same grid (SANA-WM's camera input): the
    latent's tokens go through a running sum over the tokens (no rule: the latent fails the analysis on every
    axis), the rays' only through ops with rules, so the rays alone would pass as the image input."""

    def __init__(self):
        super().__init__()
        self.latent, self.rays = nn.Conv2d(4, 32, 2, stride=2), nn.Conv2d(6, 32, 2, stride=2)
        self.blocks = nn.ModuleList(im.Block() for _ in range(2))
        self.out = nn.Linear(32, 16)

    def forward(self, hidden_states, timestep, context, rays):
        b, _, h, w = hidden_states.shape
        x = self.latent(hidden_states).flatten(2).transpose(1, 2).cumsum(dim=1)
        x = x + self.rays(rays).flatten(2).transpose(1, 2)
        temb = im.timestep_embedding(timestep)
        for block in self.blocks:
            x = block(x, temb, context.repeat(1, 1, 3)[..., :32])
        x = self.out(x).reshape(b, h // 2, w // 2, 2, 2, 4).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 4, h, w)


def test_an_input_that_passes_is_not_pipelined_in_place_of_a_latent_that_fails():
    """When the input with exactly the output's shape (the latent) fails the analysis on every axis, another input
    of the same grid that passes is not silently split instead (every op on the latent would run whole on every
    patch: a result unlike PipeFusion's, with no error): the latent's error is raised, naming the other input
    and the option that chooses it on purpose."""
    torch.manual_seed(0)
    model = _RaysBesideLatent().eval()
    x, rays, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8), torch.randn(2, *im.CONTEXT), torch.full((2,), 5)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    err = raised(compiled, x, t, ctx, rays)
    assert isinstance(err, UnsupportedGraphError), err
    text = str(err)
    assert "cumsum" in text and "exactly the output's shape" in text and "options={'image_input': 'l_rays_'}" in text
    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager", image_input="rays")
    with torch.no_grad():
        want, got = model(x, t, ctx, rays), compiled(x, t, ctx, rays)
    assert programs[0].plan.token_input == "l_rays_"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
