"""The fast part of the coverage table (benchmarks/coverage.py): every case builds and dynamo traces it, and a
fixed sample of classes (an image DiT, a joint text+image MM-DiT, a video DiT) is pipelined and equal to the
eager reference at M=4 and to the plain model at M=1."""
from __future__ import annotations

import pytest
import torch

from coverage_cases import Case, all_cases
from coverage_runner import run_case

CASES = [c for c in all_cases() if not c.skip]
MAIN = [c for c in CASES if "[" not in c.name]  # one case per class (the extra frame counts only in the table)
# the L..Z cases' outputs (conditioning stacked on the channels, joint sequences returned whole, list inputs) are
# checked by test_coverage_cases_b.py; here they are traced and compared with eager
_B_NAMES = {c.name for c in __import__("coverage_cases_b").CASES}
SAMPLE = ("DiTTransformer2DModel", "FluxTransformer2DModel", "AllegroTransformer3DModel")


def _latent_like(out: torch.Tensor, latents: torch.Tensor) -> bool:
    """The model's prediction has the latent's shape (or twice its channels: learned sigma)."""
    if out.shape == latents.shape:
        return True
    return out.dim() == latents.dim() and out.shape[0] == latents.shape[0] and out.shape[1] == 2 * latents.shape[1] \
        and out.shape[2:] == latents.shape[2:]


def test_every_class_has_one_case_or_a_skip_reason():
    import diffusers.models.transformers as t

    names = {c.name.split("[")[0] for c in all_cases()}
    # coverage_cases_a.py holds AceStep.. up to the Kandinsky classes; Krea2 onwards is coverage_cases_b.py's
    ours = {n for n in dir(t) if ("Transformer" in n or "DiT" in n) and n < "Krea"}
    assert ours <= names, f"classes A..K with no case: {sorted(ours - names)}"
    for c in all_cases():
        assert (c.build is None) == bool(c.skip), c.name
        assert c.name.split("[")[0] in dir(t), f"{c.name} is not a diffusers transformer class"


@pytest.mark.parametrize("case", MAIN, ids=[c.name for c in MAIN])
def test_case_builds_and_is_traced(case):
    torch.manual_seed(0)
    model, kwargs = case.build()
    assert not model.training
    in_b = case.name in _B_NAMES
    assert in_b or kwargs["hidden_states"].shape[0] == 2, "CFG batch 2"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(**dict(case.dynamo_config)):
        want = model(**kwargs, return_dict=False)[0]
        got = torch.compile(model, backend=count)(**kwargs, return_dict=False)[0]
    torch._dynamo.reset()
    # the case's feed: the part of the output its pipeline steps with, and the latents inside the latent argument
    # (conditioning channels the pipeline concatenates before each call are no latents)
    built = kwargs[case.feed.latent_arg]
    prediction, latents = case.feed.predicted(want, built), case.feed.initial(built)
    assert in_b or _latent_like(prediction, latents), (tuple(prediction.shape), tuple(latents.shape))
    assert graphs, "dynamo handed no graph to the backend"
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_is_pipelined_and_equal(name):
    (case,) = [c for c in CASES if c.name == name]
    row = run_case(case, stages=2, patches=4, steps=2)  # warmup 1: the second step is pipelined
    assert row.plan.startswith("2 stages"), row
    assert (row.m1_equal_plain, row.m4_equal_reference) == ("yes", "yes"), row.error


def test_two_ranks_equal_simulate_bit_for_bit():
    """AceStep's stage cut carries a transposed value (its conv1d patch embedding's output, [B, S, C] with the
    channels outermost in memory): the receiving rank must unpack it in that layout, or its matmuls run on
    other strides than in one process and differ in the last bits (1.9e-6 before)."""
    (case,) = [c for c in CASES if c.name == "AceStepTransformer1DModel"]
    row = run_case(case, stages=2, patches=4, steps=2, ranks=True)
    assert row.ranks2_equal_simulate == "yes", row.error


def test_runner_reports_failures_per_cell():
    def broken():
        raise ValueError("no such config")

    row = run_case(Case("Broken", broken))
    assert row.error.startswith("build: ValueError: no such config") and "NOT PipefusionError" in row.error
    assert row.m4_equal_reference == "build failed"
    assert run_case(Case("Skipped", None, skip="not a denoiser")).error == "skip: not a denoiser"


@pytest.mark.parametrize("case", MAIN, ids=[c.name for c in MAIN])
def test_plan_command_names_the_rule_of_every_mixing_op(case):
    """`pipefusion-compile plan` (cli.plan_graphs) on every class: a plan whose table names, for each op that
    mixes image tokens, its stage and its rule; or a PipefusionError (the classes the table lists as refused).
    Nothing runs: the plan is made from dynamo's fake values."""
    from pipefusion_compile.cli import plan_graphs
    from pipefusion_compile.errors import PipefusionError

    torch.manual_seed(0)
    model, kwargs = case.build()
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(**dict(case.dynamo_config)):
            plans = plan_graphs(model, {**kwargs, "return_dict": False}, num_stages=2, num_patches=4,
                                **dict(case.options))
    except Exception as e:  # dynamo wraps the backend's errors
        from coverage_runner import unwrap

        assert isinstance(unwrap(e), PipefusionError), f"{type(unwrap(e)).__name__}: {unwrap(e)}"
        return
    finally:
        torch._dynamo.reset()
    for plan in plans:
        text = str(plan)
        assert plan.mixing, text
        for op in plan.mixing:
            assert op.node in text and op.rule.name in text, (op, text)
