"""Hand-written DiTs with a second token stream in its own tensor (LTX-2's audio, register tokens): the
stream starts GLOBAL (it depends on no image token), its queries attend over the image keys (it becomes a
token group of its own, the TAIL piece), and image queries attend over its keys, whose output is added back
to the image tokens.

`make_register_stream_dit(order)`: 4 register tokens [B, 4, D] (a learned table plus the timestep), 4 blocks
of image self-attention and MLP, plus per block
    "registers_first": registers over the image (register queries), then the image over the registers;
    "image_first":     the image over the registers first (in block 0 the registers are still GLOBAL: plain
                       cross-attention), then registers over the image;
and a register self-attention and MLP (the stream's own layers). Latents 16x16, patch 2, 8 token rows.
`return_registers`: the forward returns (prediction, the registers' own output [B, 4, D]) as LTX-2 returns
its audio; `masked`: the register queries over the image use a (GLOBAL, all-true) key mask.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from handwritten_dits import (BATCH, CHANNELS, DEPTH, DIM, HEADS, PATCH, SIZE, FinalLayer, Mlp, TimestepEmbedder,
                              _out, modulate, unpatchify)

REGISTERS = 4


def _heads(x, heads):
    B, S, C = x.shape
    return x.view(B, S, heads, C // heads).transpose(1, 2)


def _merge(o):
    B, H, S, D = o.shape
    return o.transpose(1, 2).reshape(B, S, H * D)


class CrossAttention(nn.Module):
    """Queries from one stream, keys and values from another."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx, mask=None):
        k, v = self.kv(ctx).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(_heads(self.q(x), self.heads), _heads(k, self.heads),
                                           _heads(v, self.heads), attn_mask=mask)
        return self.proj(_merge(o))


class SelfAttention(CrossAttention):
    def forward(self, x):
        return super().forward(x, x)


class StreamBlock(nn.Module):
    def __init__(self, dim, heads, order, masked=False):
        super().__init__()
        self.order, self.masked = order, masked
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads)
        self.reg_attn = SelfAttention(dim, heads)
        self.reg_to_img = CrossAttention(dim, heads)   # register queries over image keys
        self.img_to_reg = CrossAttention(dim, heads)   # image queries over register keys
        self.mlp = Mlp(dim, 2 * dim)
        self.reg_mlp = Mlp(dim, 2 * dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))

    def forward(self, x, reg, c):
        shift, scale, gate, gate2 = self.mod(c).chunk(4, dim=1)
        x = x + gate.unsqueeze(1) * self.attn(modulate(self.norm(x), shift, scale))
        reg = reg + self.reg_attn(self.norm(reg))
        nx, nreg = self.norm(x), self.norm(reg)
        mask = x.new_ones(reg.shape[1], x.shape[1], dtype=torch.bool) if self.masked else None
        if self.order == "registers_first":
            reg = reg + self.reg_to_img(nreg, nx, mask)
            x = x + self.img_to_reg(nx, self.norm(reg))
        else:
            x = x + self.img_to_reg(nx, nreg)
            reg = reg + self.reg_to_img(nreg, nx, mask)
        x = x + gate2.unsqueeze(1) * self.mlp(self.norm(x))
        return x, reg + self.reg_mlp(self.norm(reg))


class RegisterStreamDiT(nn.Module):
    def __init__(self, order="registers_first", size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH,
                 heads=HEADS, registers=REGISTERS, return_registers=False, masked=False):
        super().__init__()
        self.patch, self.channels, self.return_registers = patch, channels, return_registers
        self.config = SimpleNamespace(patch_size=patch)
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.registers = nn.Parameter(torch.randn(1, registers, dim))
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(StreamBlock(dim, heads, order, masked) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, channels)
        self.reg_out = nn.Linear(dim, dim)

    def forward(self, hidden_states, timestep, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos
        c = self.t_embedder(timestep)
        reg = self.registers.expand(x.shape[0], -1, -1) + c.unsqueeze(1)
        for block in self.blocks:
            x, reg = block(x, reg, c)
        out = unpatchify(self.final_layer(x, c), self.patch, self.channels, h, w)
        if self.return_registers:
            return out, self.reg_out(reg)
        return _out(out, return_dict)


def make_register_stream_dit(order="registers_first", **options):
    torch.manual_seed(0)
    model = RegisterStreamDiT(order, **options)
    return model.eval(), dict(hidden_states=torch.randn(BATCH, CHANNELS, SIZE, SIZE),
                              timestep=torch.full((BATCH,), 500, dtype=torch.int64))
