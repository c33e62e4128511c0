"""A toy DiT whose joint [text | image] sequence is written into a zero buffer (the class of Lumina2).

    prepare:   patchify the latent, prompt lengths from the mask by `.tolist()` (a graph break: the rest of
               forward is dynamo's resume function, the patchified latent and the table an element of its
               `___stack0`), a joint positional table [B, L + S, D]
    joint:     joint = x.new_zeros(B, L + S, D); per sample i: joint[i, :L] = txt[i, :L]; joint[i, L:] = x[i]
               (or the image first; or both writes for all samples at once)
    blocks:    self-attention over the joint sequence with the positional table added to q and k, an MLP
    readback:  torch.stack([unpatchify(out[i, L:L + S]) for i in range(B)])

With prompt masks of different lengths the buffer keeps zeros after the shorter prompt (padding): not a
concatenation, refused.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZE, PATCH, CHANNELS, DIM, HEADS, TEXT, TEXT_DIM = 16, 2, 4, 32, 2, 6, 12


def _table(positions: int, dim: int) -> torch.Tensor:
    angles = torch.arange(positions, dtype=torch.float32)[:, None] / 10000 ** (torch.arange(dim) / dim)
    return torch.sin(angles) * 0.1


class Block(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mod = nn.Linear(dim, dim)

    def forward(self, x, pos, temb):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x) * (1 + self.mod(temb)[:, None])).chunk(3, dim=-1)
        q, k = q + pos, k + pos
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class BufferJointDiT(nn.Module):
    """See the module docstring. `order`: "text_first" or "image_first"; `writes`: "per_sample" (lengths from
    the mask, a graph break) or "batched" (`joint[:, :L] = txt`, no break)."""

    def __init__(self, order: str = "text_first", writes: str = "per_sample", layers: int = 2):
        super().__init__()
        self.order, self.writes = order, writes
        self.config = SimpleNamespace(patch_size=PATCH)  # what the eager reference reads
        self.embed = nn.Linear(PATCH * PATCH * CHANNELS, DIM)
        self.context = nn.Linear(TEXT_DIM, DIM)
        self.time = nn.Linear(1, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.out = nn.Linear(DIM, PATCH * PATCH * CHANNELS)

    def prepare(self, hidden_states, mask):
        b, c, h, w = hidden_states.shape
        p = PATCH
        x = hidden_states.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        lengths = mask.sum(dim=1).tolist() if self.writes == "per_sample" else [mask.shape[1]] * b
        total = max(lengths) + x.shape[1]
        pos = _table(total, DIM).to(x.dtype).expand(b, total, DIM).clone()
        return x, pos, lengths

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        b, c, h, w = hidden_states.shape
        x, pos, lengths = self.prepare(hidden_states, encoder_attention_mask)
        x = self.embed(x)
        txt = self.context(encoder_hidden_states)
        temb = self.time(timestep.float()[:, None] / 1000)
        s, d = x.shape[1], x.shape[2]
        joint = x.new_zeros(b, pos.shape[1], d)
        text_at = (lambda n: slice(0, n)) if self.order == "text_first" else (lambda n: slice(s, s + n))
        image_at = (lambda n: slice(n, n + s)) if self.order == "text_first" else (lambda n: slice(0, s))
        if self.writes == "batched":
            n = lengths[0]
            joint[:, text_at(n)] = txt[:, :n]
            joint[:, image_at(n)] = x
        else:
            for i, n in enumerate(lengths):
                joint[i, text_at(n)] = txt[i, :n]
                joint[i, image_at(n)] = x[i]
        for block in self.blocks:
            joint = block(joint, pos, temb)
        out = self.out(joint)
        p = PATCH
        samples = []
        for i, n in enumerate(lengths):
            part = out[i][image_at(n)].view(h // p, w // p, p, p, c)
            samples.append(part.permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
        image = torch.stack(samples)
        return image if return_dict else (image,)


def make_buffer_joint_dit(order: str = "text_first", writes: str = "per_sample", valid=(TEXT, TEXT)):
    torch.manual_seed(0)
    model = BufferJointDiT(order, writes).eval()
    mask = torch.zeros(len(valid), TEXT, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(2, CHANNELS, SIZE, SIZE, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, TEXT, TEXT_DIM, generator=g), encoder_attention_mask=mask)
    return model, kwargs

