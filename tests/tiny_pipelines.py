"""Unchanged diffusers pipelines with tiny random components, built from configs (nothing is downloaded).

Each factory returns a `TinyPipeline`: a ready pipeline object (fp32, CPU, eval) plus the call kwargs of the
inputs the pipelines suite runs: "first" (the default input), "second_resolution", "batch2" (two prompts) and
"guidance_off". Text encoders are never built: every pipeline here accepts precomputed `prompt_embeds` (and the
pooled / negative / attention-mask variants it wants), which are random tensors of the shapes the tiny
transformer reads. No VAE is built where a pipeline runs without one at `output_type="latent"` (the pipelines
then use their documented default scale factors); DiTPipeline has no latent output and always decodes, so it
gets a tiny AutoencoderKL whose `decode` input (the final latents, scaled) is recorded.

A factory builds the same weights every time (seeded), so two factories' pipelines are interchangeable.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable

import torch

STEPS = 3  # inference steps per pipeline call


@dataclasses.dataclass
class TinyPipeline:
    name: str
    pipe: object
    calls: dict[str, dict]          # variant -> pipeline kwargs (without generator / output_type)
    options: dict                   # backend options the transformer needs besides num_stages / num_patches
    max_patches: int                # token rows of the smallest input (the largest M every input allows)
    two_calls: bool = False         # "first" calls the transformer twice per step (cond, then uncond)
    seed: int = 0
    output: Callable | None = None  # pipeline output -> tensor; default: `.images` / `.frames`
    extra_kwargs: dict = dataclasses.field(default_factory=lambda: {"output_type": "latent"})

    def __post_init__(self):
        self.pipe.set_progress_bar_config(disable=True)

    def __call__(self, variant: str = "first") -> torch.Tensor:
        """Run the pipeline on one of its inputs with a fresh generator; returns the final latents."""
        kwargs = dict(self.calls[variant], **self.extra_kwargs)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        with torch.no_grad():
            out = self.pipe(generator=generator, **kwargs)
        if self.output is not None:
            return self.output(self.pipe, out)
        for attr in ("images", "frames"):
            if hasattr(out, attr):
                return getattr(out, attr)
        raise TypeError(f"{self.name}: unknown pipeline output {type(out).__name__}")


def _randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


def _embeds(seed: int, batch: int, tokens: int, dim: int) -> torch.Tensor:
    return _randn(torch.Generator().manual_seed(seed), batch, tokens, dim)


def _mask(batch: int, tokens: int, valid: int | None = None) -> torch.Tensor:
    """An attention mask over the prompt tokens: the first `valid` tokens are real, the rest padding."""
    m = torch.zeros(batch, tokens, dtype=torch.long)
    m[:, : tokens if valid is None else valid] = 1
    return m


def _eval_fp32(model):
    """Models are built in fp32 (the default dtype); inference only."""
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


# ----------------------------------------------------------------------------------------------- PixArt-Sigma
def pixart_sigma(seed: int = 0) -> TinyPipeline:
    """PixArt-Sigma with DPM-Solver++. No VAE: vae_scale_factor 8, so 64 px = an 8x8 latent = 4 token rows."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ))
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())

    def prompt(batch, seed_):
        return dict(prompt_embeds=_embeds(seed_, batch, 6, 12), prompt_attention_mask=_mask(batch, 6, 5),
                    negative_prompt_embeds=_embeds(seed_ + 100, batch, 6, 12),
                    negative_prompt_attention_mask=_mask(batch, 6, 2))

    base = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=4.5, use_resolution_binning=False,
                negative_prompt=None)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=96, width=64, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("PixArtSigmaPipeline", pipe, calls, {}, max_patches=4, seed=seed)


# ----------------------------------------------------------------------------------------------- SD3
def sd3(seed: int = 0) -> TinyPipeline:
    """SD3 with flow-match Euler. Joint attention over [image | text]; CFG as a batch of 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = _eval_fp32(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)

    def prompt(batch, seed_):
        g = torch.Generator().manual_seed(seed_)
        return dict(prompt_embeds=_randn(g, batch, 6, 32), pooled_prompt_embeds=_randn(g, batch, 16),
                    negative_prompt_embeds=_randn(g, batch, 6, 32), negative_pooled_prompt_embeds=_randn(g, batch, 16))

    base = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=96, width=64, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("StableDiffusion3Pipeline", pipe, calls, {}, max_patches=4, seed=seed)


# ----------------------------------------------------------------------------------------------- Flux
def flux(seed: int = 0) -> TinyPipeline:
    """Flux (no guidance embedding, like FLUX.1-schnell) with true CFG: `true_cfg_scale > 1` and negative prompt
    embeds make the pipeline call the transformer twice per step ("cond", then "uncond"). "guidance_off" drops
    true CFG (one call per step). No VAE: 64 px = an 8x8 latent packed into 4x4 tokens = 4 token rows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)

    def prompt(batch, seed_, cfg=True):
        g = torch.Generator().manual_seed(seed_)
        kw = dict(prompt_embeds=_randn(g, batch, 6, 32), pooled_prompt_embeds=_randn(g, batch, 16))
        neg = dict(negative_prompt_embeds=_randn(g, batch, 6, 32), negative_pooled_prompt_embeds=_randn(g, batch, 16))
        return dict(kw, **neg, true_cfg_scale=4.0) if cfg else kw

    base = dict(height=64, width=64, num_inference_steps=STEPS, max_sequence_length=6)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=96, width=64, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, **prompt(1, 1, cfg=False)),
    }
    return TinyPipeline("FluxPipeline", pipe, calls, {}, max_patches=4, two_calls=True, seed=seed)


# ----------------------------------------------------------------------------------------------- Wan
def wan(seed: int = 0) -> TinyPipeline:
    """Wan 2.1 with UniPC (flow prediction); guidance_scale > 1 runs CFG as two transformer calls per step.
    No VAE: temporal factor 4, spatial 8, so 13 frames of 32x32 px = a [1, 4, 4, 4, 4] latent (4 latent frames:
    PipeFusion bands are whole frames, so M <= 4)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)

    def prompt(batch, seed_):
        return dict(prompt_embeds=_embeds(seed_, batch, 6, 16),
                    negative_prompt_embeds=_embeds(seed_ + 100, batch, 6, 16))

    base = dict(height=32, width=32, num_frames=13, num_inference_steps=STEPS, guidance_scale=5.0)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=48, width=32, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("WanPipeline", pipe, calls, {}, max_patches=4, two_calls=True, seed=seed)


# ----------------------------------------------------------------------------------------------- CogVideoX
def cogvideox(seed: int = 0) -> TinyPipeline:
    """CogVideoX (sin-cos positional embeddings) with CogVideoX-DDIM. Latents are [B, F, C, H, W] (token rows =
    latent frames, `token_axis=1`). The config's sample size is the first input's latent size; the second
    resolution makes the model rebuild its positional table (in place) for the new grid."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=13, patch_size=2,
        max_text_seq_length=6, use_rotary_positional_embeddings=False,
    ))
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())

    def prompt(batch, seed_):
        return dict(prompt_embeds=_embeds(seed_, batch, 6, 32),
                    negative_prompt_embeds=_embeds(seed_ + 100, batch, 6, 32))

    base = dict(height=64, width=64, num_frames=13, num_inference_steps=STEPS, guidance_scale=6.0,
                max_sequence_length=6)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=48, width=64, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("CogVideoXPipeline", pipe, calls, {"token_axis": 1}, max_patches=4, seed=seed)


# ----------------------------------------------------------------------------------------------- LTX-Video
def ltx(seed: int = 0) -> TinyPipeline:
    """LTX-Video with flow-match Euler. No VAE: spatial factor 32, temporal 8, so 9 frames of 128x128 px = 2 x 4 x 4
    packed tokens [B, 32, C]. The pipeline passes `rope_interpolation_scale`, so the model scales its RoPE grid
    in place."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=12,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
        max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)

    def prompt(batch, seed_):
        return dict(prompt_embeds=_embeds(seed_, batch, 5, 12), prompt_attention_mask=_mask(batch, 5, 4),
                    negative_prompt_embeds=_embeds(seed_ + 100, batch, 5, 12),
                    negative_prompt_attention_mask=_mask(batch, 5, 2))

    base = dict(height=128, width=128, num_frames=9, num_inference_steps=STEPS, guidance_scale=3.0,
                max_sequence_length=5)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=192, width=128, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("LTXPipeline", pipe, calls, {}, max_patches=4, seed=seed)


# ----------------------------------------------------------------------------------------------- DiT
class _RecordingDecoder:
    """Wraps a VAE's `decode` (instance attribute, the pipeline is unchanged) to keep its input: DiTPipeline has no
    latent output type, so the final latents (times 1 / scaling_factor) are read here."""

    def __init__(self, vae):
        self.decode, self.latents = vae.decode, None
        vae.decode = self

    def __call__(self, latents, *args, **kwargs):
        self.latents = latents.detach().clone()
        return self.decode(latents, *args, **kwargs)


def dit(seed: int = 0) -> TinyPipeline:
    """DiT (class labels) with DDIM. The latent size is the transformer's `sample_size` (the pipeline has no
    height/width), so it has no "second_resolution" input. The null class for guidance is 1000, so the label
    table has 1000 classes."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = _eval_fp32(DiTTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ))
    vae = _eval_fp32(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=8,
    ))
    recorder = _RecordingDecoder(vae)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())

    base = dict(num_inference_steps=STEPS, guidance_scale=4.0)
    calls = {
        "first": dict(base, class_labels=[7]),
        "batch2": dict(base, class_labels=[3, 5]),
        "guidance_off": dict(base, guidance_scale=1.0, class_labels=[7]),
    }
    return TinyPipeline("DiTPipeline", pipe, calls, {}, max_patches=4, seed=seed,
                        output=lambda pipe, out: recorder.latents, extra_kwargs={"output_type": "pt"})


# ----------------------------------------------------------------------------------------------- HunyuanDiT
def hunyuan_dit(seed: int = 0) -> TinyPipeline:
    """HunyuanDiT with DDPM (as shipped; its step noise comes from the pipeline's generator). Two prompt streams
    (CLIP-like of 5 tokens, T5-like of 6), long skip connections, 2-D RoPE computed by the pipeline."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    torch.manual_seed(seed)
    transformer = _eval_fp32(HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, patch_size=2, sample_size=8, hidden_size=32,
        num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=16, text_len=5, text_len_t5=6, use_style_cond_and_image_meta_size=True,
    ))
    pipe = HunyuanDiTPipeline(vae=None, text_encoder=None, tokenizer=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=None, tokenizer_2=None)

    def prompt(batch, seed_):
        g = torch.Generator().manual_seed(seed_)
        return dict(
            prompt_embeds=_randn(g, batch, 5, 32), prompt_attention_mask=_mask(batch, 5, 4),
            prompt_embeds_2=_randn(g, batch, 6, 32), prompt_attention_mask_2=_mask(batch, 6, 5),
            negative_prompt_embeds=_randn(g, batch, 5, 32), negative_prompt_attention_mask=_mask(batch, 5, 2),
            negative_prompt_embeds_2=_randn(g, batch, 6, 32), negative_prompt_attention_mask_2=_mask(batch, 6, 3),
        )

    base = dict(height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, use_resolution_binning=False)
    calls = {
        "first": dict(base, **prompt(1, 1)),
        "second_resolution": dict(base, height=96, width=64, **prompt(1, 1)),
        "batch2": dict(base, **prompt(2, 2)),
        "guidance_off": dict(base, guidance_scale=1.0, **prompt(1, 1)),
    }
    return TinyPipeline("HunyuanDiTPipeline", pipe, calls, {}, max_patches=4, seed=seed)


FACTORIES: dict[str, Callable[..., TinyPipeline]] = {
    "pixart_sigma": pixart_sigma,
    "sd3": sd3,
    "flux": flux,
    "wan": wan,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "dit": dit,
    "hunyuan_dit": hunyuan_dit,
}


# ----------------------------------------------------------------------------------------------- two call streams
class SeparateCopies(torch.nn.Module):
    """Stands in for a transformer that a pipeline calls twice per step (conditional, then unconditional): the
    conditional call goes to `cond`, the unconditional one to `uncond`, alternating per call. Everything else the
    pipeline reads from its transformer (config, dtype, device, cache_context, model attributes) comes from `cond`.

    Where the pipeline names the call (`with transformer.cache_context("cond")`), the name must match the copy
    the alternation picks, so a pipeline that does not alternate cond / uncond fails loudly here."""

    def __init__(self, cond: torch.nn.Module, uncond: torch.nn.Module):
        super().__init__()
        self.copies = torch.nn.ModuleList([cond, uncond])
        self.calls = 0
        self.context: str | None = None

    def forward(self, *args, **kwargs):
        index = self.calls % 2
        if self.context is not None and self.context != ("cond", "uncond")[index]:
            raise AssertionError(f"call {self.calls} is {self.context!r} but the alternation expects copy {index}")
        self.calls += 1
        return self.copies[index](*args, **kwargs)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        self.context = name
        with self.copies[self.calls % 2].cache_context(name, **kwargs):
            try:
                yield
            finally:
                self.context = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            copies = self.__dict__["_modules"]["copies"]
            return getattr(copies[0], name)
