"""Autocast regions inside the model (`passes/autocast.py`): the extracted graphs run each node under the
autocast state it had in the model, with and without an ambient autocast.

Without the pass both numerics tests fail: the RoPE angles (computed under `autocast(enabled=False)`, as
diffusers' Helios and ErnieImage do) are rounded to bf16 by the caller's autocast, and the MLP's bf16 region
runs in fp32."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import handwritten_dits as hd
from helpers import call_model, compile_pf, sample_loop
from pipefusion_compile.passes.autocast import ENTER, EXIT, autocast_scopes
from reference_pipefusion import ReferencePipeFusion


class Bf16Mlp(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.mlp(x)
        return y.float()


class AutocastRopeDiT(hd.PackedRopeDiT):
    """hd.PackedRopeDiT with its RoPE angles computed by a matmul under `autocast(enabled=False)` and every
    block's MLP under `autocast(dtype=bfloat16)`."""

    def __init__(self):
        super().__init__()
        per_axis = hd.DIM // self.heads // 2
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, per_axis, 2, dtype=torch.float32) / per_axis)
        freq = torch.zeros(2, per_axis)
        freq[0, :per_axis // 2], freq[1, per_axis // 2:] = inv_freq, inv_freq
        self.register_buffer("freq", freq)
        for block in self.blocks:
            block.mlp = Bf16Mlp(block.mlp)

    def forward(self, hidden_states, timestep, img_ids, return_dict=True):
        x = self.x_embedder(hidden_states)
        c = self.t_embedder(timestep)
        with torch.autocast("cpu", enabled=False):
            angles = img_ids.float() @ self.freq
        cos, sin = angles.cos(), angles.sin()
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return hd._out(self.proj_out(self.norm_out(x)), return_dict)


def make_model():
    model, kwargs = hd.make_packed_rope_dit()
    torch.manual_seed(0)
    return AutocastRopeDiT().eval(), kwargs


def _traced(model, kwargs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(**kwargs)
    return graphs[0]


def test_scopes_of_the_dynamo_graph():
    model, kwargs = make_model()
    scopes = autocast_scopes(_traced(model, kwargs))
    enters = {e for scope in scopes.scopes.values() for e in scope}
    assert len(enters) == 1 + hd.DEPTH                 # the RoPE region and one per block's MLP
    assert all(len(scope) == 1 for scope in scopes.scopes.values())
    assert sorted(e.args[2] for e in enters) == [False] + [True] * hd.DEPTH  # (device, dtype, enabled, cache)


def test_piece_graphs_run_the_regions():
    model, kwargs = make_model()
    compiled, programs = compile_pf(model, stage_backend="eager", num_stages=2, num_patches=4, warmup_steps=1)
    with torch.no_grad():
        compiled(**kwargs)
        compiled(**kwargs)
    (program,) = programs
    seen_rope = 0
    for stage in program.stages:
        lowered = stage.lowered
        band = lowered.patch_graph(2)
        nodes = list(band.graph.nodes)
        enters = [n for n in nodes if n.target is ENTER]
        exits = [n for n in nodes if n.target is EXIT]
        assert len(enters) == len(exits) == hd.DEPTH // 2, band.code
        for enter in enters:  # each region holds the MLP's two linears, and nothing after its exit
            (exit_,) = [u for u in enter.users if u.target is EXIT]
            inside = nodes[nodes.index(enter) + 1:nodes.index(exit_)]
            assert sum(1 for n in inside if n.target is torch._C._nn.linear) == 2, band.code
        g_nodes = list(lowered.globals_gm.graph.nodes)
        for enter in [n for n in g_nodes if n.target is ENTER]:
            assert enter.args[2] is False
            (exit_,) = [u for u in enter.users if u.target is EXIT]
            inside = g_nodes[g_nodes.index(enter) + 1:g_nodes.index(exit_)]
            assert any(n.target in (torch.matmul, torch._C._TensorBase.__matmul__) or "matmul" in str(n.target)
                       for n in inside), lowered.globals_gm.code
            seen_rope += 1
    assert seen_rope == 2  # each stage's globals compute the RoPE tables it reads


@pytest.mark.parametrize("ambient", [False, True], ids=["fp32", "ambient-bf16-autocast"])
def test_equal_plain_and_reference(ambient):
    model, kwargs = make_model()

    def under(fn):
        def run(*args, **kw):
            if not ambient:
                return fn(*args, **kw)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args, **kw).float()
        return run

    _, plain = sample_loop(under(call_model(model)), kwargs, steps=3)
    compiled, programs = compile_pf(model, stage_backend="eager", num_stages=2, num_patches=1, warmup_steps=1)
    _, got = sample_loop(under(call_model(compiled)), kwargs, steps=3)
    assert programs and programs[0].stats["pipelined_calls"] > 0
    for g, w in zip(got, plain):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    compiled, programs = compile_pf(model, stage_backend="eager", num_stages=2, num_patches=4, warmup_steps=1)
    _, got = sample_loop(under(call_model(compiled)), kwargs, steps=3)
    reference = ReferencePipeFusion(model, num_patches=4, warmup_steps=1)
    _, want = sample_loop(under(lambda x, t, **kw: reference(x, timestep=t, **kw)), kwargs, steps=3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 if not ambient else 2e-2)
