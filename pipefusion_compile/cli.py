"""`pipefusion-compile plan MODEL`: print the PipeFusion plan of a model without running it."""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch
import torch.fx as fx

from .options import PipefusionOptions
from .passes.graph_inputs import graph_outputs
from .passes.meta import example_value
from .plan import PipelinePlan, build_plan


def _trace_without_running(model: torch.nn.Module, example_kwargs: dict, take) -> None:
    """Trace `model(**example_kwargs)` with dynamo; `take(gm, example_inputs)` sees every graph and returns True
    for one it used (it then returns zeros instead of being computed) or False (it runs for real, so the
    model's own data-dependent code after a graph break sees real values)."""
    from .errors import PipefusionError

    def capture(gm: fx.GraphModule, example_inputs):
        if not take(gm, example_inputs):
            return gm.forward
        outs = [example_value(o) if isinstance(o, fx.Node) else o for o in graph_outputs(gm)]
        return lambda *args: tuple(torch.zeros(o.shape, dtype=o.dtype) if isinstance(o, torch.Tensor) else o
                                   for o in outs)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=capture)(**example_kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        if isinstance(e.inner_exception, PipefusionError):
            raise e.inner_exception from None
        raise
    finally:
        torch._dynamo.reset()


def plan_graphs(model: torch.nn.Module, example_kwargs: dict, **options) -> list[PipelinePlan]:
    """Trace `model(**example_kwargs)` with dynamo and plan every graph that has self-attention.

    The planned graphs are not computed: the capturing backend plans them on dynamo's fake values and returns
    zeros. A graph it does not plan (no self-attention over the image tokens: the masks, embeddings and lengths
    between graph breaks) runs for real, so the model's own data-dependent code after a break (QwenImage-2.1's
    `mask.tolist().index(True)`) sees real values, not zeros.
    """
    opts = PipefusionOptions.from_dict(options).resolve()
    plans: list[PipelinePlan] = []

    def take(gm: fx.GraphModule, example_inputs) -> bool:
        from .backend import analyze_for_pipeline
        from .errors import failures_named

        analysis = analyze_for_pipeline(gm, example_inputs, opts)
        if analysis is None:
            return False
        with failures_named("planning the pipeline", gm):
            plans.append(build_plan(gm, example_inputs, opts, analysis)[0])
        return True

    _trace_without_running(model, example_kwargs, take)
    return plans


def plan_model(spec: str, **options) -> list[PipelinePlan]:
    """Plans for a built-in model name or a `module:function` (see `pipefusion_compile.models`)."""
    from .models import BUILTIN_OPTIONS, load_model

    model, kwargs = load_model(spec)
    given = {k: v for k, v in options.items() if v is not None}
    return plan_graphs(model, kwargs, **{**BUILTIN_OPTIONS.get(spec, {}), **given})


def degree_choices(model: torch.nn.Module, example_kwargs: dict, world: int, machine: dict | None = None,
                   calls_per_step: int = 1, **options) -> list:
    """`parallel='auto'`'s table for a world of `world` ranks, per graph with self-attention, without running
    the model (this process's compute rate is measured; the link is assumed unless `machine` gives it)."""
    from .degrees import MachineConstants, _attention_shape, calibrate, enumerate_candidates
    from .passes.sdpa import is_sdpa

    opts = PipefusionOptions.from_dict({**options, "num_stages": 2}).resolve()
    choices = []

    def take(gm: fx.GraphModule, example_inputs) -> bool:
        if not any(is_sdpa(n) for n in gm.graph.nodes):
            return False
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        heads, head_dim, rows = _attention_shape(gm)
        constants = calibrate(device, heads, head_dim, max(rows // world, 1))
        if machine:
            constants = MachineConstants.from_dict(machine, constants)
        choices.append(enumerate_candidates(gm, example_inputs, opts, world, constants, calls_per_step,
                                            options.get("num_patches")))
        return True

    _trace_without_running(model, example_kwargs, take)
    return choices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipefusion-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="print the pipeline plan of a model (nothing is run)")
    p.add_argument("model", help="diffusers class name with a tiny built-in config, or module:function")
    p.add_argument("--stages", type=int, default=None, help="N (default: world size, else 1)")
    p.add_argument("--patches", type=int, default=None, help="M (default: N)")
    p.add_argument("--partition", default="flops", help="flops | uniform | comma-separated layers per stage")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--token-axis", type=int, default=None,
                   help="axis of the image input that carries the token rows (default: found by the token "
                        "analysis)")
    p.add_argument("--image-input", default=None,
                   help="forward argument (or graph input) that is the image input (default: found by matching "
                        "the inputs against the output)")
    p.add_argument("--world", type=int, default=None,
                   help="instead of one plan: parallel='auto''s table of every cfg x pp factorization of this many "
                        "ranks, with predicted step times (this machine's compute rate; link from --bandwidth)")
    p.add_argument("--batch", type=int, default=None, help="batch of the example input (e.g. 2: cond + uncond)")
    p.add_argument("--calls-per-step", type=int, default=1, help="2 for CFG as two calls per step")
    p.add_argument("--bandwidth", type=float, default=None, help="link GB/s between two ranks (with --world)")
    p.add_argument("--latency-us", type=float, default=None, help="link latency in microseconds (with --world)")
    p.add_argument("--gflops", type=float, default=None, help="GFLOP/s of one rank instead of measuring it")
    p.add_argument("-v", "--verbose", action="store_true", help="log the passes at DEBUG")
    t = sub.add_parser("timeline", help="merge the ranks' timeline records (option timeline=DIR) into a "
                                        "Chrome/Perfetto trace and a Gantt PNG")
    t.add_argument("directory")
    t.add_argument("--trace", default=None, help="write the Chrome trace JSON here (default DIR/trace.json)")
    t.add_argument("--png", default=None, help="write a Gantt chart here (needs matplotlib)")
    t.add_argument("--steps", default=None, help="only steps A:B (e.g. 2:4)")
    t.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.command == "timeline":
        return _timeline(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    partition = args.partition
    if partition not in ("flops", "uniform"):
        partition = [int(x) for x in partition.split(",")]
    options = dict(num_stages=args.stages, num_patches=args.patches, partition=partition,
                   warmup_steps=args.warmup_steps, token_axis=args.token_axis,
                   image_input=args.image_input)
    from .errors import PipefusionError

    if args.world is not None:
        return _degrees(args, options)
    try:
        plans = plan_model(args.model, **options)
    except (PipefusionError, ValueError, ImportError, AttributeError) as e:
        print(f"pipefusion-compile: error: {e}", file=sys.stderr)
        return 2
    if not plans:
        print("no graph with self-attention over image tokens: nothing to pipeline")
    for i, plan in enumerate(plans):
        if len(plans) > 1:
            print(f"--- graph {i} ---")
        print(plan)
    return 0


def _degrees(args, options: dict) -> int:
    from .errors import PipefusionError
    from .models import BUILTIN_OPTIONS, load_model

    machine = {k: v for k, v in (("link_bytes_per_s", args.bandwidth and args.bandwidth * 1e9),
                                 ("link_latency_s", args.latency_us and args.latency_us * 1e-6),
                                 ("flops_per_s", args.gflops and args.gflops * 1e9)) if v}
    try:
        model, kwargs = load_model(args.model, **({"batch": args.batch} if args.batch else {}))
        given = {k: v for k, v in options.items() if v is not None and k != "num_stages"}
        choices = degree_choices(model, kwargs, args.world, machine, args.calls_per_step,
                                 **{**BUILTIN_OPTIONS.get(args.model, {}), **given})
    except (PipefusionError, ValueError, ImportError, AttributeError, TypeError) as e:
        print(f"pipefusion-compile: error: {e}", file=sys.stderr)
        return 2
    if not choices:
        print("no graph with self-attention over image tokens: nothing to pipeline")
    for i, choice in enumerate(choices):
        if len(choices) > 1:
            print(f"--- graph {i} ---")
        print(choice)
    return 0


def _timeline(args) -> int:
    from .errors import PipefusionError
    from .timeline import merge

    steps = tuple(int(x) for x in args.steps.split(":")) if args.steps else None
    trace = args.trace or os.path.join(args.directory, "trace.json")
    try:
        events = merge(args.directory, trace, args.png, steps, args.title)
    except (PipefusionError, ValueError, ImportError) as e:
        print(f"pipefusion-compile: error: {e}", file=sys.stderr)
        return 2
    ranks = sorted({e["rank"] for e in events})
    print(f"{len(events)} events from ranks {ranks} -> {trace}" + (f", {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
