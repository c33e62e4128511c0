"""Cut finding and stage partitioning. Separate from the cost model: costs come in as numbers.

The per-patch part of the graph is the sequence of token-carrying nodes in topological order. A *cut
position* i (1 <= i < len) splits it before node i. Candidate cuts are where the fewest token-carrying
values are live across the cut (found on a networkx view of the dataflow), counted separately between each
pair of consecutive self-attention layers, so that every gap has candidates even when long skip connections
keep more values live in later gaps: in a DiT, the residual stream between blocks and between the sub-blocks
of a block. Values in flight on a long skip (two or more attention layers since their definition or until their
next use) are not counted when comparing positions within a gap: they travel from producer to consumer
whatever the cut. A cut's price is the bytes of all the
values live across it.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import networkx as nx
import torch.fx as fx

from ..errors import PlanError
from .meta import Kind, MixingRule, node_meta


@dataclass(frozen=True)
class CutCandidates:
    order: tuple[str, ...]                 # token-carrying call nodes, topological
    positions: tuple[int, ...]             # candidate cut positions (indices into `order`)
    live: dict[int, tuple[str, ...]]       # position -> values live across it (candidates only)
    live_bytes: dict[int, int]             # position -> full-sequence bytes live across it
    attention_positions: tuple[int, ...]   # index in `order` of each self-attention node


def token_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The per-patch nodes: call nodes whose value carries image tokens."""
    return [
        n for n in gm.graph.nodes
        if n.op in ("call_function", "call_method", "call_module")
        and node_meta(n).token is not None and node_meta(n).token.in_stage
    ]


def dataflow_graph(nodes: Sequence[fx.Node]) -> nx.DiGraph:
    """networkx DiGraph over the token-carrying nodes (plus the graph output as 'output')."""
    names = {n.name for n in nodes}
    g = nx.DiGraph()
    for i, n in enumerate(nodes):
        g.add_node(n.name, index=i)
    g.add_node("output", index=len(nodes))
    for n in nodes:
        for user in n.users:
            if user.name in names:
                g.add_edge(n.name, user.name)
            elif user.op == "output":
                g.add_edge(n.name, "output")
    return g


def find_cut_candidates(gm: fx.GraphModule) -> CutCandidates:
    """Cut candidates: in each gap between self-attention layers, the positions with the fewest live
    token-carrying values."""
    nodes = token_nodes(gm)
    if len(nodes) < 2:
        raise PlanError("the graph has fewer than two token-carrying ops: nothing to pipeline")
    g = dataflow_graph(nodes)
    index = nx.get_node_attributes(g, "index")
    # Liveness sweep: a value is live across position i if it is defined before i and used at or after i.
    last_use = {v: max((index[u] for u in g.successors(v)), default=index[v]) for v in g.nodes if v != "output"}
    starts: dict[int, list[str]] = {}
    for v in last_use:
        starts.setdefault(index[v] + 1, []).append(v)
    live_at: dict[int, tuple[str, ...]] = {}
    live: set[str] = set()
    for i in range(1, len(nodes)):
        live.update(starts.get(i, []))
        live = {v for v in live if last_use[v] >= i}
        live_at[i] = tuple(sorted(live, key=index.get))
    # attention layers: self-attention over the tokens, and attention local to a token row (per-frame
    # spatial attention with frames as rows) -- a block boundary either way
    attn = tuple(i for i, n in enumerate(nodes) if node_meta(n).token.attention in ("self", "local")
                 or node_meta(n).token.mixing is MixingRule.STALE_INPUTS)
    # A value in flight on a long skip at position i (two or more self-attention layers between its definition
    # and i, or between i and its next use, e.g. HunyuanDiT's skips) travels from its producer to its consumer
    # wherever the cuts lie, so it does not make one position of a gap dearer than another: positions are
    # compared by the other live values.
    uses = {v: sorted(index[u] for u in g.successors(v)) for v in last_use}

    def attention_between(a: int, b: int) -> int:
        return bisect.bisect_left(attn, b) - bisect.bisect_right(attn, a)

    def in_flight(v: str, i: int) -> bool:
        next_use = uses[v][bisect.bisect_left(uses[v], i)]
        return attention_between(index[v], i) >= 2 or attention_between(i - 1, next_use) >= 2

    # gaps: before the first self-attention, between consecutive ones, after the last
    edges = [0, *attn, len(nodes) - 1]
    positions_set: set[int] = set()

    def count(i: int) -> int:
        return sum(1 for v in live_at[i] if not in_flight(v, i))

    # a REDUCED value (a reduction over the tokens, no token axis) lives in one stage: no cut across it
    by_name = {n.name: n for n in nodes}
    for i in [i for i, vs in live_at.items() if any(node_meta(by_name[v]).token.kind is Kind.REDUCED for v in vs)]:
        del live_at[i]
    for lo, hi in zip(edges, edges[1:]):
        gap = [i for i in range(lo + 1, hi + 1) if i in live_at]
        if gap:
            fewest = min(count(i) for i in gap)
            positions_set.update(i for i in gap if count(i) == fewest)
    positions = tuple(sorted(positions_set))
    live_bytes = {i: sum(node_meta(by_name[v]).out_bytes for v in live_at[i]) for i in positions}
    return CutCandidates(
        order=tuple(n.name for n in nodes),
        positions=positions,
        live={i: live_at[i] for i in positions},
        live_bytes=live_bytes,
        attention_positions=attn,
    )


def balanced_cuts(costs: Sequence[int], candidates: CutCandidates, num_stages: int,
                  tolerance: float = 0.01) -> tuple[int, ...]:
    """Optimal contiguous partition: N-1 cuts among the candidates that minimize the largest stage cost
    (the pipeline's bottleneck), to within `tolerance`; among those, the ones that maximize the smallest
    stage (the least idle time), then the fewest bytes crossing. Two dynamic programs, O(N * K^2) each."""
    if num_stages == 1:
        return ()
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    cands = [0, *candidates.positions, len(costs)]  # cut positions, with the two ends as sentinels
    if len(cands) - 2 < num_stages - 1:
        raise PlanError(f"only {len(cands) - 2} cut candidates for {num_stages} stages")
    nbytes = {p: candidates.live_bytes.get(p, 0) for p in cands}

    def seg(a: int, b: int) -> int:
        return prefix[cands[b]] - prefix[cands[a]]

    last = len(cands) - 1
    inf = float("inf")
    # Phase 1: the smallest achievable largest stage. big[j][b]: j stages covering [0, cands[b]).
    big = [[inf] * len(cands) for _ in range(num_stages + 1)]
    big[0][0] = 0
    for j in range(1, num_stages + 1):
        for b in range(1, len(cands)):
            big[j][b] = min((max(big[j - 1][a], seg(a, b)) for a in range(b) if big[j - 1][a] < inf), default=inf)
    limit = big[num_stages][last]
    if limit == inf:
        raise PlanError(f"cannot place {num_stages - 1} cuts")
    limit = limit * (1 + tolerance)
    # Phase 2: stages no larger than `limit`; maximize the smallest stage, then minimize bytes crossing.
    best: list[list[tuple]] = [[(-inf, inf)] * len(cands) for _ in range(num_stages + 1)]
    back = [[-1] * len(cands) for _ in range(num_stages + 1)]
    best[0][0] = (inf, 0)  # (smallest stage so far, bytes so far)
    for j in range(1, num_stages + 1):
        for b in range(1, len(cands)):
            for a in range(b):
                small, spent = best[j - 1][a]
                if small == -inf or seg(a, b) > limit:
                    continue
                cand = (min(small, seg(a, b)), spent + (nbytes[cands[b]] if b != last else 0))
                if (cand[0], -cand[1]) > (best[j][b][0], -best[j][b][1]):
                    best[j][b], back[j][b] = cand, a
    cuts, b = [], last
    for j in range(num_stages, 0, -1):
        b = back[j][b]
        cuts.append(cands[b])
    return tuple(reversed(cuts[:-1]))


def layer_cuts(layers_per_stage: Sequence[int], candidates: CutCandidates) -> tuple[int, ...]:
    """Cuts that give stage k exactly `layers_per_stage[k]` self-attention layers: each cut is the last
    candidate before the first attention layer of the next stage (i.e. at the block boundary)."""
    attn = candidates.attention_positions
    if sum(layers_per_stage) != len(attn):
        raise PlanError(
            f"partition {list(layers_per_stage)} covers {sum(layers_per_stage)} attention layers but the "
            f"graph has {len(attn)}"
        )
    cuts = []
    done = 0
    for count in layers_per_stage[:-1]:
        done += count
        lo, hi = attn[done - 1], attn[done]
        inside = [p for p in candidates.positions if lo < p <= hi]
        if not inside:
            raise PlanError(f"no cut point between attention layers {done - 1} and {done}")
        cuts.append(inside[-1])
    return tuple(cuts)


def uniform_layers(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Attention layers per stage, as equal as possible (earlier stages get the extra ones)."""
    q, r = divmod(num_layers, num_stages)
    return tuple(q + (1 if k < r else 0) for k in range(num_stages))
