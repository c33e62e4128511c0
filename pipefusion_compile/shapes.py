"""One program per concrete input shape, for graphs dynamo traced with symbolic sizes.

Under default `torch.compile` settings, the second distinct input shape a model sees (a new resolution, a
batch of 2 prompts, guidance switched off) makes dynamo recompile the frame with symbolic sizes, and that
one graph then serves every later shape. A PipeFusion plan is made for concrete token counts (stage cuts,
band heights, cache sizes, message layouts), so `ShapeDispatcher` keeps one program per shape key
(`passes.specialize.shape_key`: each tensor input's shape and dtype, each number's value, and the value of
any float dynamo passed as a 0-d tensor): a new key
specializes the symbolic graph to static sizes and runs the usual analyze -> plan -> lower on it, exactly as
a fresh compile at that shape would; a known key reuses its program, with its own step state and caches.

A graph with unbacked (data-dependent) sizes (`passes.unbacked`: a prompt cut to `int(mask.sum())` tokens, a
`nonzero` of a mask) is dispatched the same way, with the values of its unbacked symbols in the key: every
call first evaluates the `UnbackedGuard`'s slice of the graph (the mask's sum, the `nonzero`) on its real
inputs, so a call whose mask gives other sizes gets its own program, never one planned for other sizes.

What a new shape costs: planning and lowering (tens of ms to a few s for a large graph) plus compiling the
stage graphs on first use (inductor: seconds per stage and piece kind; eager: nothing). A shape seen before
costs a dictionary lookup.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx

from .lazy import LazyTensor, materialize
from .options import PipefusionOptions
from .passes.graph_inputs import is_user_input
from .passes.specialize import shape_key, specialize, value_inputs
from .passes.unbacked import UnbackedGuard

log = logging.getLogger("pipefusion_compile")


class ShapeDispatcher:
    """What the backend returns for a symbolic-shape graph: call it like the graph."""

    def __init__(self, gm: fx.GraphModule, options: PipefusionOptions, build, guard: UnbackedGuard | None = None):
        """`build(static_gm, args)` returns the callable for one shape (a program, or the plain graph when
        the backend declines it) or raises a `PipefusionError`; `guard` computes the graph's unbacked sizes
        per call (None: it has none)."""
        self.gm = gm
        self.guard = guard
        self.options = options
        self._build = build
        self.programs: dict[tuple, object] = {}
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._user_inputs = [i for i, ph in enumerate(placeholders) if is_user_input(ph)]
        self._value_inputs = value_inputs(gm)
        self._read_inputs = set(self._value_inputs) | set(guard.inputs if guard is not None else ())
        self.stats = {"shapes": 0, "specialize_s": 0.0}

    def __call__(self, *args):
        if any(isinstance(args[i], LazyTensor) for i in self._read_inputs):   # read here: resolve lazy ones
            args = tuple(materialize(a) if i in self._read_inputs else a for i, a in enumerate(args))
        unbacked = self.guard.values(args) if self.guard is not None else None
        key = (shape_key(args), tuple(args[i].item() for i in self._value_inputs),
               unbacked.key if unbacked is not None else ())
        fn = self.programs.get(key)
        if fn is not None:
            return fn(*args)
        t0 = time.perf_counter()
        static = specialize(self.gm, list(args), unbacked)
        t1 = time.perf_counter()
        fn = self._build(static, list(args))
        self.stats["shapes"] += 1
        self.stats["specialize_s"] += t1 - t0
        log.info("pipefusion: new input shapes %s: specialized the symbolic graph in %.2fs, planned and "
                 "lowered in %.2fs", self._describe(args, unbacked), t1 - t0, time.perf_counter() - t1)
        try:
            result = fn(*args)
        except BaseException:
            # the program never completed a call: do not keep it (nor list it in `programs()`)
            unregister = getattr(fn, "unregister", None)
            if unregister is not None:
                unregister()
            raise
        self.programs[key] = fn
        return result

    def _describe(self, args, unbacked=None) -> str:
        text = ", ".join(str(list(args[i].shape)) if isinstance(args[i], torch.Tensor) else repr(args[i])
                         for i in self._user_inputs)
        return text + (f"; data-dependent sizes {self.guard.describe(unbacked)}" if unbacked is not None else "")


