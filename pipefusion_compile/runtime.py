"""The compiled program: step state, mixing caches, and the one executor both runtimes use.

One call = one diffusion step. The first `warmup_steps` calls of a generation run the whole sequence
through the stages (one "patch" of all token rows), which fills every K/V cache with fresh values; later
calls run the M row bands one after another through the stages, each self-attention writing its patch's
fresh K/V into the cache before attending over it, so patches not yet computed this step are seen with
the K/V of the previous step (stale), exactly as in PipeFusion.

Each stage runs its schedule graph for the step (`schedule.build_schedule`: receives, stage calls, sends,
output writes). In one process (`simulate`, this class) every stage's schedule runs, in stage order, over an
in-process transport (`comm.LocalComm`); on ranks (`runtime_dist.DistributedProgram`) each rank runs its own
stage's over torch.distributed. Per stage, the patch order is the same, so the numerics do not depend on how
stages are placed: ranks equal simulate bit for bit.
"""
from __future__ import annotations

import enum
import json
import logging
import os
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .comm import Comm, LocalComm
from .errors import PipefusionError, UnsupportedGraphError
from .lazy import Bands, LazyTensor, materialize
from .ops import row_offset, stride_order
from .options import PipefusionOptions
from .passes.kernels import select_kernels
from .passes.stage_split import InputSource, LoweredStage, PieceGraph, StageInput
from .passes.meta import example_value, node_meta
from .passes.pieces import EXTRA, FULL, HEAD, TAIL, Piece, PieceKind
from .plan import PipelinePlan
from .schedule import build_schedule, routes, sliced_inputs

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
    """Where one call stream of the current generation is. Reset per generation."""

    step: int = 0
    generation: int = 0
    stream: int = 0


@dataclass
class _Stream:
    """One call stream: the k-th transformer call of every step (k = 0 unless the pipeline calls the model
    more than once per step, as CFG run as two calls does: conditional, then unconditional, same timestep).
    Each stream has its own step count (so its own warmup) and its own K/V caches, exactly as if each stream
    had its own compiled copy of the model."""

    state: StepState = field(default_factory=StepState)
    caches: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # stage index -> [k0, v0, x1, ...] (`CacheSpec.buffers`)


@dataclass
class _Instance:
    """State of one set of weights running through the program.

    Dynamo reuses one graph for every module whose code and shapes match (e.g. the blocks of a model split
    by a graph break), with the weights as inputs; each such module gets its own call streams.
    """

    params: tuple  # weak references to the weights it was called with
    streams: dict[int, _Stream] = field(default_factory=dict)
    generation: int = 0
    stream: int = 0                          # the stream of the latest call
    last_timestep: torch.Tensor | None = None

    def current(self) -> _Stream:
        found = self.streams.get(self.stream)
        if found is None:
            found = self.streams[self.stream] = _Stream(StepState(generation=self.generation, stream=self.stream))
        return found


@dataclass
class _StageRuntime:
    lowered: LoweredStage
    compiled: dict[int, object] = field(default_factory=dict)


@dataclass(frozen=True)
class _OutputSlot:
    """A token-carrying model output: assembled patch by patch into a full-size tensor. An output of one
    extra token group only (`group`: HEAD or TAIL, e.g. LTX-2's audio, a separate stream whose queries attend
    over the image) is written whole by that group's piece (and by a FULL piece)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int
    per_row: int
    group: PieceKind | None = None

    @classmethod
    def of(cls, node: fx.Node, token_rows: int) -> "_OutputSlot":
        val, info = example_value(node), node_meta(node).token
        axis = info.axis
        if info.outer > 1:
            raise UnsupportedGraphError(
                "a model output whose token axis is folded with the dims before it (e.g. frames x rows, "
                "[B, F * h * w, C]): a band is not one range of it; unfold it before returning it", node)
        if info.epr == 0:   # one extra group only (check_lowerable refuses outputs that mix groups)
            return cls(node.name, tuple(val.shape), val.dtype, axis, 0, HEAD if info.prefix else TAIL)
        return cls(node.name, tuple(val.shape), val.dtype, axis, val.shape[axis] // token_rows)

    def writer(self, pg: PieceGraph, piece: Piece) -> tuple | None:
        """(op, trailing args): the op that writes the part of this output `piece` computed (as the last
        stage's piece graph `pg` returns it) into the full output, called as `op(out, value, *args)`; None
        when the piece computes no part of it. Writes exactly `region(pg, piece)`."""
        found = self.region(pg, piece)
        if found is None:
            return None
        if self.group is None and self.name in pg.unpatchified:  # token layout: the unpatchify is fused in
            return torch.ops.pipefusion.write_unpatchified.default, (piece.row0, pg.unpatchified[self.name])
        axis, start, _ = found
        return torch.ops.pipefusion.write_band.default, (axis, start)

    def region(self, pg: PieceGraph, piece: Piece) -> tuple[int, int, int] | None:
        """(axis, start, length): the part of the full output `piece` computes (None: none); `writer` writes it and
        the last stage sends it to the other ranks."""
        if self.group is not None:
            return (self.axis, 0, self.shape[self.axis]) if piece.kind in (FULL, self.group) else None
        if piece.kind in EXTRA:
            return None
        if self.name in pg.unpatchified:   # [B, C, h*p, w*p]: token row r is image rows [r*p, r*p + p)
            p = pg.unpatchified[self.name]
            return 2, piece.row0 * p, piece.rows * p
        return self.axis, piece.row0 * self.per_row, piece.rows * self.per_row


class PipelineProgram:
    """What the backend returns to dynamo for one graph: call it with the graph's inputs."""

    def __init__(self, gm: fx.GraphModule, plan: PipelinePlan, stages: list[LoweredStage],
                 options: PipefusionOptions, example_inputs: list, timestep_index: int | None):
        self.gm = gm
        self.plan = plan
        self.options = options
        self.timestep_index = timestep_index
        self.all_stages = [_StageRuntime(s) for s in stages]
        self.stages = list(self.all_stages)  # the stages this process runs (on ranks: its own)
        self._producer_of = {name: st.index for st in stages for name in st.outputs}
        self._nodes_by_name = {n.name: n for n in gm.graph.nodes}
        self._schedules: dict[tuple, fx.GraphModule] = {}
        self._routes: dict[tuple, dict] = {}
        self._layouts_checked: set = set()
        self._messages: dict[tuple, list] = {}
        self._row_starts: dict[tuple, list] = {}
        self._pending_outputs: list[Bands] = []
        self._param_positions = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.instances: dict[tuple, _Instance] = {}
        self._current: _Instance | None = None
        self.stats = {"warmup_calls": 0, "pipelined_calls": 0, "compile_s": 0.0}
        self.last_pieces: tuple[Piece, ...] = ()   # the pieces of the latest call (`sequence_program.py` reads them)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._placeholder_index = {ph.name: i for i, ph in enumerate(placeholders)}
        out = next(iter(gm.graph.find_nodes(op="output")))
        self._out_spec = out.args[0]
        self._token_outputs = [
            _OutputSlot.of(leaf, plan.token_rows) for leaf in out.all_input_nodes
            if node_meta(leaf).token.carries_tokens
        ]
        self.comms: dict[int, Comm] = self._make_comms(options)

    def _make_comms(self, options: PipefusionOptions) -> dict[int, Comm]:
        """Stage index -> its transport. In one process: local ones sharing one mailbox."""
        mailbox: dict = {}
        name = f"pipefusion-local-{id(self):x}"
        return {s.lowered.index: LocalComm(name=f"{name}-s{s.lowered.index}", stage=s.lowered.index,
                                           stage_ranks=list(range(self.plan.num_stages)), timeout_s=options.timeout_s,
                                           record_timeline=options.timeline is not None, mailbox=mailbox)
                for s in self.all_stages}

    # ------------------------------------------------------------------------------------------ state
    @property
    def state(self) -> StepState:
        """Step state of the call stream of the latest call (of the weights it used)."""
        return self._current.current().state if self._current is not None else StepState()

    def uses(self, params) -> bool:
        """True if some weights this program has run with are among `params` (by identity)."""
        ids = {id(p) for p in params}
        return any(r() is not None and id(r()) in ids for inst in self.instances.values() for r in inst.params)

    def sibling(self, example_inputs: list) -> "PipelineProgram":
        """Another program of the same plan and stage graphs (their compiled callables shared) with its own step
        state, caches and transport: a CFG-parallel part run in this process (`hybrid.py`)."""
        other = type(self)(self.gm, self.plan, [s.lowered for s in self.all_stages], self.options, example_inputs,
                           self.timestep_index)
        for mine, theirs in zip(self.all_stages, other.all_stages):
            theirs.compiled = mine.compiled
        other.stats.update({k: v for k, v in self.stats.items() if k in ("plan_s", "lower_s")})
        register(other)
        return other

    def unregister(self) -> None:
        """Remove this program from `programs()` (its first call failed: it is dropped)."""
        _PROGRAMS.discard(self)

    def reset(self) -> None:
        """Start a new generation: the next call runs warmup again."""
        for inst in self.instances.values():
            _reset_instance(inst)

    def _instance(self, args) -> _Instance:
        weights = [args[i] for i in self._param_positions]
        key = tuple(id(w) for w in weights)
        inst = self.instances.get(key)
        if inst is None or any(r() is not w for r, w in zip(inst.params, weights)):  # new, or ids reused
            inst = self.instances[key] = _Instance(tuple(weakref.ref(w) for w in weights))
        self._current = inst
        return inst

    def _update_generation(self, inst: _Instance, args) -> _Stream:
        """Which generation and call stream this call belongs to, from its timestep: higher than the
        previous call's -> a new generation (stream 0); equal -> one more call of the same step (the next
        stream); lower -> the next step (stream 0). Returns the call's stream."""
        t = args[self.timestep_index] if self.timestep_index is not None else None
        if not isinstance(t, torch.Tensor):
            inst.stream = 0
            return inst.current()
        t = t.detach().to("cpu", torch.float64)
        last = inst.last_timestep
        kind = classify_call(last, t)
        if kind is CallKind.NEW_GENERATION and last is not None:
            log.info("pipefusion: timestep went up (%s -> %s): new generation", last.tolist(), t.tolist())
            _reset_instance(inst)
        elif kind is CallKind.SAME_STEP:
            inst.stream += 1
            if inst.stream not in inst.streams:
                log.info("pipefusion: call %d of one step (same timestep %s): call stream %d, with its own "
                         "step state and K/V caches", inst.stream + 1, t.tolist(), inst.stream)
        else:
            inst.stream = 0
        inst.last_timestep = t
        return inst.current()

    # ------------------------------------------------------------------------------------------ schedule
    def routes(self, piece: Piece) -> dict[tuple[int, int], list[StageInput]]:
        """(producer, consumer) -> the values one piece of this kind carries between those stages."""
        if piece.key not in self._routes:
            self._routes[piece.key] = routes([s.lowered for s in self.all_stages], self._producer_of, piece)
        return self._routes[piece.key]

    def output_receivers(self) -> list[int]:
        """The stages the last stage sends the model output bands to (in one process: none, they share it)."""
        return []

    def output_messages(self, pieces) -> list[tuple[int, list[tuple[int, int, int, int]]]]:
        """Per piece that writes a model output, in piece order: (piece index, [(output index, axis, start,
        length)]): the parts of the outputs one message from the last stage carries."""
        key = tuple(pieces)
        if key not in self._messages:
            last = self.all_stages[-1].lowered
            found = []
            for j, piece in enumerate(pieces):
                pg = last.piece_graph(piece)
                regions = [(i, *r) for i, slot in enumerate(self._token_outputs)
                           if (r := slot.region(pg, piece)) is not None]
                if regions:
                    found.append((j, regions))
            self._messages[key] = found
        return self._messages[key]

    def schedule_graph(self, pipelined: bool = True, device: torch.device | str = "cpu",
                       stage: int | None = None) -> fx.GraphModule:
        """The FX graph stage `stage` runs for one step (warmup or pipelined); receive buffers on `device`.
        `stage` defaults to the first stage this process runs (on ranks: its own)."""
        s = self.stages[0] if stage is None else next(s for s in self.all_stages if s.lowered.index == stage)
        return self._schedule_for(s, self.plan.pieces(pipelined), device)

    def _schedule_for(self, s: "_StageRuntime", pieces, device) -> fx.GraphModule:
        key = (s.lowered.index, tuple(pieces), str(device))
        if key not in self._schedules:
            self._schedules[key] = build_schedule(self, s, pieces, torch.device(device))
        return self._schedules[key]

    def _check_sent_layouts(self, s: "_StageRuntime", piece: Piece, result) -> None:
        """Once per stage and piece kind: the values the stage sends have the memory layout the receivers
        unpack them into (the traced one, `schedule.message_layout`). A stage compiler that picked another
        layout would let the receiver's ops run on other strides than the plain model's: warn, naming it."""
        key = (s.lowered.index, piece.key)
        if key in self._layouts_checked:
            return
        self._layouts_checked.add(key)
        sent = {i.name for (p, _), inputs in self.routes(piece).items() if p == s.lowered.index for i in inputs}
        for name, value in zip(s.lowered.piece_graph(piece).outputs, result):
            if name not in sent or not isinstance(value, torch.Tensor):
                continue
            traced = example_value(self._nodes_by_name[name])
            want, got = stride_order(traced.shape, traced.stride()), stride_order(value.shape, value.stride())
            if want != got:
                log.warning(
                    "pipefusion: stage %d sends %s with its dims in memory order %s, but it was traced with %s "
                    "(the order the receiving stage unpacks it in): the receiver's ops run on another layout than "
                    "in the plain model and may differ from it in the last bits", s.lowered.index, name, got, want)

    # ------------------------------------------------------------------------------------------ run
    @torch.no_grad()
    def __call__(self, *args):
        """One diffusion step (inference only: runs under no_grad): each stage this process runs, its
        schedule, in stage order."""
        args = self._lazy_arguments(args)
        inst, pieces, device, outs = self._start_step(args)
        self.last_pieces = pieces
        for c in self.comms.values():
            c.new_step(inst.state.step, device)
        key = (tuple(pieces), str(device))
        if key not in self._row_starts:   # made once, on the device: no copy, no sync per patch (`ops.row_offset`)
            self._row_starts[key] = [row_offset(piece.row0, device) for piece in pieces]
        row_starts = self._row_starts[key]
        last_globals: dict = {}
        out_bufs: list = []
        for s in self.stages:
            gmap = dict(zip(s.lowered.global_outputs, self._globals(s, args)))
            hoisted = {inp.name: gmap[inp.name] for inp in s.lowered.inputs if inp.source is InputSource.GLOBAL}
            sliced = [self._resolve(inp, args, gmap, piece)
                      for piece in pieces for inp in sliced_inputs(s.lowered, piece)]
            schedule = self._schedule_for(s, pieces, device)
            try:
                out_bufs = schedule(*row_starts, hoisted, *sliced, *self._caches(inst, s, device), *outs.values())
            except PipefusionError:
                raise
            except Exception as e:
                raise PipefusionError(f"{self.comms[s.lowered.index].where()}: {type(e).__name__}: {e}") from e
            if s.lowered.index == self.plan.num_stages - 1:
                last_globals = gmap
        self.stats["bytes_sent"] = sum(c.bytes_sent for c in self.comms.values())
        self.stats["output_bytes"] = sum(c.output_bytes for c in self.comms.values())
        for bands in self._pending_outputs:   # the previous call's output bands: long arrived, normally used
            bands.resolve_all()
        self._pending_outputs = []
        if out_bufs:
            outs = self._lazy_outputs(outs, pieces, out_bufs, inst.state)
        self._flush_timeline(wait=False)
        return self._finish_step(inst, outs, last_globals)

    def _lazy_outputs(self, outs: dict, pieces, out_bufs: list, state: StepState) -> dict:
        """The model outputs of a rank that does not run the last stage, as `LazyTensor`s whose bands resolve
        from `out_bufs` (one message per piece, `output_messages`) when first read. With option
        `lazy_outputs=False`, or for outputs whose pieces do not write bands along one axis, the call waits
        for them here."""
        comm = self.comms[self.stages[0].lowered.index]
        messages = self.output_messages(pieces)
        slots = list(outs.values())
        done = [False] * len(messages)

        def receive(m: int) -> None:
            if not done[m]:
                _, regions = messages[m]
                torch.ops.pipefusion.wait(out_bufs[m], comm.name)
                views = [slots[i].narrow(axis, start, length) for i, axis, start, length in regions]
                torch.ops.pipefusion.unpack_into(out_bufs[m], views, self.options.kernels)
                done[m] = True

        result = {}
        for i, (name, out) in enumerate(outs.items()):
            bands = [(m, axis, start, start + length) for m, (_, regions) in enumerate(messages)
                     for o, axis, start, length in regions if o == i]
            if not self.options.lazy_outputs or len({axis for _, axis, _, _ in bands}) != 1:
                for m, *_ in bands:
                    receive(m)
                result[name] = out
                continue
            if out.is_floating_point():   # a band read before it arrived shows as NaN, not as plausible values
                out.fill_(float("nan"))
            axis = bands[0][1]
            what = f"output {name} of step {state.step} (call stream {state.stream})"
            lazy = Bands(axis, [(s, e) for _, _, s, e in bands], lambda b, ms=[m for m, *_ in bands]: receive(ms[b]),
                         what)
            self._pending_outputs.append(lazy)
            result[name] = LazyTensor.of(out, lazy, axis)
            self.stats["lazy_outputs"] = self.stats.get("lazy_outputs", 0) + 1
        return result

    def _flush_timeline(self, wait: bool = True) -> None:
        """Timeline events recorded so far to `options.timeline`/rank<R>.jsonl (in one process: R = the stage).
        Each call flushes without `wait` (on a CUDA device, events the device has not run yet stay for the next
        flush: the host never waits for the device here); after the last call, flush with it."""
        if self.options.timeline is None:
            return
        for c in self.comms.values():
            events = c.take_timeline(wait)
            if not events:
                continue
            os.makedirs(self.options.timeline, exist_ok=True)
            with open(os.path.join(self.options.timeline, f"rank{c.rank}.jsonl"), "a") as f:
                for event in events:
                    f.write(json.dumps(asdict(event)) + "\n")

    def _start_step(self, args):
        """Step bookkeeping shared by both runtimes: which weights, which generation, warmup or not, the
        patches to run, the device, and empty full-size buffers for the model outputs."""
        inst = self._update_generation(self._instance(args), args)
        self.stats["streams"] = max(self.stats.get("streams", 0), inst.state.stream + 1)
        warmup = inst.state.step < self.options.warmup_steps
        self.stats["warmup_calls" if warmup else "pipelined_calls"] += 1
        pieces = self.plan.pieces(pipelined=not warmup)
        device = args[self._placeholder_index[self.plan.token_input]].device
        outputs = {o.name: torch.empty(o.shape, dtype=o.dtype, device=device) for o in self._token_outputs}
        return inst, pieces, device, outputs

    def _finish_step(self, inst: _Stream, outputs: dict, global_values: dict):
        """Advance the step and return the outputs in the structure the dynamo graph returns."""
        inst.state.step += 1
        return pytree.tree_map(
            lambda a: (outputs.get(a.name, global_values.get(a.name)) if isinstance(a, fx.Node) else a),
            self._out_spec,
        )

    def _globals(self, s: _StageRuntime, args) -> tuple:
        # Hoisted GLOBAL work is small and runs once per step: it stays eager.
        return s.lowered.globals_gm(*[args[i] for i in s.lowered.global_inputs])

    def _lazy_arguments(self, args) -> tuple:
        """The call's arguments, with every patch-lazy one resolved except the image input where this process's
        stages only read it patch by patch (`_resolve`). Done here, explicitly: dynamo calls the program with
        torch-function dispatch of tensor subclasses switched off (it traced the graph with it), so a lazy
        tensor's ops would silently read its unresolved storage."""
        if not any(isinstance(a, LazyTensor) for a in args):
            return args
        token = self._placeholder_index[self.plan.token_input]
        whole = {i for s in self.stages for i in s.lowered.global_inputs}
        return tuple(a if i == token and i not in whole else materialize(a) for i, a in enumerate(args))

    def _resolve(self, inp: StageInput, args, gmap, piece: Piece):
        """A sliced input of `piece` (a graph input or a positional table, narrowed to the piece). A patch-lazy
        image input gives a lazy view of the piece's rows: the stage call resolves it (`schedule.StageCall`),
        so patch j waits only for the bands it reads."""
        full = gmap[inp.name] if inp.source is InputSource.POSITIONAL else args[self._placeholder_index[inp.name]]
        if isinstance(full, LazyTensor) and full.pending and inp.outer == 1 and piece.kind is not FULL:
            start, length = inp.token_range(self.plan.token_rows, piece)
            return full.narrow_band(inp.axis, start, length)
        return inp.narrow(materialize(full), self.plan.token_rows, piece)

    @staticmethod
    def _caches(inst: _Stream, s: _StageRuntime, device: torch.device) -> list[torch.Tensor]:
        caches = inst.caches.get(s.lowered.index)
        if caches is None:
            caches = inst.caches[s.lowered.index] = [
                torch.zeros(c.shape, dtype=c.dtype, device=device) for c in s.lowered.caches for _ in c.buffers
            ]
        return caches

    def _stage_fn(self, s: _StageRuntime, piece: Piece, inputs: list):
        fn = s.compiled.get(piece.key)
        if fn is None:
            t0 = time.perf_counter()
            what = f"the {piece.index_name}" if piece.kind in EXTRA else f"a {piece.kind} piece of {piece.rows} token rows"
            gm = select_kernels(s.lowered.piece_graph(piece).gm, self.options.kernels)
            try:
                fn = compile_stage_graph(gm, inputs, self.options.stage_backend)
            except PipefusionError:
                raise
            except Exception as e:
                raise PipefusionError(
                    f"stage {s.lowered.index}, {what}: the inner backend {self.options.stage_backend!r} failed to "
                    f"compile the stage graph: {type(e).__name__}: {e}\n  (options={{'stage_backend': 'eager'}} "
                    "runs the stage graphs without compiling them)") from e
            elapsed = time.perf_counter() - t0
            self.stats["compile_s"] += elapsed
            s.compiled[piece.key] = fn
            log.info("pipefusion: stage %d, %s: compiled with %s in %.2fs",
                     s.lowered.index, what, self.options.stage_backend, elapsed)
        return fn


class CallKind(enum.Enum):
    """What a call is, from its timestep and the previous call's."""

    NEW_GENERATION = "new generation"   # the first call, a timestep that went up, or another shape of it
    SAME_STEP = "same step"             # the same timestep: one more call stream of this step (CFG as two calls)
    NEXT_STEP = "next step"             # a lower timestep


def classify_call(last: torch.Tensor | None, t: torch.Tensor) -> CallKind:
    if last is None or t.shape != last.shape or bool((t > last).any()):
        return CallKind.NEW_GENERATION
    return CallKind.SAME_STEP if torch.equal(t, last) else CallKind.NEXT_STEP


def _reset_instance(inst: _Instance) -> None:
    """New generation: every call stream at step 0 again, and its K/V caches back to zeros (with
    `warmup_steps=0` the first step attends to them before any fresh K/V was written)."""
    inst.generation += 1
    inst.stream = 0
    inst.last_timestep = None
    for stream in inst.streams.values():
        stream.state = StepState(generation=inst.generation, stream=stream.state.stream)
        for caches in stream.caches.values():
            for c in caches:
                c.zero_()


def register(program: PipelineProgram) -> None:
    """List a fully built program in `programs()` (a program whose construction failed is never listed)."""
    _PROGRAMS.add(program)


def programs(compiled_model) -> list[PipelineProgram]:
    """The pipefusion programs compiled so far for `compiled_model` (the `torch.compile` result or the
    original module), one per dynamo graph with attention; each has `.plan`, `.stages` and `.stats`."""
    module = getattr(compiled_model, "_orig_mod", compiled_model)
    if not isinstance(module, torch.nn.Module):
        raise PipefusionError(f"expected a torch.compile'd module, got {type(compiled_model).__name__}")
    params = list(module.parameters())
    return [p for p in list(_PROGRAMS) if p.uses(params)]


def reset(compiled_model) -> int:
    """Force a new generation on every pipefusion program compiled from `compiled_model`.

    Returns how many programs were reset (0 before the first call, when nothing has been compiled yet).
    """
    found = programs(compiled_model)
    for program in found:
        program.reset()
    return len(found)
