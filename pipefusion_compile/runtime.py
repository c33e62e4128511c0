"""The compiled program: step state, K/V caches and the PipeFusion schedule (single-process `simulate`).

One call = one diffusion step. The first `warmup_steps` calls of a generation run the whole sequence
through the stages (one "patch" of all token rows), which fills every K/V cache with fresh values; later
calls run the M row bands one after another through the stages, each self-attention writing its patch's
fresh K/V into the cache before attending over it, so patches not yet computed this step are seen with
the K/V of the previous step (stale), exactly as in PipeFusion. Per stage, the patch order is the same as
in a multi-rank pipeline, so the numerics do not depend on how stages are placed.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import PipefusionError
from .options import PipefusionOptions
from .passes.lower import LoweredStage, StageInput
from .passes.meta import example_value, node_meta
from .plan import PipelinePlan

log = logging.getLogger("pipefusion_compile")

_PROGRAMS: "weakref.WeakSet[PipelineProgram]" = weakref.WeakSet()


def compile_stage_graph(gm: fx.GraphModule, example_inputs: list, backend: str):
    """Compile one stage graph with the inner backend (called lazily, with real inputs, outside dynamo)."""
    if backend == "eager":
        return gm
    for n in gm.graph.nodes:  # the fake values dynamo recorded are full-size and from another fake mode
        n.meta.pop("example_value", None)
        n.meta.pop("val", None)
    gm.recompile()
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


@dataclass
class StepState:
    """Where the current generation is. Owned by the program, reset per generation."""

    step: int = 0
    generation: int = 0
    last_timestep: torch.Tensor | None = None


@dataclass
class _StageRuntime:
    lowered: LoweredStage
    caches: list[torch.Tensor] = field(default_factory=list)
    compiled: dict[int, object] = field(default_factory=dict)
    globals_fn: object = None


class PipelineProgram:
    """What the backend returns to dynamo for one graph: call it with the graph's inputs."""

    def __init__(self, gm: fx.GraphModule, plan: PipelinePlan, stages: list[LoweredStage],
                 options: PipefusionOptions, example_inputs: list, timestep_index: int | None):
        self.gm = gm
        self.plan = plan
        self.options = options
        self.state = StepState()
        self.timestep_index = timestep_index
        self.stages = [_StageRuntime(s) for s in stages]
        self.param_ids = frozenset(id(x) for x in example_inputs if isinstance(x, torch.nn.Parameter))
        self.stats = {"warmup_calls": 0, "pipelined_calls": 0, "compile_s": 0.0}
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._placeholder_index = {ph.name: i for i, ph in enumerate(placeholders)}
        out = next(iter(gm.graph.find_nodes(op="output")))
        self._out_spec = out.args[0]
        producers = {}
        for s in stages:
            for name in s.outputs:
                producers[name] = s.index
        self._producer = producers
        self._token_outputs = []
        for leaf in out.all_input_nodes:
            info = node_meta(leaf).token
            if info.carries_tokens:
                val = example_value(leaf)
                per_row = plan.input_rows // plan.granule
                self._token_outputs.append(
                    (leaf.name, tuple(val.shape), val.dtype, info.axis, val.shape[info.axis] // per_row)
                )
        _PROGRAMS.add(self)

    # ------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Start a new generation: the next call runs warmup again."""
        self.state = StepState(generation=self.state.generation + 1)

    def _update_generation(self, args) -> None:
        if self.timestep_index is None:
            return
        t = args[self.timestep_index]
        if not isinstance(t, torch.Tensor):
            return
        t = t.detach().to("cpu", torch.float64)
        last = self.state.last_timestep
        if last is not None and (t.shape != last.shape or bool((t > last).any())):
            log.info("pipefusion: timestep went up (%s -> %s): new generation", last.tolist(), t.tolist())
            self.reset()
        self.state.last_timestep = t

    # ------------------------------------------------------------------------------------------ run
    def __call__(self, *args):
        self._update_generation(args)
        warmup = self.state.step < self.options.warmup_steps
        patches = ((0, self.plan.token_rows),) if warmup else self.plan.patches
        self.stats["warmup_calls" if warmup else "pipelined_calls"] += 1
        globals_ = [self._globals(s, args) for s in self.stages]
        device = args[self._placeholder_index[self.plan.token_input]].device
        outputs = {
            name: torch.empty(shape, dtype=dtype, device=device)
            for name, shape, dtype, _, _ in self._token_outputs
        }
        for row0, rows in patches:
            row_start = torch.tensor(row0, dtype=torch.int64)
            carry: dict[str, torch.Tensor] = {}
            for s in self.stages:
                self._ensure_caches(s, device)
                inputs = [row_start, *self._stage_inputs(s, args, globals_[s.lowered.index], carry, row0, rows),
                          *s.caches]
                result = self._stage_fn(s, rows, inputs)(*inputs)
                carry.update(zip(s.lowered.outputs, result))
            for name, _, _, axis, per_row in self._token_outputs:
                outputs[name].narrow(axis, row0 * per_row, rows * per_row).copy_(carry[name])
        self.state.step += 1
        last_globals = dict(zip(self.stages[-1].lowered.global_outputs, globals_[-1]))
        return pytree.tree_map(
            lambda a: (outputs.get(a.name, last_globals.get(a.name)) if isinstance(a, fx.Node) else a),
            self._out_spec,
        )

    def _globals(self, s: _StageRuntime, args) -> tuple:
        if s.globals_fn is None:
            s.globals_fn = s.lowered.globals_gm  # small, runs once per step: kept eager
        return s.globals_fn(*[args[i] for i in s.lowered.global_inputs])

    def _stage_inputs(self, s: _StageRuntime, args, globals_, carry, row0: int, rows: int) -> list:
        gmap = dict(zip(s.lowered.global_outputs, globals_))
        values = []
        for inp in s.lowered.inputs:
            values.append(self._resolve(inp, args, gmap, carry, row0, rows))
        return values

    def _resolve(self, inp: StageInput, args, gmap, carry, row0: int, rows: int):
        if inp.source == "global":
            return gmap[inp.name]
        if inp.source == "recv":
            return carry[inp.name]
        full = gmap[inp.name] if inp.source == "positional" else args[self._placeholder_index[inp.name]]
        return full.narrow(inp.axis, row0 * inp.per_row, rows * inp.per_row)

    def _ensure_caches(self, s: _StageRuntime, device: torch.device) -> None:
        if not s.caches:
            s.caches = [
                torch.zeros(c.shape, dtype=c.dtype, device=device) for c in s.lowered.caches for _ in ("k", "v")
            ]

    def _stage_fn(self, s: _StageRuntime, rows: int, inputs: list):
        fn = s.compiled.get(rows)
        if fn is None:
            t0 = time.perf_counter()
            fn = compile_stage_graph(s.lowered.patch_graph(rows), inputs, self.options.stage_backend)
            elapsed = time.perf_counter() - t0
            self.stats["compile_s"] += elapsed
            s.compiled[rows] = fn
            log.info("pipefusion: stage %d, patch of %d token rows: compiled with %s in %.2fs",
                     s.lowered.index, rows, self.options.stage_backend, elapsed)
        return fn


def reset(compiled_model) -> int:
    """Force a new generation on every pipefusion program compiled from `compiled_model`.

    Accepts the `torch.compile` result or the original module. Returns how many programs were reset
    (0 before the first call, when nothing has been compiled yet).
    """
    module = getattr(compiled_model, "_orig_mod", compiled_model)
    if not isinstance(module, torch.nn.Module):
        raise PipefusionError(f"reset() expects a torch.compile'd module, got {type(compiled_model).__name__}")
    ids = {id(p) for p in module.parameters()}
    count = 0
    for program in list(_PROGRAMS):
        if program.param_ids & ids:
            program.reset()
            count += 1
    return count
