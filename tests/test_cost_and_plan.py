"""Cost analysis against analytic FLOP counts; cut finding and partition; plan errors."""
import pytest
import torch

from graph_utils import capture_model
from pipefusion_compile.errors import OptionsError, PlanError
from pipefusion_compile.models import dit, pixart
from pipefusion_compile.options import PipefusionOptions
from pipefusion_compile.passes.partition import find_cut_candidates
from pipefusion_compile.plan import build_plan, patch_bands
from toy_models import make_toy


def plan_for(model_and_kwargs, **options):
    model, kwargs = model_and_kwargs
    gm, ex = capture_model(model, kwargs)
    return build_plan(gm, ex, PipefusionOptions.from_dict(options).resolve())[0]


def linear(m, k, n):
    return 2 * m * k * n


def attention(sq, sk, d):
    return 4 * sq * sk * d  # QK^T and PV, batch 1, all heads together (heads * head_dim = d)


def test_cpu_sdpa_has_a_flop_formula():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode(), FlopCounterMode(display=False) as fc:
        q = torch.empty(2, 3, 10, 8)
        torch._C._nn.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 4 * 2 * 3 * 10 * 10 * 8


def test_pixart_stage_flops_match_analytic_count():
    d, s, t, layers = 16, 64, 6, 4
    plan = plan_for(pixart(num_layers=layers), num_stages=layers, partition="uniform")
    block = (4 * linear(s, d, d) + attention(s, s, d)      # self-attention: q, k, v, out
             + 2 * linear(s, d, d) + attention(s, t, d)    # cross-attention: q, out (K/V of the prompt are global)
             + linear(s, d, 4 * d) + linear(s, 4 * d, d))  # feed-forward
    embed = linear(s, 4 * 2 * 2, d)                        # patch-embedding conv
    unembed = linear(s, d, 2 * 2 * 8)                      # proj_out
    assert [st.flops for st in plan.stages] == [embed + block, block, block, block + unembed]
    cross_kv = 2 * linear(t, d, d)
    assert plan.stages[1].global_flops >= cross_kv
    # GLOBAL work: timestep MLP (256->16->16), adaLN (16->96), caption MLP (12->16->16), prompt K/V per layer
    global_flops = (linear(1, 256, d) + linear(1, d, d) + linear(1, d, 6 * d) + linear(t, 12, d) + linear(t, d, d)
                    + layers * cross_kv)
    assert plan.total_flops - sum(st.flops for st in plan.stages) == global_flops


def test_dit_stage_flops_match_analytic_count():
    d, s = 16, 64
    plan = plan_for(dit(num_layers=2), num_stages=2, partition="uniform")
    block = 4 * linear(s, d, d) + attention(s, s, d) + linear(s, d, 4 * d) + linear(s, 4 * d, d)
    assert [st.flops for st in plan.stages] == [linear(s, 16, d) + block, block + linear(s, d, 2 * 2 * 8)]


@pytest.mark.parametrize("factory", [pixart, dit])
@pytest.mark.parametrize("stages", [2, 4])
def test_flops_partition_is_balanced(factory, stages):
    plan = plan_for(factory(num_layers=8), num_stages=stages)
    assert plan.max_min_ratio <= 1.05, str(plan)
    assert sum(len(st.attention_layers) for st in plan.stages) == 8


def test_flops_partition_beats_uniform_on_uneven_blocks():
    flops = plan_for(make_toy(), num_stages=2)
    uniform = plan_for(make_toy(), num_stages=2, partition="uniform")
    assert [len(s.attention_layers) for s in uniform.stages] == [3, 3]
    assert flops.max_min_ratio < uniform.max_min_ratio
    assert max(s.flops for s in flops.stages) < max(s.flops for s in uniform.stages)
    assert flops.max_min_ratio < 1.2, str(flops)


def test_explicit_layers_per_stage():
    plan = plan_for(dit(num_layers=4), partition=[1, 3])
    assert plan.num_stages == 2
    assert [s.attention_layers for s in plan.stages] == [(0,), (1, 2, 3)]
    with pytest.raises(PlanError, match="covers 3 attention layers"):
        plan_for(dit(num_layers=4), partition=[1, 2])


def test_cut_candidates_are_the_residual_stream():
    model, kwargs = pixart(num_layers=2)
    gm, ex = capture_model(model, kwargs)
    build_plan(gm, ex, PipefusionOptions().resolve())
    cands = find_cut_candidates(gm)
    assert all(len(cands.live[p]) == 1 for p in cands.positions)
    # 3 residual points per PixArt block (after self-attn, cross-attn, FF), + the embedding / final norm
    assert len([p for p in cands.positions if cands.attention_positions[0] < p < cands.attention_positions[-1]]) >= 3
    assert set(cands.live_bytes.values()) <= {64 * 16 * 4, 64 * 32 * 4, 4 * 16 * 16 * 4, 16 * 4 * 8 * 4 * 2,
                                              16 * 16 * 4 * 4 * 2 * 1}


def test_plan_prints_a_table_and_cut_sizes():
    plan = plan_for(pixart(), num_stages=2, num_patches=4)
    text = str(plan)
    assert "N=2 stages, M=4 patches" in text
    assert "transformer_blocks.0.attn1 .. transformer_blocks.1.attn1" in text
    assert len(plan.cuts) == 1
    (t,) = plan.cuts[0].tensors
    assert t.patch_shape == (1, 16, 16) and t.patch_bytes == 16 * 16 * 4
    assert plan.stages[0].kv_cache_bytes == 2 * 2 * 64 * 16 * 4  # K and V of two layers, full sequence
    assert plan.patches == ((0, 2), (2, 2), (4, 2), (6, 2))


def test_patch_bands():
    assert patch_bands(8, 4) == ((0, 2), (2, 2), (4, 2), (6, 2))
    assert patch_bands(7, 3) == ((0, 3), (3, 2), (5, 2))
    with pytest.raises(PlanError, match="larger than the 7 token rows"):
        patch_bands(7, 8)


def test_bad_plans_fail_early():
    with pytest.raises(PlanError, match="num_stages=5 is more than the 4 attention layers"):
        plan_for(dit(num_layers=4), num_stages=5)
    with pytest.raises(PlanError, match="num_patches=9 is larger than the 8 token rows"):
        plan_for(dit(), num_stages=2, num_patches=9)


def test_options_validation():
    with pytest.raises(OptionsError, match="unknown pipefusion option.*num_stage"):
        PipefusionOptions.from_dict({"num_stage": 2})
    with pytest.raises(OptionsError, match="num_patches=0"):
        PipefusionOptions.from_dict({"num_patches": 0})
    with pytest.raises(OptionsError, match="stage_backend='tvm'"):
        PipefusionOptions.from_dict({"stage_backend": "tvm"})
    with pytest.raises(OptionsError, match="partition='blocks'"):
        PipefusionOptions.from_dict({"partition": "blocks"})
    with pytest.raises(OptionsError, match="has 2 stages but num_stages=3"):
        PipefusionOptions.from_dict({"partition": [1, 2], "num_stages": 3})
    with pytest.raises(OptionsError, match="warmup_steps"):
        PipefusionOptions.from_dict({"warmup_steps": -1})
    assert PipefusionOptions.from_dict({"warmup_steps": 0}).warmup_steps == 0
    opts = PipefusionOptions.from_dict({}).resolve()
    assert (opts.num_stages, opts.num_patches, opts.warmup_steps, opts.simulate) == (1, 1, 1, True)
    opts = PipefusionOptions.from_dict({"num_stages": 3}).resolve()
    assert opts.num_patches == 3
    assert PipefusionOptions.from_dict({"partition": [2, 2]}).resolve().num_stages == 2


def test_long_skip_is_priced_on_every_cut_it_crosses():
    from toy_models import make_skips

    plan = plan_for(make_skips(), num_stages=3, partition="uniform")
    assert [s.attention_layers for s in plan.stages] == [(0, 1), (2, 3), (4, 5)]
    skip = next(t for t in plan.crossing if t.consumers == (1, 2))
    assert skip.producer == 0
    for cut in plan.cuts:  # the residual stream and the skip in flight
        assert len(cut.tensors) == 2 and skip in cut.tensors
    assert "(stage 0->2)" in str(plan)
    # stage 0 sends the residual and the skip to stage 1 and the skip to stage 2: 3 activations per step
    assert plan.p2p_bytes_per_step(0) == 3 * 64 * 32 * 4 and plan.p2p_bytes_per_step(2) == 0


@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "DiTTransformer2DModel", "LTXVideoTransformer3DModel",
                                  "WanTransformer3DModel", "HunyuanDiT2DModel", "SD3Transformer2DModel",
                                  "FluxTransformer2DModel", "CogVideoXTransformer3DModel"])
def test_flops_partition_balance_on_every_builtin_model(name):
    from pipefusion_compile.models import BUILTIN, BUILTIN_OPTIONS

    # HunyuanDiT at its real depth (40 blocks, half of them skip blocks): with 16 blocks, N=4 reaches only
    # 1.136 (its skip blocks cost more and each sub-block is a large step); N=2 is 1.012 there too.
    model, kwargs = BUILTIN[name](num_layers=40 if name == "HunyuanDiT2DModel" else 16)
    gm, ex = capture_model(model, kwargs)
    for stages in (2, 4):
        bound = 1.10
        opts = PipefusionOptions.from_dict({"num_stages": stages, **BUILTIN_OPTIONS.get(name, {})}).resolve()
        plan = build_plan(gm, ex, opts)[0]
        assert plan.max_min_ratio <= bound, str(plan)


def test_balanced_cuts_prefers_the_larger_smallest_stage_among_equal_bottlenecks():
    from pipefusion_compile.passes.partition import CutCandidates, balanced_cuts

    costs = [4, 4, 1, 4, 4]
    cands = CutCandidates(order=tuple(map(str, range(5))), positions=(1, 2, 3, 4), live={},
                          live_bytes={p: 4 for p in range(1, 5)}, attention_positions=())
    # the bottleneck is 8 at best, e.g. [4, 4] | [1] | [4, 4] (a stage that idles) or [4, 4] | [1, 4] | [4]
    cuts = balanced_cuts(costs, cands, 3)
    bounds = [0, *cuts, 5]
    stages = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert max(stages) == 8 and min(stages) == 4


def test_flux_partition_by_cost_never_has_a_larger_bottleneck_than_by_block_count():
    """Flux mixes double-stream and single-stream blocks. In diffusers' Flux both cost 12 D^2 FLOPs per token
    (double: qkv 3 + out 1 + MLP 8 per stream; single: fused qkv+MLP-in 7 + out 5), so balancing by cost
    and by block count agree up to the embedders and the final layer, which only the cost partition sees:
    its bottleneck stage is never larger, and its balance better where the split falls unevenly."""
    from pipefusion_compile.models import flux

    strictly_better = 0
    for double, single in ((2, 4), (2, 8), (3, 6)):
        model, kwargs = flux(num_layers=double, num_single_layers=single)
        gm, ex = capture_model(model, kwargs)
        for stages in (2, 4):
            by_cost = build_plan(gm, ex, PipefusionOptions(num_stages=stages).resolve())[0]
            by_count = build_plan(gm, ex, PipefusionOptions(num_stages=stages, partition="uniform").resolve())[0]
            # the cost partition's bottleneck is optimal to within its 1 % tolerance (which it spends on a
            # larger smallest stage)
            assert max(s.flops for s in by_cost.stages) <= 1.01 * max(s.flops for s in by_count.stages)
            strictly_better += by_cost.max_min_ratio < by_count.max_min_ratio - 0.01
    assert strictly_better >= 1


def test_plan_says_which_axis_the_patches_split():
    from pipefusion_compile.models import cogvideox, ltx_video, pixart, wan

    expected = {wan: "whole latent frames (axis 2 of the [B, C, F, H, W]", pixart: "bands of latent rows (axis 2)",
                ltx_video: "packed token sequence (axis 1)", cogvideox: "whole latent frames (axis 1 of the [B, F"}
    for factory, text in expected.items():
        model, kwargs = factory()
        gm, ex = capture_model(model, kwargs)
        opts = {"num_stages": 2, "token_axis": 1} if factory is cogvideox else {"num_stages": 2}
        plan = build_plan(gm, ex, PipefusionOptions.from_dict(opts).resolve())[0]
        assert text in plan.split and f"split: {plan.split}" in str(plan)
