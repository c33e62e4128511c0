"""A small DiT written here, whose blocks differ in cost (for partition tests and the CLI's module:function)."""
from __future__ import annotations

from types import SimpleNamespace

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
        self.config = SimpleNamespace(patch_size=patch)  # what the eager reference reads, as on diffusers models

    def forward(self, hidden_states, return_dict=True):
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x)
        return self.unpatchify(x, hidden_states.shape, return_dict)

    def unpatchify(self, x, shape, return_dict):
        b, c, h, w = shape
        p = self.patch
        x = self.out(x).reshape(b, h // p, w // p, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return x if return_dict else (x,)


def make_toy(ff_mults=(1, 1, 1, 1, 1, 12), size=16):
    torch.manual_seed(0)
    return ToyDiT(ff_mults=tuple(ff_mults)).eval(), {"hidden_states": torch.randn(1, 4, size, size)}


class ToyDiTWithGraphBreak(ToyDiT):
    """The same model with a graph break in the middle of the blocks (as `.item()` would cause)."""

    def forward(self, hidden_states, return_dict=True):
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for i, blk in enumerate(self.blocks):
            if i == len(self.blocks) // 2:
                torch._dynamo.graph_break()
            x = blk(x)
        return self.unpatchify(x, hidden_states.shape, return_dict)


class ToyDiTWithSkips(ToyDiT):
    """Long skip connections (as HunyuanDiT's): block 0's output is read again by a middle and the last block,
    so with 3 stages one patch carries two values from stage 0 to stage 1 and one straight to stage 2."""

    def __init__(self):
        super().__init__(ff_mults=(1,) * 6)
        self.freqs = nn.Parameter(torch.randn(16), requires_grad=False)
        self.time = nn.Linear(32, 32)

    def forward(self, hidden_states, timestep=None, return_dict=True):
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        t = timestep.float()[:, None] * self.freqs[None]
        x = x + self.time(torch.cat([t.sin(), t.cos()], dim=-1))[:, None]
        skip = None
        for i, blk in enumerate(self.blocks):
            if i in (3, 5):
                x = x + 0.5 * skip
            x = blk(x)
            if i == 0:
                skip = x
        return self.unpatchify(x, hidden_states.shape, return_dict)


def make_skips(batch=1, **_):
    torch.manual_seed(0)
    return ToyDiTWithSkips().eval(), {"hidden_states": torch.randn(batch, 4, 16, 16),
                                      "timestep": torch.full((batch,), 500)}


class ToyDiTCountingCalls(ToyDiT):
    """Writes into its own buffer in place on every call (`calls += 1`) and scales every block's input by
    the count: a write that is not idempotent and is read by every stage, so applying it twice per call, or
    not at all, changes the result."""

    def __init__(self):
        super().__init__(ff_mults=(1,) * 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, hidden_states, return_dict=True):
        self.calls.add_(1)
        scale = 1 + 0.1 * self.calls
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            x = blk(x * scale)
        return self.unpatchify(x, hidden_states.shape, return_dict)


class ToyDiTWritingItsTable(ToyDiT):
    """Builds a positional table in the graph and fills part of it in place (as LTX-Video's RoPE grid and
    CogVideoX's joint table at a new resolution): the write has no users, only the table is read."""

    def __init__(self):
        super().__init__(ff_mults=(1,) * 4)

    def forward(self, hidden_states, return_dict=True):
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        table = x.new_zeros(1, x.shape[1], x.shape[2])
        rows = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None]
        table.data[:, :, : x.shape[2] // 2].copy_(torch.sin(rows / 7).expand(1, -1, x.shape[2] // 2))
        table[:, :, x.shape[2] // 2:] = torch.cos(rows / 5)
        x = x + table
        for blk in self.blocks:
            x = blk(x)
        return self.unpatchify(x, hidden_states.shape, return_dict)
