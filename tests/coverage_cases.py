"""The coverage cases: one tiny, seeded, randomly initialised build of every diffusers transformer class that
denoises image, video or audio latents (the classes A..K in coverage_cases_a.py, L..Z in coverage_cases_b.py).

A case is what `tests/coverage_runner.py` needs to check a class against the plain model and the eager
reference (`tests/reference_pipefusion.py`); `benchmarks/coverage.py` prints the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from helpers import Feed

if TYPE_CHECKING:
    from reference_pipefusion import ImageLayout


@dataclass(frozen=True)
class Case:
    name: str                                   # the diffusers class name
    build: Callable[[], tuple[torch.nn.Module, dict]]  # seeded model in eval() with random weights, and the forward kwargs
                                                # (the latent argument + the rest; CFG batch 2; no return_dict)
    text_tokens: int = 0                        # text tokens in a joint text+image attention sequence (for the reference)
    text_first: bool = False                    # text before image in that sequence (or in the keys, below)
    key_text_tokens: int = 0                    # text keys of image-only queries ([image | text] keys, no text queries)
    stream_tokens: int = 0                      # tokens of a second stream in its own tensor whose queries attend over
                                                # the image (LTX-2's audio): one more piece after the image, for the reference
    after_tokens: int = 0                       # with text_first: tokens after the image too ([text | image | after])
    layout: "ImageLayout | None" = None         # reference's image layout when ImageLayout.of cannot tell it (see tests/reference_pipefusion.py)
    reductions: bool = False                    # the reference assembles torch.matmul over the image tokens (linear attention)
    options: tuple = ()                         # backend options the class needs, as (key, value) pairs (ideally none)
    feed: Feed = Feed()                         # how its pipeline makes each call's latent argument and reads the prediction
    skip: str | None = None                     # why it is not built (not a latent denoiser, needs weights, ...)
    # torch._dynamo.config flags its compiled calls run under, as (name, value) pairs (e.g. UNBACKED_SIZES)
    dynamo_config: tuple = ()


# dynamo traces sizes computed from masks (`int(mask.sum())`, `nonzero`, a boolean index) into the graph
# instead of breaking it there; the backend specializes such a graph per call (passes/unbacked.py)
UNBACKED_SIZES = (("capture_scalar_outputs", True), ("capture_dynamic_output_shape_ops", True))


def all_cases() -> list[Case]:
    """Every case, A..K then L..Z (the second list only where its module exists)."""
    from coverage_cases_a import CASES as cases_a

    try:
        from coverage_cases_b import CASES as cases_b
    except ModuleNotFoundError as e:
        if e.name != "coverage_cases_b":
            raise
        cases_b = []
    return [*cases_a, *cases_b]


def case_by_name(name: str) -> Case:
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(f"no coverage case named {name!r}")
