"""`torch.compile(..., backend="pipefusion", options={...})` options, validated into one dataclass."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch.distributed as dist

from .errors import OptionsError
from .kernels import HAS_TRITON

Partition = Union[str, tuple[int, ...]]


@dataclass(frozen=True)
class PipefusionOptions:
    """What the user asked for. `None` fields are filled from the environment by `resolve()`."""

    num_stages: int | None = None
    """N: pipeline stages. Default: the world size of the process group / (cfg_parallel x sequence_parallel),
    else 1."""
    cfg_parallel: int | None = None
    """CFG-parallel degree (default 1, or what parallel='auto' chooses): the batch (e.g. cond + uncond) is split into this many equal parts, each run by its
    own pipeline of num_stages ranks (or, in one process, one after the other); every rank returns the whole
    output. The world size must be cfg_parallel x num_stages. The batch axis of every input is found by
    dataflow (`passes/batch.py`)."""
    sequence_parallel: int | None = None
    """Sequence-parallel degree inside each stage (default 1): each stage runs on this many ranks, each one
    part of every image band and heads / sequence_parallel of every self-attention (Ulysses: an all-to-all
    before and after each attention; the fresh K/V of the whole band reach every rank's cache). The world size
    must be cfg_parallel x num_stages x sequence_parallel. In one process the plan runs with whole bands (the
    degree is checked, not simulated). `ulysses.py`."""
    mesh: Any = None
    """A `torch.distributed.device_mesh.DeviceMesh` with dims named "cfg", "pp" and/or "sp" (e.g.
    `init_device_mesh("cpu", (2, 2), mesh_dim_names=("cfg", "pp"))`) to run over instead of the one built from
    the world; its sizes give cfg_parallel, num_stages and sequence_parallel."""
    sp_group: Any = None
    """Process group of this rank's sequence-parallel ranks (with `group`, the pipeline's); set from the mesh by
    the backend, or given with group instead of a mesh."""
    num_patches: int | None = None
    """M: image patches (row bands) per step. Default: N (parallel='auto': the candidate chosen)."""
    parallel: str | None = None
    """"auto": choose cfg_parallel x num_stages (= the world size) and M from the cost model (`degrees.py`:
    every factorization predicted from its plan and this machine's measured constants, the fastest that fits
    memory). "manual": use num_stages / cfg_parallel / num_patches as given. Default: "auto" on a process group
    when none of num_stages, cfg_parallel, mesh, a partition list is given; else "manual"."""
    machine: Mapping[str, float] | None = None
    """parallel='auto': machine constants to use instead of measuring them (any of flops_per_s,
    link_bytes_per_s, link_latency_s, piece_overhead_s, call_overhead_s, memory_bytes)."""
    calls_per_step: int = 1
    """parallel='auto': how often the pipeline calls the model per step (2: CFG as two calls, Wan / Flux true
    CFG), which only the cost model needs to know before the first step."""
    warmup_steps: int = 1
    """Calls per generation that run the full sequence with fresh K/V before the patch pipeline starts."""
    partition: Partition = "flops"
    """"flops" (balance FLOPs), "uniform" (equal attention layers per stage) or layers per stage, e.g. (3, 5)."""
    stage_backend: str = "inductor"
    """How each stage graph is compiled: "inductor" or "eager"."""
    simulate: bool | None = None
    """Run all stages in this process. Default: True when no process group is initialized."""
    token_axis: int | None = None
    """Axis of the image input that carries token rows. Default: found by the token analysis (the leading
    non-batch axis under which it succeeds and finds self-attention: 1 for [B, S, C] and [B, F, C, H, W], 2 for
    [B, C, H, W] and [B, C, F, H, W])."""
    image_input: str | None = None
    """The image input: a forward argument ("hidden_states") or graph placeholder ("l_hidden_states_") name.
    Default: found by matching the user inputs against the model output by batch and tokens."""
    group: Any = None
    """Process group to pipeline over (multi-process mode). Default: the default (world) group."""
    timeout_s: float = 300.0
    """Multi-process mode: how long any receive, send or collective may wait before failing (gloo; on NCCL
    waits are stream-side and the process group's own watchdog timeout applies)."""
    lazy_outputs: bool = True
    """Multi-process mode: on the ranks that do not run the last stage, a call returns as soon as this rank
    has issued its work, with model outputs whose row bands resolve as the last stage sends them (`lazy.py`):
    the next call starts its first patch when that band is ready, so there is no pipeline fill and drain
    between steps. False: every call waits for the whole output (the same numbers, one bubble per step)."""
    release_params: bool = True
    """Multi-process mode: free the storage of parameters this rank's stage never reads."""
    timeline: str | None = None
    """Directory to write this rank's timeline to (`rank<R>.jsonl`); env PIPEFUSION_TIMELINE also sets it."""
    kernels: str = "auto"
    """Data-movement kernels (K/V cache update, pack/unpack, patch output): "auto" (Triton on CUDA, the torch
    reference on CPU), "triton" (also on CPU, only under TRITON_INTERPRET=1) or "torch"."""
    strict: bool | None = None
    """What to do with a graph that has attention-like computation over the image tokens which the backend
    does not recognize as attention (a hand-written softmax(q @ k^T) @ v, `nn.MultiheadAttention`, an aten SDPA
    kernel called directly), so that it cannot be pipelined: True raises `UnsupportedGraphError`, False runs
    the graph unchanged with a WARNING (and a record in `pipefusion_compile.declined(model)`).
    Default: True when num_stages > 1 (ranks would otherwise each run the whole model without saying so)."""

    _KNOWN_BACKENDS = ("inductor", "eager")
    _KERNEL_MODES = ("auto", "triton", "torch")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "PipefusionOptions":
        if options is not None and not isinstance(options, Mapping):
            raise OptionsError(
                f"options={options!r}: expected a dict of pipefusion options, e.g. "
                "torch.compile(model, backend='pipefusion', options={'num_stages': 2})"
            )
        options = dict(options or {})
        bad_keys = sorted(repr(k) for k in options if not isinstance(k, str))
        if bad_keys:
            raise OptionsError(f"option names must be strings, got {', '.join(bad_keys)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(
                f"unknown pipefusion option(s) {unknown}; known options are {sorted(known)}"
            )
        if isinstance(options.get("partition"), list):
            options["partition"] = tuple(options["partition"])
        return cls(**options)

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str, value: Any, minimum: int) -> None:
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise OptionsError(f"option {name}={value!r}: expected an int >= {minimum}")

        positive_int("num_stages", self.num_stages, 1)
        positive_int("cfg_parallel", self.cfg_parallel, 1)
        positive_int("sequence_parallel", self.sequence_parallel, 1)
        positive_int("calls_per_step", self.calls_per_step, 1)
        if self.parallel not in (None, "auto", "manual"):
            raise OptionsError(f"option parallel={self.parallel!r}: expected 'auto' or 'manual'")
        if self.machine is not None and not isinstance(self.machine, Mapping):
            raise OptionsError(f"option machine={self.machine!r}: expected a dict of machine constants")
        if self.mesh is not None:
            self._validate_mesh()
        positive_int("num_patches", self.num_patches, 1)
        positive_int("warmup_steps", self.warmup_steps, 0)
        if self.token_axis is not None:
            positive_int("token_axis", self.token_axis, 1)
        if self.image_input is not None and (not isinstance(self.image_input, str) or not self.image_input):
            raise OptionsError(f"option image_input={self.image_input!r}: expected the name of a forward argument "
                               "(e.g. 'hidden_states') or of a graph input")
        p = self.partition
        if isinstance(p, str):
            if p not in ("flops", "uniform"):
                raise OptionsError(
                    f"option partition={p!r}: expected 'flops', 'uniform' or a list of attention layers per stage"
                )
        elif isinstance(p, Sequence):
            if not p or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in p):
                raise OptionsError(
                    f"option partition={list(p)!r}: every stage needs a positive number of attention layers"
                )
            if self.num_stages is not None and len(p) != self.num_stages:
                raise OptionsError(
                    f"option partition={list(p)!r} has {len(p)} stages but num_stages={self.num_stages}"
                )
        else:
            raise OptionsError(f"option partition={p!r}: expected a string or a list of ints")
        if self.stage_backend not in self._KNOWN_BACKENDS:
            raise OptionsError(
                f"option stage_backend={self.stage_backend!r}: expected one of {list(self._KNOWN_BACKENDS)}"
            )
        if self.kernels not in self._KERNEL_MODES:
            raise OptionsError(f"option kernels={self.kernels!r}: expected one of {list(self._KERNEL_MODES)}")
        if self.kernels == "triton" and not HAS_TRITON:
            raise OptionsError("option kernels='triton': triton is not installed")
        if self.simulate is not None and not isinstance(self.simulate, bool):
            raise OptionsError(f"option simulate={self.simulate!r}: expected True or False")
        for name in ("release_params", "lazy_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"option {name}={getattr(self, name)!r}: expected True or False")
        if (isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float))
                or not math.isfinite(self.timeout_s) or not 0 < self.timeout_s <= 1e9):
            raise OptionsError(f"option timeout_s={self.timeout_s!r}: expected a positive, finite number of seconds (at most 1e9)")
        if self.strict is not None and not isinstance(self.strict, bool):
            raise OptionsError(f"option strict={self.strict!r}: expected True or False (or leave it unset)")
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise OptionsError(f"option group={self.group!r}: expected a torch.distributed ProcessGroup")
        if self.sp_group is not None and not isinstance(self.sp_group, dist.ProcessGroup):
            raise OptionsError(f"option sp_group={self.sp_group!r}: expected a torch.distributed ProcessGroup")
        if self.timeline is not None and not isinstance(self.timeline, str):
            raise OptionsError(f"option timeline={self.timeline!r}: expected a directory path")

    _MESH_DIMS = ("cfg", "pp", "sp")

    def _validate_mesh(self) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        if not isinstance(self.mesh, DeviceMesh):
            raise OptionsError(f"option mesh={self.mesh!r}: expected a torch.distributed.device_mesh.DeviceMesh")
        names = self.mesh.mesh_dim_names
        if not names or any(n not in self._MESH_DIMS for n in names):
            raise OptionsError(f"option mesh: its dims are named {names}; expected names among {list(self._MESH_DIMS)}"
                               " (e.g. mesh_dim_names=('cfg', 'pp'))")
        if self.group is not None:
            raise OptionsError("options mesh and group: give one of them (the mesh's 'pp' dim is the pipeline group)")
        sizes = dict(zip(names, self.mesh.mesh.shape))
        cfg, pp = sizes.get("cfg", 1), sizes.get("pp", 1)
        if self.cfg_parallel not in (None, 1) and self.cfg_parallel != cfg:
            raise OptionsError(f"option cfg_parallel={self.cfg_parallel} but the mesh's 'cfg' dim has size {cfg}")
        if self.num_stages is not None and self.num_stages != pp:
            raise OptionsError(f"option num_stages={self.num_stages} but the mesh's 'pp' dim has size {pp}")
        sp = sizes.get("sp", 1)
        if self.sequence_parallel not in (None, 1) and self.sequence_parallel != sp:
            raise OptionsError(f"option sequence_parallel={self.sequence_parallel} but the mesh's 'sp' dim has size {sp}")

    def mesh_degrees(self) -> dict[str, int]:
        """The mesh's size per dim name (1 for a dim it does not have)."""
        sizes = dict(zip(self.mesh.mesh_dim_names, self.mesh.mesh.shape))
        return {name: int(sizes.get(name, 1)) for name in self._MESH_DIMS}

    def resolve(self) -> "PipefusionOptions":
        """Fill the defaults that depend on the process group and on each other."""
        pg = dist.is_available() and dist.is_initialized()
        simulate = (not pg) if self.simulate is None else self.simulate
        num_stages = self.num_stages
        parallel = self.parallel
        if parallel is None:
            parallel = "auto" if (pg and not simulate and num_stages is None and self.cfg_parallel is None
                                  and self.sequence_parallel is None and self.mesh is None
                                  and isinstance(self.partition, str)) else "manual"
        if parallel == "auto" and (num_stages is not None or self.cfg_parallel is not None or self.mesh is not None
                                   or self.sequence_parallel is not None):
            raise OptionsError("option parallel='auto' chooses num_stages, cfg_parallel and sequence_parallel: do not "
                               "give them too")
        if parallel == "auto" and (simulate or not pg):
            raise OptionsError("option parallel='auto' chooses the degrees for the ranks of a process group; in one "
                               "process give num_stages (and cfg_parallel) yourself")
        cfg = self.cfg_parallel or 1
        sp = self.sequence_parallel or 1
        if parallel == "auto":   # provisional: `degrees.choose_parallel` fills the degrees from the graph
            return dataclasses.replace(
                self, parallel=parallel, simulate=simulate, cfg_parallel=1, sequence_parallel=1,
                timeline=self.timeline if self.timeline is not None else (os.environ.get("PIPEFUSION_TIMELINE") or None),
                strict=self.strict if self.strict is not None else True)
        if self.mesh is not None:
            degrees = self.mesh_degrees()
            cfg, num_stages, sp = degrees["cfg"], degrees["pp"], degrees["sp"]
        if num_stages is None:
            if not isinstance(self.partition, str):
                num_stages = len(self.partition)
            elif pg and not simulate:
                world = dist.get_world_size(self.group)
                if world % (cfg * sp):
                    raise OptionsError(
                        f"options cfg_parallel={cfg} x sequence_parallel={sp} do not divide the world size {world}: "
                        "the world must be cfg_parallel x num_stages x sequence_parallel ranks")
                num_stages = world // (cfg * sp)
            else:
                num_stages = dist.get_world_size(self.group) if pg else 1
        if pg and not simulate and sp > 1 and self.group is not None and self.sp_group is None and self.mesh is None:
            raise OptionsError(
                f"option sequence_parallel={sp} with option group: give the sequence-parallel group too (option "
                "sp_group), or a mesh with an 'sp' dim; the groups are not built inside a given group")
        if pg and not simulate and self.mesh is None and (cfg > 1 or sp > 1) and self.sp_group is None:
            world = dist.get_world_size(self.group)
            if cfg * num_stages * sp != world:
                raise OptionsError(
                    f"options cfg_parallel={cfg} x num_stages={num_stages} x sequence_parallel={sp} = "
                    f"{cfg * num_stages * sp} ranks, but the process group has {world}: the degrees' product must "
                    "be the world size")
        num_patches = self.num_patches if self.num_patches is not None else num_stages
        strict = self.strict if self.strict is not None else num_stages > 1
        timeline = self.timeline if self.timeline is not None else (os.environ.get("PIPEFUSION_TIMELINE") or None)
        mesh, group = self.mesh, self.group
        if mesh is not None and cfg == 1 and sp == 1:   # a pipeline only: over the mesh's "pp" dim, as over a group
            mesh, group = None, (mesh.get_group("pp") if "pp" in mesh.mesh_dim_names else None)
        return dataclasses.replace(
            self, num_stages=num_stages, num_patches=num_patches, simulate=simulate, timeline=timeline,
            strict=strict, cfg_parallel=cfg, mesh=mesh, group=group, parallel=parallel, sequence_parallel=sp,
        )

    def fingerprint_items(self) -> dict:
        """The options every rank must agree on."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("group", "mesh", "sp_group", "timeline", "timeout_s")}
