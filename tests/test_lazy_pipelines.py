"""Patch-lazy outputs through unchanged diffusers pipelines on 2 real ranks (gloo): the same latents, bit for
bit, as the per-step schedule (every call waits for its output) and as a loop that forces the output each step,
and as simulate mode. Covers each scheduler family and both forms of classifier-free guidance: PixArt-Sigma
(DPM-Solver++, CFG as a batch of 2), SD3 (flow-match Euler, batch), Flux (flow-match Euler, CFG as two calls),
Wan (UniPC, two calls), DiT (DDIM, batch; its VAE decode materializes the last output). SD3 runs under
`make test-full` (its scheduler and guidance form are covered by Flux and PixArt here)."""
import pytest
import torch

from dist_utils import run_ranks
from dist_workers import LAZY_MODES, pipeline_lazy_modes, pipeline_sequence

# UniPC's multistep update stacks past model outputs (torch.stack, then an einsum over them): it waits for the
# whole output there; DiT's pipeline decodes the final latents after the loop (the test's decoder records them
# first: one wait per generation, after the last step)
WAITS_IN_LOOP = {"wan": {"_VariableFunctionsClass.stack"}}
WAITS_AFTER_LOOP = {"dit": 1}
CASES = [("pixart_sigma", ["first", "batch2"]), pytest.param("sd3", ["first"], marks=pytest.mark.full),
         ("flux", ["first", "guidance_off"]), ("wan", ["first"]), ("dit", ["first"])]


@pytest.mark.parametrize("name,variants", CASES, ids=["pixart_sigma", "sd3", "flux", "wan", "dit"])
def test_lazy_outputs_equal_the_per_step_schedule_bit_for_bit(name, variants, tmp_path):
    options = {"num_stages": 2, "num_patches": 2}
    results = run_ranks(pipeline_lazy_modes, 2, name, options, variants, tmp_path=tmp_path, timeout=600)
    for res in results:
        got = res["value"]
        for mode in LAZY_MODES:
            assert got[mode]["pipelined_calls"] > 0
            for variant, a, b in zip(variants, got[mode]["outputs"], got["per_step"]["outputs"]):
                assert torch.equal(a, b), (name, variant, mode, res["rank"])
        lazy_seen = got["lazy"]["lazy_outputs"]
        if res["rank"] == 0:   # the lazy path ran: every call returned lazy outputs there, none per step
            assert lazy_seen == got["lazy"]["calls"] > 0, got["lazy"]
            assert got["per_step"]["lazy_outputs"] == 0
            for waits in got["lazy"]["materialized"]:
                rest = {op: n for op, n in waits.items() if op not in WAITS_IN_LOOP.get(name, set())}
                assert sum(rest.values()) <= WAITS_AFTER_LOOP.get(name, 0), f"{name}: waited for whole outputs: {waits}"
            assert set().union(*got["forced"]["materialized"]) >= {"TensorBase.sum"}
        else:                  # the last rank computes the outputs itself
            assert lazy_seen == 0
        assert got["lazy"]["programs"] == 1 or name == "pixart_sigma"   # one program per shape (batch2: two)
    # and the ranks equal simulate mode
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = pipeline_lazy_modes(0, 1, name, {**options, "simulate": True}, variants)["per_step"]["outputs"]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(results[0]["value"]["lazy"]["outputs"], want):
        assert torch.equal(a, b)
