"""A graph whose self-attention mixes tokens that reach its outputs only inside a joint sequence.

The piece of a model before a graph break may refine the prompt (a text refiner: self-attention over the
prompt tokens alone) and return it concatenated with other context tokens for the graph of the blocks:

    l_encoder_hidden_states_ [2, 6, 32]  ->  refiner (self-attention over the 6 prompt tokens)  -> refined
    image_proj = linear(l_image_embeds_)                    [2, 4, 32]   (GLOBAL: no prompt token in it)
    context = cat([image_proj, refined], dim=1)             [2, 10, 32]  -> returned
    packed = cat([history, patch_embed(l_hidden_states_)])  [2, 340, 32] -> returned (no attention here)

The token analysis finds the prompt as the only input whose tokens reach a self-attention, every
self-attention mixes those tokens alone (no joint sequence yet), and no output holds them as an image stream:
each one that carries them holds other tokens too (`TokenInfo.joint`) or none of its own part (`epr == 0`). Patches of such a graph would be bands of the prompt, and its output
could not be assembled band by band (`stage_split.check_lowerable`); there is no image stream to pipeline, so
the graph runs unchanged (`declines.decline`, recorded) instead of failing. A graph whose self-attention is
already joint (a piece of a joint-attention DiT that a break ends mid-stream) still fails
(`stage_split.check_lowerable`): there the tokens are the image stream, and running it unchanged would hide
that.
"""
from __future__ import annotations

import torch.fx as fx

from .graph_inputs import graph_outputs
from .meta import node_meta


def joint_only_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The token-carrying outputs of an analyzed graph when none of them holds the image tokens alone (every
    one is a joint sequence or a value of another group only) and no self-attention is over a joint sequence;
    empty otherwise (some output is an image stream, none carries tokens, or an attention is joint)."""
    for n in gm.graph.nodes:
        info = node_meta(n).token if n.op != "output" else None
        if info is not None and info.attention == "self" and info.joint:
            return []
    carrying = []
    for out in graph_outputs(gm):
        if not isinstance(out, fx.Node):
            continue
        info = node_meta(out).token
        if info is None or not info.carries_tokens:
            continue
        if info.elements is not None or not (info.joint or info.epr == 0):
            return []
        carrying.append(out)
    return carrying
