"""Which placeholders of a dynamo graph are the user's inputs, and which one carries the image tokens."""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import UnsupportedGraphError
from .meta import META_KEY, NodeMeta, example_value


def _source_root(source):
    while source is not None and hasattr(source, "base") and getattr(source, "base") is not None:
        source = source.base
    return source


def is_user_input(node: fx.Node, example: object | None = None) -> bool:
    """True for forward arguments; False for the module's parameters and buffers lifted as inputs.

    Dynamo records each placeholder's source: arguments root at a local of `forward`, parameters and
    buffers root at its `self`. Graphs not made by dynamo fall back to `isinstance(x, nn.Parameter)`.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    root = _source_root(source)
    local = getattr(root, "local_name", None)
    if local is not None:
        return local != "self"
    return not isinstance(example, torch.nn.Parameter)


def graph_outputs(gm: fx.GraphModule) -> list:
    """The leaves of the graph's output node, in order."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(out.args[0])


class InputMatch(enum.IntEnum):
    """How a user input's shape relates to the model output's (stronger first)."""

    NAMED = 0             # option image_input names it
    SAME_BUT_CHANNELS = 1  # the output's shape in all dims but one ([B, C, H, W] -> [B, C', H, W])
    SAME_TOKENS = 2       # as many elements per channel as the output, laid out otherwise
                          # (packed [B, H * W, C] in, [B, C, H, W] out, or the reverse; an output with extra dims)
    PATCHIFIED = 3        # p_t * p^2 times more or fewer elements per channel than the output
                          # ([B, C, H, W] in, packed [B, H/p * W/p, p * p * C] out, or the reverse)


class InputRejection(enum.Enum):
    """Why a user tensor input is not taken as the image input."""

    TOO_FEW_DIMS = "fewer than 3 dims (an image input is [B, tokens..., C] or [B, C, spatial...])"
    OTHER_BATCH = "its batch dim (0) differs from the output's"
    NO_TOKEN_MATCH = "no way of reading its dims as channels x tokens matches the output's tokens"
    LIST_ELEMENT = "an element of a list argument: a latent passed as a list of per-sample tensors"
    NOT_NAMED = "option image_input names another input"


@dataclass(frozen=True)
class InputCandidate:
    """One user tensor input of the graph, as the image-input search saw it."""

    name: str                    # placeholder name (l_hidden_states_)
    argument: str                # forward argument as dynamo's source names it (hidden_states, latents[0])
    shape: tuple[int, ...]
    match: InputMatch | None     # None: rejected
    rejected: InputRejection | None = None
    per_sample_match: bool = False  # a list element whose shape matches one sample of the output
    elements: tuple[str, ...] = ()  # a list latent: the placeholders of its elements, in list order (`name` is
                                    # the first); each is one sample, all patched alike

    @property
    def is_list(self) -> bool:
        return bool(self.elements)

    def describe(self) -> str:
        how = self.match.name.lower() if self.match is not None else f"not taken: {self.rejected.value}"
        what = f"{len(self.elements)} per-sample tensors of" if self.elements else ""
        return f"{self.argument} ({self.name}) {what}{list(self.shape)}: {how}"


def _argument(node: fx.Node) -> tuple[str, str | None, int | None]:
    """(display name, root forward argument, list index or None) of a placeholder.

    Sources as dynamo writes them: `L['x']` (an argument), `L['x'][0]` (an element of a list argument), and
    through `nn.Module.__call__`'s `*args, **kwargs`: `L['args'][0]`, `L['kwargs']['x']`, `L['args'][0][1]`.
    """
    meta = node.meta.get(META_KEY)
    if meta is not None and "argument" in meta.extra:   # recorded while dynamo's sources lived (`remember_arguments`)
        return meta.extra["argument"]
    source = getattr(node.meta.get("grapharg"), "source", None)
    root = _source_root(source)
    local = getattr(root, "local_name", None)
    if local is None:  # dynamo drops the sources once a compile is done; its placeholder names keep the argument
        for prefix in ("l_kwargs_", "l_"):
            if node.name.startswith(prefix) and node.name.endswith("_") and len(node.name) > len(prefix) + 1:
                return node.name[len(prefix):-1], node.name[len(prefix):-1], None
        return node.name, None, None
    chain = []
    s = source
    while s is not None and s is not root:
        chain.append(s)
        s = getattr(s, "base", None)
    chain.reverse()                       # outermost access first
    name, levels = local, chain
    if local in ("args", "kwargs") and chain and hasattr(chain[0], "index"):
        index = chain[0].index            # the wrapper's varargs: args[0] or kwargs['x'] is the argument
        name = index if isinstance(index, str) else f"args[{index}]"
        levels = chain[1:]
    if not levels:
        return name, name, None
    first = getattr(levels[0], "index", None)
    display = f"{name}[{first}]" if isinstance(first, int) else source.name
    if isinstance(first, int) and len(levels) == 1:
        return display, name, first
    return (display() if callable(display) else str(display)), name, None


_RESUME_STACK = re.compile(r"___stack\d+")


def is_resume_stack(root: str | None) -> bool:
    """True for a forward argument that is a value dynamo's resume function got from the interpreter stack at a
    graph break (`___stack0`): the result of the call that broke the graph (Lumina2's rope embedder returns the
    patchified latent and its rotary tables as one tuple), not a list the user passed."""
    return root is not None and _RESUME_STACK.fullmatch(root) is not None


def arguments_of(gm: fx.GraphModule) -> dict[str, tuple]:
    """`_argument` of every placeholder, read while dynamo's sources live (during the backend call)."""
    return {ph.name: _argument(ph) for ph in gm.graph.find_nodes(op="placeholder")}


def remember_arguments(gm: fx.GraphModule, arguments: dict[str, tuple]) -> fx.GraphModule:
    """Record `arguments` (from `arguments_of` on the graph dynamo handed the backend) on the placeholders of
    `gm`, a copy made later (a graph specialized to a shape at call time, when the sources are gone), so a list
    latent's elements are still told from arguments of their own. Each placeholder gets its own meta."""
    for ph in gm.graph.find_nodes(op="placeholder"):
        if ph.name in arguments:
            ph.meta[META_KEY] = NodeMeta(extra={"argument": arguments[ph.name]})
    return gm


def _per_channel(shape: tuple[int, ...], drop_extra: bool = False) -> set[int]:
    """Elements per channel of one sample, for each choice of the channel dim (and, for outputs of 4+ non-batch
    dims with `drop_extra`, of one more dim the output carries besides the tokens)."""
    rest = shape[1:]
    total = math.prod(rest)
    sizes = {total // d for d in rest if d}
    if drop_extra and len(rest) >= 4:
        sizes |= {total // (a * b) for i, a in enumerate(rest) for b in rest[i + 1:] if a and b}
    return sizes


def _is_patch_ratio(big: int, small: int) -> bool:
    if small <= 0 or big % small:
        return False
    r = big // small
    return any(r % pt == 0 and r // pt > 1 and math.isqrt(r // pt) ** 2 == r // pt for pt in (1, 2, 4))


def _match(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> InputMatch | None:
    if len(out_shape) < 3:  # an image output has a batch, tokens (or rows) and channels
        return None
    if len(shape) == len(out_shape) and sum(a != b for a, b in zip(shape, out_shape)) <= 1:
        return InputMatch.SAME_BUT_CHANNELS
    ins, outs = _per_channel(shape), _per_channel(out_shape, drop_extra=True)
    if ins & outs:
        return InputMatch.SAME_TOKENS
    outs = _per_channel(out_shape)  # a patch factor relates the tokens themselves, not tokens x an extra dim
    if any(_is_patch_ratio(a, b) or _is_patch_ratio(b, a) for a in ins for b in outs):
        return InputMatch.PATCHIFIED
    return None


def _list_match(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> InputMatch | None:
    """How one element of a list latent (one sample, no batch dim) matches the output: against one sample of a
    batched output, or against the output itself when the model returns a list of per-sample tensors too."""
    found = [m for m in (_match((1, *shape), (1, *out_shape[1:])) if len(out_shape) >= 3 else None,
                         _match((1, *shape), (1, *out_shape))) if m is not None]
    return min(found) if found else None


def _list_candidates(elements: list[InputCandidate], out_shape, image_input: str | None) -> list[InputCandidate]:
    """One candidate per list argument whose elements (at least one, all of one shape, each with 2+ dims) look
    like per-sample latents: the list latent, its elements patched alike."""
    groups: dict[str, list[InputCandidate]] = {}
    for c in sorted(elements, key=_list_index):
        groups.setdefault(c.argument.rsplit("[", 1)[0], []).append(c)
    found = []
    for root, members in groups.items():
        shape = members[0].shape
        if len(shape) < 2 or any(m.shape != shape for m in members):
            continue
        if image_input is not None:
            if image_input not in (root, *(m.name for m in members), *(m.argument for m in members)):
                continue
            match = InputMatch.NAMED
        else:
            match = _list_match(shape, out_shape)
        if match is not None:
            found.append(InputCandidate(members[0].name, root, shape, match,
                                        elements=tuple(m.name for m in members)))
    return found


def output_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    outputs = [example_value(o) for o in graph_outputs(gm) if isinstance(o, fx.Node)]
    outputs = [v for v in outputs if isinstance(v, torch.Tensor)]
    if not outputs:
        raise UnsupportedGraphError("the graph returns no tensor, so no image output to pipeline")
    big = [v for v in outputs if v.dim() >= 3]
    return tuple((big or outputs)[0].shape)


def image_input_candidates(gm: fx.GraphModule, example_inputs: list | None = None,
                           image_input: str | None = None) -> tuple[tuple[int, ...], list[InputCandidate]]:
    """(the output's shape, every user tensor input as a candidate image input), the matched ones first,
    strongest match first, then the largest.

    The image input is matched against the model output by batch and by tokens: its elements per channel
    (for some choice of the channel dim) equal the output's, or differ by a patch factor p_t * p^2; the
    same shape in all dims but one is the strongest match. `image_input` (a forward argument or a placeholder
    name) takes that input whatever its shape.
    """
    out_shape = output_shape(gm)
    found = []
    elements: list[InputCandidate] = []  # the elements of list arguments, each as dynamo's own graph input
    for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        ex = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        val = example_value(ph)
        if val is None:
            val = ex
        if not isinstance(val, torch.Tensor) or not is_user_input(ph, ex):
            continue
        shape = tuple(val.shape)
        if any(not isinstance(s, int) for s in shape):
            continue
        argument, root, index = _argument(ph)
        if image_input is not None:
            named = image_input in (ph.name, argument, root)
            if named and index is None:
                found.append(InputCandidate(ph.name, argument, shape, InputMatch.NAMED))
            elif named:
                elements.append(InputCandidate(ph.name, argument, shape, None, InputRejection.LIST_ELEMENT,
                                               per_sample_match=True))
            else:
                found.append(InputCandidate(ph.name, argument, shape, None, InputRejection.NOT_NAMED))
            continue
        if index is not None and not is_resume_stack(root):
            per_sample = _list_match(shape, out_shape) is not None
            elements.append(InputCandidate(ph.name, argument, shape, None, InputRejection.LIST_ELEMENT, per_sample))
            continue
        if len(shape) < 3:
            found.append(InputCandidate(ph.name, argument, shape, None, InputRejection.TOO_FEW_DIMS))
        elif shape[0] != out_shape[0]:
            found.append(InputCandidate(ph.name, argument, shape, None, InputRejection.OTHER_BATCH))
        else:
            match = _match(shape, out_shape)
            found.append(InputCandidate(ph.name, argument, shape, match,
                                        None if match is not None else InputRejection.NO_TOKEN_MATCH))
    # a list latent is tried after every tensor input: a list argument of per-token tables (a rotary (cos, sin)
    # pair) must not take the place of the batched latent beside it
    found += _list_candidates(elements, out_shape, image_input)
    found += elements
    found.sort(key=lambda c: (c.match is None, c.is_list, c.match or 0, -math.prod(c.shape)))
    return out_shape, found


def _list_index(c: InputCandidate) -> int:
    """The position of a list element in its list (`x[3]` -> 3)."""
    tail = c.argument.rsplit("[", 1)[-1].rstrip("]")
    return int(tail) if tail.isdigit() else 0


def list_latent_error(candidates: list[InputCandidate], out_shape) -> UnsupportedGraphError | None:
    """The error for a latent passed as a list of per-sample tensors that cannot be one image input (one graph
    input per element): samples of different shapes, whose bands of rows would not line up."""
    grouped = {e for c in candidates if c.is_list for e in c.elements}
    elements = [c for c in candidates if c.rejected is InputRejection.LIST_ELEMENT and c.per_sample_match
                and c.name not in grouped]
    if not elements:
        return None
    root = elements[0].argument.rsplit("[", 1)[0]
    same = sorted((c for c in elements if c.argument.rsplit("[", 1)[0] == root), key=_list_index)
    return UnsupportedGraphError(
        f"the image input looks like the list argument `{root}`: {len(same)} per-sample tensors "
        f"({', '.join(f'{c.argument} {list(c.shape)}' for c in same)}) for an output {list(out_shape)}. "
        "A list latent is patched element by element (a patch is the same band of rows of every sample), so its "
        "samples must have one shape: pass samples of one resolution")


def _no_image_input(out_shape, candidates: list[InputCandidate], image_input: str | None) -> UnsupportedGraphError:
    listed = "".join(f"\n  - {c.describe()}" for c in candidates) or "\n  (the graph has no user tensor input)"
    if image_input is not None:
        return UnsupportedGraphError(
            f"option image_input={image_input!r} names no tensor input of this graph; its user tensor inputs "
            f"(forward argument, graph input, shape):{listed}")
    return UnsupportedGraphError(
        f"could not find the image input: no user input matches the output {list(out_shape)} by batch and "
        f"tokens (the output's shape in all dims but the channels, or as many elements per channel, or a patch "
        f"factor p^2 more or fewer); the user tensor inputs:{listed}\n  pass options={{'image_input': "
        "'<forward argument>'} to name it")


def find_token_inputs(gm: fx.GraphModule, example_inputs: list | None = None,
                      image_input: str | None = None) -> tuple[list[fx.Node], list[InputCandidate]]:
    """The candidate image inputs in the order to try them, and every candidate as seen (for errors)."""
    out_shape, candidates = image_input_candidates(gm, example_inputs, image_input)
    matched = [c for c in candidates if c.match is not None]
    listed = list_latent_error(candidates, out_shape)
    if listed is not None and (not matched or image_input is not None):
        raise listed  # with matched inputs, `tokens.analyze_tokens` raises it only when none of them passes
    if not matched:
        raise _no_image_input(out_shape, candidates, image_input)
    by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    return [by_name[c.name] for c in matched], candidates


def input_members(gm: fx.GraphModule, candidates: list[InputCandidate], token_input: fx.Node) -> tuple[fx.Node, ...]:
    """The placeholders patched as the image input `token_input`: its list's elements for a list latent (the
    same band of rows of each sample), else itself."""
    by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    for c in candidates:
        if c.is_list and c.name == token_input.name:
            return tuple(by_name[e] for e in c.elements)
    return (token_input,)


def find_token_input(gm: fx.GraphModule, example_inputs: list | None = None,
                     image_input: str | None = None) -> fx.Node:
    """The image input: the best-matching user tensor input (see `image_input_candidates`).

    A DiT maps a latent to a latent of the same spatial extent ([B, C, H, W] -> [B, C', H, W]; packed
    [B, S, C] -> [B, S, C']), or packs or unpacks it on the way ([B, S, C] -> [B, C, H, W]). Among several
    candidates of one kind the largest wins; `tokens.analyze_tokens` tries the others when the analysis fails.
    """
    return find_token_inputs(gm, example_inputs, image_input)[0][0]
