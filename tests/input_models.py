"""Toy DiTs in plain PyTorch whose image input is laid out unlike their output (for tests/test_inputs.py).

Each model takes `(hidden_states, timestep, context)` and has `to_input(out)`, which maps an output back to
the input's layout (a sampling loop's update `x = x + c * to_input(out)`), and `layout()`: (token rows, tokens
per row in the attention sequence, output axis of the rows, output elements per row) for the eager reference:

    PackedInUnpackedOut   [B, h * w, p * p * C]  -> [B, C, h * p, w * p]   (Flux-style packed latents in)
    UnpackedInPackedOut   [B, C, H, W]           -> [B, H/p * W/p, p * p * C] (unpatchify left to the pipeline)
    FramesFirst           [B, F, C, H, W]        -> [B, F, C, H, W]        (CogVideoX layout: token axis 1)
    ChannelsFirstVideo    [B, C, F, H, W]        -> [B, C, F, H, W]        (Wan layout, a conv3d patch embedding)
    OutputWithExtraDim    [B, C, H, W]           -> [B, 2, C, H, W]        (two heads stacked on a new dim)
    ListLatent            [[C, H, W]] * B        -> [B, C, H, W]           (a list of per-sample latents)
    ListTokensCat         [[C, H, W]] * B        -> [[C, H, W]] * B        (per-sample patchify, the samples'
                                                                            tokens concatenated on the token axis)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, CONTEXT = 32, 2, (5, 12)


def timestep_embedding(t: torch.Tensor, dim: int = DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """Self-attention over the tokens, cross-attention to the context, MLP; timestep added to the tokens."""

    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q, self.kv, self.cross_proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, d = t.shape
        return t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, h, s, d = t.shape
        return t.transpose(1, 2).reshape(b, s, h * d)

    def forward(self, x, temb, context):
        q, k, v = self.qkv(self.norm1(x) + temb[:, None]).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v))
        x = x + self.proj(self.merge_heads(a))
        ck, cv = self.kv(context).chunk(2, dim=-1)
        a = F.scaled_dot_product_attention(self.split_heads(self.q(self.norm2(x))), self.split_heads(ck),
                                           self.split_heads(cv))
        x = x + self.cross_proj(self.merge_heads(a))
        return x + self.mlp(self.norm3(x))


class _Trunk(nn.Module):
    def __init__(self, layers: int = 4):
        super().__init__()
        self.time = nn.Linear(DIM, DIM)
        self.context = nn.Linear(CONTEXT[1], DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))

    def run(self, tokens, timestep, context):
        temb = self.time(timestep_embedding(timestep))
        ctx = self.context(context)
        for block in self.blocks:
            tokens = block(tokens, temb, ctx)
        return tokens


class PackedInUnpackedOut(_Trunk):
    """Packed [B, h * w, p * p * C] in (raster order), unpacked [B, C, h * p, w * p] out."""

    def __init__(self, h: int = 4, w: int = 6, p: int = 2, channels: int = 4):
        super().__init__()
        self.h, self.w, self.p, self.c = h, w, p, channels
        self.embed = nn.Linear(p * p * channels, DIM)
        self.out = nn.Linear(DIM, p * p * channels)

    def example(self, batch: int = 1):
        return torch.randn(batch, self.h * self.w, self.p * self.p * self.c)

    def forward(self, hidden_states, timestep, context):
        b = hidden_states.shape[0]
        t = self.out(self.run(self.embed(hidden_states), timestep, context))
        t = t.reshape(b, self.h, self.w, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, self.c, self.h * self.p, self.w * self.p)

    def layout(self):
        return (self.h, self.w, 2, self.p)

    def to_input(self, out):
        b = out.shape[0]
        t = out.reshape(b, self.c, self.h, self.p, self.w, self.p).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(b, self.h * self.w, self.p * self.p * self.c)


class UnpackedInPackedOut(_Trunk):
    """[B, C, H, W] in, patch-embedded by a conv; packed [B, H/p * W/p, p * p * C] out (no unpatchify)."""

    def __init__(self, height: int = 8, width: int = 12, p: int = 2, channels: int = 4):
        super().__init__()
        self.height, self.width, self.p, self.c = height, width, p, channels
        self.embed = nn.Conv2d(channels, DIM, p, stride=p)
        self.out = nn.Linear(DIM, p * p * channels)

    def example(self, batch: int = 1):
        return torch.randn(batch, self.c, self.height, self.width)

    def forward(self, hidden_states, timestep, context):
        tokens = self.embed(hidden_states).flatten(2).transpose(1, 2)
        return self.out(self.run(tokens, timestep, context))

    def layout(self):
        return (self.height // self.p, self.width // self.p, 1, self.width // self.p)

    def to_input(self, out):
        b, h, w, p = out.shape[0], self.height // self.p, self.width // self.p, self.p
        t = out.reshape(b, h, w, p, p, self.c).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, self.c, self.height, self.width)


class FramesFirst(_Trunk):
    """Video latents [B, F, C, H, W] (frames before channels, as CogVideoX): a per-frame patch-embedding conv
    over [B * F, C, H, W], tokens frame-major, the same layout out."""

    def __init__(self, frames: int = 4, channels: int = 6, size: int = 8, p: int = 2):
        super().__init__()
        self.f, self.c, self.size, self.p = frames, channels, size, p
        self.embed = nn.Conv2d(channels, DIM, p, stride=p)
        self.out = nn.Linear(DIM, p * p * channels)

    def example(self, batch: int = 1):
        return torch.randn(batch, self.f, self.c, self.size, self.size)

    def forward(self, hidden_states, timestep, context):
        b, f, c, hh, ww = hidden_states.shape
        g, p = hh // self.p, self.p
        t = self.embed(hidden_states.reshape(b * f, c, hh, ww))           # [B * F, D, g, g]
        t = t.reshape(b, f, DIM, g * g).transpose(2, 3).reshape(b, f * g * g, DIM)
        t = self.out(self.run(t, timestep, context))
        t = t.reshape(b, f, g, g, p, p, c).permute(0, 1, 6, 2, 4, 3, 5)
        return t.reshape(b, f, c, hh, ww)

    def layout(self):
        return (self.f, (self.size // self.p) ** 2, 1, 1)

    def to_input(self, out):
        return out


class ChannelsFirstVideo(_Trunk):
    """Video latents [B, C, F, H, W] (channels before frames, as Wan or HunyuanVideo): a conv3d patch embedding
    with patch (1, p, p) plus a learned per-token table, tokens frame-major then row-major, the same layout out.
    With one frame its token rows are the H / p rows; with fewer frames than patches, the rows of every frame
    (a patch: the same rows of each frame); else the frames."""

    def __init__(self, frames: int = 1, channels: int = 4, height: int = 8, width: int = 12, p: int = 2):
        super().__init__()
        self.f, self.c, self.height, self.width, self.p = frames, channels, height, width, p
        self.embed = nn.Conv3d(channels, DIM, (1, p, p), stride=(1, p, p))
        self.pos = nn.Parameter(0.1 * torch.randn(1, frames * (height // p) * (width // p), DIM))
        self.out = nn.Linear(DIM, p * p * channels)

    def example(self, batch: int = 1):
        return torch.randn(batch, self.c, self.f, self.height, self.width)

    def forward(self, hidden_states, timestep, context):
        b = hidden_states.shape[0]
        h, w, p = self.height // self.p, self.width // self.p, self.p
        tokens = self.embed(hidden_states).flatten(2).transpose(1, 2) + self.pos     # [B, F * h * w, D]
        t = self.out(self.run(tokens, timestep, context))
        t = t.reshape(b, self.f, h, w, p, p, self.c).permute(0, 6, 1, 2, 4, 3, 5)
        return t.reshape(b, self.c, self.f, self.height, self.width)

    def layout(self, patches: int = 4):
        h, w = self.height // self.p, self.width // self.p
        if self.f == 1:
            return (h, w, 3, self.p)
        return (self.f, h * w, 2, 1) if self.f >= patches else (h, w, 3, self.p, self.f)

    def to_input(self, out):
        return out


class OutputWithExtraDim(UnpackedInPackedOut):
    """[B, C, H, W] in, [B, 2, C, H, W] out: two predictions stacked on a dim the input does not have."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.out = nn.Linear(DIM, 2 * self.p * self.p * self.c)

    def forward(self, hidden_states, timestep, context):
        b = hidden_states.shape[0]
        h, w, p = self.height // self.p, self.width // self.p, self.p
        tokens = self.embed(hidden_states).flatten(2).transpose(1, 2)
        t = self.out(self.run(tokens, timestep, context))
        t = t.reshape(b, h, w, 2, p, p, self.c).permute(0, 3, 6, 1, 4, 2, 5)
        return t.reshape(b, 2, self.c, self.height, self.width)

    def layout(self):
        return (self.height // self.p, self.width // self.p, 3, self.p)

    def to_input(self, out):
        return out[:, 0]


class ListLatent(UnpackedInPackedOut):
    """The latent as a list of per-sample [C, H, W] tensors, stacked inside forward; [B, C, H, W] out."""

    def example(self, batch: int = 2):
        return list(torch.randn(batch, self.c, self.height, self.width).unbind(0))

    def forward(self, hidden_states, timestep, context):
        x = torch.stack(hidden_states)
        return super().to_input(super().forward(x, timestep, context))

    def layout(self):
        return (self.height // self.p, self.width // self.p, 2, self.p)   # of the [B, C, H, W] output


class ListTokensCat(_Trunk):
    """A list of per-sample [C, H, W] latents, each patchified on its own to [h * w, p * p * C] tokens; the
    samples' tokens concatenated along the token axis ([B * S, D]: sample-major, as Z-Image embeds them), a
    per-token table tiled per sample added there, split back per sample and batched by pad_sequence (all of
    one length: a stack); a list of per-sample [C, H, W] out, each unpatchified on its own. Any resolution."""

    def __init__(self, height: int = 8, width: int = 12, p: int = 2, channels: int = 4):
        super().__init__()
        self.height, self.width, self.p, self.c = height, width, p, channels
        self.h, self.w = height // p, width // p
        self.embed = nn.Linear(p * p * channels, DIM)
        self.out = nn.Linear(DIM, p * p * channels)

    def example(self, batch: int = 2, height: int | None = None, width: int | None = None):
        return list(torch.randn(batch, self.c, height or self.height, width or self.width).unbind(0))

    def patchify(self, x):
        c, hh, ww = x.shape
        p = self.p
        t = x.view(c, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0)
        return t.reshape((hh // p) * (ww // p), p * p * c)

    def unpatchify(self, t, hh, ww):
        c, p = self.c, self.p
        return t.view(hh // p, ww // p, p, p, c).permute(4, 0, 2, 1, 3).reshape(c, hh, ww)

    def forward(self, hidden_states, timestep, context):
        _, hh, ww = hidden_states[0].shape
        s = (hh // self.p) * (ww // self.p)
        x = self.embed(torch.cat([self.patchify(x) for x in hidden_states], dim=0))   # [B * S, D]
        pos = torch.sin(torch.arange(s, dtype=torch.float32)[:, None] / (1.0 + torch.arange(DIM)))  # [S, D]
        x = x + pos.repeat(len(hidden_states), 1)
        x = torch.nn.utils.rnn.pad_sequence(list(x.split([s] * len(hidden_states), dim=0)), batch_first=True)
        t = self.out(self.run(x, timestep, context))                                   # [B, S, p * p * C]
        return [self.unpatchify(y, hh, ww) for y in t.unbind(0)]

    def layout(self):
        return (self.h, self.w, 1, self.p)   # of each output element [C, H, W]


class PackedWithRotaryTuple(PackedInUnpackedOut):
    """PackedInUnpackedOut with a rotary (cos, sin) tuple argument of [S, DIM] tables (the GlmImage and Lumina2
    block graphs after a graph break): a list argument whose elements look like one sample's tokens."""

    def forward(self, hidden_states, timestep, context, rotary=None):
        cos, sin = rotary
        b = hidden_states.shape[0]
        tokens = self.embed(hidden_states)
        tokens = tokens * cos + sin
        t = self.out(self.run(tokens, timestep, context))
        t = t.reshape(b, self.h, self.w, self.p, self.p, self.c).permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, self.c, self.h * self.p, self.w * self.p)

    def rotary(self):
        angles = torch.arange(self.h * self.w, dtype=torch.float32)[:, None] / (1 + torch.arange(DIM))
        return angles.cos(), angles.sin()


MODELS = {"packed_in": PackedInUnpackedOut, "packed_out": UnpackedInPackedOut, "frames_first": FramesFirst,
          "extra_dim": OutputWithExtraDim, "one_frame": ChannelsFirstVideo,
          "two_frames": lambda: ChannelsFirstVideo(frames=2),
          "four_frames": lambda: ChannelsFirstVideo(frames=4)}


def make(name: str, seed: int = 0, batch: int = 1):
    """(model, hidden_states, context) for one of MODELS."""
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    return model, model.example(batch), torch.randn(batch, *CONTEXT)
