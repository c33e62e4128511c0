"""pipefusion-compile: a torch.compile backend that runs a diffusion transformer as a PipeFusion pipeline.

    compiled = torch.compile(transformer, backend="pipefusion", options={"num_stages": 2, "num_patches": 4})
"""
from .backend import pipefusion_backend
from .declines import Declined, declined
from .errors import ModelSpecError, OptionsError, PipefusionError, PlanError, UnsupportedGraphError
from .options import PipefusionOptions
from .plan import PipelinePlan
from .runtime import PipelineProgram, programs, reset

__all__ = [
    "pipefusion_backend",
    "reset",
    "programs",
    "declined",
    "Declined",
    "plan",
    "PipefusionOptions",
    "PipelinePlan",
    "PipelineProgram",
    "PipefusionError",
    "OptionsError",
    "PlanError",
    "UnsupportedGraphError",
    "ModelSpecError",
]


def plan(*args, **kwargs):
    """Print-free planning entry point; see `pipefusion_compile.cli.plan_model`."""
    from .cli import plan_model

    return plan_model(*args, **kwargs)
