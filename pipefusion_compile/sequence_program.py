"""The program of a sequence-parallel rank: its column's pipeline, then the other ranks' parts of the output.

With `sequence_parallel = P` a world of pp x P ranks (per CFG part) is a mesh ("pp", "sp"); the ranks that share
an "sp" coordinate r form a pipeline of their own (a "column": stage 0 .. N-1, each running part r of every band,
`pieces.sub_band`), and the P ranks of one stage exchange heads around every self-attention (`ulysses.py`):

    4 ranks, num_stages=2, sequence_parallel=2 (mesh ("pp", "sp") = [[0, 1], [2, 3]]):
        column 0: ranks 0 -> 2, part 0 of every band        stage 0: ranks 0, 1 (all-to-alls over heads)
        column 1: ranks 1 -> 3, part 1 of every band        stage 1: ranks 2, 3

Each column's last stage sends its parts of the output to its column (the pipeline's own output messages);
then an all-gather over the "sp" group gives every rank the parts of the other columns, so every rank returns
the whole output. Pieces every rank runs whole (a joint sequence's text and full warmup sequence) need no
gather: every column computed them.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from .errors import UnsupportedGraphError
from .lazy import materialize
from .passes.meta import example_value, node_meta
from .passes.pieces import BAND, Piece, extent_of, sub_band
from .passes.sdpa import sdpa_qkv
from .ulysses import SpGroup

log = logging.getLogger("pipefusion_compile")


class SequenceParallelProgram:
    """What the backend returns on a rank of a sequence-parallel stage: call it like the graph."""

    def __init__(self, program, sp: SpGroup):
        self.program = program
        self.sp = sp
        self._parts: dict[tuple, list] = {}
        dtypes = {slot.dtype for slot in program._token_outputs}
        if len(dtypes) > 1:
            raise UnsupportedGraphError(f"sequence_parallel: model outputs of several dtypes ({sorted(map(str, dtypes))})"
                                        " are not gathered yet; use sequence_parallel=1")

    # what the CFG-parallel programs (`hybrid.py`) read of a part's program: the column's
    plan = property(lambda self: self.program.plan)
    stats = property(lambda self: self.program.stats)
    comm = property(lambda self: self.program.comm)
    gm = property(lambda self: self.program.gm)
    timestep_index = property(lambda self: self.program.timestep_index)
    stage_index = property(lambda self: self.program.stage_index)
    _placeholder_index = property(lambda self: self.program._placeholder_index)
    _out_spec = property(lambda self: self.program._out_spec)

    @torch.no_grad()
    def __call__(self, *args):
        out = self.program(*args)
        pieces = self.program.last_pieces
        if not any(p.kind is BAND and p.split for p in pieces):
            self._count()
            return out
        leaves, spec = pytree.tree_flatten(out)
        names = [getattr(n, "name", None) for n in pytree.tree_leaves(self.program._out_spec)]
        leaves = [materialize(x) for x in leaves]
        by_name = dict(zip(names, leaves))
        parts = self.parts(pieces)
        mine = [by_name[name].narrow(axis, start, length) for name, axis, start, length in parts[self.sp.rank]]
        sizes = [sum(by_name[n].narrow(a, s, ln).numel() for n, a, s, ln in regions) for regions in parts]
        dtype = mine[0].dtype
        flat = torch.zeros(max(sizes), dtype=dtype, device=mine[0].device)
        torch.cat([m.reshape(-1).to(dtype) for m in mine], out=flat[:sizes[self.sp.rank]])
        got = [torch.empty_like(flat) for _ in range(self.sp.size)]
        self.sp.run(lambda: dist.all_gather(got, flat, group=self.sp.group, async_op=True),
                    "the all-gather of the sequence-parallel parts of the output",
                    flat.numel() * flat.element_size() * (self.sp.size - 1))
        for r, regions in enumerate(parts):
            if r == self.sp.rank:
                continue
            at = 0
            for name, axis, start, length in regions:
                view = by_name[name].narrow(axis, start, length)
                view.copy_(got[r][at:at + view.numel()].view(view.shape))
                at += view.numel()
        self._count()
        return pytree.tree_unflatten(leaves, spec)

    def _count(self) -> None:
        self.program.stats["sp_bytes_sent"] = self.sp.bytes_sent
        self.program.stats["sp_collectives"] = self.sp.collectives

    def parts(self, pieces) -> list[list[tuple[str, int, int, int]]]:
        key = tuple(pieces)
        if key not in self._parts:
            self._parts[key] = output_parts(self.program, pieces, self.sp.size, self.sp.rank)
        return self._parts[key]


def output_parts(program, pieces, size: int, rank: int) -> list[list[tuple[str, int, int, int]]]:
    """Per sequence-parallel rank: the (output name, axis, start, length) regions of the model outputs its
    parts of the bands compute, in the order the output all-gather carries them (`rank`: this program's)."""
    last = program.all_stages[-1].lowered
    found = [[] for _ in range(size)]
    for piece in pieces:
        if piece.kind is not BAND or not piece.split:
            continue
        pg = last.piece_graph(piece)
        band = Piece(BAND, piece.row0 - sum(piece.split[:rank]), sum(piece.split))
        for r in range(size):
            part = sub_band(band, size, r)
            for slot in program._token_outputs:
                region = slot.region(pg, part)
                if region is not None:
                    found[r].append((slot.name, *region))
    return found

def sp_bytes_per_step(plan, gm, analysis, stage: int, pipelined: bool = True) -> int:
    """What a rank of stage `stage` sends in its sequence-parallel group in one step (`plan.sp_degree` ranks; this
    one `plan.sp_rank`), from the plan and the traced shapes; `ulysses.SpGroup.bytes_sent` counts what it sent.
    Per self-attention of the stage, per piece:
        a part of a band (P ranks, this one r, parts of s_i tokens): the first all-to-all sends (P-1)/P of its
            q, k and v (B x H x s_r x D each), the second, to each other rank i, B x H/P x s_i x D of the output;
        a piece run whole (L tokens): the all-gather sends B x H/P x L x D to each of the P-1 others;
    and once per step with band parts, the output gather: P-1 times the largest rank's part of the outputs."""
    P, r = plan.sp_degree, plan.sp_rank
    if P == 1:
        return 0
    nodes = {n.name: n for n in gm.graph.nodes}
    pieces = plan.pieces(pipelined)
    total = 0
    for name, position in zip(plan.self_attention, plan.attention_positions):
        if plan.stage_of(position) != stage:
            continue
        n = nodes[name]
        q, k, v = (example_value(t) for t in sdpa_qkv(n))
        kinfo = node_meta(sdpa_qkv(n)[1]).token
        per_row = analysis.per_row(kinfo)
        B, Hq, _, Dq = q.shape
        Hk, Dk, Dv = k.shape[1], k.shape[3], v.shape[3]
        size = q.element_size()
        for piece in pieces:
            if piece.kind is BAND and piece.split:
                s = [rows * per_row for rows in piece.split]
                total += size * B * s[r] * (Hq * Dq + Hk * Dk + Hk * Dv) * (P - 1) // P
                total += size * B * (Hq // P) * Dv * sum(x for i, x in enumerate(s) if i != r)
            else:
                tokens = extent_of(kinfo.prefix, kinfo.suffix, per_row, plan.token_rows, piece)
                total += size * B * (Hq // P) * tokens * Dv * (P - 1)
    parts = [p for p in pieces if p.kind is BAND and p.split]
    if parts:
        row_bytes = 0   # bytes of one token row of every model output with an image part
        for o in gm.graph.find_nodes(op="output")[0].all_input_nodes:
            info, val = node_meta(o).token, example_value(o)
            if info is not None and info.carries_tokens and info.epr and isinstance(val, torch.Tensor):
                row_bytes += val.numel() * val.element_size() // plan.token_rows
        most = max(sum(p.split[i] for p in parts) for i in range(P))
        total += most * row_bytes * (P - 1)
    return total
