"""One stage's schedule for one step: an FX graph of `pipefusion::` comm ops around calls of the compiled stage.

Both runtimes run these graphs (simulate: every stage's, one after another, over `comm.LocalComm`; ranks: their
own stage's, over `comm.DistComm`), so one process exercises the routes, pack and unpack the ranks run:

    %buf_0_from0 = empty(...)            # every receive of the step is posted first (irecv ahead of time)
    pipefusion.irecv(%buf_0_from0, 0, 0, channel) ...
    pipefusion.wait(%buf_0_from0)        # patch 0 arrives
    %in_0 = pipefusion.unpack(%buf_0_from0, ...)
    %out_0 = stage(%row_start_0, ..., %in_0[0], ..., caches)
    pipefusion.isend(pipefusion.pack([...]), 2, 0, channel)    # sent without waiting
    ...                                   # patches 1..M-1
    pipefusion.wait_sends(...)            # the sends of the previous call (this call's stay in flight)
    return [%outbuf_0, ...]               # other ranks than the last: the model output bands, still arriving

Values crossing a cut for one patch travel as one packed buffer per (producer, consumer) pair, in the memory
layout the producer's traced value has (`message_layout`); long skips go straight from producer to consumer.
Every rank returns the full model output (the latent, not hidden states), so the user's scheduler runs
identically everywhere: the last stage sends each band of it to every other rank as soon as it has written
it (tag `OUTPUT_TAG + patch`); the others post those receives first and return the buffers, from which the
runtime makes the patch-lazy output (`lazy.py`).
"""
from __future__ import annotations

import logging
import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from . import comm as _comm  # noqa: F401  (registers the pipefusion:: comm ops the schedules call)
from .comm import OUTPUT_TAG
from .kernels import DTYPE_CODE
from .ops import stride_order
from .passes.kernels import select_kernels
from .passes.stage_split import InputSource, LoweredStage, StageInput
from .passes.meta import example_value
from .lazy import materialize
from .passes.pieces import EXTRA, Piece

if TYPE_CHECKING:
    from .runtime import PipelineProgram, _StageRuntime

log = logging.getLogger("pipefusion_compile")


def routes(stages: list[LoweredStage], producer_of: dict[str, int], piece: Piece) -> dict[tuple[int, int], list[StageInput]]:
    """(producer, consumer) -> the values one piece of this kind carries, in the consumer's input order."""
    found: dict[tuple[int, int], list[StageInput]] = {}
    for st in stages:
        for inp in st.piece_graph(piece).inputs:
            if inp.source is InputSource.RECV:
                found.setdefault((producer_of[inp.name], st.index), []).append(inp)
    return found


def sliced_inputs(stage: LoweredStage, piece: Piece) -> list[StageInput]:
    """The piece's inputs that the runtime slices from a full-size value (graph inputs, positional tables)."""
    return [inp for inp in stage.piece_graph(piece).inputs if inp.source in (InputSource.POSITIONAL, InputSource.IMAGE)]


def message_layout(nodes_by_name: dict[str, fx.Node], token_rows: int, inputs: list[StageInput], piece: Piece):
    """How one message lays out `inputs` for `piece`: flattened shapes, ranks, dtype codes, the memory order
    of each tensor's dims (as the producer's traced value has them: a receiver that made them row-major would
    run its ops on another layout than the plain model does, and a matmul over a transposed operand then
    differs in the last bits), and the byte count."""
    shapes, ranks, dtypes, orders, nbytes = [], [], [], [], 0
    for inp in inputs:
        val = example_value(nodes_by_name[inp.name])
        shape = list(val.shape)
        shape[inp.axis] = inp.token_range(token_rows, piece)[1]
        shapes += shape
        ranks.append(len(shape))
        dtypes.append(DTYPE_CODE[val.dtype])
        orders += stride_order(val.shape, val.stride())
        nbytes += torch.Size(shape).numel() * val.element_size()
    return shapes, ranks, dtypes, orders, nbytes


def _region_bytes(slot, axis: int, length: int) -> int:
    """Bytes of `length` elements along `axis` of a model output."""
    shape = list(slot.shape)
    shape[axis] = length
    return torch.Size(shape).numel() * slot.dtype.itemsize


class StageCall(torch.nn.Module):
    """The compiled stage for one kind of piece, as a submodule of the schedule graph.

    Called as `stage(patch, row_start, hoisted, *per_patch, *caches)`: `patch` is the piece's index in the
    step (for errors and the timeline), `hoisted` the dict of the stage's GLOBAL inputs (the same for every
    piece), `per_patch` the piece's received and sliced inputs, in piece-input order.
    """

    def __init__(self, program: "PipelineProgram", stage: "_StageRuntime", piece: Piece):
        super().__init__()
        self.piece = piece
        self._owner = [program, stage]  # a list, so nn.Module registers neither as a child

    def forward(self, patch: int, row_start, hoisted, *rest):
        program, stage = self._owner
        comm = program.comms[stage.lowered.index]
        comm.patch = patch
        rest_iter = iter(rest)
        inputs = [row_start] + [hoisted[i.name] if i.source is InputSource.GLOBAL else next(rest_iter)
                                for i in stage.lowered.piece_graph(self.piece).inputs] + list(rest_iter)
        inputs = [materialize(x) for x in inputs]   # a patch-lazy input: wait for the bands this piece reads
        t0 = comm.mark()
        result = program._stage_fn(stage, self.piece, inputs)(*inputs)
        comm.record("compute", t0)
        program._check_sent_layouts(stage, self.piece, result)
        return result


def build_schedule(program: "PipelineProgram", stage: "_StageRuntime", pieces, device: torch.device) -> fx.GraphModule:
    """The schedule graph of `stage` for one step of `pieces`; receive buffers on `device`."""
    k, last = stage.lowered.index, program.plan.num_stages - 1
    channel = program.comms[k].name
    root = torch.nn.Module()
    g = fx.Graph()
    row_start = [g.placeholder(f"row_start_{j}") for j in range(len(pieces))]
    hoisted = g.placeholder("hoisted")  # the stage's GLOBAL inputs, computed once per step
    sliced = [{inp.name: g.placeholder(f"{inp.name}_patch{j}") for inp in sliced_inputs(stage.lowered, piece)}
              for j, piece in enumerate(pieces)]
    caches = [g.placeholder(f"cache_{c.attention}_{w}") for c in stage.lowered.caches for w in c.buffers]
    outs = [g.placeholder(f"out_{o.name}") for o in program._token_outputs]
    found = [program.routes(piece) for piece in pieces]
    layout = lambda inputs, piece: message_layout(program._nodes_by_name, program.plan.token_rows, inputs, piece)
    bufs = {}
    messages = program.output_messages(pieces)   # (piece, [(output, axis, start, length)]) per output band
    receivers = program.output_receivers()
    out_bufs = []
    if k != last and k in receivers:             # the model output bands this stage gets from the last
        for j, regions in messages:
            nbytes = sum(_region_bytes(program._token_outputs[i], axis, length) for i, axis, _, length in regions)
            buf = g.call_function(torch.empty, ((nbytes,),), {"dtype": torch.uint8, "device": device})
            buf.name = f"outbuf_{j}"
            g.call_function(torch.ops.pipefusion.irecv.default, (buf, last, OUTPUT_TAG + j, channel))
            out_bufs.append(buf)
    regions_of = dict(messages)
    for j, piece in enumerate(pieces):           # post every receive of the step ahead of time
        for p in sorted(p for (p, c) in found[j] if c == k):
            *_, nbytes = layout(found[j][(p, k)], piece)
            buf = g.call_function(torch.empty, ((nbytes,),), {"dtype": torch.uint8, "device": device})
            buf.name = f"buf_{j}_from{p}"
            g.call_function(torch.ops.pipefusion.irecv.default, (buf, p, j, channel))
            bufs[(j, p)] = buf
    for j, piece in enumerate(pieces):
        values = {}
        for p in sorted(p for (p, c) in found[j] if c == k):
            inputs = found[j][(p, k)]
            shapes, ranks, dtypes, orders, _ = layout(inputs, piece)
            g.call_function(torch.ops.pipefusion.wait.default, (bufs[(j, p)], channel))
            unpacked = g.call_function(torch.ops.pipefusion.unpack.default,
                                       (bufs[(j, p)], shapes, ranks, dtypes, orders))
            for i, inp in enumerate(inputs):
                values[inp.name] = g.call_function(operator.getitem, (unpacked, i))
        available = {**sliced[j], **values}
        pg = stage.lowered.piece_graph(piece)
        per_piece = [available[i.name] for i in pg.inputs if i.source is not InputSource.GLOBAL]
        args = [j, row_start[j], hoisted] + per_piece + caches
        target = f"stage_{piece.kind}" if piece.kind in EXTRA else f"stage_{piece.kind}{piece.rows}"
        if not hasattr(root, target):
            root.add_module(target, StageCall(program, stage, piece))
        result = g.call_module(target, tuple(args))
        produced = {name: g.call_function(operator.getitem, (result, i)) for i, name in enumerate(pg.outputs)}
        for c in sorted(c for (p, c) in found[j] if p == k):
            packed = g.call_function(torch.ops.pipefusion.pack.default,
                                     ([produced[i.name] for i in found[j][(k, c)]],))
            g.call_function(torch.ops.pipefusion.isend.default, (packed, c, j, channel))
        if k == last:
            for slot, out in zip(program._token_outputs, outs):
                write = slot.writer(pg, piece)
                if write is not None:
                    op, rest = write
                    g.call_function(op, (out, produced[slot.name], *rest))
            if receivers and j in regions_of:   # this band of the output, to every other rank at once
                views = [g.call_function(torch.narrow, (outs[i], axis, start, length))
                         for i, axis, start, length in regions_of[j]]
                packed = g.call_function(torch.ops.pipefusion.pack.default, (views,))
                for r in receivers:
                    g.call_function(torch.ops.pipefusion.isend.default, (packed, r, OUTPUT_TAG + j, channel))
    token = outs[0] if outs else g.call_function(torch.empty, ((0,),), {"device": device})
    g.call_function(torch.ops.pipefusion.wait_sends.default, (token, channel))
    g.output(out_bufs)
    g.lint()
    return select_kernels(fx.GraphModule(root, g, class_name=f"PipeFusionSchedule_stage{k}"),
                          program.options.kernels)
