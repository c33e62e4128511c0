"""CFG-parallel: the batch split over the "cfg" dim of a device mesh, a PipeFusion pipeline in each part.

    world of 4 ranks, cfg_parallel=2, num_stages=2 (mesh ("cfg", "pp") = [[0, 1], [2, 3]]):

        call(x: [2, ...])  --cut by batch (`passes/batch.py`)-->  part 0: x[0:1] on ranks 0, 1 (stages 0, 1)
                                                                  part 1: x[1:2] on ranks 2, 3 (stages 0, 1)
        each rank: its part's output (the pipeline's last stage broadcasts it within the part), then an
        all-gather over the "cfg" dim (ranks 0 + 2, 1 + 3) joins the parts along each output's batch axis.

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

from .errors import UnsupportedGraphError, failures_named
from .lazy import materialize
from .options import PipefusionOptions
from .passes.batch import BatchSplit, split_batch
from .passes.sdpa import is_sdpa

log = logging.getLogger("pipefusion_compile")

_MESHES: dict[tuple, object] = {}


def build_mesh(options: PipefusionOptions):
    """The ("cfg", "pp") device mesh of the world (built once per shape of it; every rank builds it, in the same
    order, as they compile the same graphs), or the one passed in."""
    if options.mesh is not None:
        return options.mesh
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    key = (options.cfg_parallel, options.num_stages, device)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device, (options.cfg_parallel, options.num_stages),
                                        mesh_dim_names=("cfg", "pp"))
    return _MESHES[key]


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


def compile_cfg_parallel(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions, compile_part):
    """The callable for a static graph under cfg_parallel > 1. `compile_part(gm, inputs, options)` builds
    one part's program (`backend.compile_for_shape` with cfg_parallel 1)."""
    parts = options.cfg_parallel
    try:
        with failures_named("splitting the batch for cfg_parallel", gm):
            part_gm, part_inputs, split = split_batch(gm, example_inputs, parts)
    except UnsupportedGraphError:
        if not any(is_sdpa(n) for n in gm.graph.nodes):   # a piece between graph breaks with nothing to pipeline
            log.info("pipefusion: a graph without attention runs unchanged on every rank (cfg_parallel)")
            return None
        raise
    log.info("pipefusion: cfg_parallel=%d: %s", parts, split.describe().replace("\n", "; "))
    inner = dataclasses.replace(options, cfg_parallel=1, mesh=None)
    if options.simulate:
        first = compile_part(part_gm, part_inputs, inner)
        if not hasattr(first, "sibling"):   # declined (recorded, and an error under strict): runs unchanged
            return None
        programs = [first] + [first.sibling(part_inputs) for _ in range(parts - 1)]
        return CfgParallelProgram(split, programs, options)
    mesh = build_mesh(options)
    part = int(mesh.get_coordinate()[mesh.mesh_dim_names.index("cfg")]) if "cfg" in mesh.mesh_dim_names else 0
    pp_group = mesh.get_group("pp") if "pp" in mesh.mesh_dim_names else None
    cfg_group = mesh.get_group("cfg")
    inner = dataclasses.replace(inner, group=pp_group)
    program = compile_part(part_gm, part_inputs, inner)
    if not hasattr(program, "comm"):
        return None
    return CfgParallelProgram(split, [program], options, part, cfg_group)
