"""Plain-PyTorch models whose transformer blocks sit after a graph break and receive one joint token sequence.

`JointInputDiT`: the first graph embeds the image, concatenates it with other tokens (learned register
tokens and a time token, before or after the image) and builds the per-joint-token tables (RoPE cos/sin
[S, d], an additive attention mask [B, 1, S, S]); `torch._dynamo.graph_break()` ends it; the second graph
holds the blocks and gets `[others | image]` (or `[image | others]`) as a single input, slices the image
part off at the end and unpatchifies it: the layout of OmniGen's block graph.

`ContextRefiner`: a graph whose only self-attention is over the prompt, returned inside a joint context
`[image-embedding tokens | refined prompt]` next to the packed latent (Framepack's first graph).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, dim)

    def forward(self, h, temb, cos, sin, mask):
        q, k, v = self.qkv(self.norm1(h)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        h = h + self.proj(a)
        return h + self.mlp(self.norm2(h)) * (1 + self.mod(temb))[:, None]


class JointInputDiT(nn.Module):
    """[B, 4, H, W] -> tokens; [registers | time token | image] (or the image first); a graph break; blocks
    over the joint sequence with RoPE and a mask per joint token; the image part -> [B, 4, H, W]."""

    def __init__(self, others_first: bool = True, registers: int = 2, dim: int = 16, heads: int = 2,
                 layers: int = 2, patch: int = 2, image_slice=None):
        super().__init__()
        self.others_first, self.patch, self.image_slice = others_first, patch, image_slice
        self.embed = nn.Conv2d(4, dim, patch, stride=patch)
        self.registers = nn.Parameter(torch.randn(1, registers, dim))
        self.time = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(JointBlock(dim, heads) for _ in range(layers))
        self.out = nn.Linear(dim, patch * patch * 4)
        self.head_dim = dim // heads

    @property
    def other_tokens(self) -> int:
        return self.registers.shape[1] + 1

    def forward(self, hidden_states, timestep, return_dict: bool = True):
        b, c, height, width = hidden_states.shape
        p = self.patch
        image = self.embed(hidden_states).flatten(2).transpose(1, 2)
        n = image.shape[1]
        freqs = torch.arange(self.head_dim, dtype=torch.float32)[None] / self.head_dim
        temb = self.time(torch.sin(timestep.float()[:, None] * (1 + freqs.repeat(1, 2)[:, : image.shape[2]])))
        others = torch.cat([self.registers.expand(b, -1, -1), temb[:, None]], dim=1)
        joint = torch.cat([others, image] if self.others_first else [image, others], dim=1)
        s = joint.shape[1]
        angles = torch.arange(s, dtype=torch.float32)[:, None] * freqs[:, : self.head_dim // 2]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        # the other tokens see each other causally and the image; the image sees everything
        keep = torch.ones(s, s, dtype=torch.bool)
        lo = 0 if self.others_first else n
        others_range = slice(lo, lo + self.other_tokens)
        keep[others_range, others_range] = torch.tril(keep[others_range, others_range])
        mask = torch.zeros(b, 1, s, s).masked_fill(~keep, float("-inf"))
        torch._dynamo.graph_break()
        h = joint
        for block in self.blocks:
            h = block(h, temb, cos, sin, mask)
        if self.image_slice is not None:
            h = h[:, self.image_slice]
        else:
            h = h[:, -n:] if self.others_first else h[:, :n]
        out = self.out(h).reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return (out.reshape(b, c, height, width),)


def make_joint_input_dit(others_first: bool = True, **kw):
    torch.manual_seed(0)
    model = JointInputDiT(others_first, **kw).eval()
    return model, dict(hidden_states=torch.randn(2, 4, 16, 16), timestep=torch.full((2,), 500.0))


class ContextRefiner(nn.Module):
    """Self-attention over the prompt only; returns ([image-embedding tokens | refined prompt], the packed
    latent). No self-attention over the latent: nothing to pipeline."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Conv2d(4, dim, 2, stride=2)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.image_proj = nn.Linear(8, dim)

    def forward(self, hidden_states, prompt, image_embeds):
        q, k, v = self.qkv(prompt).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        refined = prompt + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        context = torch.cat([self.image_proj(image_embeds), refined], dim=1)
        return context, self.embed(hidden_states).flatten(2).transpose(1, 2)
