"""Autocast regions of the dynamo graph, put back around the same nodes in every extracted graph.

Dynamo records `with torch.autocast(...)` inside the model as a pair of nodes; what lies between them runs
under that autocast state, and everything else under the caller's (ambient) one. The extraction of the
globals and stage graphs copies the compute nodes only, so without this pass a region is silently lost:
diffusers' Helios, ErnieImage, OmniGen and Z-Image compute their RoPE positions under
`autocast(enabled=False)` so that an ambient bf16 autocast does not round them, and a model may also enable
autocast for part of a block.

    dynamo graph                                  an extracted graph holding %out and %y (%x elsewhere)
        %x = linear(%h, %w)                           %out = einsum(...)          # ran in bf16
        %_enter_autocast = _enter_autocast('cpu', None, False, None)
        %out = einsum('i,j->ij', %pos, %freqs)    ->  %_enter_autocast = _enter_autocast('cpu', None, False, None)
        %_exit_autocast = _exit_autocast(%_enter_autocast)   %out = einsum(...)   # fp32, as in the model
        %y = cos(%out)                                %_exit_autocast = _exit_autocast(%_enter_autocast)
                                                      %y = cos(%out)

`autocast_scopes` reads the regions of the dynamo graph (node name -> the enter nodes active there,
outermost first); `restore_autocast` wraps each run of consecutive nodes with the same scope in copies of
those enter/exit nodes. Node names are kept by the extraction (and by the piece rewrites for the nodes they
do not create); a node a rewrite created runs in the scope of the node before it (`kv_cache_update` right
before the attention that reads the cache runs where the attention does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

ENTER = getattr(torch.amp.autocast_mode, "_enter_autocast", None)
EXIT = getattr(torch.amp.autocast_mode, "_exit_autocast", None)


@dataclass(frozen=True)
class AutocastScopes:
    """The autocast regions of a dynamo graph."""

    scopes: dict[str, tuple[fx.Node, ...]]   # node name -> the enter nodes active there, outermost first
    names: frozenset[str]                     # every node name of that graph

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def of(self, n: fx.Node, previous: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
        """The scope of `n` in an extracted graph: its own, or for a node a rewrite created, the previous one."""
        if n.name in self.names:
            return self.scopes.get(n.name, ())
        return previous


def autocast_scopes(gm: fx.GraphModule) -> AutocastScopes:
    """The autocast regions of the dynamo graph `gm`."""
    stack: list[fx.Node] = []
    scopes: dict[str, tuple[fx.Node, ...]] = {}
    for n in gm.graph.nodes:
        if ENTER is not None and n.op == "call_function" and n.target is ENTER:
            stack.append(n)
        elif EXIT is not None and n.op == "call_function" and n.target is EXIT:
            enter = n.args[0]
            if enter in stack:
                del stack[stack.index(enter):]
        elif stack and n.op not in ("placeholder", "output"):
            scopes[n.name] = tuple(stack)
    return AutocastScopes(scopes, frozenset(n.name for n in gm.graph.nodes))


def restore_autocast(gm: fx.GraphModule, scopes: AutocastScopes) -> fx.GraphModule:
    """Wrap the nodes of `gm` that were inside autocast regions of the dynamo graph in the same regions (see
    the module docstring); `gm` unchanged when none of its nodes was in one."""
    if not scopes or not any(n.name in scopes.scopes for n in gm.graph.nodes):
        return gm
    g = gm.graph
    open_: list[tuple[fx.Node, fx.Node]] = []   # (enter node of the dynamo graph, its copy here)

    def close_to(depth: int, before: fx.Node) -> None:
        while len(open_) > depth:
            _, copy = open_.pop()
            with g.inserting_before(before):
                g.call_function(EXIT, (copy,))

    current: tuple[fx.Node, ...] = ()
    for n in list(g.nodes):
        if n.op == "placeholder":
            continue
        if n.op == "output":
            close_to(0, n)
            break
        want = scopes.of(n, current)
        keep = 0
        while keep < min(len(open_), len(want)) and open_[keep][0] is want[keep]:
            keep += 1
        close_to(keep, n)
        for enter in want[keep:]:
            with g.inserting_before(n):
                copy = g.call_function(ENTER, tuple(enter.args), dict(enter.kwargs))
            open_.append((enter, copy))
        current = want
    g.lint()
    gm.recompile()
    return gm
