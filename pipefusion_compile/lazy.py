"""Patch-lazy model outputs: a tensor whose row bands resolve one at a time, as the last stage finishes them.

On a rank that does not run the last stage, a pipelined call returns as soon as this rank has issued its own
work; the model output is a `LazyTensor` over a full-size buffer whose bands arrive from the last stage. The
ops a diffusers loop runs between two transformer calls are applied band by band (`BANDWISE`), so the next
call's first patch only waits for the first band of its input, and stage 0 works on step t+1 while the last
stage finishes step t:

    noise = transformer(latents, t)            # LazyTensor: bands [0, 4), [4, 8), ... pending
    a, b = noise.chunk(2)                       # views of it: the same bands (chunk on the batch dim)
    guided = b + 4.5 * (a - b)                  # recorded per band, computed when a band is asked for
    latents = latents - 0.1 * guided            # LazyTensor again
    transformer(latents, t2)                    # patch j resolves band j of `latents` right before it runs

Which ops run band by band, and why it gives the same bits: element-wise arithmetic (without `alpha`), dtype
casts, views on other dims than the band's (`chunk`, `split`, `narrow`, slicing) and `cat` on other dims.
Each output element is computed by the same scalar operation from the same inputs whichever band it is in
(`tests/test_lazy.py` checks every op, dtype and band offset bit for bit against the whole-tensor op). Any
other op (a reduction, `.item()`, printing, a convolution in the VAE, an in-place op) first resolves every
pending band of every lazy tensor ("materializes" them: the op may write to one, or return a plain view of one
that a band recorded earlier still reads): always correct, logged once per op at INFO. A plain tensor that a
recorded op reads is copied when the op is recorded, so a later in-place write cannot change what the band
computes. Unresolved bands hold NaN (floating point), so code that reads the storage without
going through torch (a kernel compiled by another backend) shows it instead of reading plausible values.

Under `torch.compile` tracing a `LazyTensor` is an ordinary tensor: dynamo recompiles the transformer once
for it (the type is guarded) and the backend hands back the program it already built for that graph.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch

log = logging.getLogger("pipefusion_compile")

_LIVE: "weakref.WeakSet[Bands]" = weakref.WeakSet()   # bands with something pending
MATERIALIZED: dict[str, int] = {}   # op name -> how often it waited for every band (this process)


class Bands:
    """Row bands of one full-size buffer along `axis`, each filled once by `fill(j)`.

    `ranges` are disjoint (start, stop) ranges of `axis` in band order; together they cover it. `fill(j)`
    writes band j into the buffer (receives it, or computes it from other bands); after the last band, `fill`
    is dropped, and with it whatever it kept alive.
    """

    def __init__(self, axis: int, ranges: list[tuple[int, int]], fill: Callable[[int], None], what: str):
        self.axis = axis
        self.ranges = list(ranges)
        self.done = [False] * len(self.ranges)
        self.what = what
        self._fill: Callable[[int], None] | None = fill
        if not self.ranges:
            self._fill = None
        else:
            _LIVE.add(self)

    @property
    def complete(self) -> bool:
        return self._fill is None

    def resolve(self, j: int) -> None:
        if self.done[j]:
            return
        self._fill(j)
        self.done[j] = True
        if all(self.done):
            self._fill = None
            _LIVE.discard(self)

    def resolve_range(self, start: int, stop: int) -> None:
        """Every band that overlaps [start, stop) of `axis`, in band order."""
        for j, (s, e) in enumerate(self.ranges):
            if s < stop and e > start:
                self.resolve(j)

    def resolve_all(self) -> None:
        for j in range(len(self.ranges)):
            self.resolve(j)


def resolve_everything() -> None:
    """Resolve every pending band of every live lazy tensor (before an in-place op on one of them)."""
    for bands in sorted(_LIVE, key=id):
        bands.resolve_all()


class LazyTensor(torch.Tensor):
    """A view of a `Bands` buffer (shares its storage). `_axis` is the band axis in this view's dims, `_offset`
    where the view starts along it in the buffer's coordinates."""

    _bands: Bands
    _axis: int
    _offset: int

    @staticmethod
    def of(view: torch.Tensor, bands: Bands, axis: int, offset: int = 0) -> "LazyTensor":
        t = view.as_subclass(LazyTensor)
        t._bands, t._axis, t._offset = bands, axis, offset
        return t

    @property
    def pending(self) -> bool:
        return not self._bands.complete

    def _extent(self) -> tuple[int, int]:
        with torch._C.DisableTorchFunctionSubclass():
            return self._offset, self._offset + self.shape[self._axis]

    def band_ranges(self) -> list[tuple[int, int]]:
        """The bands, in this view's coordinates along `_axis` (clipped to the view)."""
        lo, hi = self._extent()
        return [(max(s, lo) - lo, min(e, hi) - lo) for s, e in self._bands.ranges if s < hi and e > lo]

    def resolve_range(self, start: int, stop: int) -> None:
        self._bands.resolve_range(self._offset + start, self._offset + stop)

    def narrow_band(self, dim: int, start: int, length: int) -> "LazyTensor":
        """`narrow`, as a lazy view, whether or not torch-function dispatch is on (the runtime calls it
        inside a dynamo-compiled frame, where it is off)."""
        with torch._C.DisableTorchFunctionSubclass():
            view = self.as_subclass(torch.Tensor).narrow(dim, start, length)
        offset = self._offset + (start if dim % view.dim() == self._axis else 0)
        return LazyTensor.of(view, self._bands, self._axis, offset)

    def materialize(self) -> torch.Tensor:
        """Wait for every band of this view; returns it as a plain tensor (same storage)."""
        lo, hi = self._extent()
        self._bands.resolve_range(lo, hi)
        return self.as_subclass(torch.Tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():   # traced: an ordinary tensor
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        lazies = [a for a in _leaves(args, kwargs) if isinstance(a, LazyTensor) and a.pending]
        if not lazies or func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        rule = BANDWISE.get(func)
        if rule is not None and not _mutates(func, kwargs):
            result = rule(func, args, kwargs)
            if result is not NotImplemented:
                return result
        return _materialized_call(func, args, kwargs, lazies)


def _leaves(args, kwargs) -> list:
    """The arguments, one level of lists flattened (what torch ops take: tensors, numbers, lists of tensors)."""
    found = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            found.extend(a)
        else:
            found.append(a)
    return found


def materialize(x):
    """`x` as a plain tensor, every band resolved (anything else unchanged)."""
    return x.materialize() if isinstance(x, LazyTensor) else x


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _mutates(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return ("out" in kwargs or name in ("__setitem__", "set_", "copy_", "__set__")
            or (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__")))


def _materialized_call(func, args, kwargs, lazies):
    """Any other op: resolve every pending band first. Not only the op's own inputs: the op may return a
    plain view of one, and a write through that view must not reach a band recorded before and still pending."""
    name = _name(func)
    resolve_everything()
    MATERIALIZED[name] = MATERIALIZED.get(name, 0) + 1
    if MATERIALIZED[name] == 1:
        log.info("pipefusion: %s on a patch-lazy model output (%s) waits for all of its bands: the next step's "
                 "first patch then waits for this step's last one (ops run band by band: element-wise arithmetic, "
                 "dtype casts, chunk/split/cat/slicing on other dims)", name, lazies[0]._bands.what)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# The ops that run band by band. Each rule returns its result or NotImplemented (then the op materializes).


def _probe(func, args, kwargs, lazy: "LazyTensor"):
    """What `func` returns, from a run on empty slices: every operand that has the band axis (counted from the
    end, as broadcasting aligns dims) narrowed to 0 elements along it. Returns (output dtype and shape with
    the band axis at full size, output band axis, the first full-size operand) or None if the op returned
    no tensor; ("self", ...) when the op returned its input itself (a no-op cast)."""
    from_end = lazy.dim() - lazy._axis
    full = lazy.shape[lazy._axis]
    first = None

    def cut(x):
        nonlocal first
        if not isinstance(x, torch.Tensor):
            return x
        x = x.as_subclass(torch.Tensor) if isinstance(x, LazyTensor) else x
        if x.dim() >= from_end and x.shape[x.dim() - from_end] == full:
            first = x if first is None else first
            return x.narrow(x.dim() - from_end, 0, 0)
        return x

    with torch._C.DisableTorchFunctionSubclass():
        cut_args = [[cut(t) for t in a] if isinstance(a, (list, tuple)) else cut(a) for a in args]
        cut_kwargs = {k: cut(v) for k, v in kwargs.items()}
        out = func(*cut_args, **cut_kwargs)
    if not isinstance(out, torch.Tensor):
        return None
    if cut_args and out is cut_args[0]:
        return "self", None, None, None
    axis = out.dim() - from_end
    if axis < 0 or out.shape[axis] != 0:
        return None
    shape = list(out.shape)
    shape[axis] = full
    return out.dtype, shape, axis, first


def _empty_like_layout(shape, dtype, device, like: torch.Tensor | None) -> torch.Tensor:
    """A full-size output laid out as an element-wise op lays out its result: in the memory order of its
    full-size operand (the order of its dims by stride), row-major when it has none."""
    if like is None or like.dim() != len(shape):
        return torch.empty(shape, dtype=dtype, device=device)
    from .ops import stride_order

    return torch.empty_permuted(shape, stride_order(like.shape, like.stride()), dtype=dtype, device=device)


def _computed(func, lazy: "LazyTensor", base: torch.Tensor, axis: int, ranges, band_args) -> LazyTensor:
    """A new lazy tensor over `base` whose band j is `func` of `band_args(j)`, resolved on demand."""
    if base.is_floating_point() or base.is_complex():
        base.fill_(float("nan"))

    def fill(j: int) -> None:
        s, e = ranges[j]
        a, kw = band_args(j, s, e)
        with torch._C.DisableTorchFunctionSubclass():
            base.narrow(axis, s, e - s).copy_(func(*a, **kw))

    what = f"{_name(func)} of {lazy._bands.what}"
    return LazyTensor.of(base, Bands(axis, ranges, fill, what), axis)


def _operands_for(out_ndim: int, axis: int, full: int, leaves):
    """How each tensor leaf of an op is cut into bands: ("lazy", x) narrowed along its band axis, ("full", copy)
    a plain tensor narrowed likewise, ("whole", x) broadcast (no band axis). None if some leaf cannot be cut."""
    plans, ranges = [], None
    for x in leaves:
        if not isinstance(x, torch.Tensor):
            plans.append(("const", x))
            continue
        d = axis - (out_ndim - x.dim())     # this operand's dim under the output's band axis
        if isinstance(x, LazyTensor) and x.pending:
            if x._axis != d or x.shape[d] != full:
                return None, None
            mine = x.band_ranges()
            if ranges is not None and mine != ranges:
                return None, None
            ranges = mine
            plans.append(("lazy", x))
        else:   # a snapshot: an in-place write to it later must not change what the band computes
            plain = x.as_subclass(torch.Tensor) if isinstance(x, LazyTensor) else x
            if d < 0 or plain.shape[d] == 1:
                plans.append(("whole", plain.clone()))
            elif plain.shape[d] == full:
                plans.append(("full", plain.clone()))
            else:
                return None, None
    return plans, ranges


def _band_of(kind, x, d_from_end: int, s: int, e: int):
    if kind == "lazy":
        x.resolve_range(s, e)
        d = x.dim() - d_from_end
        return x.as_subclass(torch.Tensor).narrow(d, s, e - s)
    if kind == "full":
        return x.narrow(x.dim() - d_from_end, s, e - s)
    return x


def _elementwise(func, args, kwargs):
    """Out-of-place element-wise ops and dtype casts (same device)."""
    if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None or "device" in kwargs:
        return NotImplemented
    if any(isinstance(a, (torch.device, str, list, tuple)) for a in (*args, *kwargs.values())):   # .to(device)
        return NotImplemented
    lazy = next(a for a in (*args, *kwargs.values()) if isinstance(a, LazyTensor) and a.pending)
    probe = _probe(func, args, kwargs, lazy)
    if probe is None:
        return NotImplemented
    dtype, shape, axis, like = probe
    if dtype == "self":                      # a no-op cast returns its input itself
        return args[0]
    names = list(kwargs)
    plans, ranges = _operands_for(len(shape), axis, shape[axis], [*args, *kwargs.values()])
    if plans is None:
        return NotImplemented
    from_end = len(shape) - axis

    def band_args(j, s, e):
        cut = [_band_of(kind, x, from_end, s, e) for kind, x in plans]
        return cut[:len(args)], dict(zip(names, cut[len(args):]))

    base = _empty_like_layout(shape, dtype, lazy.device, like)
    return _computed(func, lazy, base, axis, ranges, band_args)


def _cat(func, args, kwargs):
    """`torch.cat(tensors, dim)` on another dim than the band axis."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return NotImplemented
    lazy = next(t for t in tensors if isinstance(t, LazyTensor) and t.pending)
    if any(not isinstance(t, torch.Tensor) or t.dim() != lazy.dim() for t in tensors) or dim % lazy.dim() == lazy._axis:
        return NotImplemented
    probe = _probe(func, (list(tensors), dim), {}, lazy)
    if probe is None or probe[0] == "self":
        return NotImplemented
    dtype, shape, axis, _ = probe
    plans, ranges = _operands_for(len(shape), axis, shape[axis], list(tensors))
    if plans is None:
        return NotImplemented
    from_end = len(shape) - axis

    def band_args(j, s, e):
        return ([_band_of(kind, x, from_end, s, e) for kind, x in plans], dim), {}

    return _computed(func, lazy, torch.empty(shape, dtype=dtype, device=lazy.device), axis, ranges, band_args)


def _view(func, args, kwargs):
    """Views on other dims (`chunk`, `split`, `narrow`, slicing): lazy views of the same bands; `narrow` of
    the band axis itself gives a lazy view of part of it."""
    x = args[0]
    if not isinstance(x, LazyTensor) or any(isinstance(a, LazyTensor) for a in _leaves(args[1:], kwargs)):
        return NotImplemented
    plain = x.as_subclass(torch.Tensor)
    name = getattr(func, "__name__", "")
    offset, axis = x._offset, x._axis
    if name == "__getitem__":
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(i is Ellipsis or i is None or isinstance(i, (torch.Tensor, list, bool)) for i in index):
            return NotImplemented
        if len(index) > axis and index[axis] != slice(None):
            return NotImplemented
        axis -= sum(1 for i in index[:axis] if isinstance(i, int))
    elif name == "narrow":
        dim = args[1] if len(args) > 1 else kwargs["dim"]
        if dim % x.dim() == axis:
            start = args[2] if len(args) > 2 else kwargs["start"]
            offset += start % x.shape[axis] if start < 0 else start
    else:   # chunk / split / tensor_split
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % x.dim() == axis:
            return NotImplemented
    with torch._C.DisableTorchFunctionSubclass():
        out = func(plain, *args[1:], **kwargs)
    if isinstance(out, torch.Tensor):
        return LazyTensor.of(out, x._bands, axis, offset)
    return type(out)(LazyTensor.of(o, x._bands, axis, offset) for o in out)


_ELEMENTWISE = [
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.neg, torch.negative, torch.abs, torch.sqrt, torch.clamp, torch.clip, torch.square,
    torch.Tensor.abs, torch.Tensor.sqrt, torch.Tensor.clamp, torch.Tensor.clip, torch.Tensor.square,
    torch.Tensor.__abs__,
    torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, torch.Tensor.neg,
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__,
    torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__truediv__, torch.Tensor.__rtruediv__,
    torch.Tensor.__neg__,
    torch.Tensor.to, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double,
    torch.Tensor.type_as,
]
BANDWISE: dict = {f: _elementwise for f in _ELEMENTWISE}
BANDWISE.update({f: _cat for f in (torch.cat, torch.concat, torch.concatenate)})
BANDWISE.update({f: _view for f in (torch.chunk, torch.Tensor.chunk, torch.split, torch.Tensor.split,
                                    torch.Tensor.narrow, torch.narrow, torch.Tensor.__getitem__)})

_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.requires_grad.__get__,
    torch.Tensor.layout.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.stride,
    torch.Tensor.element_size, torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.__len__,
    torch.Tensor.is_contiguous, torch.Tensor.dim_order, torch.Tensor.is_meta.__get__,
}
