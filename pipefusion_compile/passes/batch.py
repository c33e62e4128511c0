"""Batch analysis and batch split: the graph for 1/parts of the batch, for CFG-parallel.

CFG-parallel gives each part of the device mesh one part of the batch (PixArt's cond + uncond, SD3's, DiT's):
every part runs the same pipeline on its samples and the outputs are gathered. dynamo bakes the batch size into
the graph (`view(x, 2, 72, 4, -1)`, `expand(cls, 2, -1, -1)`), so the part's graph is derived here, by
dataflow, never by guessing from an int that happens to equal the batch:

1. The batch B is the output's leading dim; the user tensor inputs whose leading dim is B are the batched
   ones (axis 0: `hidden_states`, `timestep`, `encoder_hidden_states`, ...).
2. One forward pass in graph order runs every node twice: its traced (full-batch) value is in the graph, its
   part value is computed on fake tensors of the part's inputs. The ints of a shape argument that measure the
   batch axis of the operand (`view`/`reshape`: the output dim that keeps the elements before the operand's
   batch axis and is a multiple of B; `expand`: the operand's batch axis; `expand`/`repeat` of an unbatched
   size-1 dim to exactly B: the batch is created there, the ViT class-token idiom) are rewritten to the part's.
3. A node's batch axis is then *measured*: the one dim whose part size is its full size / parts. Anything else
   is an error naming the op and its source line, never a silent result:
   - an op whose output loses the batch (a reduction over it, `x[0]`, an einsum contracting it),
   - an op whose dim argument names the batch axis (`softmax(x, 0)`, `cat(..., 0)`, `flip`, `chunk`, ...),
     which would combine samples (a shape-preserving mix the measurement alone would not see),
   - batched operands whose batch axes do not line up under broadcasting (an input taken as batched that is
     not, e.g. a table whose length happens to equal B),
   - a write (`x[i] = v`) into a batched value that selects along the batch axis.

    Before (B = 2, parts = 2):                        After (the part's graph, B' = 1):
        l_x_: [2, 4, 8, 8]   (batched, axis 0)            l_x_: [1, 4, 8, 8]
        l_t_: [2]            (batched, axis 0)            l_t_: [1]
        %e = embed(%l_t_)          [2, 32]                %e = embed(%l_t_)          [1, 32]
        %h = view(%p, 2, 16, 32)   [2, 16, 32]            %h = view(%p, 1, 16, 32)   [1, 16, 32]
        %c = expand(%cls, 2, -1, -1)  [2, 1, 32]          %c = expand(%cls, 1, -1, -1)  [1, 1, 32]

`split_batch` returns the part's graph (its example values re-traced at the part's inputs, see
`specialize.specialize`) and a `BatchSplit` saying how to cut a call's inputs and join its outputs. Each node's
result is `node_meta(n).batch` (a `BatchInfo`) on the analyzed (full) graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import OptionsError, PipefusionError, UnsupportedGraphError
from .fx_eval import fetch_attr, run_node
from .graph_inputs import graph_outputs, is_user_input
from .meta import META_KEY, BatchInfo, ValueEnum, example_value, node_meta


class BatchRule(ValueEnum):
    """How a node's batch axis was found."""

    INPUT = "input"              # a user input whose leading dim is the batch
    MEASURED = "measured"        # the one dim that scales with the batch (every op without ints to rewrite)
    RESHAPED = "reshaped"        # view/reshape/expand with its batch int rewritten
    CREATED = "created"          # expand/repeat of an unbatched size-1 dim to exactly B
    NONE = "none"                # carries no batch (weights, tables, the prompt-independent embeddings)


@dataclass(frozen=True)
class SizeRewrite:
    """One int of a shape argument that measures the batch axis."""

    node: str
    position: int      # index into the op's size list (-1: its output_size)
    full: int
    part: int


@dataclass
class BatchSplit:
    """How a call of the full-batch graph becomes `parts` calls of the part's graph."""

    batch: int
    parts: int
    input_axes: dict[int, int]           # placeholder position -> batch axis (the batched inputs)
    output_axes: tuple[int | None, ...]  # per output leaf (graph order): batch axis (None: not a tensor)
    rewrites: tuple[SizeRewrite, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)   # nodes per BatchRule

    @property
    def part_batch(self) -> int:
        return self.batch // self.parts

    def cut(self, args, part: int) -> list:
        """The inputs of part `part` of a call: each batched input's samples [part * B', (part + 1) * B')."""
        b = self.part_batch
        return [a.narrow(self.input_axes[i], part * b, b).contiguous() if i in self.input_axes else a
                for i, a in enumerate(args)]

    def describe(self) -> str:
        lines = [f"batch split: B={self.batch} into {self.parts} parts of {self.part_batch}",
                 f"  batched inputs (position: axis): {self.input_axes}",
                 f"  sizes rewritten: {len(self.rewrites)}"]
        lines += [f"    {r.node}[{r.position}]: {r.full} -> {r.part}" for r in self.rewrites]
        return "\n".join(lines)


# ops whose dim argument, if it names the batch axis, makes samples meet: (name, position of the dim argument
# counting the tensor as 0). A dim of None (a full reduction) loses the batch and is caught by measurement.
_DIM_ARG = {
    **{name: 1 for name in (
        "sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "any", "all", "argmax",
        "argmin", "median", "nansum", "nanmean", "var_mean", "std_mean", "count_nonzero", "softmax",
        "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort", "argsort", "flip",
        "unbind", "narrow", "select", "index_select", "gather", "scatter", "scatter_add", "scatter_reduce",
        "index_add", "index_copy", "index_fill", "cat", "concat", "concatenate", "take_along_dim", "diff",
        "kthvalue", "mode", "_softmax", "_log_softmax")},
    **{name: 2 for name in ("chunk", "split", "tensor_split", "split_with_sizes", "roll", "topk",
                            "repeat_interleave", "norm", "normalize", "renorm")},
}
_DIM_KWARGS = ("dim", "dims", "axis")
# ops whose operands after the first only give metadata (dtype, device): their batch axes need not line up
_METADATA_OPERANDS = ("type_as", "to")
_RESHAPES = ("view", "reshape")
# factories whose size may be the batch (`torch.rand(labels.shape[0])`, baked to `torch.rand(4)`): a size that
# is exactly B, at one position only, is taken as creating the batch axis there; where that value meets batched
# data, its axis must line up with theirs (`_check_alignment`), so a size that only equals B by chance fails loudly
_FACTORIES = ("rand", "randn", "zeros", "ones", "empty", "full")
_SHAPE_OPS = _RESHAPES + ("expand", "repeat")


def op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return n.target
    return getattr(n.target, "__name__", str(n.target))


def _ints(dims) -> list[int]:
    if dims is None:
        return []
    if isinstance(dims, int) and not isinstance(dims, bool):
        return [dims]
    if isinstance(dims, (tuple, list, torch.Size)):
        return [d for d in dims if isinstance(d, int) and not isinstance(d, bool)]
    return []


def _tensors(value) -> list:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _sizes(n: fx.Node) -> tuple[list, str, int]:
    """(the size list of a view/reshape/expand/repeat, where it is: 'varargs' or 'tuple', its first index)."""
    rest = list(n.args[1:])
    if "size" in n.kwargs or "shape" in n.kwargs:
        key = "size" if "size" in n.kwargs else "shape"
        return list(n.kwargs[key]), key, 0
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0]), "tuple", 1
    return rest, "varargs", 1


def _with_sizes(n: fx.Node, sizes: list, where: str, first: int):
    if where in ("size", "shape"):
        return n.args, {**n.kwargs, where: tuple(sizes)}
    if where == "tuple":
        return (n.args[0], tuple(sizes), *n.args[2:]), dict(n.kwargs)
    return (n.args[0], *sizes), dict(n.kwargs)


class _SeedConflict(UnsupportedGraphError):
    """Batched operands that do not line up, one of them batched only through inputs taken as batched for
    their leading dim alone (`unseed`: those inputs)."""

    def __init__(self, reason: str, node: fx.Node, unseed: frozenset):
        super().__init__(reason, node)
        self.unseed = unseed


class _BatchAnalyzer:
    def __init__(self, gm: fx.GraphModule, example_inputs: list, parts: int, image: int | None = None,
                 unbatched: frozenset = frozenset()):
        self.gm = gm
        self.parts = parts
        outs = [example_value(o) for o in graph_outputs(gm) if isinstance(o, fx.Node)]
        tensors = [v for v in outs if isinstance(v, torch.Tensor) and v.dim() > 0]
        if not tensors:
            raise UnsupportedGraphError("cfg_parallel: the graph returns no batched tensor to split")
        self.batch = int(tensors[0].shape[0])
        if self.batch < parts or self.batch % parts:
            raise OptionsError(
                f"option cfg_parallel={parts}: the model is called with a batch of {self.batch}, which does not "
                f"split into {parts} equal parts (the batch form of CFG-parallel needs the conditional and "
                f"unconditional samples in one batch, e.g. a batch of 2 per prompt); use cfg_parallel=1")
        self.part = self.batch // parts
        self.example_inputs = example_inputs
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.part_values: dict[fx.Node, object] = {}
        self.rewrites: list[SizeRewrite] = []
        self.new_args: dict[fx.Node, tuple] = {}
        self.input_axes: dict[int, int] = {}
        self.image = image              # the image input's position: batched for sure (the others by their dim 0)
        self.unbatched = unbatched      # positions whose dim 0 is B but which were found not to be batched
        self.seeds: dict[fx.Node, frozenset] = {}   # node -> the batched inputs it depends on

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> BatchSplit:
        placeholders = list(self.gm.graph.find_nodes(op="placeholder"))
        with self.mode:
            for n in self.gm.graph.nodes:
                if n.op == "output":
                    continue
                if n.op == "placeholder":
                    self._placeholder(n, placeholders.index(n))
                elif n.op == "get_attr":
                    value = fetch_attr(self.gm, n.target)
                    self.part_values[n] = (self.mode.from_tensor(value, static_shapes=True)
                                           if isinstance(value, torch.Tensor) else value)
                    node_meta(n).batch = BatchInfo(None, rule=BatchRule.NONE)
                else:
                    self._call(n)
        axes = []
        for o in graph_outputs(self.gm):
            if not isinstance(o, fx.Node) or not isinstance(example_value(o), torch.Tensor):
                axes.append(None)
                continue
            info = node_meta(o).batch
            if info is None or info.axis is None:
                raise UnsupportedGraphError(
                    "cfg_parallel: this model output does not carry the batch (it is the same for every sample), "
                    "so the parts' outputs cannot be joined along a batch axis", o)
            axes.append(info.axis)
        counts: dict[str, int] = {}
        for n in self.gm.graph.nodes:
            info = node_meta(n).batch
            if info is not None:
                counts[str(info.rule)] = counts.get(str(info.rule), 0) + 1
        return BatchSplit(self.batch, self.parts, dict(self.input_axes), tuple(axes), tuple(self.rewrites), counts)

    def _placeholder(self, n: fx.Node, i: int) -> None:
        x = self.example_inputs[i] if i < len(self.example_inputs) else example_value(n)
        if (isinstance(x, torch.Tensor) and is_user_input(n, x) and x.dim() > 0 and x.shape[0] == self.batch
                and i not in self.unbatched):
            self.input_axes[i] = 0
            self.seeds[n] = frozenset({i})
            node_meta(n).batch = BatchInfo(0, 1, BatchRule.INPUT)
            x = x.narrow(0, 0, self.part)
        elif isinstance(x, (list, tuple)) and is_user_input(n, None):
            raise UnsupportedGraphError("cfg_parallel: a list input (a latent passed as per-sample tensors) is not "
                                        "split by batch yet", n)
        else:
            node_meta(n).batch = BatchInfo(None, rule=BatchRule.NONE)
        self.part_values[n] = self.mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else x

    # ---------------------------------------------------------------------------------------------- call
    def _info(self, a) -> BatchInfo | None:
        return node_meta(a).batch if isinstance(a, fx.Node) else None

    def _batched_operands(self, n: fx.Node) -> list[tuple[fx.Node, int, int]]:
        """(operand, its batch axis, its rank) for every tensor operand that carries the batch."""
        found = []
        for a in n.all_input_nodes:
            info = self._info(a)
            val = example_value(a)
            if info is not None and isinstance(info.axis, int) and isinstance(val, torch.Tensor):
                found.append((a, info.axis, val.dim()))
        return found

    def _call(self, n: fx.Node) -> None:
        batched = self._batched_operands(n)
        name = op_name(n)
        args, kwargs = n.args, n.kwargs
        if batched:
            self._check_dims(n, name, batched)
            self._check_alignment(n, batched)
            self._check_write(n, batched)
        created = False
        if name in _SHAPE_OPS and n.args and isinstance(n.args[0], fx.Node):
            args, kwargs, created = self._rewrite_sizes(n, name)
        elif name == "repeat_interleave" and isinstance(n.kwargs.get("output_size"), int) and batched:
            kwargs = self._rewrite_output_size(n)
        elif name in _FACTORIES and n.op == "call_function" and not n.all_input_nodes:
            args, created = self._rewrite_factory(n)
        part_args = fx.node.map_arg(args, lambda x: self.part_values[x])
        part_kwargs = fx.node.map_arg(kwargs, lambda x: self.part_values[x])
        try:
            value = run_node(self.gm, n, part_args, part_kwargs)
        except Exception as e:
            raise UnsupportedGraphError(
                f"cfg_parallel: this op fails on a part of the batch ({type(e).__name__}: {str(e)[:300]}); the batch "
                f"size is baked into it in a way the batch analysis does not rewrite "
                f"(batched inputs: {self._batched_names()})", n) from e
        self.part_values[n] = value
        deps = [self.seeds[a] for a in n.all_input_nodes if a in self.seeds]
        if deps:
            self.seeds[n] = frozenset().union(*deps)
        if (args, kwargs) != (n.args, n.kwargs):
            self.new_args[n] = (args, kwargs)
        node_meta(n).batch = self._measure(n, value, bool(batched), created)

    def _batched_names(self) -> str:
        placeholders = list(self.gm.graph.find_nodes(op="placeholder"))
        return ", ".join(placeholders[i].name for i in sorted(self.input_axes)) or "none"

    def _measure(self, n: fx.Node, value, has_batched_operand: bool, created: bool) -> BatchInfo:
        full = example_value(n)
        fulls, parts_ = _tensors(full), _tensors(value)
        if not fulls:
            return BatchInfo(None, rule=BatchRule.NONE)
        if len(fulls) != len(parts_):
            raise UnsupportedGraphError("cfg_parallel: this op returns another number of tensors on a part of the "
                                        "batch", n)
        infos = []
        for f, p in zip(fulls, parts_):
            if f.dim() != p.dim():
                raise UnsupportedGraphError("cfg_parallel: this op's result has another rank on a part of the batch",
                                            n)
            differ = [d for d in range(f.dim()) if f.shape[d] != p.shape[d]]
            if not differ:
                if has_batched_operand:
                    raise UnsupportedGraphError(
                        "cfg_parallel: this op combines the samples of the batch (its result does not depend on "
                        "which samples it is given by shape: a reduction over the batch, a selection of one "
                        "sample, a contraction over it), so the batch cannot be split across the mesh", n)
                infos.append(BatchInfo(None, rule=BatchRule.NONE))
                continue
            d = differ[0]
            if (len(differ) > 1 or f.shape[d] % self.batch or p.shape[d] * self.parts != f.shape[d]):
                raise UnsupportedGraphError(
                    f"cfg_parallel: on a part of the batch this op's result is {list(p.shape)} instead of "
                    f"{list(f.shape)} split along one axis by {self.parts}", n)
            rule = BatchRule.CREATED if created else (
                BatchRule.RESHAPED if n in self.new_args else BatchRule.MEASURED)
            infos.append(BatchInfo(d, f.shape[d] // self.batch, rule))
        if isinstance(full, torch.Tensor):
            return infos[0]
        batched = [i for i in infos if i.axis is not None]
        return BatchInfo(None, rule=batched[0].rule if batched else BatchRule.NONE, elements=tuple(infos))

    # ---------------------------------------------------------------------------------------------- checks
    def _check_dims(self, n: fx.Node, name: str, batched) -> None:
        position = _DIM_ARG.get(name)
        if position is None:
            return
        if name == "repeat_interleave" and isinstance(n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats"), int):
            return   # each sample's copies stay together (sample-major): a part of the batch is one range
        dims = next((n.kwargs[k] for k in _DIM_KWARGS if k in n.kwargs), None)
        if dims is None and len(n.args) > position:
            dims = n.args[position]
        first = n.args[0] if n.args else None
        if name in ("cat", "concat", "concatenate"):  # torch.cat(tensors, dim): the operands are a list
            ranks = {r for _, _, r in batched}
            axes = {a for _, a, _ in batched}
            dims = _ints(dims if dims is not None else 0)
            rank = next(iter(ranks))
            if any((d % rank) in axes for d in dims):
                raise UnsupportedGraphError(
                    f"cfg_parallel: {name} along the batch axis: the samples of the batch are rearranged, so a part "
                    "of the batch is not a part of the result", n)
            return
        info = self._info(first)
        if info is None or info.axis is None:
            return
        rank = example_value(first).dim()
        if any(rank and (d % rank) == info.axis for d in _ints(dims)):
            raise UnsupportedGraphError(
                f"cfg_parallel: {name} along the batch axis (dim {info.axis}) combines or reorders the samples of "
                "the batch, so the batch cannot be split across the mesh", n)

    def _check_alignment(self, n: fx.Node, batched) -> None:
        if op_name(n) in _METADATA_OPERANDS:
            batched = [b for b in batched if b[0] is n.args[0]]
        if len(batched) < 2:
            return
        from_end = {rank - axis for _, axis, rank in batched}
        if len(from_end) > 1:
            what = ", ".join(f"{a.name} (axis {axis} of {rank})" for a, axis, rank in batched)
            # an operand batched only through inputs other than the image input: those may not be batched at all
            suspects = frozenset().union(*(self.seeds.get(a, frozenset()) for a, _, _ in batched
                                           if self.image is not None and self.image not in self.seeds.get(a, ())))
            if suspects:
                raise _SeedConflict(f"cfg_parallel: the batch axes of this op's operands do not line up ({what})",
                                    n, suspects)
            raise UnsupportedGraphError(
                f"cfg_parallel: the batch axes of this op's operands do not line up ({what}): an input taken as "
                f"batched because its leading dim is {self.batch} may not be (batched inputs: "
                f"{self._batched_names()})", n)

    def _check_write(self, n: fx.Node, batched) -> None:
        if not (n.op == "call_function" and n.target is operator.setitem):
            return
        target = n.args[0]
        info = self._info(target)
        if info is None or info.axis is None:
            return
        index = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if Ellipsis in index and index.index(Ellipsis) <= info.axis:
            return
        if len(index) > info.axis:
            at = index[info.axis]
            if not (isinstance(at, slice) and at == slice(None, None, None)):
                raise UnsupportedGraphError(
                    "cfg_parallel: a write into a batched value that selects along its batch axis", n)

    # ---------------------------------------------------------------------------------------------- rewrites
    def _rewrite_sizes(self, n: fx.Node, name: str):
        """The op's args with the ints that measure the batch rewritten to the part's, and whether the op
        creates the batch axis."""
        x = n.args[0]
        info = self._info(x)
        xin, out = example_value(x), example_value(n)
        if not isinstance(xin, torch.Tensor) or not isinstance(out, torch.Tensor):
            return n.args, n.kwargs, False
        sizes, where, first = _sizes(n)
        if name in _RESHAPES and sizes and not isinstance(sizes[0], torch.dtype):
            if info is None or info.axis is None:
                return n.args, n.kwargs, False
            pre = math.prod(xin.shape[:info.axis])
            k = next((k for k in range(out.dim()) if math.prod(out.shape[:k]) == pre
                      and out.shape[k] % self.batch == 0 and out.shape[k] >= self.batch), None)
            if k is None or len(sizes) != out.dim():
                raise UnsupportedGraphError(
                    f"cfg_parallel: {name} folds the batch axis with a dim before it, so a part of the batch is "
                    "not one range of the result", n)
            return self._set(n, sizes, where, first, k, out.shape[k]) + (False,)
        if name == "expand":
            offset = len(sizes) - xin.dim()
            if info is not None and info.axis is not None:
                return self._set(n, sizes, where, first, info.axis + offset, out.shape[info.axis + offset]) + (False,)
            created = [k for k, s in enumerate(sizes) if s == self.batch
                       and (k < offset or xin.shape[k - offset] == 1)]
            if len(created) == 1:
                return self._set(n, sizes, where, first, created[0], self.batch) + (True,)
            return n.args, n.kwargs, False
        if name == "repeat":
            offset = len(sizes) - xin.dim()
            if info is not None and info.axis is not None:
                if sizes[info.axis + offset] != 1:
                    raise UnsupportedGraphError(
                        "cfg_parallel: repeat along the batch axis rearranges the samples of the batch", n)
                return n.args, n.kwargs, False
            created = [k for k, s in enumerate(sizes) if s == self.batch
                       and (k < offset or xin.shape[k - offset] == 1)]
            if len(created) == 1:
                k = created[0]
                new = list(sizes)
                new[k] = self.part
                self.rewrites.append(SizeRewrite(n.name, k, self.batch, self.part))
                return _with_sizes(n, new, where, first) + (True,)
        return n.args, n.kwargs, False

    def _rewrite_factory(self, n: fx.Node) -> tuple[tuple, bool]:
        args = n.args
        if not args:
            return args, False
        tupled = isinstance(args[0], (tuple, list, torch.Size))
        if not tupled and op_name(n) == "full":   # full(size, fill_value): the size is always a sequence
            return args, False
        sizes = list(args[0]) if tupled else list(args)
        at = [k for k, v in enumerate(sizes) if v == self.batch and isinstance(v, int) and not isinstance(v, bool)]
        if len(at) != 1:
            return args, False
        sizes[at[0]] = self.part
        self.rewrites.append(SizeRewrite(n.name, at[0], self.batch, self.part))
        return ((tuple(sizes), *args[1:]) if tupled else tuple(sizes)), True

    def _rewrite_output_size(self, n: fx.Node) -> dict:
        """`repeat_interleave(x, r, dim=batch axis, output_size=B * r)`: the output size measures the batch."""
        info = self._info(n.args[0])
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        rank = example_value(n.args[0]).dim()
        if info is None or info.axis is None or dim is None or dim % rank != info.axis:
            return dict(n.kwargs)
        size = n.kwargs["output_size"]
        self.rewrites.append(SizeRewrite(n.name, -1, size, size // self.parts))
        return {**n.kwargs, "output_size": size // self.parts}

    def _set(self, n: fx.Node, sizes: list, where: str, first: int, k: int, full: int):
        s = sizes[k]
        if not isinstance(s, int) or isinstance(s, bool) or s == -1:
            return n.args, n.kwargs    # inferred (-1) or computed at run time: right at the part's size already
        if s != full:
            raise PipefusionError(f"internal: {n.name} size {k} is {s}, its traced result has {full}")
        new = list(sizes)
        new[k] = s // self.parts
        self.rewrites.append(SizeRewrite(n.name, k, s, new[k]))
        return _with_sizes(n, new, where, first)


def analyze_batch(gm: fx.GraphModule, example_inputs: list, parts: int) -> tuple[BatchSplit, dict]:
    """The batch axes of `gm` (in `node_meta(n).batch`) and the rewritten args per node, for `parts` parts."""
    if parts < 2:
        raise PipefusionError("internal: a batch split needs at least 2 parts")
    image = _image_position(gm, example_inputs)
    unbatched: frozenset = frozenset()
    while True:
        analyzer = _BatchAnalyzer(gm, example_inputs, parts, image, unbatched)
        try:
            return analyzer.run(), analyzer.new_args
        except _SeedConflict as e:   # try again with those inputs taken as the same for every sample
            if not e.unseed - unbatched:
                raise UnsupportedGraphError(e.reason, e.node) from None
            unbatched = unbatched | e.unseed


def _image_position(gm: fx.GraphModule, example_inputs: list) -> int | None:
    """Position of the image input (`graph_inputs.find_token_input`), None if there is none to find."""
    from .graph_inputs import find_token_input

    try:
        node = find_token_input(gm, example_inputs)
    except PipefusionError:
        return None
    return list(gm.graph.find_nodes(op="placeholder")).index(node)


def split_batch(gm: fx.GraphModule, example_inputs: list, parts: int) -> tuple[fx.GraphModule, list, BatchSplit]:
    """(the graph for one part of the batch, part 0's inputs, the split): see the module docstring."""
    from .specialize import specialize

    split, new_args = analyze_batch(gm, example_inputs, parts)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for old, (args, kwargs) in new_args.items():
        new = copies[old]
        new.args = fx.node.map_arg(args, lambda a: copies[a])
        new.kwargs = fx.node.map_arg(kwargs, lambda a: copies[a])
    part_gm = fx.GraphModule(gm, graph)
    part_inputs = split.cut(example_inputs, 0)
    part_gm = specialize(part_gm, part_inputs)
    for n in part_gm.graph.nodes:   # the copy shares the full graph's meta objects, whose facts are not its own
        n.meta.pop(META_KEY, None)
    return part_gm, part_inputs, split
