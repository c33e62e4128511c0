"""A graph input that already holds a joint token sequence: [other tokens | image tokens] (or image first).

A model cut by a graph break may embed the image and concatenate it with other tokens (a prompt, a time
token, history latents) in the graph before the break, so the graph that holds the transformer blocks
receives one input whose token axis holds every group:

    graph 1 (before the break):  h = cat([condition (6), time (1), patch_embed(latent) (64)], dim=1)
    graph 2 (this graph):        l_hidden_states_ [2, 71, 32]     <- the joint sequence, one input
                                 ... blocks (self-attention over all 71 tokens) ...
                                 image = getitem(norm(h), (slice(None), slice(-64, None)))   [2, 64, 32]
                                 return unpatchify(proj(image))  [2, 4, 16, 16]

No input matches the output's tokens (71 is not 64), but the graph itself says which part is the image: the
output reads exactly the `n` tokens at one end of the sequence, and `n` tokens match the output. Such an
input is a joint input (`JointInput`): the token analysis seeds it with the other tokens as the group before
(`prefix`) or after (`suffix`) its image part, as if the graph had begun with `cat([other, image])`, and the
joint-sequence machinery does the rest (the other group is one more piece of the step; positional tables and
masks per joint token are sliced like it). The analysis then checks the split: a slice through the image
part, or an output holding the other tokens, is still refused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from .graph_inputs import InputCandidate, InputRejection, _match
from .meta import example_value

_TOKEN_AXIS = 1  # a packed token input is [B, S, C]


@dataclass(frozen=True)
class JointInput:
    """A placeholder holding [prefix other tokens | image tokens | suffix other tokens] on `axis`; `evidence`
    is the slice that reads exactly the image part on the way to the output."""

    name: str
    axis: int
    prefix: int
    suffix: int
    evidence: str
    extent: int       # elements on `axis`, every group

    @property
    def image_tokens(self) -> int:
        return self.extent - self.prefix - self.suffix


def _end_slice(node: fx.Node, extent: int) -> tuple[int, int] | None:
    """(prefix, suffix) when `node` is `x[:, lo:hi]` keeping one end of a token axis of `extent` elements
    (`x[:, -n:]`, `x[:, extent - n:]`, `x[:, :n]`), else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) != 2 or index[0] != slice(None):
        return None
    s = index[1]
    if not isinstance(s, slice) or s.step not in (None, 1):
        return None
    if any(b is not None and not isinstance(b, int) for b in (s.start, s.stop)):
        return None
    lo, hi, _ = s.indices(extent)
    if hi <= lo or (lo, hi) == (0, extent):
        return None
    if hi == extent:
        return lo, 0
    if lo == 0:
        return 0, extent - hi
    return None


def _same_extent_values(start: fx.Node, extent: int) -> list[fx.Node]:
    """The values computed from `start` that are 3-D with `extent` elements on the token axis (the blocks
    keep [B, S, D]), in graph order."""
    found, stack, seen = [], [start], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = example_value(n)
        shape = getattr(val, "shape", None)
        if shape is None or len(shape) != 3 or shape[_TOKEN_AXIS] != extent:
            continue
        found.append(n)
        stack.extend(n.users)
    return found


def find_joint_inputs(gm: fx.GraphModule, candidates: list[InputCandidate],
                      out_shape: tuple[int, ...]) -> list[JointInput]:
    """The inputs whose image part the graph names: a [B, S, C] input (matched or rejected only as
    NO_TOKEN_MATCH: its whole token count need not match the output's) from which a value [B, S, D] is sliced at one end of its tokens to n < S tokens, n of
    them matching the output (`graph_inputs._match`). One candidate per input (the first such slice)."""
    by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    joint = []
    for c in candidates:
        if (c.match is None and c.rejected is not InputRejection.NO_TOKEN_MATCH) or len(c.shape) != 3:
            continue
        extent = c.shape[_TOKEN_AXIS]
        for value in _same_extent_values(by_name[c.name], extent):
            for user in value.users:
                ends = _end_slice(user, extent)
                if ends is None:
                    continue
                image = extent - sum(ends)
                if _match((c.shape[0], image, c.shape[2]), out_shape) is None:
                    continue
                joint.append(JointInput(c.name, _TOKEN_AXIS, ends[0], ends[1], user.name, extent))
                break
            else:
                continue
            break
    return joint
