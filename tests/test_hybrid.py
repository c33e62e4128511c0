"""CFG-parallel (the batch split over a "cfg" mesh dim, a pipeline per part): the batch analysis, the part's
graph, one process against the plain model and the same plan, and 4 real ranks against one process."""
import pytest
import torch
import torch.nn as nn

import pipefusion_compile
from dist_utils import run_ranks
from dist_workers import generate, mismatched_options, pipeline_sequence, run_job, with_rank_threads
from graph_utils import capture_model
from pipefusion_compile.errors import OptionsError, UnsupportedGraphError
from pipefusion_compile.models import BUILTIN
from pipefusion_compile.passes.batch import BatchRule, split_batch
from pipefusion_compile.passes.meta import node_meta

FAMILIES = ["PixArtTransformer2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
            "HunyuanDiT2DModel", "WanTransformer3DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel"]
STEPS = 4


def _tensors(out):
    return [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (tuple, list)) else [out]


# --------------------------------------------------------------------------------------------- analysis + pass
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("batch,parts", [(2, 2), (4, 2)])
def test_part_graphs_joined_equal_the_full_graph(name, batch, parts):
    """Differential: the part's graph on each part of the inputs, joined along the found output axes, is the full
    graph's result; every batched input is found (the image input among them) and none of the others."""
    model, kwargs = BUILTIN[name](batch=batch)
    gm, ex = capture_model(model, kwargs)
    part_gm, part_inputs, split = split_batch(gm, ex, parts)
    assert split.batch == batch and split.part_batch == batch // parts
    batched = {i for i, x in enumerate(ex) if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)
               and x.dim() and x.shape[0] == batch}
    assert set(split.input_axes) == batched and set(split.input_axes.values()) == {0}
    assert split.counts[str(BatchRule.INPUT)] == len(batched)
    assert split.rewrites, "dynamo bakes the batch into views: some size must have been rewritten"
    with torch.no_grad():
        full = _tensors(gm(*ex))
        outs = [_tensors(part_gm(*split.cut(ex, p))) for p in range(parts)]
    for i, f in enumerate(full):
        torch.testing.assert_close(torch.cat([o[i] for o in outs], split.output_axes[i]), f, rtol=1e-5, atol=1e-5)
    for n in part_gm.graph.nodes:   # the part's graph carries the part's example values
        if n.op == "placeholder" and n.meta.get("example_value") is not None:
            i = list(part_gm.graph.find_nodes(op="placeholder")).index(n)
            if i in split.input_axes:
                assert n.meta["example_value"].shape[0] == batch // parts


def test_rewritten_sizes_are_the_views_of_the_batch():
    """Graph-pass level: exactly the ints that measure the batch change (a view's batch dim, a token count
    that happens to equal B stays)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x):                                # x: [2, 2, 4]: B = 2 and 2 tokens
            h = self.proj(x).view(2, 2, 2, 4)                # [B, S, heads, d]
            c = self.cls.expand(2, -1, -1)                   # the batch created from a size-1 dim
            q = h.transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 2, 8)
            return torch.cat([c, o], 1)

    m = M()
    gm, ex = capture_model(m, {"x": torch.randn(2, 2, 4)})
    part_gm, _, split = split_batch(gm, ex, 2)
    assert {(r.position, r.full, r.part) for r in split.rewrites} == {(0, 2, 1)}
    assert len(split.rewrites) == 3   # view, expand, reshape: each its batch dim only
    views = [n for n in part_gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape", "expand")]
    assert [tuple(a for a in n.args[1:]) for n in views] == [(1, 2, 2, 4), (1, -1, -1), (1, 2, 8)]
    rules = {str(node_meta(n).batch.rule) for n in gm.graph.nodes if node_meta(n).batch is not None}
    assert {"input", "created", "reshaped", "measured"} <= rules
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([part_gm(*split.cut(ex, p))[0] for p in range(2)]), gm(*ex)[0])


class _Mixer(nn.Module):
    """Self-attention over tokens, then a last op given by name that may combine the samples of the batch."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.proj = nn.Linear(4, 4)

    def forward(self, x, table):   # x [B, S, 4], table [S', 4] (S' == B: looks batched, is not)
        h = self.proj(x)
        h = torch.nn.functional.scaled_dot_product_attention(h[:, None], h[:, None], h[:, None])[:, 0]
        if self.how == "mean_over_batch":
            return h - h.mean(0, keepdim=True)
        if self.how == "softmax_over_batch":
            return torch.softmax(h, 0)
        if self.how == "first_sample":
            return h + h[0]
        if self.how == "cat_on_batch":
            return torch.cat([h, h.flip(0)], 0)[:2]
        if self.how == "roll_batch":
            return h.roll(1, 0)
        if self.how == "table":
            return h + table                  # a per-token [S, 4] table with S == B: lines up with the tokens
        return h


@pytest.mark.parametrize("how,what", [
    ("mean_over_batch", "mean along the batch axis"), ("softmax_over_batch", "softmax along the batch axis"),
    ("first_sample", "combines the samples"), ("cat_on_batch", "along the batch axis"),
    ("roll_batch", "roll along the batch axis")])
def test_ops_that_combine_samples_are_refused_by_name(how, what):
    m = _Mixer(how)
    gm, ex = capture_model(m, {"x": torch.randn(2, 2, 4), "table": torch.randn(2, 4)})
    with pytest.raises(UnsupportedGraphError) as e:
        split_batch(gm, ex, 2)
    assert what in str(e.value) and "node:" in str(e.value) and "from:" in str(e.value), str(e.value)


def test_samples_kept_apart_pass():
    gm, ex = capture_model(_Mixer("none"), {"x": torch.randn(2, 3, 4), "table": torch.randn(5, 4)})
    _, _, split = split_batch(gm, ex, 2)
    assert split.output_axes == (0,)


def test_an_input_whose_leading_dim_only_equals_the_batch_is_not_split():
    """A per-token [S, 4] table with S == B looks batched by its leading dim; its axis does not line up with the
    image input's batch, so the analysis takes it as the same for every sample, and the split is exact."""
    x, table = torch.randn(2, 2, 4), torch.randn(2, 4)
    gm, ex = capture_model(_Mixer("table"), {"x": x, "table": table})
    part_gm, _, split = split_batch(gm, ex, 2)
    positions = {i for i, v in enumerate(ex) if v is table}
    assert positions and not positions & set(split.input_axes)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([part_gm(*split.cut(ex, p))[0] for p in range(2)]), gm(*ex)[0])


# --------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("name", ["PixArtTransformer2DModel", "SD3Transformer2DModel", "DiTTransformer2DModel"])
def test_cfg_parallel_in_one_process(name):
    """cfg 2 x pp 2: with warmup covering every step it is the plain model; pipelined, it is the same plan
    without the split up to the last bits (each part runs batch-1 kernels, the plan without it batch-2 ones)."""
    cfg = {"num_stages": 2, "num_patches": 2, "cfg_parallel": 2}
    plain = run_job(name, {"batch": 2}, {"num_stages": 1, "num_patches": 1}, STEPS)
    warm = run_job(name, {"batch": 2}, {**cfg, "warmup_steps": STEPS}, STEPS)
    torch.testing.assert_close(warm["final"], plain["final"], rtol=1e-5, atol=1e-5)
    split = run_job(name, {"batch": 2}, cfg, STEPS)
    same = run_job(name, {"batch": 2}, {"num_stages": 2, "num_patches": 2}, STEPS)
    for a, b in zip(split["steps"], same["steps"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert not torch.allclose(split["final"], plain["final"], atol=1e-4)   # stale K/V did change something
    assert [s["pipelined_calls"] for s in split["part_stats"]] == [STEPS - 1] * 2


def test_bad_cfg_degrees_are_named():
    model, kwargs = BUILTIN["PixArtTransformer2DModel"](batch=3)
    compiled = torch.compile(model, backend="pipefusion", options={"cfg_parallel": 2, "stage_backend": "eager"})
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        with torch.no_grad():
            compiled(**kwargs)
    assert "cfg_parallel=2" in str(e.value) and "batch of 3" in str(e.value)
    with pytest.raises(OptionsError, match="cfg_parallel=0"):
        pipefusion_compile.PipefusionOptions(cfg_parallel=0)
    with pytest.raises(OptionsError, match="DeviceMesh"):
        pipefusion_compile.PipefusionOptions(mesh=[[0, 1]])


# --------------------------------------------------------------------------------------------- 4 real ranks
def test_cfg2_x_pp2_on_four_ranks_equals_simulate_bit_for_bit(tmp_path):
    jobs = [(name, {"batch": 2}, {"cfg_parallel": 2, "num_patches": 2})
            for name in ("PixArtTransformer2DModel", "SD3Transformer2DModel")]
    jobs.append(("DiTTransformer2DModel", {"batch": 4}, {"cfg_parallel": 2, "num_patches": 4}))
    results = run_ranks(generate, 4, jobs, STEPS, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(jobs):
        want = with_rank_threads(run_job, name, fkw, {**options, "num_stages": 2, "simulate": True}, STEPS)
        for res in results:
            got = res["value"][j]
            assert torch.equal(got["final"], want["final"]), (name, res["rank"])
            for a, b in zip(got["steps"], want["steps"]):
                assert torch.equal(a, b), (name, res["rank"])
            # bytes per step: the pipeline's within the part as its plan predicts, and the cfg gather: this
            # rank's part of the output to the other part, every step
            assert got["stats"]["bytes_sent"] == got["plan_bytes"], (name, res["rank"])
            half = want["steps"][0].numel() * 4 // 2
            assert got["stats"]["cfg_bytes_sent"] == half * STEPS, (name, res["rank"])


def test_degrees_not_the_world_size_are_refused(tmp_path):
    options = [{"cfg_parallel": 2, "num_stages": 2}, {"sequence_parallel": 2, "num_stages": 2}]
    results = run_ranks(mismatched_options, 2, options, tmp_path=tmp_path, timeout=200, allow_errors=True)
    assert ("cfg_parallel=2 x num_stages=2 x sequence_parallel=1 = 4 ranks, but the process group has 2"
            in results[0].get("error", "")), results[0]
    assert ("cfg_parallel=1 x num_stages=2 x sequence_parallel=2 = 4 ranks, but the process group has 2"
            in results[1].get("error", "")), results[1]


@pytest.mark.parametrize("name", ["pixart_sigma", "sd3"])
def test_unchanged_pipeline_on_four_ranks_cfg2_x_pp2(name, tmp_path):
    variants = ["first", "batch2"]
    options = {"cfg_parallel": 2, "num_patches": 2}
    results = run_ranks(pipeline_sequence, 4, name, options, variants, tmp_path=tmp_path, timeout=600)
    want = with_rank_threads(pipeline_sequence, 0, 1, name, {**options, "num_stages": 2, "simulate": True}, variants)
    plain = with_rank_threads(pipeline_sequence, 0, 1, name, {"num_stages": 2, "num_patches": 2, "simulate": True},
                      variants)
    for res in results:
        got = res["value"]
        assert got["distributed"] and got["stages"] == [2]
        for variant, a, b in zip(variants, got["outputs"], want["outputs"]):
            assert torch.equal(a, b), (name, variant, res["rank"])
    for a, b in zip(want["outputs"], plain["outputs"]):   # the same plan without the split: last bits only
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- two calls per step
def test_two_call_form_in_one_process_runs_each_stream_on_its_part():
    """Wan with CFG as two calls per step, batch 1: stream k of a step runs on part k; the result is the same
    program with its two call streams (each its own caches), bit for bit."""
    import tiny_pipelines

    def run(options):
        torch._dynamo.reset()
        tiny = tiny_pipelines.wan()
        tiny.pipe.transformer = torch.compile(tiny.pipe.transformer, backend="pipefusion",
                                              options={"stage_backend": "eager", **options})
        return tiny("first"), pipefusion_compile.programs(tiny.pipe.transformer)

    got, parts = run({"num_stages": 2, "num_patches": 2, "cfg_parallel": 2})
    want, (one,) = run({"num_stages": 2, "num_patches": 2})
    assert torch.equal(got, want)
    assert len(parts) == 2 and all(p.stats["streams"] == 1 for p in parts) and one.stats["streams"] == 2
    assert [p.stats["pipelined_calls"] + p.stats["warmup_calls"] for p in parts] == [3, 3]


def test_cfg_on_a_batch_of_one_with_one_call_per_step_is_refused():
    import tiny_pipelines

    torch._dynamo.reset()
    tiny = tiny_pipelines.wan()
    tiny.pipe.transformer = torch.compile(tiny.pipe.transformer, backend="pipefusion",
                                          options={"stage_backend": "eager", "cfg_parallel": 2})
    with pytest.raises(OptionsError, match="cfg_parallel=2 on a batch of 1: the model is called once per step"):
        tiny("guidance_off")


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_two_call_form_on_four_ranks_equals_simulate(name, tmp_path):
    variants = ["first"]
    options = {"cfg_parallel": 2, "num_patches": 2}
    results = run_ranks(pipeline_sequence, 4, name, options, variants, tmp_path=tmp_path, timeout=600)
    want = with_rank_threads(pipeline_sequence, 0, 1, name, {**options, "num_stages": 2, "simulate": True}, variants)
    for res in results:
        got = res["value"]
        assert got["distributed"] and got["stages"] == [2]
        assert torch.equal(got["outputs"][0], want["outputs"][0]), (name, res["rank"])
        # bytes: each rank's pipeline sends per call what its part's plan predicts (the last call, pipelined),
        # the last stage its output bands to the part's other stage, and the owner part's last stage each of
        # its calls' whole output to both ranks of the other part
        stats, calls = got["stats"], got["stats"]["warmup_calls"] + got["stats"]["pipelined_calls"]
        assert stats["pipelined_calls"] > 0 and stats["bytes_sent"] == got["plan_bytes"], (name, res["rank"])
        last = got["stage"] == 1
        assert stats["output_bytes"] == (got["out_bytes"] if last else 0), (name, res["rank"])
        assert stats.get("cfg_bytes_sent", 0) == (calls * got["out_bytes"] * 2 if last else 0), (name, res["rank"])


# --------------------------------------------------------------------------------------------- the sweep
def _coverage_cases():
    from coverage_cases import all_cases

    return [c for c in all_cases() if not c.skip and "[" not in c.name]


@pytest.mark.parametrize("case", _coverage_cases(), ids=lambda c: c.name)
def test_batch_split_of_every_transformer_class(case):
    """Every diffusers transformer class of the coverage table, at its CFG batch of 2: each graph with attention
    splits into parts whose joined result is the full graph's, or is refused with a PipefusionError naming the
    node, never a silently different result (`make test` runs every third class, `make test-full` all)."""
    from pipefusion_compile.errors import PipefusionError
    from pipefusion_compile.passes.sdpa import is_sdpa

    torch.manual_seed(0)
    model, kwargs = case.build()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(**dict(case.dynamo_config)):
        torch.compile(model, backend=capture)(**kwargs, return_dict=False)
    checked = 0
    for gm, ex in graphs:
        if not any(is_sdpa(n) for n in gm.graph.nodes):
            continue
        try:
            part_gm, _, split = split_batch(gm, ex, 2)
        except PipefusionError as e:
            assert "node:" in str(e) or "batch of" in str(e), str(e)
            continue
        with torch.no_grad():
            full = gm(*ex)
            parts = [part_gm(*split.cut(ex, p)) for p in range(2)]
        full_t = [o for o in pytest_leaves(full) if isinstance(o, torch.Tensor)]
        part_t = [[o for o in pytest_leaves(p) if isinstance(o, torch.Tensor)] for p in parts]
        for i, f in enumerate(full_t):
            torch.testing.assert_close(torch.cat([p[i] for p in part_t], split.output_axes[i]), f, rtol=1e-4,
                                       atol=1e-5, msg=lambda m: f"{case.name} output {i}: {m}")
        checked += 1
    assert graphs


def pytest_leaves(value):
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(value)
