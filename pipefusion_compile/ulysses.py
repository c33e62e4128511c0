"""Sequence parallelism inside a stage (Ulysses): the `pipefusion::sp_*` collective ops and their groups.

The `sequence_parallel` ranks of one pipeline stage each hold one sub-band of every image band (`plan.py`:
`PipelinePlan.sp_degree`). Around every self-attention of a band piece (`passes/sequence_parallel.py`):

    q, k, v    [B, H, s_r, D]          this rank's sub-band, every head
      sp_scatter_heads   all-to-all    [B, H/P, s_0 + ... + s_{P-1}, D]: the whole band, this rank's heads
      kv_cache_update    the band's fresh K/V into this rank's head slice of the cache
      sdpa               the band's queries over the whole cache, this rank's heads
      sp_gather_heads    all-to-all    [B, H, s_r, D]: back to this rank's sub-band, every head

so each rank's fresh K/V reach the whole group (as xDiT's hybrid does) and the cache of a rank holds H/P heads.
A piece every rank of the stage runs whole (the text of a joint sequence, the full sequence of a warmup step
with text) attends with its own heads and all-gathers them (`sp_all_gather_heads`).

Every collective runs on the group's process group with the program's time limit; a failure names the
attention node, the group's ranks and what was being exchanged. Each op adds what this rank sent to its
group's `bytes_sent` (what the plan predicts: `sequence_program.sp_bytes_per_step`).
"""
from __future__ import annotations

import datetime
import itertools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import PipefusionCommError


@dataclass
class SpGroup:
    """The sequence-parallel ranks of one stage: their process group, this rank's index in it, the time limit
    of a collective, and the bytes this rank has sent in it."""

    key: str
    group: object
    ranks: tuple[int, ...]
    rank: int
    timeout_s: float
    bytes_sent: int = 0
    collectives: int = 0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def run(self, post, what: str, sent: int) -> None:
        """Post an async collective and wait for it at most `timeout_s` (NCCL: the stream waits)."""
        t0 = time.monotonic()
        try:
            work = post()
            if dist.get_backend(self.group) == "nccl":
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:
            elapsed = time.monotonic() - t0
            late = " (timed out: is every rank of the group running the same step?)" \
                if elapsed >= 0.95 * self.timeout_s else ""
            raise PipefusionCommError(
                f"sequence-parallel group {list(self.ranks)} (this rank: index {self.rank}): {what} failed after "
                f"{elapsed:.1f}s{late}: {type(e).__name__}: {e}") from e
        self.bytes_sent += sent
        self.collectives += 1


_GROUPS: dict[str, SpGroup] = {}
_COUNTER = itertools.count()


def register_group(group, timeout_s: float) -> SpGroup:
    ranks = tuple(dist.get_process_group_ranks(group))
    sp = SpGroup(f"sp{next(_COUNTER)}-{'-'.join(map(str, ranks))}", group, ranks, dist.get_rank(group), timeout_s)
    _GROUPS[sp.key] = sp
    return sp


def group(key: str) -> SpGroup:
    try:
        return _GROUPS[key]
    except KeyError:
        raise PipefusionCommError(f"no sequence-parallel group {key!r} (its program was freed)") from None


def _exchange(sp: SpGroup, send: list[list[torch.Tensor]], recv_shapes: list[list[tuple]], what: str):
    """One flat `all_to_all_single`: the tensors `send[i]` go to index i; from each index i arrive tensors of
    `recv_shapes[i]` (all of one dtype), returned per index."""
    parts = [t.contiguous().reshape(-1) for peer in send for t in peer]
    flat = torch.cat(parts)
    counts = [sum(t.numel() for t in peer) for peer in send]
    sizes = [[int(torch.Size(shape).numel()) for shape in peer] for peer in recv_shapes]
    out = torch.empty(sum(map(sum, sizes)), dtype=flat.dtype, device=flat.device)
    own = counts[sp.rank] * flat.element_size()
    sp.run(lambda: dist.all_to_all_single(out, flat, [sum(n) for n in sizes], counts, group=sp.group,
                                          async_op=True), what, flat.numel() * flat.element_size() - own)
    got, at = [], 0
    for peer_sizes, peer_shapes in zip(sizes, recv_shapes):
        tensors = []
        for n, shape in zip(peer_sizes, peer_shapes):
            tensors.append(out[at:at + n].view(shape))
            at += n
        got.append(tensors)
    return got


def _band_shape(x: torch.Tensor, axis: int, heads: int, tokens: int) -> tuple:
    shape = list(x.shape)
    shape[axis - 1], shape[axis] = heads, tokens
    return tuple(shape)


@torch.library.custom_op("pipefusion::sp_scatter_heads", mutates_args=())
def sp_scatter_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: list[int], group_key: str,
                     axis: int, node: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ulysses' first all-to-all: this rank's sub-band of q, k, v (every head; tokens along `axis`, heads at
    `axis - 1`) -> the whole band (`sizes`: each rank's tokens) with this rank's share of the heads. One
    collective for the three when they share a dtype (else one each)."""
    sp = group(group_key)
    qkv = (q, k, v)
    heads = [x.shape[axis - 1] // sp.size for x in qkv]
    chunks = [torch.split(x, h, axis - 1) for x, h in zip(qkv, heads)]
    batches = [(0, 1, 2)] if len({x.dtype for x in qkv}) == 1 else [(0,), (1,), (2,)]
    outs: list = [None] * 3
    for which in batches:
        send = [[chunks[j][i] for j in which] for i in range(sp.size)]
        shapes = [[_band_shape(qkv[j], axis, heads[j], tokens) for j in which] for tokens in sizes]
        names = "/".join(("queries", "keys", "values")[j] for j in which)
        got = _exchange(sp, send, shapes, f"the all-to-all of the {names} of {node} (sub-band -> head slice)")
        for slot, j in enumerate(which):
            outs[j] = torch.cat([peer[slot] for peer in got], axis)
    return tuple(outs)


@sp_scatter_heads.register_fake
def _(q, k, v, sizes, group_key, axis, node):
    sp = group(group_key)
    outs = []
    for x in (q, k, v):
        shape = list(x.shape)
        shape[axis - 1], shape[axis] = x.shape[axis - 1] // sp.size, sum(sizes)
        outs.append(x.new_empty(shape))
    return tuple(outs)


@torch.library.custom_op("pipefusion::sp_gather_heads", mutates_args=())
def sp_gather_heads(o: torch.Tensor, sizes: list[int], group_key: str, axis: int, node: str) -> torch.Tensor:
    """Ulysses' second all-to-all: the band's attention output for this rank's heads -> this rank's sub-band
    (`sizes[rank]` tokens along `axis`) with every head (heads at `axis - 1`)."""
    sp = group(group_key)
    send = [[c] for c in torch.split(o, sizes, axis)]
    shape = list(o.shape)
    shape[axis] = sizes[sp.rank]
    got = _exchange(sp, send, [[tuple(shape)]] * sp.size,
                    f"the all-to-all of the output of {node} (head slice -> sub-band)")
    return torch.cat([peer[0] for peer in got], axis - 1)


@sp_gather_heads.register_fake
def _(o, sizes, group_key, axis, node):
    sp = group(group_key)
    shape = list(o.shape)
    shape[axis], shape[axis - 1] = sizes[sp.rank], o.shape[axis - 1] * sp.size
    return o.new_empty(shape)


@torch.library.custom_op("pipefusion::sp_all_gather_heads", mutates_args=())
def sp_all_gather_heads(o: torch.Tensor, group_key: str, head_axis: int, node: str) -> torch.Tensor:
    """A piece every rank of the stage runs whole: each rank's attention output over its heads -> every head."""
    sp = group(group_key)
    x = o.contiguous()
    got = [torch.empty_like(x) for _ in range(sp.size)]
    sp.run(lambda: dist.all_gather(got, x, group=sp.group, async_op=True),
           f"the all-gather of the heads of {node}", x.numel() * x.element_size() * (sp.size - 1))
    return torch.cat(got, head_axis)


@sp_all_gather_heads.register_fake
def _(o, group_key, head_axis, node):
    shape = list(o.shape)
    shape[head_axis] *= group(group_key).size
    return o.new_empty(shape)
