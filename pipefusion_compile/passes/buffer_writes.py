"""A fresh buffer filled by slice writes that tile it exactly is a concatenation: rewritten as one.

Some models build a joint sequence by writing each token group into a zero buffer, per sample (Lumina2, whose
per-sample prompt lengths are Python constants once its rope embedder's `.tolist()` broke the graph):

    joint = hidden_states.new_zeros(B, max_seq_len, D)
    for i in range(B):
        joint[i, :text_len] = text[i, :text_len]
        joint[i, text_len:] = hidden_states[i]

The token analysis follows values, not writes into a global tensor, so it refuses the writes of image tokens
("writing image tokens into a global tensor"). When the writes cover every element of the buffer exactly once,
the buffer equals a concatenation of the written values, which the analysis reads as a joint sequence
(`token_rules.rule_cat`). This pass rewrites it so, before the analysis:

    Before:                                                    After:
        %buf = new_zeros(%img, 2, 70, 32)                          %joint = cat([%txt, %img], 1)   [2, 70, 32]
        %t0 = getitem(%txt, (0, slice(None, 6)))   [6, 32]         %y = to(%joint, float32)
        %s0 = setitem(%buf, (0, slice(None, 6)), %t0)
        %i0 = getitem(%img, 0)                     [64, 32]
        %s1 = setitem(%buf, (0, slice(6, 70)), %i0)
        ... the same two writes for sample 1 ...
        %y = to(%buf, float32)

Per-sample writes of the same slices of one source (sample i of the buffer from sample i of `%txt`) are first
merged into one write of all those samples (`%txt[0:2, :6]`, which is `%txt` itself); the writes left are then
split recursively by cuts through the buffer that no write straddles, each slab a `cat` of its parts along the
cut dim (a part written at an int index gets that dim back by `unsqueeze`).

A buffer is rewritten only when all of this holds, and otherwise left as it is (the analysis then refuses the
writes as before, and its error says which of these failed: `NotConcatenation`, recorded on the buffer):
- it is made by `new_zeros` / `zeros` (or `new_empty` / `empty`: every element is overwritten anyway);
- every use of it up to its last write is a `setitem` into it (no read, no view of it in between);
- each write's index is ints and unit-step slices (and one `...`), its value a tensor of exactly the written
  region's shape (no broadcast) and of the buffer's dtype;
- the written regions are disjoint and cover the buffer (no element left zero: padding between samples of
  different lengths is not a concatenation), and can be cut apart by planes through the buffer;
- nothing the written values are views of is written in place between the first write and the last (the `cat`
  reads them after the last write, where the `setitem`s copied them earlier).
"""
from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .canonical_attention import _emit
from .meta import example_value, node_meta
from .side_effects import alias_root, is_mutating, mutated_operand

NOT_CONCATENATION = "not_concatenation"
"""`extra` key on a buffer left as it is: the `Refusal` saying why its writes are not a concatenation."""

_BUFFER_METHODS = ("new_zeros", "new_empty")
_BUFFER_FUNCTIONS = (torch.zeros, torch.empty)


class NotConcatenation(enum.Enum):
    """Why the slice writes into a fresh buffer are not read as a concatenation of the written values."""

    READ_BEFORE_FILLED = "the buffer is read (or viewed) before its last write"
    INDEX = "a write's index is not made of ints and unit-step slices"
    NOT_TENSOR = "a write stores a number, not a tensor"
    BROADCAST = "a written value's shape is not the written region's (it is broadcast)"
    DTYPE = "a written value's dtype or device is not the buffer's"
    OVERLAP = "two writes overlap"
    GAPS = ("some elements are never written (left zero: padding, e.g. samples of different lengths in one "
            "buffer)")
    NO_CUT = "the written regions are not the parts of a concatenation (no cut through the buffer separates them)"
    MUTATED = "a written value is changed in place before the buffer's last write"


@dataclass(frozen=True)
class Refusal:
    reason: NotConcatenation
    detail: str = ""

    def describe(self) -> str:
        return self.reason.value + (f" ({self.detail})" if self.detail else "")


class _Refused(Exception):
    def __init__(self, reason: NotConcatenation, detail: str = ""):
        super().__init__(reason.value)
        self.refusal = Refusal(reason, detail)


@dataclass(frozen=True)
class _Write:
    """One write: the region [lo, hi) per buffer dim, the dims indexed by an int (absent from the value)."""

    box: tuple[tuple[int, int], ...]
    dropped: frozenset[int]
    value: fx.Node
    node: fx.Node | None          # the setitem (None for a write merged from several)

    def volume(self) -> int:
        return math.prod(hi - lo for lo, hi in self.box)


def is_fresh_buffer(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _BUFFER_METHODS and "out" not in node.kwargs
    return node.op == "call_function" and node.target in _BUFFER_FUNCTIONS and "out" not in node.kwargs


def _writes_into(buf: fx.Node) -> list[fx.Node]:
    return [u for u in buf.users if u.target is operator.setitem and u.op == "call_function" and u.args[0] is buf]


def _parse_index(index, shape: tuple[int, ...]) -> tuple[tuple[tuple[int, int], ...], frozenset[int]]:
    items = index if isinstance(index, tuple) else (index,)
    if sum(1 for it in items if it is Ellipsis) > 1:
        raise _Refused(NotConcatenation.INDEX, "two '...'")
    explicit = sum(1 for it in items if it is not Ellipsis)
    box, dropped = [], set()
    for it in items:
        if it is Ellipsis:
            start = len(box)
            box.extend((0, shape[start + k]) for k in range(len(shape) - explicit))
            continue
        if len(box) >= len(shape):
            raise _Refused(NotConcatenation.INDEX, "more index items than dims")
        extent = shape[len(box)]
        if isinstance(it, bool) or not isinstance(it, (int, slice)):
            raise _Refused(NotConcatenation.INDEX, f"index item {it!r}")
        if isinstance(it, int):
            i = it + extent if it < 0 else it
            if not 0 <= i < extent:
                raise _Refused(NotConcatenation.INDEX, f"index {it} out of range")
            dropped.add(len(box))
            box.append((i, i + 1))
            continue
        if any(b is not None and not isinstance(b, int) for b in (it.start, it.stop, it.step)):
            raise _Refused(NotConcatenation.INDEX, f"slice {it} with bounds computed at run time")
        lo, hi, step = it.indices(extent)
        if step != 1 or hi <= lo:
            raise _Refused(NotConcatenation.INDEX, f"slice {it} (strided or empty)")
        box.append((lo, hi))
    box.extend((0, shape[d]) for d in range(len(box), len(shape)))
    return tuple(box), frozenset(dropped)


def _parse_write(w: fx.Node, buf_val: torch.Tensor) -> _Write:
    _, index, value = w.args
    shape = tuple(int(s) for s in buf_val.shape)
    box, dropped = _parse_index(index, shape)
    val = example_value(value) if isinstance(value, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _Refused(NotConcatenation.NOT_TENSOR, w.name)
    region = tuple(hi - lo for d, (lo, hi) in enumerate(box) if d not in dropped)
    if tuple(int(s) for s in val.shape) != region:
        raise _Refused(NotConcatenation.BROADCAST, f"{value.name} {list(val.shape)} into {list(region)} at {w.name}")
    if (val.dtype, val.device) != (buf_val.dtype, buf_val.device):
        raise _Refused(NotConcatenation.DTYPE, f"{value.name} {val.dtype} on {val.device}, the buffer "
                                               f"{buf_val.dtype} on {buf_val.device}")
    return _Write(box, dropped, value, w)


def _overlap(a: _Write, b: _Write) -> bool:
    return all(alo < bhi and blo < ahi for (alo, ahi), (blo, bhi) in zip(a.box, b.box))


# ----------------------------------------------------------------------------------------------------------
# Merging per-sample writes of the same slices of one source


def _sample_read(value: fx.Node):
    """(source, index items) when `value` is `source[items]` with ints and slices only, else None."""
    if value.op != "call_function" or value.target is not operator.getitem or not isinstance(value.args[0], fx.Node):
        return None
    index = value.args[1]
    items = index if isinstance(index, tuple) else (index,)
    if not isinstance(example_value(value.args[0]), torch.Tensor):
        return None
    if any(isinstance(it, bool) or not isinstance(it, (int, slice)) for it in items):
        return None
    if any(isinstance(it, slice) and any(b is not None and not isinstance(b, int) for b in (it.start, it.stop,
                                                                                            it.step))
           for it in items):
        return None
    return value.args[0], items


def _merge_key(w: _Write, p: int):
    """What writes mergeable along buffer dim `p` share, and their (buffer index, source index) there."""
    if p not in w.dropped:
        return None
    read = _sample_read(w.value)
    if read is None:
        return None
    source, items = read
    src_shape = tuple(int(s) for s in example_value(source).shape)
    kept_before_p = sum(1 for d in range(p) if d not in w.dropped)
    for q, it in enumerate(items):
        # the source dim that lands where p would: as many kept items before it as kept buffer dims before p
        if isinstance(it, int) and sum(1 for x in items[:q] if isinstance(x, slice)) == kept_before_p:
            j = it + src_shape[q] if it < 0 else it
            rest = tuple((k, x.indices(src_shape[k]) if isinstance(x, slice) else x)
                         for k, x in enumerate(items) if k != q)
            others = tuple(b for d, b in enumerate(w.box) if d != p)
            key = (source, q, rest, others, w.dropped, w.box[p][0] - j)
            return key, w.box[p][0], j
    return None


def _merged_value(g: fx.Graph, source: fx.Node, items: tuple, q: int, lo: int, hi: int, origin: fx.Node) -> fx.Node:
    src_shape = tuple(int(s) for s in example_value(source).shape)
    new_items = tuple(slice(lo, hi) if k == q else it for k, it in enumerate(items))
    if all(isinstance(it, slice) and it.indices(src_shape[k]) == (0, src_shape[k], 1)
           for k, it in enumerate(new_items)):
        return source
    return _emit(g, "call_function", operator.getitem, (source, new_items), {}, origin)


def _merge_samples(g: fx.Graph, writes: list[_Write], origin: fx.Node) -> list[_Write]:
    """Writes of consecutive samples `buf[i, R] = src[i + c, R']` (same source, same R and R') merged into one
    `buf[i0:i1, R] = src[i0 + c:i1 + c, R']`, along each buffer dim in turn."""
    ndim = len(writes[0].box)
    for p in range(ndim):
        groups: dict = {}
        rest = []
        for w in writes:
            found = _merge_key(w, p)
            if found is None:
                rest.append(w)
            else:
                groups.setdefault(found[0], []).append((found[1], found[2], w))
        merged = list(rest)
        for key, members in groups.items():
            source, q = key[0], key[1]
            members.sort(key=lambda m: m[0])
            run: list = []
            for m in members + [None]:
                if run and (m is None or m[0] != run[-1][0] + 1):
                    if len(run) == 1:
                        merged.append(run[0][2])
                    else:
                        first = run[0][2]
                        items = _sample_read(first.value)[1]
                        value = _merged_value(g, source, items, q, run[0][1], run[-1][1] + 1, origin)
                        box = tuple((run[0][0], run[-1][0] + 1) if d == p else b for d, b in enumerate(first.box))
                        merged.append(_Write(box, first.dropped - {p}, value, None))
                    run = []
                if m is not None:
                    run.append(m)
        writes = merged
    return writes


# ----------------------------------------------------------------------------------------------------------
# The concatenation of the written regions


def _part(g: fx.Graph, w: _Write, origin: fx.Node) -> fx.Node:
    value = w.value
    for d in sorted(w.dropped):
        value = _emit(g, "call_function", torch.unsqueeze, (value, d), {}, origin)
    return value


def _concatenate(g: fx.Graph, writes: list[_Write], region: tuple[tuple[int, int], ...], origin: fx.Node) -> fx.Node:
    """The value of `region` of the buffer, tiled exactly by `writes`."""
    if len(writes) == 1 and writes[0].box == region:
        return _part(g, writes[0], origin)
    for d, (rlo, rhi) in enumerate(region):
        cuts = sorted({b for w in writes for b in w.box[d] if rlo < b < rhi})
        cuts = [c for c in cuts if not any(w.box[d][0] < c < w.box[d][1] for w in writes)]
        if not cuts:
            continue
        parts = []
        for lo, hi in zip([rlo, *cuts], [*cuts, rhi]):
            slab = tuple((lo, hi) if k == d else b for k, b in enumerate(region))
            inside = [w for w in writes if lo <= w.box[d][0] and w.box[d][1] <= hi]
            parts.append(_concatenate(g, inside, slab, origin))
        return _emit(g, "call_function", torch.cat, (parts,), {"dim": d}, origin)
    raise _Refused(NotConcatenation.NO_CUT)


def _check_not_mutated(buf: fx.Node, setitems: list[fx.Node], writes: list[_Write]) -> None:
    order = {n: i for i, n in enumerate(buf.graph.nodes)}
    first, last = min(order[w] for w in setitems), max(order[w] for w in setitems)
    roots = {alias_root(w.value) for w in writes}
    for n in buf.graph.nodes:
        if first < order[n] < last and n not in setitems and is_mutating(n):
            target = mutated_operand(n)
            if target is not None and alias_root(target) in roots:
                raise _Refused(NotConcatenation.MUTATED, f"{n.name} writes into {alias_root(target).name}")


def _rewrite(gm: fx.GraphModule, buf: fx.Node) -> fx.Node:
    """The `cat` now holding `buf`'s value (the buffer and its writes erased); raises `_Refused`."""
    g = gm.graph
    buf_val = example_value(buf)
    if not isinstance(buf_val, torch.Tensor):
        raise _Refused(NotConcatenation.NOT_TENSOR, buf.name)
    setitems = _writes_into(buf)
    order = {n: i for i, n in enumerate(g.nodes)}
    last = max(setitems, key=order.__getitem__)
    early = [u for u in buf.users if u not in setitems and order[u] < order[last]]
    if early or any(w.args[2] is buf or w.users for w in setitems):
        raise _Refused(NotConcatenation.READ_BEFORE_FILLED, ", ".join(u.name for u in early))
    writes = [_parse_write(w, buf_val) for w in setitems]
    for i, a in enumerate(writes):
        for b in writes[i + 1:]:
            if _overlap(a, b):
                raise _Refused(NotConcatenation.OVERLAP, f"{a.node.name} and {b.node.name}")
    covered = sum(w.volume() for w in writes)
    if covered != buf_val.numel():
        raise _Refused(NotConcatenation.GAPS, f"{buf_val.numel() - covered} of {buf_val.numel()} elements")
    _check_not_mutated(buf, setitems, writes)
    region = tuple((0, int(s)) for s in buf_val.shape)
    anchor = last.next
    made: list[fx.Node] = []
    with g.inserting_before(anchor):
        before = set(g.nodes)
        try:
            merged = _merge_samples(g, writes, buf)
            joint = _concatenate(g, merged, region, buf)
            if joint.target is not torch.cat or joint in before:
                # one write filled it all: the buffer was a copy of that value, never a view of it
                joint = _emit(g, "call_method", "clone", (joint,), {}, buf)
        except _Refused:
            made = [n for n in g.nodes if n not in before]
            for n in reversed(made):
                g.erase_node(n)
            raise
    buf.replace_all_uses_with(joint, delete_user_cb=lambda u: u not in setitems)
    for w in setitems:
        g.erase_node(w)
    g.erase_node(buf)
    for value in dict.fromkeys(w.value for w in writes):   # the per-sample reads that merged writes replaced
        if not value.users and value.op == "call_function" and value.target is operator.getitem:
            g.erase_node(value)
    return joint


def fold_buffer_writes(gm: fx.GraphModule) -> list[str]:
    """Rewrite every fresh buffer whose slice writes tile it into the concatenation of the written values (see
    the module docstring); returns the names of the buffers rewritten. A buffer with writes that is left as it
    is records why in `node.meta["pipefusion"].extra[NOT_CONCATENATION]` (a `Refusal`)."""
    done = []
    for buf in list(gm.graph.nodes):
        if not is_fresh_buffer(buf) or not _writes_into(buf):
            continue
        name = buf.name
        try:
            _rewrite(gm, buf)
        except _Refused as e:
            node_meta(buf).extra[NOT_CONCATENATION] = e.refusal
            continue
        done.append(name)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
