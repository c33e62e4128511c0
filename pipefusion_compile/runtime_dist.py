"""Multi-process PipeFusion: one stage per rank of a process group, async P2P between stages.

Each rank compiles the same graph and builds the same plan (checked once: the ranks exchange a fingerprint),
keeps only its stage, and runs one *schedule graph* per step kind (warmup: one patch of all rows; pipelined:
M bands). A schedule graph is an FX graph of `pipefusion::` comm ops around calls of the compiled stage:

    %buf_0_from0 = empty(...)            # every receive of the step is posted first (irecv ahead of time)
    pipefusion.irecv(%buf_0_from0, 0, 0, channel) ...
    pipefusion.wait(%buf_0_from0)        # patch 0 arrives
    %in_0 = pipefusion.unpack(%buf_0_from0, ...)
    %out_0 = stage(%row_start_0, ..., %in_0[0], ..., caches)
    pipefusion.isend(pipefusion.pack([...]), 2, 0, channel)    # sent without waiting
    ...                                   # patches 1..M-1
    pipefusion.wait_sends(...); pipefusion.broadcast(%out, last stage)

so `print(program.schedule_graph(pipelined=True))` is exactly what the rank runs. Values crossing a cut for one
patch travel as one packed buffer per (producer, consumer) pair; long skips go straight from producer to
consumer. Every rank returns the full model output (broadcast from the last stage: the latent, not hidden
states), so the user's scheduler runs identically everywhere.
"""
from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import time
import uuid
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.fx as fx

from .comm import Comm, PipefusionCommError
from .errors import PipefusionError, PlanError
from .kernels import DTYPE_CODE
from .ops import stride_order
from .options import PipefusionOptions
from .passes.kernels import select_kernels
from .passes.lower import LoweredStage, StageInput
from .passes.meta import example_value
from .passes.pieces import EXTRA, Piece
from .plan import PipelinePlan
from .runtime import PipelineProgram

log = logging.getLogger("pipefusion_compile")


class _StageCall(torch.nn.Module):
    """The compiled stage for one kind of piece, as a submodule of the schedule graph.

    Called as `stage(patch, row_start, hoisted, *per_patch, *caches)`: `patch` is the piece's index in the
    step (for errors and the timeline), `hoisted` the dict of the stage's GLOBAL inputs (the same for every
    piece), `per_patch` the piece's received and sliced inputs, in piece-input order.
    """

    def __init__(self, program: "DistributedProgram", piece: Piece):
        super().__init__()
        self.piece = piece
        self._program = [program]  # a list, so nn.Module does not register the program as a child

    def forward(self, patch: int, row_start, hoisted, *rest):
        program = self._program[0]
        program.comm.patch = patch
        rest_iter = iter(rest)
        inputs = [row_start] + [hoisted[i.name] if i.source == "global" else next(rest_iter)
                                for i in program.own.lowered.piece_graph(self.piece).inputs] + list(rest_iter)
        t0 = time.perf_counter()
        result = program._stage_fn(program.own, self.piece, inputs)(*inputs)
        program.comm.record("compute", t0)
        program._check_sent_layouts(self.piece, result)
        return result


class DistributedProgram(PipelineProgram):
    """One rank's part of the pipeline. Same interface as `PipelineProgram`."""

    def __init__(self, gm: fx.GraphModule, plan: PipelinePlan, stages: list[LoweredStage],
                 options: PipefusionOptions, example_inputs: list, timestep_index: int | None):
        super().__init__(gm, plan, stages, options, example_inputs, timestep_index)
        group = options.group if options.group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        if size != plan.num_stages:
            raise PlanError(
                f"the process group has {size} ranks but the plan has num_stages={plan.num_stages}: run one "
                "rank per stage (torchrun --nproc-per-node N), or pass the group to pipeline over (option group)"
            )
        self.group = group
        self.stage_index = dist.get_rank(group)
        self.stage_ranks = [dist.get_global_rank(group, i) if group is not dist.group.WORLD else i
                            for i in range(size)]
        self.own = self.stages[self.stage_index]
        self.stages_all = self.stages
        self.stages = [self.own]  # only this rank's stage computes (its globals too)
        self._producer_of = {name: st.index for st in stages for name in st.outputs}
        self._nodes_by_name = {n.name: n for n in gm.graph.nodes}
        last = plan.num_stages - 1
        for slot in self._token_outputs:
            producer = next(s.index for s in stages if slot.name in s.outputs or slot.name in _members(s))
            if producer != last:
                raise PlanError(f"model output {slot.name} is computed by stage {producer}, not the last stage")
        self.comm = Comm(
            name=f"pipefusion-{uuid.uuid4().hex[:12]}", group=group, stage=self.stage_index,
            stage_ranks=self.stage_ranks, timeout_s=options.timeout_s,
            record_timeline=options.timeline is not None,
        )
        self._schedules: dict[tuple, fx.GraphModule] = {}
        self._layouts_checked: set = set()
        self.stats.update(bytes_sent=0, output_bytes=0, resident_param_bytes=0, released_param_bytes=0)
        self._check_fingerprint()
        if options.release_params:
            self._release_params(example_inputs)

    # ------------------------------------------------------------------------------------------ setup
    def _routes(self, piece: Piece) -> dict[tuple[int, int], list[StageInput]]:
        """(producer, consumer) -> the values one piece of this kind carries, in the consumer's input order."""
        routes: dict[tuple[int, int], list[StageInput]] = {}
        for st in self.stages_all:
            for inp in st.lowered.piece_graph(piece).inputs:
                if inp.source == "recv":
                    routes.setdefault((self._producer_of[inp.name], st.lowered.index), []).append(inp)
        return routes

    def fingerprint(self) -> str:
        text = "\n".join([str(self.plan), self.gm.code, repr(sorted(self.options.fingerprint_items().items()))])
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_fingerprint(self) -> None:
        mine = self.fingerprint()
        # NCCL only moves CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        local = torch.tensor([int(mine[:15], 16)], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(local) for _ in self.stage_ranks]
        what = "exchanging plan fingerprints with the other ranks"
        work = self.comm._start(lambda: dist.all_gather(gathered, local, group=self.group, async_op=True), what, -1)
        self.comm._wait(work, what, -1)
        values = [int(t.item()) for t in gathered]
        if len(set(values)) != 1:
            differ = [self.stage_ranks[i] for i, v in enumerate(values) if v != values[0]]
            raise PlanError(
                f"rank {self.comm.rank}: the ranks built different pipeline plans (ranks {differ} differ from "
                f"rank {self.stage_ranks[0]}): every rank must compile the same model with the same options "
                f"and inputs. This rank's plan:\n{self.plan}"
            )

    def _release_params(self, example_inputs: list) -> None:
        """Free the storage of parameters this rank's stage never reads (metadata stays: no recompiles)."""
        needed = {id(example_inputs[i]) for i in self.own.lowered.global_inputs}
        resident = released = 0
        for x in example_inputs:
            if not isinstance(x, torch.nn.Parameter):
                continue
            storage = x.untyped_storage()
            if id(x) in needed:
                if storage.nbytes() == 0 and x.numel() > 0:
                    raise PipefusionError(
                        "a parameter this graph needs was released by an earlier pipefusion graph on this rank "
                        "(the model was split by graph breaks); compile with options={'release_params': False}"
                    )
                resident += storage.nbytes()
            elif storage.nbytes():
                released += storage.nbytes()
                storage.resize_(0)
        self.stats.update(resident_param_bytes=resident, released_param_bytes=released)
        log.info("pipefusion: rank %d keeps %.1f MiB of parameters, released %.1f MiB", self.comm.rank,
                 resident / 2**20, released / 2**20)

    def _check_sent_layouts(self, piece: Piece, result) -> None:
        """Once per piece kind: the values this stage sends have the memory layout the receivers unpack them
        into (the traced one, see `_message_layout`). A stage compiler that picked another layout would let
        the receiver's ops run on other strides than in one process: warn, naming the value."""
        if piece.key in self._layouts_checked:
            return
        self._layouts_checked.add(piece.key)
        sent = {i.name for (p, _), inputs in self._routes(piece).items() if p == self.stage_index for i in inputs}
        for name, value in zip(self.own.lowered.piece_graph(piece).outputs, result):
            if name not in sent or not isinstance(value, torch.Tensor):
                continue
            traced = example_value(self._nodes_by_name[name])
            want, got = stride_order(traced.shape, traced.stride()), stride_order(value.shape, value.stride())
            if want != got:
                log.warning(
                    "pipefusion: stage %d sends %s with its dims in memory order %s, but it was traced with %s "
                    "(the order the receiving rank unpacks it in): the receiver's ops run on another layout than "
                    "in one process and may differ from simulate in the last bits", self.stage_index, name,
                    got, want)

    # ------------------------------------------------------------------------------------------ schedule
    def schedule_graph(self, pipelined: bool = True, device: torch.device | str = "cpu") -> fx.GraphModule:
        """The FX graph this rank runs for one step (warmup or pipelined); receive buffers on `device`."""
        return self._schedule_for(self.plan.pieces(pipelined), device)

    def _schedule_for(self, pieces, device) -> fx.GraphModule:
        key = (tuple(pieces), str(device))
        if key not in self._schedules:
            self._schedules[key] = select_kernels(self._build_schedule(pieces, torch.device(device)),
                                                  self.options.kernels)
        return self._schedules[key]

    def _sliced_inputs(self, piece: Piece) -> list[StageInput]:
        return [inp for inp in self.own.lowered.piece_graph(piece).inputs if inp.source in ("positional", "image")]

    def _message_layout(self, inputs: list[StageInput], piece: Piece):
        """How one message lays out `inputs` for `piece`: flattened shapes, ranks, dtype codes, the memory order
        of each tensor's dims (as the producer's traced value has them: a receiver that made them row-major
        would run its ops on another layout than one process does, and a matmul over a transposed operand
        then differs in the last bits), and the byte count."""
        shapes, ranks, dtypes, orders, nbytes = [], [], [], [], 0
        for inp in inputs:
            val = example_value(self._nodes_by_name[inp.name])
            shape = list(val.shape)
            shape[inp.axis] = inp.token_range(self.plan.token_rows, piece)[1]
            shapes += shape
            ranks.append(len(shape))
            dtypes.append(DTYPE_CODE[val.dtype])
            orders += stride_order(val.shape, val.stride())
            nbytes += torch.Size(shape).numel() * val.element_size()
        return shapes, ranks, dtypes, orders, nbytes

    def _build_schedule(self, pieces, device: torch.device) -> fx.GraphModule:
        k, last = self.stage_index, self.plan.num_stages - 1
        channel = self.comm.name
        root = torch.nn.Module()
        g = fx.Graph()
        row_start = [g.placeholder(f"row_start_{j}") for j in range(len(pieces))]
        hoisted = g.placeholder("hoisted")  # the stage's GLOBAL inputs, computed once per step
        sliced = [{inp.name: g.placeholder(f"{inp.name}_patch{j}") for inp in self._sliced_inputs(piece)}
                  for j, piece in enumerate(pieces)]
        caches = [g.placeholder(f"cache_{c.attention}_{w}") for c in self.own.lowered.caches for w in c.buffers]
        outs = [g.placeholder(f"out_{o.name}") for o in self._token_outputs]
        routes = [self._routes(piece) for piece in pieces]
        bufs = {}
        for j, piece in enumerate(pieces):           # post every receive of the step ahead of time
            for p in sorted(p for (p, c) in routes[j] if c == k):
                *_, nbytes = self._message_layout(routes[j][(p, k)], piece)
                buf = g.call_function(torch.empty, ((nbytes,),), {"dtype": torch.uint8, "device": device})
                buf.name = f"buf_{j}_from{p}"
                g.call_function(torch.ops.pipefusion.irecv.default, (buf, p, j, channel))
                bufs[(j, p)] = buf
        for j, piece in enumerate(pieces):
            values = {}
            for p in sorted(p for (p, c) in routes[j] if c == k):
                inputs = routes[j][(p, k)]
                shapes, ranks, dtypes, orders, _ = self._message_layout(inputs, piece)
                g.call_function(torch.ops.pipefusion.wait.default, (bufs[(j, p)], channel))
                unpacked = g.call_function(torch.ops.pipefusion.unpack.default,
                                           (bufs[(j, p)], shapes, ranks, dtypes, orders))
                for i, inp in enumerate(inputs):
                    values[inp.name] = g.call_function(operator.getitem, (unpacked, i))
            available = {**sliced[j], **values}
            pg = self.own.lowered.piece_graph(piece)
            args = [j, row_start[j], hoisted] + [available[i.name] for i in pg.inputs if i.source != "global"] + caches
            target = f"stage_{piece.kind}" if piece.kind in EXTRA else f"stage_{piece.kind}{piece.rows}"
            if not hasattr(root, target):
                root.add_module(target, _StageCall(self, piece))
            result = g.call_module(target, tuple(args))
            produced = {name: g.call_function(operator.getitem, (result, i)) for i, name in enumerate(pg.outputs)}
            for c in sorted(c for (p, c) in routes[j] if p == k):
                packed = g.call_function(torch.ops.pipefusion.pack.default,
                                         ([produced[i.name] for i in routes[j][(k, c)]],))
                g.call_function(torch.ops.pipefusion.isend.default, (packed, c, j, channel))
            if k == last:
                for slot, out in zip(self._token_outputs, outs):
                    write = slot.writer(pg, piece)
                    if write is not None:
                        op, rest = write
                        g.call_function(op, (out, produced[slot.name], *rest))
        token = outs[0] if outs else caches[0]
        g.call_function(torch.ops.pipefusion.wait_sends.default, (token, channel))
        for out in outs:
            g.call_function(torch.ops.pipefusion.broadcast.default, (out, last, channel))
        g.output(None)
        g.lint()
        return fx.GraphModule(root, g, class_name=f"PipeFusionSchedule_rank{self.comm.rank}")

    # ------------------------------------------------------------------------------------------ run
    @torch.no_grad()
    def __call__(self, *args):
        inst, pieces, device, outs = self._start_step(args)
        self.comm.new_step(inst.state.step)
        s = self.own
        gmap = dict(zip(s.lowered.global_outputs, self._globals(s, args)))
        hoisted = {inp.name: gmap[inp.name] for inp in s.lowered.inputs if inp.source == "global"}
        sliced = [self._resolve(inp, args, gmap, None, piece)
                  for piece in pieces for inp in self._sliced_inputs(piece)]
        row_starts = [torch.tensor(piece.row0, dtype=torch.int64) for piece in pieces]
        schedule = self._schedule_for(pieces, device)
        try:
            schedule(*row_starts, hoisted, *sliced, *self._caches(inst, s, device), *outs.values())
        except PipefusionCommError:
            raise
        except Exception as e:
            raise PipefusionError(f"{self.comm.where()}: {type(e).__name__}: {e}") from e
        self.stats["bytes_sent"] = self.comm.bytes_sent
        self.stats["output_bytes"] = self.comm.output_bytes
        self._flush_timeline()
        return self._finish_step(inst, outs, gmap if self.stage_index == self.plan.num_stages - 1 else {})

    def _flush_timeline(self) -> None:
        if self.options.timeline is None or not self.comm.timeline:
            return
        os.makedirs(self.options.timeline, exist_ok=True)
        path = os.path.join(self.options.timeline, f"rank{self.comm.rank}.jsonl")
        with open(path, "a") as f:
            for event in self.comm.timeline:
                f.write(json.dumps(asdict(event)) + "\n")
        self.comm.timeline.clear()


def _members(stage: LoweredStage) -> set[str]:
    return {n.name for n in stage.stage_gm.graph.nodes if n.op not in ("placeholder", "output")}
