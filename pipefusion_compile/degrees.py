"""Choosing the parallel degrees: every factorization of the world into cfg x pp (and M per pipeline), each
one's step time predicted from its plan's FLOPs and bytes and this machine's constants, the fastest that fits.

    candidates for world 2, DiT (batch 2 = cond + uncond), one call per step:
        cfg pp  M  form    compute  overhead  comm   bubble   step (pred.)  bytes/step/rank  memory/rank
         2   1  1  batch   ...
         1   2  2  -       ...
         1   2  4  -       ...

A candidate's step (one diffusion step: every call of it) is modeled as

    pipeline call  = max over stages (stage FLOPs / rate + pieces x per-piece overhead + sent bytes / bandwidth
                     + messages x latency) + per-call overhead;  x (M + N - 1) / M when the call's output is
                     needed whole before the next call starts (the batch form gathers it: one fill and drain)
    none           = calls x pipeline call (plan of the whole batch)
    batch form     = calls x (pipeline call of the part's plan + all-gather of the part's output)
    two-call form  = calls / cfg x pipeline call + the owner's output sent to the other part's ranks

The constants (`MachineConstants`) are measured at start-up (`calibrate`: a transformer block of the model's width for the
compute rate, a ping-pong between ranks 0 and 1 for the link; rank 0's values are broadcast so every rank
makes the same choice) or given (option `machine`); the per-piece and per-call host overheads are this
project's measurements (README "Measured"), or given.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx

from .errors import OptionsError, PipefusionError
from .options import PipefusionOptions
from .passes.meta import ValueEnum, example_value
from .passes.pieces import BAND
from .plan import PipelinePlan

log = logging.getLogger("pipefusion_compile")


class CfgForm(ValueEnum):
    NONE = "-"               # no CFG-parallel
    BATCH = "batch"          # the batch (cond + uncond) split over the cfg dim
    TWO_CALLS = "two calls"  # call stream k of a step on part k


# Host overheads measured on this project's CPU runs (timeline, 2026-12-01): ~0.7 ms per piece (schedule,
# pack/unpack, stage call), ~7 ms per call (dynamo guards, hoisted globals, setup). On CUDA these are
# assumptions until measured there (README says so).
_OVERHEADS = {"cpu": (0.7e-3, 7e-3), "cuda": (60e-6, 2e-3)}


@dataclass(frozen=True)
class MachineConstants:
    flops_per_s: float        # fp32 rate of one rank on a transformer block of the model's width
    link_bytes_per_s: float   # point-to-point bandwidth between two ranks
    link_latency_s: float     # one small message
    piece_overhead_s: float   # host time per piece per stage (schedule, pack, unpack, stage call)
    call_overhead_s: float    # host time per call (guards, hoisted globals, setup)
    memory_bytes: int         # memory one rank may use
    collective_s: float = 0.0  # one small collective over the ranks (an all-to-all; sequence parallelism's unit)
    source: str = "given"

    @classmethod
    def from_dict(cls, given: dict, base: "MachineConstants") -> "MachineConstants":
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise OptionsError(f"option machine: unknown constant(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(base, **given, source=f"{base.source}, given: {', '.join(sorted(given))}")

    def describe(self) -> str:
        return (f"rate {self.flops_per_s / 1e9:.1f} GFLOP/s, link {self.link_bytes_per_s / 1e9:.2f} GB/s + "
                f"{self.link_latency_s * 1e6:.0f} us, {self.piece_overhead_s * 1e3:.2f} ms/piece, "
                f"{self.call_overhead_s * 1e3:.1f} ms/call, {self.collective_s * 1e6:.0f} us/collective, memory {self.memory_bytes / 2**30:.1f} GiB/rank "
                f"({self.source})")


def _memory_per_rank(device: torch.device, world: int) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(total // max(world, 1))   # the ranks of one host share it


def _block_rate(device: torch.device, heads: int, head_dim: int, rows: int, repeats: int = 8) -> float:
    """FLOP/s of one transformer block of the model's width (pre-norm attention over `rows` tokens + a 4x GELU
    MLP, random weights) at its fastest of `repeats` runs after 2 untimed ones. A block, not a bare GEMM: its
    norms and element-wise ops run at memory speed as the model's do (a bare GEMM was measured ~20 % faster
    than the model's effective rate on this CPU); the fastest, not the median, as the steady state is (a
    median swung by 2x with what the other cores did meanwhile)."""
    k, m = heads * head_dim, max(rows, 16)
    g = torch.Generator(device="cpu").manual_seed(0)
    w = [torch.randn(n, k, generator=g).to(device) * k ** -0.5 for n in (3 * k, k, 4 * k)]
    w2 = torch.randn(k, 4 * k, generator=g).to(device) * (4 * k) ** -0.5
    x = torch.randn(1, m, k, generator=g).to(device)
    F = torch.nn.functional

    def block(x):
        q, kk, v = F.linear(F.layer_norm(x, (k,)), w[0]).view(1, m, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        x = x + F.linear(F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(1, m, k), w[1])
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (k,)), w[2])), w2)

    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            block(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    flops = 2 * m * k * (3 * k + k + 8 * k) + 4 * m * m * k
    return flops / max(min(times), 1e-9)


def _ping_pong(group, device: torch.device) -> tuple[float, float]:
    """(latency s, bandwidth B/s) between ranks 0 and 1 of `group`."""
    rank = dist.get_rank(group)
    peer = 1 - rank
    peer_global = dist.get_global_rank(group, peer) if group is not dist.group.WORLD else peer
    result = []
    for nbytes, trips in ((4096, 8), (4 << 20, 3)):
        buf = torch.zeros(nbytes // 4, device=device)
        times = []
        for _ in range(trips):
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer_global, group=group)
                dist.recv(buf, peer_global, group=group)
            else:
                dist.recv(buf, peer_global, group=group)
                dist.send(buf, peer_global, group=group)
            times.append((time.perf_counter() - t0) / 2)
        result.append(statistics.median(times))
    latency, big = result
    return latency, (4 << 20) / max(big - latency, 1e-9)


def _collective(group, device: torch.device, repeats: int = 8) -> float:
    """Seconds of one small all-to-all over every rank of `group` (median of `repeats`, after one untimed)."""
    world = dist.get_world_size(group)
    buf, out = torch.zeros(64 * world, device=device), torch.empty(64 * world, device=device)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        dist.all_to_all_single(out, buf, group=group)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(device: torch.device, heads: int, head_dim: int, rows: int, group=None) -> MachineConstants:
    """Measure this machine's constants (a fraction of a second). With a process group every rank must call
    it; ranks 0 and 1 measure the link, and every rank gets rank 0's numbers."""
    piece, call = _OVERHEADS.get(device.type, _OVERHEADS["cpu"])
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    rate = _block_rate(device, heads, head_dim, rows)
    latency, bandwidth = 50e-6, 1e9
    source = "calibrated: block rate; link assumed (one process)"
    if world > 1:
        group = group if group is not None else dist.group.WORLD
        if dist.get_rank(group) in (0, 1):
            latency, bandwidth = _ping_pong(group, device)
        collective = _collective(group, device)
        memory = _memory_per_rank(device, world)
        values = torch.tensor([rate, latency, bandwidth, memory, collective], dtype=torch.float64,
                              device=device if dist.get_backend(group) == "nccl" else "cpu")
        dist.broadcast(values, dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0, group=group)
        rate, latency, bandwidth, memory, collective = values.tolist()
        source = "calibrated on rank 0: block rate, ping-pong with rank 1, an all-to-all of every rank"
        return MachineConstants(rate, bandwidth, latency, piece, call, int(memory), collective, source)
    return MachineConstants(rate, bandwidth, latency, piece, call, _memory_per_rank(device, world), 2 * latency,
                            source)


_CHOSEN: dict[tuple, tuple] = {}   # model (its weights' ids) -> (choice, weak refs): one layout for every shape


def _attention_shape(gm: fx.GraphModule) -> tuple[int, int, int]:
    """(heads, head dim, query tokens) of the graph's largest self-attention: the calibration block's shape."""
    from .passes.sdpa import is_sdpa

    best = (1, 64, 256)
    for n in gm.graph.nodes:
        v = example_value(n) if is_sdpa(n) else None
        if isinstance(v, torch.Tensor) and v.dim() == 4:
            _, h, s, d = v.shape
            best = max(best, (h, d, s), key=lambda t: (t[0] * t[1], t[2]))
    return best


def choose_parallel(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions) -> PipefusionOptions:
    """`parallel='auto'`: the options with the chosen degrees (cfg_parallel, num_stages, num_patches). Every
    rank calls it (calibration is collective). The first shape of a model chooses; later shapes keep it (ranks
    have released the other stages' weights)."""
    import weakref

    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    key = tuple(id(p) for p in params)
    kept = _CHOSEN.get(key)
    if kept is not None and params and all(r() is p for r, p in zip(kept[1], params)):
        choice = kept[0]
    else:
        group = options.group if options.group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        heads, head_dim, rows = _attention_shape(gm)
        measured = calibrate(device, heads, head_dim, max(rows // world, 1), group)
        constants = MachineConstants.from_dict(options.machine, measured) if options.machine else measured
        choice = enumerate_candidates(gm, example_inputs, options, world, constants, options.calls_per_step,
                                      options.num_patches)
        if params:
            _CHOSEN[key] = (choice, tuple(weakref.ref(p) for p in params))
        if dist.get_rank(group) == 0:
            log.info("pipefusion: %s", choice)
    c = choice.chosen
    log.info("pipefusion: parallel='auto' chose %s (%s), predicted %.1f ms per step", c.label, c.form,
             c.step_s * 1e3)
    return dataclasses.replace(options, parallel="manual", cfg_parallel=c.cfg, num_stages=c.pp,
                               num_patches=c.patches, sequence_parallel=c.sp)


def choice_of(compiled_model) -> DegreeChoice | None:
    """The `parallel='auto'` table and choice made for `compiled_model` (the `torch.compile` result or the
    module), None before its first call or when its degrees were given."""
    module = getattr(compiled_model, "_orig_mod", compiled_model)
    ids = {id(p) for p in module.parameters()}
    for key, (choice, refs) in _CHOSEN.items():
        if key and set(key) <= ids and all(r() is not None for r in refs):
            return choice
    return None


@dataclass(frozen=True)
class Candidate:
    cfg: int
    pp: int
    patches: int
    form: CfgForm
    sp: int = 1                       # sequence-parallel ranks per stage (Ulysses)
    compute_s: float = 0.0
    overhead_s: float = 0.0
    comm_s: float = 0.0
    bubble_s: float = 0.0
    step_s: float = math.inf          # predicted time of one diffusion step (all its calls)
    p2p_bytes: tuple[int, ...] = ()   # per pipeline stage: bytes it sends per step (stage cuts + output bands)
    cfg_bytes: tuple[int, ...] = ()   # per pipeline stage: bytes it sends per step across the cfg dim (the batch
                                      # form's all-gather; the two-call form's output, from the last stage)
    sp_bytes: tuple[int, ...] = ()    # per pipeline stage: bytes a rank sends per step in its sequence-parallel
                                      # group (all-to-alls, head gathers, the output gather)
    memory_bytes: int = 0             # per rank: its stage's parameters and caches
    fits: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return f"cfg {self.cfg} x pp {self.pp} x sp {self.sp}, M={self.patches}"

    def bytes_per_rank(self, stage: int) -> int:
        """What a rank running pipeline stage `stage` (of any part; sequence-parallel part 0, the largest)
        sends per step."""
        return sum(b[stage] if b else 0 for b in (self.p2p_bytes, self.cfg_bytes, self.sp_bytes))


@dataclass
class DegreeChoice:
    world: int
    batch: int
    calls_per_step: int
    constants: MachineConstants
    candidates: list[Candidate]
    chosen: Candidate
    references: dict[str, int] = field(default_factory=dict)  # other methods' bytes per rank per step

    def __str__(self) -> str:
        lines = [f"parallel='auto': world {self.world}, batch {self.batch}, {self.calls_per_step} call(s) per step",
                 f"  machine: {self.constants.describe()}",
                 f"  {'':2}{'cfg':>3} {'pp':>3} {'sp':>3} {'M':>3}  {'form':<9} {'compute':>9} {'overhead':>9} {'comm':>8} "
                 f"{'bubble':>8} {'step':>9}  {'bytes/step/rank':>15}  {'memory/rank':>11}"]
        for c in self.candidates:
            mark = "->" if c is self.chosen else "  "
            sent = max((c.bytes_per_rank(s) for s in range(c.pp)), default=0)
            lines.append(
                f"  {mark}{c.cfg:>3} {c.pp:>3} {c.sp:>3} {c.patches:>3}  {str(c.form):<9} {_ms(c.compute_s):>9} "
                f"{_ms(c.overhead_s):>9} {_ms(c.comm_s):>8} {_ms(c.bubble_s):>8} {_ms(c.step_s):>9}  "
                f"{_mb(sent):>15}  {_mb(c.memory_bytes):>11}" + ("" if c.fits else "  does not fit" if math.isfinite(c.step_s) else "  not possible")
                + (f"  ({c.note})" if c.note else ""))
        for name, nbytes in self.references.items():
            lines.append(f"  {'':2}{name:<53}{'':>20}{_mb(nbytes):>15}")
        return "\n".join(lines)


def _ms(s: float) -> str:
    return "-" if not math.isfinite(s) else f"{s * 1e3:.1f}ms"


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}MiB" if n >= 2**20 else f"{n / 2**10:.1f}KiB"


def _patch_options(pp: int, token_rows: int, given: int | None) -> list[int]:
    if given is not None:
        return [given] if given <= token_rows else []
    if pp == 1:
        return [1]
    return [m for m in (pp, 2 * pp) if m <= token_rows]


def _output_bytes(gm: fx.GraphModule) -> int:
    from .passes.graph_inputs import graph_outputs

    total = 0
    for o in graph_outputs(gm):
        v = example_value(o) if isinstance(o, fx.Node) else None
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def _param_bytes(example_inputs: list) -> int:
    return sum(x.numel() * x.element_size() for x in example_inputs if isinstance(x, torch.nn.Parameter))


def predict_call(plan: PipelinePlan, out_bytes: int, k: MachineConstants, whole_output: bool,
                 sp_bytes: tuple[int, ...] = (), collectives: tuple[int, ...] = ()) -> dict:
    """One call of a pipeline: compute, overhead, comm and bubble seconds and bytes sent per stage.

    With sequence parallelism (`plan.sp_degree` P > 1, the plan of part 0, the largest): each rank computes
    1/P of its stage's token work (the hoisted globals whole), sends its parts of the bands, and per stage
    `sp_bytes` in `collectives` collectives (each `collective_s`, or P - 1 link latencies if not known); the
    output is gathered whole."""
    n, m, P = plan.num_stages, plan.num_patches, plan.sp_degree
    pieces = len(plan.pieces(pipelined=True))
    part = sum(p.rows for p in plan.pieces(True) if p.kind is BAND) / plan.token_rows if P > 1 else 1.0
    per_stage, sent = [], []
    for s in plan.stages:
        nbytes = plan.p2p_bytes_per_step(s.index)
        messages = pieces if s.index < n - 1 else 0
        if s.index == n - 1 and n > 1:   # the model output, band by band, to every other stage
            nbytes += int(out_bytes * part) * (n - 1)
            messages += m * (n - 1)
        compute = (s.flops / P + s.global_flops) / k.flops_per_s
        overhead = pieces * k.piece_overhead_s
        comm = nbytes / k.link_bytes_per_s + messages * k.link_latency_s
        if P > 1:
            each = k.collective_s or (P - 1) * k.link_latency_s
            comm += sp_bytes[s.index] / k.link_bytes_per_s + collectives[s.index] * each
        per_stage.append((compute, overhead, comm))
        sent.append(nbytes)
    slowest = max(per_stage, key=sum)
    busy = sum(slowest)
    bubble = busy * (n - 1) / m if (whole_output or P > 1) and n > 1 else 0.0
    return {"compute": slowest[0], "overhead": slowest[1] + k.call_overhead_s, "comm": slowest[2],
            "bubble": bubble, "time": busy + bubble + k.call_overhead_s, "sent": tuple(sent)}


def enumerate_candidates(gm: fx.GraphModule, example_inputs: list, options: PipefusionOptions, world: int,
                         constants: MachineConstants, calls_per_step: int = 1,
                         patches: int | None = None) -> DegreeChoice:
    """Every cfg x pp = world (cfg 1 or 2) with its M choices (M = pp and 2 pp, or `patches` if given),
    predicted; the fastest that fits is chosen."""
    from .backend import analyze_for_pipeline
    from .passes.batch import split_batch
    from .passes.sequence_parallel import check_heads
    from .plan import build_plan

    out_bytes = _output_bytes(gm)
    outs = [example_value(o) for o in gm.graph.find_nodes(op="output")[0].all_input_nodes]
    batch = next((int(v.shape[0]) for v in outs if isinstance(v, torch.Tensor) and v.dim()), 1)
    params = _param_bytes(example_inputs)
    graphs: dict[CfgForm, tuple] = {}

    def graph_for(form: CfgForm):
        """The graph a candidate of `form` pipelines, analyzed on a copy (the analysis rewrites what it
        analyzes; the backend analyzes the original once the choice is made)."""
        if form not in graphs:
            g, inputs = fresh_copy(gm), example_inputs
            if form is CfgForm.BATCH:
                g, inputs, _ = split_batch(gm, example_inputs, 2)
            analysis = analyze_for_pipeline(g, inputs, dataclasses.replace(options, num_stages=2, num_patches=1,
                                                                           cfg_parallel=1, parallel="manual"))
            if analysis is None:
                raise PipefusionError("parallel='auto': this graph has nothing to pipeline")
            graphs[form] = (g, inputs, analysis)
        return graphs[form]

    candidates: list[Candidate] = []
    # over a group the user gave, sequence-parallel groups cannot be carved out of it (building them is
    # collective over the world, and the world may run other groups' pipelines at the same time)
    sp_degrees = _divisors if options.group is None else (lambda n: [1])
    for cfg, sp in [(c, p) for c in (1, 2) for p in sp_degrees(world // c) if world % c == 0]:
        pp = world // (cfg * sp)
        if cfg == 1:
            form = CfgForm.NONE
        elif batch % 2 == 0:
            form = CfgForm.BATCH
        elif calls_per_step >= 2:
            form = CfgForm.TWO_CALLS
        else:
            candidates.append(Candidate(cfg, pp, 1, CfgForm.NONE, sp, fits=False,
                                        note="a batch of 1 and one call per step: nothing for a second part"))
            continue
        try:
            g, inputs, analysis = graph_for(form)
            if sp > 1:   # the compile's own check: every self-attention's heads divide
                check_heads(g, sp)
        except PipefusionError as e:   # e.g. the batch does not split: a candidate that is not possible, named
            candidates.append(Candidate(cfg, pp, 1, form, sp, fits=False, note=_brief(e)))
            continue
        for m in _patch_options(pp, analysis.token_rows, patches):
            opts = dataclasses.replace(options, num_stages=pp, num_patches=m, cfg_parallel=1, parallel="manual")
            try:
                plan, _ = build_plan(g, inputs, opts, analysis)
                if sp > 1:
                    plan = dataclasses.replace(plan, sp_degree=sp, sp_rank=0)
                    plan.check_sequence_parallel()
                    _check_sequence_parallel_rules(g, plan)
            except PipefusionError as e:
                candidates.append(Candidate(cfg, pp, m, form, sp, fits=False, note=_brief(e)))
                continue
            part_out = out_bytes // 2 if form is CfgForm.BATCH else out_bytes
            sp_bytes, collectives = _sp_traffic(plan, g, analysis)
            call = predict_call(plan, part_out, constants, whole_output=form is CfgForm.BATCH, sp_bytes=sp_bytes,
                                collectives=collectives)
            calls = calls_per_step if form is not CfgForm.TWO_CALLS else max(calls_per_step // cfg, 1)
            extra, cfg_bytes = 0.0, (0,) * pp
            if form is CfgForm.BATCH:     # every rank sends its part of the output to the other part
                cfg_bytes = (part_out * (cfg - 1) * calls_per_step,) * pp
                extra = calls_per_step * (part_out * (cfg - 1) / constants.link_bytes_per_s + constants.link_latency_s)
            elif form is CfgForm.TWO_CALLS:   # the owner's last stage sends its output to the other parts' ranks
                cfg_bytes = (0,) * (pp - 1) + (out_bytes * pp * sp * (cfg - 1) * calls,)
                extra = calls * (out_bytes * pp * sp * (cfg - 1) / constants.link_bytes_per_s
                                 + constants.link_latency_s)
            memory = max(int(params * s.share) + s.kv_cache_bytes // sp for s in plan.stages)
            candidates.append(Candidate(
                cfg, pp, m, form, sp, compute_s=calls * call["compute"], overhead_s=calls * call["overhead"],
                comm_s=calls * call["comm"] + extra, bubble_s=calls * call["bubble"],
                step_s=calls * call["time"] + extra, p2p_bytes=tuple(b * calls for b in call["sent"]),
                cfg_bytes=cfg_bytes, sp_bytes=tuple(b * calls for b in sp_bytes), memory_bytes=memory,
                fits=memory <= constants.memory_bytes))
    fitting = [c for c in candidates if c.fits and math.isfinite(c.step_s)]
    if not fitting:
        raise PipefusionError("parallel='auto': no factorization of the world fits:\n"
                              + "\n".join(f"  {c.label}: {c.note or 'does not fit'}" for c in candidates))
    candidates.sort(key=lambda c: (not c.fits, c.step_s))
    chosen = min(fitting, key=lambda c: c.step_s)
    g, _, analysis = graph_for(CfgForm.NONE)
    return DegreeChoice(world, batch, calls_per_step, constants, candidates, chosen,
                        reference_bytes(gm, analysis, world))


def _brief(error: Exception, limit: int = 150) -> str:
    """The first line of `error`, cut at a word under `limit` characters: why a candidate is not possible."""
    line = str(error).splitlines()[0]
    if len(line) <= limit:
        return line
    return line[:line.rfind(" ", 0, limit)].rstrip(",;:(") + " ..."


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_sequence_parallel_rules(gm: fx.GraphModule, plan: PipelinePlan) -> None:
    """Sequence parallelism is built for plain self-attention: any other token-mixing rule makes it impossible."""
    from .passes.meta import MixingRule

    others = sorted({m.rule.name for m in plan.mixing if m.rule is not MixingRule.STALE_KV})
    if others:
        raise PipefusionError(f"sequence parallelism is built for self-attention only; this model mixes tokens by "
                              f"{', '.join(others)} too")


def _sp_traffic(plan: PipelinePlan, gm: fx.GraphModule, analysis) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per stage: bytes a rank sends in its sequence-parallel group per pipelined step, and its collectives."""
    if plan.sp_degree == 1:
        return (0,) * plan.num_stages, (0,) * plan.num_stages
    from .sequence_program import sp_bytes_per_step

    pieces = plan.pieces(True)
    bands = sum(1 for p in pieces if p.kind.value == "band")
    per_attention = 2 * bands + (len(pieces) - bands)   # all-to-alls of q, k, v (one) and the output per band part
    attention = [0] * plan.num_stages
    for position in plan.attention_positions:
        attention[plan.stage_of(position)] += 1
    return (tuple(sp_bytes_per_step(plan, gm, analysis, s) for s in range(plan.num_stages)),
            tuple(a * per_attention + (1 if bands else 0) for a in attention))


def fresh_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose nodes carry dynamo's meta but none of this package's analysis results."""
    from .passes.meta import META_KEY

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for n in graph.nodes:
        n.meta.pop(META_KEY, None)
    return fx.GraphModule(gm, graph)


def reference_bytes(gm: fx.GraphModule, analysis, world: int) -> dict[str, int]:
    """Bytes per rank per step of the sequence-parallel methods on the same model (world ranks), from the
    hidden state's size and the number of attention layers: Ulysses all-to-alls q, k, v and the output
    (4 (n-1)/n^2 of a layer's activation), DistriFusion all-gathers each rank's K and V share to the others."""
    hidden = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", "") == "scaled_dot_product_attention":
            v = example_value(n)
            if isinstance(v, torch.Tensor):
                hidden = max(hidden, v.numel() * v.element_size())
    layers = len(analysis.self_attention)
    if world < 2 or not hidden:
        return {}
    return {f"Ulysses (sp {world}), for reference": int(4 * hidden * (world - 1) / world**2 * layers),
            f"DistriFusion ({world} patches), for reference": int(2 * hidden / world * (world - 1) * layers)}
