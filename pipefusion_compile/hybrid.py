"""CFG-parallel over the "cfg" dim of a device mesh, a PipeFusion pipeline in each part, in two forms.

Batch form (`CfgParallelProgram`: the batch holds cond + uncond, PixArt, SD3, DiT, HunyuanDiT):

    world of 4 ranks, cfg_parallel=2, num_stages=2 (mesh ("cfg", "pp") = [[0, 1], [2, 3]]):

        call(x: [2, ...])  --cut by batch (`passes/batch.py`)-->  part 0: x[0:1] on ranks 0, 1 (stages 0, 1)
                                                                  part 1: x[1:2] on ranks 2, 3 (stages 0, 1)
        each rank: its part's output (the pipeline's last stage broadcasts it within the part), then an
        all-gather over the "cfg" dim (ranks 0 + 2, 1 + 3) joins the parts along each output's batch axis.

Two-call form (`StreamParallelProgram`: a batch of 1, CFG as two calls per step with the same timestep, Wan
and Flux true CFG): call stream k of a step (0: cond, 1: uncond) runs on part k % cfg. The owner part runs its
pipeline; its last stage sends the output to every rank of the other parts, which return at once with a
patch-lazy output (`lazy.py`) that resolves when it arrives. So the uncond call starts on part 1 while part 0
still computes the cond call: the two streams of a step run at the same time.

With sequence parallelism the mesh is ("cfg", "pp", "sp") and each part's program is a sequence-parallel one
(`sequence_program.py`): the cfg gather and the two-call send then see every rank of a part holding the whole
output (the two-call form sends it from one rank: the last stage's first).

In one process (simulate) the parts run one after the other, each its own program (own step state, caches)
sharing the compiled stage graphs; every part equals what the ranks of that part compute, bit for bit.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import OptionsError, UnsupportedGraphError, failures_named
from .lazy import Bands, LazyTensor, materialize
from .options import PipefusionOptions
from .passes.batch import BatchSplit, split_batch
from .passes.sdpa import is_sdpa
from .runtime import CallKind, classify_call

log = logging.getLogger("pipefusion_compile")

_MESHES: dict[tuple, object] = {}


def build_mesh(options: PipefusionOptions):
    """The ("cfg", "pp") device mesh of the world, ("cfg", "pp", "sp") with sequence parallelism (sp innermost:
    a stage's ranks are neighbours), built once per shape of it (every rank builds it, in the same order, as
    they compile the same graphs), or the one passed in."""
    if options.mesh is not None:
        if "pp" not in options.mesh.mesh_dim_names:
            raise OptionsError("option mesh: with a 'cfg' or 'sp' dim, name the pipeline dim 'pp' too (size 1 for "
                               "none)")
        if options.sequence_parallel > 1 and "sp" not in options.mesh.mesh_dim_names:
            raise OptionsError("option mesh: sequence_parallel > 1 needs an 'sp' dim in the mesh")
        return options.mesh
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    sp = options.sequence_parallel
    key = (options.cfg_parallel, options.num_stages, sp, device)
    if key not in _MESHES:
        shape, names = (options.cfg_parallel, options.num_stages), ("cfg", "pp")
        if sp > 1:
            shape, names = (*shape, sp), (*names, "sp")
        _MESHES[key] = init_device_mesh(device, shape, mesh_dim_names=names)
    return _MESHES[key]


def mesh_groups(options: PipefusionOptions) -> PipefusionOptions:
    """`options` with this rank's pipeline group (and sequence-parallel group) taken from the mesh."""
    mesh = build_mesh(options)
    sp_group = mesh.get_group("sp") if options.sequence_parallel > 1 else None
    return dataclasses.replace(options, group=mesh.get_group("pp"), sp_group=sp_group)


class CfgParallelProgram:
    """What the backend returns for a graph compiled with cfg_parallel > 1: call it like the graph."""

    def __init__(self, split: BatchSplit, programs: list, options: PipefusionOptions, part: int | None = None,
                 cfg_group=None):
        self.split = split
        self.programs = programs     # simulate: one per part; ranks: this rank's part's
        self.options = options
        self.part = part             # ranks: this rank's part (its coordinate on the "cfg" dim)
        self.cfg_group = cfg_group
        self.stats = {"cfg_bytes_sent": 0}
        for p in programs:
            p.batch_split = split
            p.cfg_part = part

    @property
    def plan(self):
        return self.programs[0].plan

    @torch.no_grad()
    def __call__(self, *args):
        args = [materialize(a) for a in args]
        if self.part is None:
            outs = [prog(*self.split.cut(args, p)) for p, prog in enumerate(self.programs)]
            return self._join(outs)
        own = self.programs[0](*self.split.cut(args, self.part))
        return self._join(self._gather(own))

    def _join(self, outs: list):
        flat = [pytree.tree_flatten(o) for o in outs]
        spec = flat[0][1]
        axes = iter(self.split.output_axes)
        joined = []
        for leaves in zip(*(f for f, _ in flat)):
            if isinstance(leaves[0], torch.Tensor):
                axis = next(axes)
                joined.append(torch.cat([materialize(x) for x in leaves], axis))
            else:
                joined.append(leaves[0])
        return pytree.tree_unflatten(joined, spec)

    def _gather(self, own) -> list:
        """Every part's output on this rank: an all-gather over the "cfg" dim, one per output tensor."""
        leaves, spec = pytree.tree_flatten(own)
        program = self.programs[0]
        per_part = [[] for _ in range(self.split.parts)]
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                for p in per_part:
                    p.append(leaf)
                continue
            x = materialize(leaf).contiguous()
            got = [torch.empty_like(x) for _ in range(self.split.parts)]
            what = f"gathering the CFG-parallel parts of the output (part {self.part})"
            work = program.comm._start(lambda: dist.all_gather(got, x, group=self.cfg_group, async_op=True), what, -1)
            program.comm._wait(work, what, -1)
            sent = x.numel() * x.element_size() * (self.split.parts - 1)
            self.stats["cfg_bytes_sent"] += sent
            program.stats["cfg_bytes_sent"] = program.stats.get("cfg_bytes_sent", 0) + sent
            for p, g in zip(per_part, got):
                p.append(g)
        return [pytree.tree_unflatten(p, spec) for p in per_part]


class StreamParallelProgram:
    """The two-call form: what the backend returns for a graph with a batch smaller than cfg_parallel."""

    def __init__(self, programs: list, options: PipefusionOptions, timestep_index: int, mesh=None):
        self.programs = programs      # simulate: one per part; ranks: this rank's part's
        self.options = options
        self.parts = options.cfg_parallel
        self.timestep_index = timestep_index
        self.mesh = mesh
        self.part = None if mesh is None else _coordinate(mesh, "cfg")
        # per part: its ranks, and the one that sends each call's output to the other parts (its last stage's,
        # the first of them under sequence parallelism: every rank of the part has the whole output)
        self._ranks = None if mesh is None else [part.reshape(-1).tolist() for part in mesh.mesh]
        self._senders = None if mesh is None else [int(part[-1].reshape(-1)[0]) for part in mesh.mesh]
        self.stats = {"cfg_bytes_sent": 0, "calls_per_part": [0] * self.parts}
        self._last: torch.Tensor | None = None
        self._stream = 0
        self._streams_in_step = 1
        self._step = 0
        self._calls = 0
        self._sends: list = []
        self._pending: list[Bands] = []
        for p in programs:
            p.cfg_part = self.part

    @property
    def plan(self):
        return self.programs[0].plan

    def _next_stream(self, args) -> int:
        """Call stream of this call, as the runtime counts it (`runtime.classify_call`)."""
        t = args[self.timestep_index].detach().to("cpu", torch.float64)
        kind = classify_call(self._last, t)
        if kind is CallKind.SAME_STEP:
            self._stream += 1
            self._streams_in_step = max(self._streams_in_step, self._stream + 1)
        else:
            if kind is CallKind.NEXT_STEP:
                self._step += 1
                if self._step == 1 and self._streams_in_step < self.parts:
                    raise OptionsError(
                        f"option cfg_parallel={self.parts} on a batch of {t.numel() or 1}: the model is called once "
                        "per step, so there is neither a batch to split nor a second call (CFG as two calls per "
                        "step) to run on the other part; use cfg_parallel=1, or a batch holding cond + uncond")
            else:
                self._step = 0
                self._streams_in_step = 1
            self._stream = 0
        self._last = t
        return self._stream

    @torch.no_grad()
    def __call__(self, *args):
        stream = self._next_stream(args)
        owner = stream % self.parts
        self.stats["calls_per_part"][owner] += 1
        self._calls += 1
        if stream == 0:   # a new step: the previous step's receives have arrived (its outputs were read to make
            for bands in self._pending:   # this step's input); never wait for them within a step, where the
                bands.resolve_all()       # other part is still computing them
            self._pending = []
        if self.part is None:
            return self.programs[owner](*args)
        program = self.programs[0]
        tag = self._calls % (1 << 20)
        if owner == self.part:
            out = program(*args)
            if dist.get_rank() == self._senders[owner]:
                self._send(out, [r for c, ranks in enumerate(self._ranks) if c != owner for r in ranks], tag)
            return out
        return self._receive(args, self._senders[owner], tag)

    def _send(self, out, peers: list[int], tag: int) -> None:
        program = self.programs[0]
        for work, what in self._sends:
            program.comm._wait(work, what, -1)
        self._sends = []
        for leaf in pytree.tree_leaves(out):
            if not isinstance(leaf, torch.Tensor):
                continue
            x = leaf.contiguous()
            for peer in peers:
                what = f"sending call {self._calls}'s output to rank {peer} of another CFG part"
                work = program.comm._start(lambda x=x, peer=peer: dist.isend(x, peer, tag=tag), what, -1, peer)
                self._sends.append((work, what))
                self.stats["cfg_bytes_sent"] += x.numel() * x.element_size()
        program.stats["cfg_bytes_sent"] = self.stats["cfg_bytes_sent"]

    def _receive(self, args, owner_rank: int, tag: int):
        """This call's output, computed by another part: received from its last stage, as patch-lazy tensors."""
        program = self.programs[0]
        device = args[program._placeholder_index[program.plan.token_input]].device
        result = {}
        for node in program.gm.graph.find_nodes(op="output")[0].all_input_nodes:
            value = node.meta.get("example_value")
            if not isinstance(value, torch.Tensor):
                raise UnsupportedGraphError("cfg_parallel (two calls per step): a model output that is not a tensor",
                                            node)
            buf = torch.empty(value.shape, dtype=value.dtype, device=device)
            if buf.is_floating_point():   # a read before it arrived shows as NaN, not as plausible values
                buf.fill_(float("nan"))
            what = f"receiving call {self._calls}'s output from rank {owner_rank} of another CFG part"
            work = program.comm._start(lambda buf=buf: dist.irecv(buf, owner_rank, tag=tag), what, -1, owner_rank)

            def fill(_j, work=work, what=what):
                program.comm._wait(work, what, -1, owner_rank)

            if self.options.lazy_outputs and buf.dim():
                bands = Bands(0, [(0, buf.shape[0])], fill, f"output {node.name} of call {self._calls}")
                self._pending.append(bands)
                result[node.name] = LazyTensor.of(buf, bands, 0)
            else:
                fill(0)
                result[node.name] = buf
        return pytree.tree_map(lambda a: result.get(a.name) if isinstance(a, fx.Node) else a, program._out_spec)


def _coordinate(mesh, dim: str) -> int:
    return int(mesh.get_coordinate()[mesh.mesh_dim_names.index(dim)]) if dim in mesh.mesh_dim_names else 0


def compile_cfg_parallel(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions, compile_part):
    """The callable for a static graph under cfg_parallel > 1 (None: run the graph unchanged).
    `compile_part(gm, inputs, options)` builds one part's program (`backend.compile_for_shape` with
    cfg_parallel 1). A batch that splits into cfg_parallel parts takes the batch form, a smaller one the
    two-call form."""
    parts = options.cfg_parallel
    outs = [o.meta.get("example_value") for o in gm.graph.find_nodes(op="output")[0].all_input_nodes]
    batch = next((int(v.shape[0]) for v in outs if isinstance(v, torch.Tensor) and v.dim()), None)
    if batch is not None and batch < parts:
        return _compile_two_calls(gm, example_inputs, options, compile_part)
    try:
        with failures_named("splitting the batch for cfg_parallel", gm):
            part_gm, part_inputs, split = split_batch(gm, example_inputs, parts)
    except UnsupportedGraphError:
        if not any(is_sdpa(n) for n in gm.graph.nodes):   # a piece between graph breaks with nothing to pipeline
            log.info("pipefusion: a graph without attention runs unchanged on every rank (cfg_parallel)")
            return None
        raise
    log.info("pipefusion: cfg_parallel=%d: %s", parts, split.describe().replace("\n", "; "))
    built = _part_programs(part_gm, part_inputs, options, compile_part)
    if built is None:
        return None
    programs, mesh = built
    if mesh is None:
        return CfgParallelProgram(split, programs, options)
    return CfgParallelProgram(split, programs, options, _coordinate(mesh, "cfg"), mesh.get_group("cfg"))


def _part_programs(gm, example_inputs, options, compile_part):
    """(the programs of the parts this process runs, the mesh or None in one process), or None when the part's
    graph is declined (recorded, an error under strict: it then runs unchanged). In one process: one program
    per part, siblings sharing the compiled stage graphs; on ranks: this rank's part's, over the mesh's "pp"
    group."""
    inner = dataclasses.replace(options, cfg_parallel=1, mesh=None)
    mesh = None
    if not options.simulate:
        mesh = build_mesh(options)
        inner = dataclasses.replace(mesh_groups(options), cfg_parallel=1, mesh=None)
    program = compile_part(gm, example_inputs, inner)
    if getattr(program, "plan", None) is None:   # declined: the graph's own forward
        return None
    if mesh is not None:
        return [program], mesh
    return [program] + [program.sibling(example_inputs) for _ in range(options.cfg_parallel - 1)], None


def _compile_two_calls(gm, example_inputs, options, compile_part):
    built = _part_programs(gm, example_inputs, options, compile_part)
    if built is None:
        return None
    programs, mesh = built
    if programs[0].timestep_index is None:
        raise OptionsError(f"option cfg_parallel={options.cfg_parallel} on a batch of 1 runs each call of a step "
                           "(CFG as two calls) on its own part, which needs a timestep input to tell the calls of "
                           "one step apart; this graph has none")
    if mesh is not None:
        log.info("pipefusion: cfg_parallel=%d on a batch of 1: the calls of a step run on the parts in turn",
                 options.cfg_parallel)
    return StreamParallelProgram(programs, options, programs[0].timestep_index, mesh)
