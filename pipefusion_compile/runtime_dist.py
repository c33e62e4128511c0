"""Multi-process PipeFusion: one stage per rank of a process group, async P2P between stages.

Each rank compiles the same graph and builds the same plan (checked once: the ranks exchange a fingerprint),
keeps only its stage (and, with `release_params`, only its stage's weights), and runs the executor of
`runtime.PipelineProgram` on it: its stage's schedule graph per step (`schedule.py`) over torch.distributed
(`comm.DistComm`) instead of the in-process transport. `print(program.schedule_graph(pipelined=True))` is
exactly what the rank runs.
"""
from __future__ import annotations

import hashlib
import logging
import uuid

import torch
import torch.distributed as dist
import torch.fx as fx

from .comm import Comm, DistComm
from .errors import PipefusionError, PlanError
from .options import PipefusionOptions
from .passes.stage_split import LoweredStage
from .plan import PipelinePlan
from .runtime import PipelineProgram

log = logging.getLogger("pipefusion_compile")


class DistributedProgram(PipelineProgram):
    """One rank's part of the pipeline. Same interface as `PipelineProgram`."""

    def __init__(self, gm: fx.GraphModule, plan: PipelinePlan, stages: list[LoweredStage],
                 options: PipefusionOptions, example_inputs: list, timestep_index: int | None):
        group = options.group if options.group is not None else dist.group.WORLD
        size = dist.get_world_size(group)
        if size != plan.num_stages:
            raise PlanError(
                f"the process group has {size} ranks but the plan has num_stages={plan.num_stages}: run one "
                "rank per stage (torchrun --nproc-per-node N), or pass the group to pipeline over (option group)"
            )
        self.group = group
        self.stage_index = dist.get_rank(group)
        self.stage_ranks = [dist.get_global_rank(group, i) if group is not dist.group.WORLD else i
                            for i in range(size)]
        super().__init__(gm, plan, stages, options, example_inputs, timestep_index)
        self.own = self.all_stages[self.stage_index]
        self.stages = [self.own]  # only this rank's stage computes (its globals too)
        self.comm = self.comms[self.stage_index]
        last = plan.num_stages - 1
        for slot in self._token_outputs:
            producer = next(s.index for s in stages if slot.name in s.outputs or slot.name in _members(s))
            if producer != last:
                raise PlanError(f"model output {slot.name} is computed by stage {producer}, not the last stage")
        self.stats.update(bytes_sent=0, output_bytes=0, resident_param_bytes=0, released_param_bytes=0)
        self._check_fingerprint()
        if options.release_params:
            self._release_params(example_inputs)

    def _make_comms(self, options: PipefusionOptions) -> dict[int, Comm]:
        return {self.stage_index: DistComm(
            name=f"pipefusion-{uuid.uuid4().hex[:12]}", group=self.group, stage=self.stage_index,
            stage_ranks=self.stage_ranks, timeout_s=options.timeout_s,
            record_timeline=options.timeline is not None, stream_side=dist.get_backend(self.group) == "nccl")}

    def output_receivers(self) -> list[int]:
        return list(range(self.plan.num_stages - 1))

    # ------------------------------------------------------------------------------------------ setup
    def fingerprint(self) -> str:
        text = "\n".join([str(self.plan), self.gm.code, repr(sorted(self.options.fingerprint_items().items()))])
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_fingerprint(self) -> None:
        mine = self.fingerprint()
        # NCCL only moves CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        local = torch.tensor([int(mine[:15], 16)], dtype=torch.int64, device=device)
        gathered = [torch.zeros_like(local) for _ in self.stage_ranks]
        what = "exchanging plan fingerprints with the other ranks"
        work = self.comm._start(lambda: dist.all_gather(gathered, local, group=self.group, async_op=True), what, -1)
        self.comm._wait(work, what, -1)
        values = [int(t.item()) for t in gathered]
        if len(set(values)) != 1:
            differ = [self.stage_ranks[i] for i, v in enumerate(values) if v != values[0]]
            raise PlanError(
                f"rank {self.comm.rank}: the ranks built different pipeline plans (ranks {differ} differ from "
                f"rank {self.stage_ranks[0]}): every rank must compile the same model with the same options "
                f"and inputs. This rank's plan:\n{self.plan}"
            )

    def _release_params(self, example_inputs: list) -> None:
        """Free the storage of parameters this rank's stage never reads (metadata stays: no recompiles)."""
        needed = {id(example_inputs[i]) for i in self.own.lowered.global_inputs}
        resident = released = 0
        for x in example_inputs:
            if not isinstance(x, torch.nn.Parameter):
                continue
            storage = x.untyped_storage()
            if id(x) in needed:
                if storage.nbytes() == 0 and x.numel() > 0:
                    raise PipefusionError(
                        "a parameter this graph needs was released by an earlier pipefusion graph on this rank "
                        "(the model was split by graph breaks); compile with options={'release_params': False}"
                    )
                resident += storage.nbytes()
            elif storage.nbytes():
                released += storage.nbytes()
                storage.resize_(0)
        self.stats.update(resident_param_bytes=resident, released_param_bytes=released)
        log.info("pipefusion: rank %d keeps %.1f MiB of parameters, released %.1f MiB", self.comm.rank,
                 resident / 2**20, released / 2**20)


def _members(stage: LoweredStage) -> set[str]:
    return {n.name for n in stage.stage_gm.graph.nodes if n.op not in ("placeholder", "output")}
