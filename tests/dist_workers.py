"""Functions the spawned ranks run (importable by the spawned processes)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import pipefusion_compile
from helpers import call_model, sample_loop
from pipefusion_compile.models import BUILTIN, BUILTIN_OPTIONS


def factory(name):
    if name == "toy:skips":
        from toy_models import make_skips

        return make_skips
    if name.startswith("stream:"):  # tests/stream_dits.py: "stream:registers_first"
        import stream_dits

        return lambda **kw: stream_dits.make_register_stream_dit(name.split(":")[1], **kw)
    if name.startswith("hw:"):  # a hand-written DiT of tests/handwritten_dits.py: "hw:make_uvit", "hw:make_uvit:4"
        import handwritten_dits

        _, fn, *args = name.split(":")
        make = getattr(handwritten_dits, fn)
        return lambda **kw: make(*[int(a) if a.isdigit() else a for a in args], **kw)
    return BUILTIN[name]


def with_rank_threads(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in this process with the ranks' thread count (1): a reduction (e.g. HunyuanDiT's
    text pooling mean) may sum in another order with more threads, which changes the last bit, so a one-process
    reference for a multi-rank run is computed this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def run_job(model_name, factory_kwargs, options, steps, seed=1, group=None):
    torch._dynamo.reset()
    model, kwargs = factory(model_name)(**factory_kwargs)
    opts = {"stage_backend": "eager", **BUILTIN_OPTIONS.get(model_name, {}), **options}
    if group is not None:
        opts["group"] = group
    elif dist.is_initialized() and not ({"parallel", "cfg_parallel", "num_stages", "mesh", "sequence_parallel"} & set(opts)):
        # these suites test the pipeline over the world; parallel='auto' (the default) may split a batch instead
        opts["num_stages"] = dist.get_world_size()
    compiled = torch.compile(model, backend="pipefusion", options=opts)
    final, per_step = sample_loop(call_model(compiled), kwargs, steps=steps, seed=seed)
    found = pipefusion_compile.programs(compiled)
    # cfg_parallel in one process: one program per part of the batch (on ranks: this rank's part's)
    parts = opts.get("cfg_parallel", 1) if opts.get("simulate") or not torch.distributed.is_initialized() else 1
    assert len(found) == parts, (len(found), parts)
    program = found[0]
    result = {"final": final, "steps": per_step, "stats": dict(program.stats),
              "part_stats": [dict(p.stats) for p in found]}
    if opts.get("parallel") == "auto":
        from pipefusion_compile.degrees import choice_of

        result["auto_choice"] = str(choice_of(compiled))
    if hasattr(program, "stage_index") and program.plan.sp_degree > 1:
        from pipefusion_compile.sequence_program import sp_bytes_per_step

        warm, analysis = program.options.warmup_steps, program.all_stages[0].lowered.analysis
        result["sp_plan_bytes"] = sum(sp_bytes_per_step(program.plan, program.gm, analysis, program.stage_index,
                                                        pipelined=s >= warm) for s in range(steps))
        result["plan_bytes_by_step"] = [program.plan.p2p_bytes_per_step(program.stage_index, s >= warm)
                                        for s in range(steps)]
    if hasattr(program, "stage_index"):
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        result.update(plan_bytes=program.plan.p2p_bytes_per_step(program.stage_index), param_bytes=total,
                      stage=program.stage_index, schedule=str(program.schedule_graph(pipelined=True).graph),
                      routes={k: [i.name for i in v] for k, v in program.routes(program.plan.pieces(True)[-1]).items()})
    return result


def generate(rank, world, jobs, steps):
    """Each job: (model name, factory kwargs, options). Compile on this rank and run a DDIM loop."""
    return [run_job(name, fkw, opts, steps) for name, fkw, opts in jobs]


def generate_in_groups(rank, world, group_size, job, steps):
    """The world split into pipelines of `group_size` ranks; each group samples its own seed."""
    groups = [dist.new_group(list(range(g, g + group_size))) for g in range(0, world, group_size)]
    mine = rank // group_size
    name, fkw, opts = job
    return run_job(name, fkw, opts, steps, seed=100 + mine, group=groups[mine])


def die_mid_step(rank, world, victim, step, patch, options):
    """Rank `victim` exits abruptly while computing `patch` of `step`; the others must fail, not hang."""
    from pipefusion_compile.schedule import StageCall as _StageCall

    original = _StageCall.forward

    def forward(self, patch_index, *rest):
        program = self._owner[0]
        if rank == victim and program.comm.step == step and patch_index == patch:
            os._exit(17)
        return original(self, patch_index, *rest)

    _StageCall.forward = forward
    return run_job("PixArtTransformer2DModel", {}, options, steps=8)


def mismatched_options(rank, world, options_per_rank):
    return run_job("DiTTransformer2DModel", {}, options_per_rank[rank], steps=2)


def pipeline_sequence(rank, world, name, options, variants):
    """An unchanged diffusers pipeline (tests/tiny_pipelines.py) whose transformer is compiled with the
    backend, run on `variants` in order in this process (e.g. a resolution change mid-run)."""
    import tiny_pipelines

    torch._dynamo.reset()
    tiny = getattr(tiny_pipelines, name)()
    tiny.pipe.transformer = torch.compile(tiny.pipe.transformer, backend="pipefusion",
                                          options={"stage_backend": "eager", **tiny.options, **options})
    outputs = [tiny(v) for v in variants]
    found = pipefusion_compile.programs(tiny.pipe.transformer)
    result = {"outputs": outputs, "shapes": sorted({p.plan.input_shape for p in found}),
              "stages": sorted({p.plan.num_stages for p in found}),
              "distributed": all(hasattr(p, "stage_index") for p in found)}
    if len(found) == 1 and hasattr(found[0], "stage_index"):   # what this rank sent, next to what its plan says
        program = found[0]
        outs = program.gm.graph.find_nodes(op="output")[0].all_input_nodes
        result.update(stats=dict(program.stats), stage=program.stage_index,
                      plan_bytes=program.plan.p2p_bytes_per_step(program.stage_index),
                      out_bytes=sum(v.numel() * v.element_size() for v in (o.meta.get("example_value") for o in outs)
                                    if isinstance(v, torch.Tensor)))
    return result


def pipeline_jobs(rank, world, jobs):
    """`pipeline_sequence` for each (pipeline name, options, variants) in turn, in one process."""
    return [pipeline_sequence(rank, world, name, options, variants) for name, options, variants in jobs]


def builtin_shapes(rank, world, model_name, sizes, options, steps=3):
    """A built-in model compiled once, sampled at each of `sizes` in turn (default torch.compile settings)."""
    torch._dynamo.reset()
    make = factory(model_name)
    model, _ = make()
    opts = {"stage_backend": "eager", **BUILTIN_OPTIONS.get(model_name, {}), **options}
    compiled = torch.compile(model, backend="pipefusion", options=opts)
    finals = []
    for size in sizes:
        _, kwargs = make(sample_size=size)
        finals.append(sample_loop(call_model(compiled), kwargs, steps=steps)[0])
    found = pipefusion_compile.programs(compiled)
    return {"finals": finals, "cuts": sorted({tuple(s.start for s in p.plan.stages) for p in found})}


LAZY_MODES = ("lazy", "per_step", "forced")


def pipeline_lazy_modes(rank, world, name, options, variants, steps=5):
    """An unchanged diffusers pipeline (tests/tiny_pipelines.py) run three ways in this process: with patch-lazy
    outputs ("lazy", the default), with `lazy_outputs=False` ("per_step": every call waits for its whole
    output), and lazy with a loop that forces the output each step (its scheduler first reads the model
    output's sum, as a progress callback computing a statistic would). Returns the final latents of each
    variant per mode, and per mode how many lazy outputs the calls returned and which ops materialized."""
    import tiny_pipelines
    from pipefusion_compile import lazy

    found = {}
    for mode in LAZY_MODES:
        torch._dynamo.reset()
        tiny = getattr(tiny_pipelines, name)()
        opts = {"stage_backend": "eager", **tiny.options, **options, "lazy_outputs": mode != "per_step"}
        tiny.pipe.transformer = torch.compile(tiny.pipe.transformer, backend="pipefusion", options=opts)
        if mode == "forced":
            step = tiny.pipe.scheduler.step

            def forcing_step(model_output, *args, _step=step, **kwargs):
                float(model_output.sum())
                return _step(model_output, *args, **kwargs)

            tiny.pipe.scheduler.step = forcing_step
        outputs, materialized = [], []
        for v in variants:
            tiny.calls[v] = dict(tiny.calls[v], num_inference_steps=steps)
            before = dict(lazy.MATERIALIZED)
            out = tiny(v)
            materialized.append({k: n - before.get(k, 0) for k, n in lazy.MATERIALIZED.items() if n != before.get(k, 0)})
            outputs.append(lazy.materialize(out).clone())
        programs = pipefusion_compile.programs(tiny.pipe.transformer)
        found[mode] = {"outputs": outputs, "materialized": materialized,
                       "lazy_outputs": sum(p.stats.get("lazy_outputs", 0) for p in programs),
                       "pipelined_calls": sum(p.stats["pipelined_calls"] for p in programs),
                       "calls": sum(p.stats["pipelined_calls"] + p.stats["warmup_calls"] for p in programs),
                       "programs": len(programs)}
    return found


def auto_job(rank, world, name, factory_kwargs, options, steps):
    """`run_job` with parallel='auto' (the default on ranks): also returns what it chose and its table."""
    from pipefusion_compile import degrees

    result = run_job(name, factory_kwargs, {"parallel": "auto", **options}, steps)
    (choice, _), = [v for v in degrees._CHOSEN.values()]   # run_job's model is gone; it made the only choice
    c = choice.chosen
    result.update(chosen=(c.cfg, c.pp, c.patches, str(c.form), c.sp), table=str(choice),
                  predicted_bytes=c.bytes_per_rank(result.get("stage", 0)) if hasattr(c, "bytes_per_rank") else None,
                  constants=choice.constants)
    return result
