"""Shared test helpers: compile with the backend, run a diffusion loop with a real diffusers scheduler."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass(frozen=True)
class Feed:
    """How a diffusers pipeline feeds its scheduler's latents to the model and reads the noise prediction back.

    The default is the common case: the latents are the `hidden_states` argument as they are and the output is
    the prediction (with learned sigma: twice the latent's channels, the first half is the noise). Other
    pipelines concatenate fixed conditioning to the latents every step (`cat([latents, cond], dim=1)`), name the
    latent argument differently, pass a list of per-sample latents, or return more than the prediction (a whole
    joint sequence). The conditioning and the layout of the latents are read from the built kwargs, so a case's
    builder stays the pipeline's first call.
    """

    latent_arg: str = "hidden_states"  # the forward's latent argument (its first; the name finds it in the kwargs)
    timestep_arg: str = "timestep"     # the forward's timestep argument
    # the scheduler's latents inside the built latent argument (their shape is what the loop samples)
    latents: Callable[[Any], torch.Tensor] | None = None
    # (latents, built latent argument) -> this step's latent argument
    model_input: Callable[[torch.Tensor, Any], Any] | None = None
    # (model output, this step's latent argument) -> the part the pipeline steps with
    prediction: Callable[[Any, Any], torch.Tensor] | None = None

    def initial(self, built) -> torch.Tensor:
        return self.latents(built) if self.latents else built

    def input(self, latents: torch.Tensor, built):
        return self.model_input(latents, built) if self.model_input else latents

    def predicted(self, out, model_input) -> torch.Tensor:
        return self.prediction(out, model_input) if self.prediction else out


def channel_conditioned(channels: int, **fields) -> Feed:
    """The latents are the first `channels` channels of the latent argument; the channels after them are fixed
    conditioning that the pipeline concatenates to the latents before every call (Motif-Video's first-frame
    condition and mask, Wan-Animate's reference latents)."""
    return Feed(latents=lambda built: built[:, :channels],
                model_input=lambda x, built: torch.cat([x, built[:, channels:]], dim=1), **fields)


def sample_loop(model_fn, kwargs: dict, steps: int = 10, seed: int = 1, feed: Feed = Feed()):
    """A DDIM loop; returns (final latents, per-step predictions). `model_fn(latent argument, t, **kw)`.

    `feed` says how the latent argument is made from the latents and which part of the output is recorded and
    stepped with (by default: the latents themselves, the whole output)."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    built = kwargs[feed.latent_arg]
    latents = torch.randn(feed.initial(built).shape, generator=g)
    rest = {k: v for k, v in kwargs.items() if k not in (feed.latent_arg, feed.timestep_arg)}
    batch = latents.shape[0]
    given_t = kwargs.get(feed.timestep_arg)
    t_dtype = given_t.dtype if given_t is not None else torch.int64  # as the model's pipeline passes it
    outputs = []
    with torch.no_grad():
        for t in sched.timesteps:
            x = feed.input(latents, built)
            out = feed.predicted(model_fn(x, t.expand(batch).to(t_dtype), **rest), x)
            outputs.append(out)
            eps = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latents.shape[1] else out
            latents = sched.step(eps, t, latents).prev_sample
    return latents, outputs


def call_model(model, feed: Feed = Feed()):
    """`model_fn` for sample_loop: the latent argument first (positionally, as every forward takes it)."""

    def fn(x, t, **kw):
        return model(x, **{feed.timestep_arg: t}, **kw, return_dict=False)[0]

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
