"""The backend as users meet it: entry point, options, logging, graphs without attention, errors."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import pipefusion_compile

from graph_utils import capture_model
from helpers import compile_pf
from pipefusion_compile.models import dit, pixart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_name_works_without_importing_the_package():
    code = textwrap.dedent("""
        import sys, torch
        from diffusers import DiTTransformer2DModel
        torch.manual_seed(0)
        m = DiTTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                  in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=10).eval()
        x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([1])
        assert "pipefusion_compile" not in sys.modules
        c = torch.compile(m, backend="pipefusion", options={"num_stages": 2, "num_patches": 1,
                                                           "stage_backend": "eager"})
        with torch.no_grad():
            torch.testing.assert_close(c(x, t, y).sample, m(x, t, y).sample)
        assert "pipefusion_compile" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_unknown_option_is_a_clear_error():
    model, kwargs = dit()
    compiled = torch.compile(model, backend="pipefusion", options={"num_stage": 2})
    with pytest.raises(Exception, match=r"unknown pipefusion option\(s\) \['num_stage'\]"):
        with torch.no_grad():
            compiled(**kwargs)


def test_more_stages_than_layers_is_a_clear_error():
    model, kwargs = dit(num_layers=2)
    compiled = torch.compile(model, backend="pipefusion", options={"num_stages": 3})
    with pytest.raises(Exception, match="num_stages=3 is more than the 2 attention layers"):
        with torch.no_grad():
            compiled(**kwargs)


def test_plan_logged_at_info_and_passes_at_debug(caplog):
    model, kwargs = pixart(num_layers=2)
    with caplog.at_level(logging.DEBUG, logger="pipefusion_compile"):
        compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
        with torch.no_grad():
            compiled(**kwargs)
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    debug = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "PipeFusion plan: N=2 stages, M=2 patches" in info
    assert "pipefusion pass rewrite_stale_attention: after" in debug
    assert "kv_cache_update" in debug


def test_graph_without_attention_runs_unchanged():
    w = torch.randn(4, 4, 3, 3)

    def conv_net(x):  # a 3x3 conv mixes rows, but with no attention there is nothing to pipeline
        return F.conv2d(x, w, padding=1)

    x = torch.randn(1, 4, 8, 8)
    compiled, programs = compile_pf(conv_net, num_stages=2)
    torch.testing.assert_close(compiled(x), conv_net(x))
    assert programs[0].__wrapped__.__self__.__class__.__name__ == "GraphModule"  # gm.forward, not a pipeline


def test_unsupported_op_next_to_attention_names_op_and_line():
    def net(x):
        t = x.flatten(2).transpose(1, 2)
        q = t.view(1, -1, 2, 2).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(1, 64, 4)
        running = a.cumsum(dim=1)   # a prefix sum over the tokens: no rule (a mean over them has one)
        return (a + running).transpose(1, 2).reshape(1, 4, 8, 8)

    compiled = torch.compile(net, backend="pipefusion", options={"num_stages": 1})
    with pytest.raises(Exception) as err:
        compiled(torch.randn(1, 4, 8, 8))
    msg = str(err.value)
    assert "cumsum" in msg and "no token rule" in msg, msg
    assert "running = a.cumsum(dim=1)" in msg


def test_cli_prints_plan(capsys):
    from pipefusion_compile.cli import main

    assert main(["plan", "PixArtTransformer2DModel", "--stages", "2", "--patches", "4"]) == 0
    out = capsys.readouterr().out
    assert "N=2 stages, M=4 patches" in out and "max/min stage FLOPs" in out
    assert "hidden_states_41 [1, 16, 16] 1.0 KiB" in out
    assert "patches (token rows): [0, 2), [2, 4), [4, 6), [6, 8)" in out


def test_cli_plans_a_builtin_model_with_the_token_axis_found(capsys):
    """CogVideoX's latents are [B, F, C, H, W]: the analysis finds token axis 1 (frames); --token-axis
    overrides it (axis 2, the channels, fails at the patch embedding's conv)."""
    from pipefusion_compile.cli import main

    assert main(["plan", "CogVideoXTransformer3DModel", "--stages", "2"]) == 0
    out = capsys.readouterr().out
    assert "axis 1, 4 rows" in out and "other tokens first" in out
    assert main(["plan", "CogVideoXTransformer3DModel", "--stages", "2", "--token-axis", "2"]) == 2
    err = capsys.readouterr().err
    assert "conv over the channels" in err and "image_embeds = self.proj(image_embeds)" in err


def test_cli_module_function_and_errors(capsys, monkeypatch):
    from pipefusion_compile.cli import main

    monkeypatch.chdir(os.path.join(ROOT, "tests"))
    assert main(["plan", "toy_models:make_toy", "--stages", "2", "--partition", "uniform"]) == 0
    assert "partition=uniform" in capsys.readouterr().out
    assert main(["plan", "DiTTransformer2DModel", "--stages", "9"]) == 2
    assert "num_stages=9 is more than the 4 attention layers" in capsys.readouterr().err
    assert main(["plan", "NoSuchModel"]) == 2


def test_simulate_false_without_process_group_is_clear():
    model, kwargs = dit()
    compiled = torch.compile(model, backend="pipefusion", options={"simulate": False})
    with pytest.raises(Exception, match="simulate=False needs an initialized torch.distributed process group"):
        with torch.no_grad():
            compiled(**kwargs)


def _inductor_matches_eager(factory, steps: int):
    """Run `factory()`'s model through a DDIM loop with eager and with inductor stage graphs (N=2, M=2),
    assert they agree, and return the inductor programs."""
    from helpers import call_model, sample_loop

    model, kwargs = factory()
    eager, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    want, _ = sample_loop(call_model(eager), kwargs, steps=steps)
    torch._dynamo.reset()
    inductor, programs = compile_pf(model, num_stages=2, num_patches=2, stage_backend="inductor")
    got, _ = sample_loop(call_model(inductor), kwargs, steps=steps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    return programs


@pytest.mark.slow
def test_inductor_and_eager_stage_backends_agree():
    programs = _inductor_matches_eager(pixart, steps=3)
    compiled = programs[0].stages[0].compiled
    assert set(compiled) == {("band", 4), ("band", 8)} and not isinstance(compiled[("band", 4)], torch.fx.GraphModule)


def test_graph_breaks_each_graph_with_attention_is_pipelined_on_its_own():
    from reference_pipefusion import ReferencePipeFusion
    from toy_models import ToyDiTWithGraphBreak

    torch.manual_seed(0)
    model = ToyDiTWithGraphBreak().eval()
    x = torch.randn(1, 4, 16, 16)
    compiled = torch.compile(model, backend="pipefusion", options={"num_stages": 2, "stage_backend": "eager"})
    with pytest.raises(Exception, match="graph breaks"):
        with torch.no_grad():
            compiled(x)

    torch._dynamo.reset()
    compiled, programs = compile_pf(model, num_stages=1, num_patches=2, stage_backend="eager")
    reference = ReferencePipeFusion(model, num_patches=2)
    with torch.no_grad():
        for step in range(3):
            xs = x + 0.5 * step  # the latents change from step to step, so stale K/V differ from fresh ones
            got, want = compiled(xs), reference(xs)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - model(xs)).abs().max() > 1e-3
    # dynamo reuses one block graph for the blocks of each half: state is kept per set of weights
    # (with symbolic sizes, which dynamo uses for a graph it sees again with other weights, the programs are
    # the per-shape ones of the dispatcher: pipefusion_compile.programs lists them all)
    assert max(len(p.instances) for p in pipefusion_compile.programs(compiled)) >= 2
    pipelined = pipefusion_compile.programs(compiled)
    assert len(pipelined) >= 2 and sum(len(p.plan.self_attention) for p in pipelined) >= 2


def test_inductor_compiles_the_text_piece_and_the_bands_of_a_joint_model():
    from pipefusion_compile.models import flux

    programs = _inductor_matches_eager(flux, steps=2)
    for stage in programs[0].stages:  # full sequence (warmup), the text piece, the bands: each compiled once
        assert set(stage.compiled) == {("full", 64), ("head",), ("band", 32)}
        assert not any(isinstance(fn, torch.fx.GraphModule) for fn in stage.compiled.values())


def test_timestep_is_the_input_whose_sinusoid_an_mlp_reads_not_a_rope_position():
    """ErnieImage passes `text_lens` (1-d, feeds RoPE's sin/cos) as well as the timestep: taking text_lens,
    equal at every call, made every call a new call stream, so nothing was ever pipelined."""
    from coverage_cases import case_by_name
    from pipefusion_compile.backend import find_timestep_input
    from pipefusion_compile.passes.tokens import analyze_tokens

    model, kwargs = case_by_name("ErnieImageTransformer2DModel").build()
    gm, ex = capture_model(model, kwargs)
    analyze_tokens(gm, ex)
    names = [ph.name for ph in gm.graph.find_nodes(op="placeholder")]
    assert "timestep" in names[find_timestep_input(gm, ex)]


class _UpperCaseGlobal(torch.nn.Module):
    """A prompt-only value held in a local named `P` (SANA-WM's UCPE ray transforms `P, P_T`), read by every
    block: dynamo names the node `P`, and fx lowercases that name when it makes the stage's placeholder."""

    def __init__(self):
        super().__init__()
        from toy_models import ToyDiT

        self.dit = ToyDiT(ff_mults=(1, 1, 1, 1))
        self.cond = torch.nn.Linear(8, 32)
        self.config = self.dit.config

    def forward(self, hidden_states, cond, return_dict=True):
        P = self.cond(cond).sigmoid()[:, None]  # noqa: N806 (the name is the point)
        x = self.dit.embed(hidden_states).flatten(2).transpose(1, 2)
        for blk in self.dit.blocks:
            x = blk(x) * P
        return self.dit.unpatchify(x, hidden_states.shape, return_dict)


def test_a_stage_input_whose_name_fx_renames_is_still_passed():
    from helpers import call_model, sample_loop

    torch.manual_seed(0)
    model = _UpperCaseGlobal().eval()
    kwargs = {"hidden_states": torch.randn(1, 4, 16, 16), "cond": torch.randn(1, 8)}
    _, want = sample_loop(lambda x, t, **kw: model(x, **kw, return_dict=False)[0], kwargs, steps=2)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, got = sample_loop(lambda x, t, **kw: compiled(x, **kw, return_dict=False)[0], kwargs, steps=2)
    assert programs and any(i.name == "P" for s in programs[0].stages for i in s.lowered.inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
