"""A small DiT written here, whose blocks differ in cost (for partition tests and the CLI's module:function)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, ff_mult * dim)
        self.ff2 = nn.Linear(ff_mult * dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.ff2(F.gelu(self.ff1(self.norm2(x))))


class ToyDiT(nn.Module):
    """Latent [B, C, H, W] -> patch embed -> blocks -> unpatchify, with per-block FF widths."""

    def __init__(self, channels=4, dim=32, heads=2, patch=2, ff_mults=(1, 1, 1, 1, 1, 12)):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.blocks = nn.ModuleList(Block(dim, heads, m) for m in ff_mults)
        self.out = nn.Linear(dim, patch * patch * channels)
        self.channels = channels

    def forward(self, hidden_states):
        b, c, h, w = hidden_states.shape
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        p = self.patch
        x = self.out(x).reshape(b, h // p, w // p, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def make_toy(ff_mults=(1, 1, 1, 1, 1, 12), size=16):
    torch.manual_seed(0)
    return ToyDiT(ff_mults=tuple(ff_mults)).eval(), {"hidden_states": torch.randn(1, 4, size, size)}
