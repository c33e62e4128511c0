"""The `pipefusion` dynamo backend.

Note [PipeFusion backend]
-------------------------
Background: PipeFusion splits the image tokens into M patches (row bands) and the layers into N stages;
patch j's self-attention at step t uses fresh K/V for tokens already computed at step t and one-step-stale
K/V for the rest, so stages exchange only the current patch's activations.

Algorithm, for each graph dynamo hands us:
  1. Analyze: token analysis (which values carry image tokens, on which axis) and cost (FLOPs per node).
  2. Plan: cut candidates on the graph, FLOP-balanced stages, M row bands -> `PipelinePlan`.
  3. Lower: per stage, a globals graph (hoisted once per step) and per-patch-size stage graphs with
     stale-K/V attention; compiled lazily with the inner backend (inductor or eager).
A graph without self-attention over image tokens runs unchanged (fast path) and is recorded
(`pipefusion_compile.declined`); one with attention over the image tokens in a form the backend does not
recognize warns, or raises under option `strict` (default when num_stages > 1).

Debugging: `logging.getLogger("pipefusion_compile")` prints the plan at INFO and every pass's graph before
and after at DEBUG; `program.plan` is the dataclass; `program.stages[k].lowered.patch_graph(rows).graph` is
what stage k runs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref

import torch
import torch.distributed as dist
import torch.fx as fx

from .declines import decline
from .lazy import LazyTensor, materialize
from .errors import (OptionsError, PipefusionError, TooFewLayersError, UnsupportedGraphError, failures_named,
                     graph_break_report)
from .options import PipefusionOptions
from .passes.buffer_writes import fold_buffer_writes
from .passes.canonical_attention import canonicalize_attention
from .passes.context_graphs import joint_only_outputs
from .passes.key_concat import concat_keys_at_attention
from .passes.graph_inputs import arguments_of, is_user_input, remember_arguments
from .passes.lower import lower
from .passes.meta import Kind, node_meta
from .passes.sdpa import is_sdpa
from .passes.sequence_parallel import SequenceParallel, check_heads
from .passes.tokens import TokenAnalysis, analyze_tokens
from .plan import KeptCuts, build_plan
from .passes.specialize import is_symbolic
from .passes.unbacked import UnbackedGuard, has_unbacked
from .runtime import PipelineProgram, register
from .shapes import ShapeDispatcher

log = logging.getLogger("pipefusion_compile")

_SINUSOID_TARGETS = (torch.sin, torch.cos, "sin", "cos")


def find_timestep_input(gm: fx.GraphModule, example_inputs: list) -> int | None:
    """Position of the diffusion timestep among the graph's inputs, or None.

    The timestep is the user input (0-d or 1-d, GLOBAL) that feeds a sinusoidal embedding (sin/cos) which an
    MLP (a linear) then reads: the timestep embedding. Class labels and prompts feed no sin/cos; 1-d inputs
    that feed RoPE tables (text lengths, position ids) feed sin/cos too, but their tables are combined with
    the queries and keys, not read by a linear, so they rank after. The runtime watches it to detect a new
    generation (and the call streams of one step).
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found = []
    for i, ph in enumerate(placeholders):
        val = ph.meta.get("example_value", example_inputs[i] if i < len(example_inputs) else None)
        if not isinstance(val, torch.Tensor) or val.dim() > 1 or not is_user_input(ph, example_inputs[i]):
            continue
        if node_meta(ph).token.kind not in (Kind.GLOBAL,):
            continue
        sinusoid = _global_reach(ph, lambda n: n.target in _SINUSOID_TARGETS)
        if sinusoid is not None:
            mlp = _global_reach(sinusoid, lambda n: n.target in _LINEAR_TARGETS)
            found.append((mlp is None, i))
    return min(found)[1] if found else None


_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)


def _global_reach(start: fx.Node, pred) -> fx.Node | None:
    """The first node matching `pred` reached from `start` through values that carry no image tokens."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not start and n.op in ("call_function", "call_method") and pred(n):
            return n
        stack.extend(u for u in n.users if not node_meta(u).token or not node_meta(u).token.carries_tokens)
    return None


# The stage cuts of each model's first plan (keyed by its weights and the options that shape a plan): a new
# input shape keeps them where the graph allows, so a rank's stage keeps the same layers, hence the same
# parameters (the others may already be released), at every resolution.
_KEPT_CUTS: dict[tuple, tuple[KeptCuts, tuple]] = {}


def _model_key(example_inputs: list, options: PipefusionOptions) -> tuple[tuple, list]:
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    return (tuple(id(p) for p in params), options.num_stages, str(options.partition)), params


def _kept_cuts(example_inputs: list, options: PipefusionOptions) -> KeptCuts | None:
    key, params = _model_key(example_inputs, options)
    found = _KEPT_CUTS.get(key)
    if found is None or not params:
        return None
    kept, refs = found
    if any(r() is not p for r, p in zip(refs, params)):  # those weights are gone (ids reused): stale entry
        del _KEPT_CUTS[key]
        return None
    return kept


def _keep_cuts(example_inputs: list, options: PipefusionOptions, plan) -> None:
    key, params = _model_key(example_inputs, options)
    if params and _kept_cuts(example_inputs, options) is None:
        _KEPT_CUTS[key] = (KeptCuts.of(plan), tuple(weakref.ref(p) for p in params))


def compile_program(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions,
                    analysis: TokenAnalysis | None = None, sp: SequenceParallel | None = None) -> PipelineProgram:
    """Phases 1-3 for one graph; returns the runnable program (stage graphs compile on first use).

    `sp`: this rank is one of the sequence-parallel ranks of its stage (its plan runs its part of every band).
    Under `sequence_parallel` > 1 without it (one process) the plan runs whole bands, and the degree is checked:
    every band splits and every attention's heads divide."""
    t0 = time.perf_counter()
    with failures_named("planning the pipeline", gm):
        try:
            plan, analysis = build_plan(gm, example_inputs, options, analysis,
                                        keep=_kept_cuts(example_inputs, options))
        except TooFewLayersError as e:  # usually graph breaks: name each one dynamo recorded and its fix
            report = graph_break_report()
            if not report:
                raise
            raise TooFewLayersError(f"{e}{report}") from None
        degree = options.sequence_parallel or 1
        if degree > 1:
            parts = dataclasses.replace(plan, sp_degree=degree, sp_rank=sp.rank if sp is not None else 0)
            parts.check_sequence_parallel()
            check_heads(gm, degree)
            if sp is not None:
                plan = parts
    _keep_cuts(example_inputs, options, plan)
    t1 = time.perf_counter()
    with failures_named("lowering the plan to stage graphs", gm):
        stages = lower(gm, plan, analysis, shared_inputs=options.simulate, sp=sp)
        for stage in stages:  # lowering finishes here, so a graph it cannot lower fails at compile time
            for piece in (*plan.pieces(pipelined=False), *plan.pieces(pipelined=True)):
                stage.piece_graph(piece)
    t2 = time.perf_counter()
    with failures_named("building the pipeline program", gm):
        timestep = find_timestep_input(gm, example_inputs)
        if timestep is None:
            log.warning("pipefusion: no timestep input found; call pipefusion_compile.reset(model) before each "
                        "new generation")
        if options.simulate:
            program = PipelineProgram(gm, plan, stages, options, example_inputs, timestep)
        else:
            from .runtime_dist import DistributedProgram

            program = DistributedProgram(gm, plan, stages, options, example_inputs, timestep)
    program.stats.update(plan_s=t1 - t0, lower_s=t2 - t1)
    register(program)
    return program


def analyze_for_pipeline(gm: fx.GraphModule, example_inputs, options: PipefusionOptions) -> TokenAnalysis | None:
    """The token analysis of `gm`, or None for a graph with nothing to pipeline (runs unchanged).

    A graph without any attention runs unchanged even where the analysis has no rule for it (it may not even
    have an image input); a graph with attention whose analysis fails raises the analysis' error. A graph that
    runs unchanged is recorded (`pipefusion_compile.declined`); if it holds attention-like computation over the
    image tokens in a form the backend does not recognize, that is a WARNING, or an error under `strict`.
    """
    check_example_values(gm)
    with failures_named("rewriting buffers filled by slice writes as concatenations", gm):
        for name in fold_buffer_writes(gm):
            log.info("pipefusion: the slice writes into %s rewritten as a concatenation", name)
    with failures_named("rewriting attention to scaled_dot_product_attention", gm):
        rewritten = canonicalize_attention(gm)
        concat_keys_at_attention(gm)
    for r in rewritten:
        log.info("pipefusion: %s at %s rewritten to scaled_dot_product_attention (%s)", r.form.value, r.replaced,
                 r.node)
    strict = options.strict if options.strict is not None else (options.num_stages or 1) > 1
    try:
        with failures_named("the token analysis", gm):
            analysis = analyze_tokens(gm, example_inputs, options.token_axis, options.image_input,
                                      options.num_patches)
    except UnsupportedGraphError as e:
        if any(is_sdpa(n) for n in gm.graph.nodes):
            report = graph_break_report()
            if not report:
                raise
            # a graph that ends or starts at a graph break may not hold the latent at all (Mochi: the prompt's
            # attention pooling, cut off by a break in every attention layer): the breaks are the cause to name
            raise UnsupportedGraphError(
                f"a graph between graph breaks (listed below) cannot be pipelined: {e.reason}\n  (a piece of a "
                f"model cut by graph breaks may not hold the image input at all){report}", e.node) from None
        decline(gm, example_inputs, strict, e.reason, e.node)
        return None
    if not analysis.mixes_tokens:
        decline(gm, example_inputs, strict, "no self-attention over the image tokens")
        return None
    joint = joint_only_outputs(gm)
    if joint:
        decline(gm, example_inputs, strict,
                f"the tokens of {analysis.token_input} that its self-attention mixes reach the outputs only inside "
                f"a joint sequence with other tokens ({', '.join(n.name for n in joint)}): a context refiner, no "
                "image stream to pipeline")
        return None
    return analysis


def check_example_values(gm: fx.GraphModule) -> None:
    """The analyses read the fake values dynamo records on every node; a graph made another way (e.g. by
    `torch.fx.symbolic_trace`) has none, and would fail with an unrelated error."""
    for n in gm.graph.find_nodes(op="placeholder"):
        if "example_value" not in n.meta and "val" not in n.meta:
            raise UnsupportedGraphError(
                "the graph carries no example values (node.meta['example_value']), which dynamo records and the "
                "backend plans from: use the backend through torch.compile(model, backend='pipefusion'), not on a "
                "graph traced another way", n)


_BUILT: dict[str, list] = {}   # graph signature -> [(weak ref to the callable built for it, its graph)]


def _signature(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions) -> str:
    """What makes two dynamo graphs the same program: their code (a patch-lazy input only changes the type
    annotation of its placeholder), the inputs' metadata, and the options."""
    code = gm.code.replace(f"{LazyTensor.__module__}.{LazyTensor.__name__}".replace(".", "_"), "torch.Tensor")
    meta = [(type(x).__name__ if not isinstance(x, torch.Tensor) else
             (isinstance(x, torch.nn.Parameter), str(tuple(x.shape)), str(x.stride()), str(x.dtype), str(x.device)))
            for x in example_inputs]
    chosen = sorted((k, repr(v)) for k, v in options.fingerprint_items().items())
    text = repr((code, meta, chosen, id(options.group) if options.group is not None else None))
    return hashlib.sha256(text.encode()).hexdigest()


def _same_constants(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    for n in a.graph.find_nodes(op="get_attr"):
        x, y = getattr(a, n.target, None), getattr(b, n.target, None)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x is not y and x != y:
            return False
    return True


def _built_before(gm: fx.GraphModule, signature: str):
    """The program (or shape dispatcher) built for the same graph, if it is alive."""
    for ref, other in _BUILT.get(signature, []):
        fn = ref()
        if fn is not None and _same_constants(gm, other):
            return fn
    return None


def _remember(fn, gm: fx.GraphModule, signature: str):
    try:
        ref = weakref.ref(fn)
    except TypeError:   # the graph's own forward (nothing to pipeline): rebuilt cheaply, nothing to share
        return fn
    entries = [(r, g) for r, g in _BUILT.get(signature, []) if r() is not None]
    _BUILT[signature] = entries + [(ref, gm)]
    return fn


def pipefusion_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None, **kwargs):
    """`torch.compile(model, backend="pipefusion", options={...})`.

    A graph dynamo traced again only because an input is now a patch-lazy output (`lazy.LazyTensor`, whose
    type dynamo guards on) gets the program built for it before: the same step state and caches, and no
    second plan (on ranks: no second fingerprint exchange, which only the ranks receiving lazy outputs would
    join)."""
    if kwargs.get("mode") not in (None, "default"):
        raise PipefusionError(f"the pipefusion backend takes no mode (got {kwargs['mode']!r}); use options")
    opts = PipefusionOptions.from_dict(options).resolve()
    if not opts.simulate and not (dist.is_available() and dist.is_initialized()):
        raise PipefusionError(
            "simulate=False needs an initialized torch.distributed process group (one rank per stage, e.g. "
            "launched by torchrun); without one, leave simulate unset to run every stage in this process"
        )
    signature = _signature(gm, example_inputs, opts)
    if any(isinstance(x, LazyTensor) for x in example_inputs):
        found = _built_before(gm, signature)
        if found is not None:
            log.info("pipefusion: dynamo traced the graph again for a patch-lazy input (its type is guarded): "
                     "the program built for it before runs it")
            return found
    return _remember(_build(gm, example_inputs, opts), gm, signature)


def _build(gm: fx.GraphModule, example_inputs: list, opts: PipefusionOptions):
    if is_symbolic(gm, example_inputs):
        # dynamo generalized the sizes (the second shape under automatic dynamic shapes): one program per
        # concrete shape, each planned as a fresh compile at that shape would be (see shapes.py)
        log.info("pipefusion: graph with symbolic sizes: planning one program per concrete input shape")
        arguments = arguments_of(gm)  # dynamo's sources (a list latent's elements) are gone by the first call
        return ShapeDispatcher(gm, opts, lambda static, args: compile_for_shape(
            remember_arguments(static, arguments), args, opts), unbacked_guard(gm))
    if has_unbacked(gm):
        # sizes that depend on tensor values (a mask's sum, nonzero): one program per value of them, each call
        # computing them first (see passes/unbacked.py)
        log.info("pipefusion: graph with data-dependent sizes: planning one program per value of them")
        arguments = arguments_of(gm)
        return ShapeDispatcher(gm, opts, lambda static, args: compile_for_shape(
            remember_arguments(static, arguments), args, opts), unbacked_guard(gm))
    return compile_for_shape(gm, example_inputs, opts)


def resolving_lazy_inputs(fn):
    """`fn` (a graph that runs unchanged), resolving patch-lazy inputs first: dynamo calls compiled graphs with
    torch-function dispatch of tensor subclasses off, so the graph's ops would read a lazy input's storage
    before its bands arrived."""

    def run(*args):
        return fn(*[materialize(a) for a in args])

    run.__wrapped__ = fn
    return run


def unbacked_guard(gm: fx.GraphModule) -> UnbackedGuard | None:
    """The per-call computation of `gm`'s data-dependent sizes, or None if it has none."""
    if not has_unbacked(gm):
        return None
    with failures_named("finding what the graph's data-dependent sizes depend on", gm):
        return UnbackedGuard(gm)


def compile_for_shape(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions):
    """The callable for a graph with static sizes: a program, or the graph itself when there is nothing to
    pipeline."""
    if options.parallel == "auto":
        from .degrees import choose_parallel

        with failures_named("choosing the parallel degrees (parallel='auto')", gm):
            options = choose_parallel(gm, example_inputs, options)
    if options.cfg_parallel > 1:
        from .hybrid import compile_cfg_parallel

        program = compile_cfg_parallel(gm, example_inputs, options, compile_for_shape)
        return program if program is not None else resolving_lazy_inputs(gm.forward)
    analysis = analyze_for_pipeline(gm, example_inputs, options)
    if analysis is None:
        return resolving_lazy_inputs(gm.forward)
    if (options.sequence_parallel or 1) > 1 and not options.simulate:
        return _compile_sequence_parallel(gm, example_inputs, options, analysis)
    return compile_program(gm, example_inputs, options, analysis)


def _compile_sequence_parallel(gm, example_inputs, options: PipefusionOptions, analysis):
    """This rank's column of a sequence-parallel pipeline (`sequence_program.py`), its groups from the mesh
    unless given."""
    from .hybrid import mesh_groups
    from .sequence_program import SequenceParallelProgram
    from .ulysses import register_group

    if options.sp_group is None:
        options = mesh_groups(options)
    group = register_group(options.sp_group, options.timeout_s)
    if group.size != options.sequence_parallel:
        raise OptionsError(f"option sequence_parallel={options.sequence_parallel} but its group (sp_group) has "
                           f"{group.size} ranks")
    sp = SequenceParallel(group.size, group.rank, group.key)
    program = compile_program(gm, example_inputs, options, analysis, sp=sp)
    log.info("pipefusion: sequence_parallel=%d: this rank runs part %d of every band (ranks %s per stage)",
             group.size, group.rank, list(group.ranks))
    return SequenceParallelProgram(program, group)
