"""Shared test helpers: compile with the backend, run a diffusion loop with a real diffusers scheduler."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from pipefusion_compile import pipefusion_backend
from pipefusion_compile.errors import PipefusionError


def compile_pf(model, **options):
    """torch.compile with the pipefusion backend; returns (compiled model, list of programs it builds)."""
    programs = []

    def backend(gm, example_inputs):
        fn = pipefusion_backend(gm, example_inputs, options=options)
        programs.append(fn)
        return fn

    return torch.compile(model, backend=backend), programs


def sample_loop(model_fn, kwargs: dict, steps: int = 10, seed: int = 1):
    """A DDIM loop; returns (final latents, per-step model outputs). `model_fn(latents, t, **kw)`."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(kwargs["hidden_states"].shape, generator=g)
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    batch = latents.shape[0]
    t_dtype = kwargs["timestep"].dtype if "timestep" in kwargs else torch.int64  # as the model's pipeline passes it
    outputs = []
    with torch.no_grad():
        for t in sched.timesteps:
            out = model_fn(latents, t.expand(batch).to(t_dtype), **rest)
            outputs.append(out)
            eps = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latents.shape[1] else out
            latents = sched.step(eps, t, latents).prev_sample
    return latents, outputs


def call_model(model):
    def fn(latents, t, **kw):
        return model(latents, timestep=t, **kw, return_dict=False)[0]

    return fn


def build_program(factory, **options):
    """Compile `factory()`'s model (eager stages), call it once, return its one program."""
    model, kwargs = factory()
    compiled, programs = compile_pf(model, stage_backend="eager", **options)
    with torch.no_grad():
        compiled(**kwargs)
    (program,) = programs
    return program


def raised(fn, *args, **kwargs) -> PipefusionError:
    """Call `fn`; return the PipefusionError it raised (unwrapped from dynamo's BackendCompilerFailed)."""
    try:
        with torch.no_grad():
            fn(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        err = e.inner_exception
    except Exception as e:
        err = e
    else:
        pytest.fail("no error was raised")
    assert isinstance(err, PipefusionError), f"{type(err).__name__} escaped to the user: {err}"
    return err
