"""Lowering: from the analyzed dynamo graph and a plan to per-stage graphs.

For stage k `lower` builds
  * a *globals* graph: the GLOBAL/POSITIONAL values the stage reads, hoisted out of the patch loop
    (computed once per step from the model inputs; `stage_split.extract_globals`), and
  * a *piece* graph per kind of piece (`pieces.py`: the full sequence for warmup, one per distinct band
    height, the text of a joint sequence), composed of passes, each a function over a GraphModule:

      stage_split.py, once per stage:
        extract_stage          copy the stage's token-carrying nodes; everything they read from outside
                               becomes a placeholder (received value, hoisted global, sliced positional
                               table, sliced image input); self-attention gets two cache placeholders
      piece_rewrites.py, on each piece's copy of the stage graph:
        select_group           keep, of every value, the token group the piece holds (image band or text):
                               `cat` of text and image along the token axis -> the piece's operand, slices
                               that select a group -> their input, values without the group -> removed
        rewrite_stale_attention   sdpa(q, k, v)  ->  pipefusion.kv_cache_update(ck, cv, k, v, row_start)
                                                     sdpa(q, ck, cv)
        rewrite_halo_convs     conv(x, w, pad=1) ->  h = pipefusion.halo_rows(cx, x, row_start, ...)
                                                     conv(h, w, pad=0 along the rows)
        rewrite_stale_reductions  matmul(v, k) over the tokens -> pipefusion.cache_rows(cv, v, row_start, ...)
                                                     pipefusion.cache_rows(ck, k, ...); matmul(cv, ck)
        rewrite_token_sizes    sizes dynamo baked into reshape/view/expand/unflatten, at the axis the token
                               analysis says carries tokens, become the piece's extent (`rows * per_row`)
      output_fusion.py:
        fuse_unpatchify_output the last stage returns a model output that ends in diffusers' unpatchify in token
                               layout; the runtime writes it with `pipefusion.write_unpatchified`

  then `propagate_patch_shapes` (piece_rewrites.py) runs the patch graph on fake tensors and checks every
  token-carrying value has the patch's shape (a constant that measures tokens and was missed fails here, at
  compile time). With sequence parallelism, `rewrite_sequence_parallel` (sequence_parallel.py) then wraps each
  self-attention over the caches in Ulysses' all-to-alls (each rank: its part of the band, its heads).

This module holds `lower`, which composes them, and re-exports the names other modules import from here
(`StageInput`, `LoweredStage`, the passes, ...).
"""
from __future__ import annotations

import logging

import torch.fx as fx

from ..errors import PipefusionError
from .autocast import autocast_scopes, restore_autocast
from .cross_group import rewrite_cross_group_attention
from .meta import node_meta
from .output_fusion import fuse_unpatchify_output
from .piece_rewrites import (propagate_patch_shapes, rewrite_halo_convs, rewrite_stale_attention,
                             rewrite_stale_reductions, rewrite_token_sizes, select_group)
from .pieces import BAND, FULL, Piece
from .sample_rules import rewrite_sample_splits
from .sequence_parallel import SequenceParallel, rewrite_sequence_parallel, sp_cache_specs
from .side_effects import alias_root, check_kept, mutated_operand
from .stage_split import (InputSource, LoweredStage, PieceGraph, check_lowerable, detach_fresh_tensors,
                          extract_globals, extract_stage, output_names)
from .stage_split import CacheSpec, StageInput  # noqa: F401  (re-exported: the stage interface, with the above)
from .tokens import TokenAnalysis

log = logging.getLogger("pipefusion_compile")


# ----------------------------------------------------------------------------------------------------------
# The lowering pipeline


def _run_pass(name: str, fn, gm: fx.GraphModule, *args) -> fx.GraphModule:
    log.debug("pipefusion pass %s: before\n%s", name, gm.graph)
    try:
        out = fn(gm, *args)
    except PipefusionError:
        raise
    except Exception as e:  # re-raise with the pass name
        raise PipefusionError(f"pass {name} failed: {type(e).__name__}: {e}") from e
    log.debug("pipefusion pass %s: after\n%s", name, (out[0] if isinstance(out, tuple) else out).graph)
    return out


def lower(gm: fx.GraphModule, plan, analysis: TokenAnalysis, shared_inputs: bool = False,
          sp: SequenceParallel | None = None) -> list[LoweredStage]:
    """Build the globals graph and the piece-graph factory of every stage of `plan`.

    `shared_inputs`: all stages run in one process on the same graph inputs (simulate mode), so an in-place
    write into a graph input (a buffer, a parameter, an argument) runs once per step, in the globals of the
    first stage that reads it; with one process per stage, each stage's globals apply it to their own copy.
    A write into a graph input that no stage reads still runs (on the last stage): it is visible to the
    caller. Every write of the dynamo graph must end up in some extracted graph (`check_kept`).

    `sp`: this rank is one of `sp.degree` sequence-parallel ranks of its stage: its K/V caches hold its share of
    the heads and every self-attention is wrapped in Ulysses' all-to-alls (`sequence_parallel.py`).
    """
    check_lowerable(gm)
    seq = sp   # (`sp` names each stage's plan below)
    _run_pass("detach_fresh_tensors", detach_fresh_tensors, gm)
    scopes = autocast_scopes(gm)
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    order = [nodes_by_name[name] for name in plan.order]
    position = {n.name: i for i, n in enumerate(order)}
    out_node = next(iter(gm.graph.find_nodes(op="output")))
    writes_to_inputs = [n for n in gm.graph.nodes if mutated_operand(n) is not None
                        and alias_root(mutated_operand(n)).op in ("placeholder", "get_attr")]
    applied: set[fx.Node] = set()   # writes into graph inputs some earlier stage's globals already apply
    last = len(plan.stages) - 1

    def allow_write(w: fx.Node) -> bool:
        return not (shared_inputs and w in applied)

    stages = []
    for sp in plan.stages:
        members = order[sp.start:sp.end]
        later = set()
        for n in members:
            for u in n.users:
                if u is out_node or (u.name in position and position[u.name] >= sp.end):
                    later.add(n.name)
        stage_gm, inputs, caches, outputs = _run_pass("extract_stage", extract_stage, gm, members, later, analysis)
        needed = [nodes_by_name[i.name] for i in inputs if i.source in (InputSource.GLOBAL, InputSource.POSITIONAL)]
        if sp.index == last:
            for leaf in out_node.all_input_nodes:
                if not node_meta(leaf).token.carries_tokens and leaf not in needed:
                    needed.append(leaf)
        unread = tuple(w for w in writes_to_inputs if w not in applied) if sp.index == last else ()
        globals_gm, positions, gouts = _run_pass("extract_globals", extract_globals, gm, needed, allow_write,
                                                 unread)
        globals_gm = restore_autocast(globals_gm, scopes)
        kept = {n.name for n in globals_gm.graph.nodes}
        applied.update(w for w in writes_to_inputs if w.name in kept)

        model_outputs = {n.name for n in out_node.all_input_nodes} if sp.index == len(plan.stages) - 1 else set()

        def build(piece: Piece, stage_gm=stage_gm, inputs=inputs, model_outputs=model_outputs,
                  stage_outputs=outputs, sp_index=sp.index) -> PieceGraph:
            graph = fx.Graph()
            graph.output(graph.graph_copy(stage_gm.graph, {}))
            g = fx.GraphModule(stage_gm, graph)
            g = _run_pass("rewrite_cross_group_attention", rewrite_cross_group_attention, g, piece.kind)
            g = _run_pass("select_group", select_group, g, piece.kind)
            g = _run_pass("rewrite_sample_splits", rewrite_sample_splits, g)
            g = _run_pass("rewrite_stale_attention", rewrite_stale_attention, g, piece.kind)
            whole = piece.kind == FULL or (piece.kind == BAND and piece.rows == analysis.token_rows)
            g = _run_pass("rewrite_halo_convs", rewrite_halo_convs, g, whole)
            g = _run_pass("rewrite_stale_reductions", rewrite_stale_reductions, g, whole)
            g = _run_pass("rewrite_token_sizes", rewrite_token_sizes, g, piece, analysis)
            g = _run_pass("propagate_patch_shapes", propagate_patch_shapes, g, piece, analysis)
            if seq is not None:
                g = _run_pass("rewrite_sequence_parallel", rewrite_sequence_parallel, g, piece, seq)
            g, fused = _run_pass("fuse_unpatchify_output", fuse_unpatchify_output, g, model_outputs)
            g = _run_pass("restore_autocast", restore_autocast, g, scopes)
            names = output_names(g)
            if not set(names) <= set(stage_outputs):
                raise PipefusionError(
                    f"internal: the {piece.kind} piece graph of stage {sp_index} returns "
                    f"{sorted(set(names) - set(stage_outputs))}, which are not outputs of the stage")
            kept = {ph.target for ph in g.graph.find_nodes(op="placeholder")}
            return PieceGraph(g, tuple(i for i in inputs if i.name in kept), names, fused)

        if seq is not None:
            caches = sp_cache_specs(caches, seq.degree, nodes_by_name)
        stages.append(LoweredStage(
            index=sp.index, globals_gm=globals_gm, global_inputs=positions, global_outputs=gouts,
            inputs=inputs, caches=caches, outputs=outputs, stage_gm=stage_gm,
            token_rows=analysis.token_rows, analysis=analysis, _build=build,
        ))
    check_kept(gm, [g for st in stages for g in (st.globals_gm, st.stage_gm)], "the lowered stages")
    return stages
