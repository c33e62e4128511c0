"""Small diffusion transformers written by hand in plain PyTorch, the way research code writes them (no
diffusers model classes): the backend has to find their tokens and attention from the graph alone.

Each model returns `(output,)` when called with `return_dict=False` (as diffusers models do) and has
`config.patch_size` where the eager reference reads the layout from it. Each `make_*()` returns
`(model.eval(), kwargs)`, seeded, fp32, a classifier-free-guidance-like batch of 2, latents 16x16 with patch
2 (8 token rows) unless its docstring says otherwise, 4 blocks, width 32, 2 heads.

The adaLN-Zero layers here are *not* zero-initialised (DiT's training init): at zero every block is the
identity, attention would not matter and stale K/V could not change the result.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, DEPTH, CHANNELS, PATCH, SIZE, BATCH, PROMPT = 32, 2, 4, 4, 2, 16, 2, 6


# ---------------------------------------------------------------------------------------------------------
# shared pieces


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional table [1, h * w, dim] (row-major), as the DiT paper's code builds it."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    table = torch.cat([one_axis(dim // 2, gy), one_axis(dim // 2, gx)], dim=1)
    return table.float()[None]


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """[B, h * w, p * p * c] -> [B, c, h * p, w * p]."""
    x = x.reshape(x.shape[0], h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)


def _out(x, return_dict):
    return x if return_dict else (x,)


# ---------------------------------------------------------------------------------------------------------
# a. timm-style DiT


class Attention(nn.Module):
    """timm's ViT attention: one qkv linear, heads split by reshape/permute/unbind, SDPA."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimmDiT(nn.Module):
    """The DiT paper's model in its code's style: class-conditional, learned sigma (2C output channels)."""

    def __init__(self, input_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, hidden_size=DIM, depth=DEPTH,
                 num_heads=HEADS, num_classes=10):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels
        self.patch_size = patch_size
        self.config = SimpleNamespace(patch_size=patch_size)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # the last class is CFG's null class
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid, grid), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x, h, w):
        c, p = self.out_channels, self.patch_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep) + self.y_embedder(class_labels)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return _out(self.unpatchify(x, h, w), return_dict)


def _class_kwargs(seed_offset=0):
    return dict(hidden_states=torch.randn(BATCH, CHANNELS, SIZE, SIZE),
                timestep=torch.full((BATCH,), 500, dtype=torch.int64),
                class_labels=torch.tensor([3, 10]))  # a class and the null class, as CFG batches them


def _prompt_kwargs():
    return dict(hidden_states=torch.randn(BATCH, CHANNELS, SIZE, SIZE),
                timestep=torch.full((BATCH,), 500, dtype=torch.int64),
                encoder_hidden_states=torch.randn(BATCH, PROMPT, DIM))


def make_timm_dit():
    torch.manual_seed(0)
    model = TimmDiT()
    return model.eval(), _class_kwargs()


# ---------------------------------------------------------------------------------------------------------
# b. hand-written softmax attention (called through this module's globals, so the reference can intercept)


def softmax_attention(q, k, v, scale):
    """[B, H, S, D] attention written out."""
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    x = attn @ v
    return x


def softmax_attention_bmm(q, k, v, scale):
    """[B * H, S, D] attention through baddbmm/bmm (as older diffusers attention processors wrote it)."""
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                           q, k.transpose(-1, -2), beta=0, alpha=scale)
    probs = scores.softmax(dim=-1)
    return torch.bmm(probs, v)


def softmax_attention_einsum(q, k, v, scale):
    """[B, H, S, D] attention through einsum."""
    attn = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    attn = attn.softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


ATTENTION_FNS = {"softmax": "softmax_attention", "bmm": "softmax_attention_bmm", "einsum": "softmax_attention_einsum"}


class ManualAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        if kind not in ATTENTION_FNS:
            raise ValueError(f"attention={kind!r}: expected one of {sorted(ATTENTION_FNS)}")
        self.kind = kind
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (t.view(B, N, H, D).transpose(1, 2) for t in (self.to_q(x), self.to_k(x), self.to_v(x)))
        if self.kind == "bmm":
            q, k, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            o = softmax_attention_bmm(q, k, v, self.scale).view(B, H, N, D)
        elif self.kind == "einsum":
            o = softmax_attention_einsum(q, k, v, self.scale)
        else:
            o = softmax_attention(q, k, v, self.scale)
        return self.to_out(o.transpose(1, 2).reshape(B, N, C))


class ManualBlock(nn.Module):
    def __init__(self, dim, num_heads, kind):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ManualAttention(dim, num_heads, kind)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.time = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb):
        shift, scale = self.time(F.silu(temb)).chunk(2, dim=-1)
        x = x + self.attn(modulate(self.norm1(x), shift, scale))
        return x + self.mlp(self.norm2(x))


class ManualAttentionDiT(nn.Module):
    """Attention as softmax(q @ k^T * scale) @ v, in one of three spellings (`attention`)."""

    def __init__(self, attention="softmax", size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH,
                 heads=HEADS):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(ManualBlock(dim, heads, attention) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch * patch * channels)

    def forward(self, hidden_states, timestep, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        x = self.embed(hidden_states).flatten(2).transpose(1, 2) + self.pos
        temb = self.t_embedder(timestep)
        for block in self.blocks:
            x = block(x, temb)
        x = self.proj_out(self.norm_out(x))
        return _out(unpatchify(x, self.patch, self.channels, h, w), return_dict)


def make_manual_attention_dit(attention="softmax"):
    torch.manual_seed(0)
    model = ManualAttentionDiT(attention=attention)
    return model.eval(), dict(hidden_states=torch.randn(BATCH, CHANNELS, SIZE, SIZE),
                              timestep=torch.full((BATCH,), 500, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# c. nn.MultiheadAttention for self- and cross-attention


class MHABlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.time = nn.Linear(dim, 3 * dim)

    def forward(self, x, context, temb):
        g1, g2, g3 = self.time(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        h = self.norm1(x)
        x = x + (1 + g1) * self.attn(h, h, h, need_weights=False)[0]
        x = x + (1 + g2) * self.cross(self.norm2(x), context, context, need_weights=False)[0]
        return x + (1 + g3) * self.mlp(self.norm3(x))


class MHADiT(nn.Module):
    """Self-attention and cross-attention over a prompt through torch.nn.MultiheadAttention."""

    def __init__(self, size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        grid = size // patch
        self.register_buffer("pos", sincos_2d(dim, grid, grid), persistent=False)
        self.t_embedder = TimestepEmbedder(dim)
        self.context = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(MHABlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch * patch * channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        x = self.embed(hidden_states).flatten(2).transpose(1, 2) + self.pos
        temb = self.t_embedder(timestep)
        context = self.context(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, context, temb)
        x = self.proj_out(self.norm_out(x))
        return _out(unpatchify(x, self.patch, self.channels, h, w), return_dict)


def make_mha_dit():
    torch.manual_seed(0)
    model = MHADiT()
    return model.eval(), _prompt_kwargs()


# ---------------------------------------------------------------------------------------------------------
# d. U-ViT: time and class tokens in front of the image tokens, optional registers after, long skips


class UViTBlock(nn.Module):
    def __init__(self, dim, heads, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Sequence [time token, class token, image tokens (, registers)]: the two global tokens take part in
    every attention like image tokens; a learned positional table over the whole [1, 2 + S, dim]; the
    first half's block outputs are concatenated with the second half's inputs (long skips). `nested`: the
    sequence is built by two concatenations, `cat([time, cat([class, image])])` (as Framepack prepends its
    history latents one resolution at a time)."""

    extras = 2

    def __init__(self, size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH, heads=HEADS,
                 num_classes=10, registers=0, nested=False):
        super().__init__()
        self.nested = nested
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch)
        self.patch_embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.time_embed = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.label_emb = nn.Embedding(num_classes + 1, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.extras + (size // patch) ** 2, dim) * 0.1)
        self.registers = nn.Parameter(torch.randn(1, registers, dim)) if registers else None
        self.in_blocks = nn.ModuleList(UViTBlock(dim, heads) for _ in range(depth // 2))
        self.out_blocks = nn.ModuleList(UViTBlock(dim, heads, skip=True) for _ in range(depth - depth // 2))
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * channels)

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)
        B, L, D = x.shape
        time_token = self.time_embed(timestep_embedding(timestep, D)).unsqueeze(1)
        label_token = self.label_emb(class_labels).unsqueeze(1)
        if self.nested:
            x = torch.cat([time_token, torch.cat([label_token, x], dim=1)], dim=1)
        else:
            x = torch.cat([time_token, label_token, x], dim=1)
        x = x + self.pos_embed
        if self.registers is not None:
            x = torch.cat([x, self.registers.expand(B, -1, -1)], dim=1)
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        x = self.decoder_pred(self.norm(x))
        x = x[:, self.extras:self.extras + L]
        return _out(unpatchify(x, self.patch, self.channels, h, w), return_dict)


def make_uvit(registers=0, nested=False):
    torch.manual_seed(0)
    model = UViT(registers=registers, nested=nested)
    return model.eval(), _class_kwargs()


# ---------------------------------------------------------------------------------------------------------
# e. MM-DiT by hand: two streams, joint attention over [text | image]


class StreamParts(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))


class JointBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.img = StreamParts(dim)
        self.txt = StreamParts(dim)

    def _qkv(self, parts, x, shift, scale):
        B, N, C = x.shape
        qkv = parts.qkv(modulate(parts.norm1(x), shift, scale))
        return qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, img, txt, c):
        i_mod = self.img.mod(c).chunk(6, dim=1)
        t_mod = self.txt.mod(c).chunk(6, dim=1)
        iq, ik, iv = self._qkv(self.img, img, i_mod[0], i_mod[1])
        tq, tk, tv = self._qkv(self.txt, txt, t_mod[0], t_mod[1])
        q = torch.cat([tq, iq], dim=2)
        k = torch.cat([tk, ik], dim=2)
        v = torch.cat([tv, iv], dim=2)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).flatten(2)
        txt_o, img_o = o.split([txt.shape[1], o.shape[1] - txt.shape[1]], dim=1)
        img = img + i_mod[2].unsqueeze(1) * self.img.proj(img_o)
        img = img + i_mod[5].unsqueeze(1) * self.img.mlp(modulate(self.img.norm2(img), i_mod[3], i_mod[4]))
        txt = txt + t_mod[2].unsqueeze(1) * self.txt.proj(txt_o)
        txt = txt + t_mod[5].unsqueeze(1) * self.txt.mlp(modulate(self.txt.norm2(txt), t_mod[3], t_mod[4]))
        return img, txt


class HandMMDiT(nn.Module):
    """Separate text and image streams, each with its own projections; joint attention, text first."""

    def __init__(self, size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch)
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.context_embedder = nn.Linear(dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(JointBlock(dim, heads) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        img = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos
        txt = self.embed_prompt(encoder_hidden_states)
        c = self.t_embedder(timestep)
        for block in self.blocks:
            img, txt = block(img, txt, c)
        x = self.final_layer(img, c)
        return _out(unpatchify(x, self.patch, self.channels, h, w), return_dict)

    def embed_prompt(self, encoder_hidden_states):
        return self.context_embedder(encoder_hidden_states)


def make_hand_mmdit():
    torch.manual_seed(0)
    model = HandMMDiT()
    return model.eval(), _prompt_kwargs()


# ---------------------------------------------------------------------------------------------------------
# f. factorized video DiT: spatial attention per frame, temporal attention per position


class FactorizedBlock(nn.Module):
    def __init__(self, dim, heads, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)
        self.time = nn.Linear(dim, 2 * dim)

    def forward(self, x, temb, frames):
        """x [B, F * HW, D], frame-major."""
        B, S, D = x.shape
        hw = S // frames
        shift, scale = self.time(F.silu(temb)).chunk(2, dim=-1)
        h = modulate(self.norm1(x), shift, scale)
        if self.temporal:  # [B * HW, F, D]: each position attends over the frames
            h = h.view(B, frames, hw, D).transpose(1, 2).reshape(B * hw, frames, D)
            h = self.attn(h).view(B, hw, frames, D).transpose(1, 2).reshape(B, S, D)
        else:  # [B * F, HW, D]: each frame attends within itself
            h = self.attn(h.reshape(B * frames, hw, D)).view(B, S, D)
        x = x + h
        return x + self.mlp(self.norm2(x))


class FactorizedVideoDiT(nn.Module):
    """Video latents [B, C, F, H, W], patches 1 x 2 x 2; blocks alternate spatial and temporal attention."""

    def __init__(self, frames=4, size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch, patch_size_t=1)
        self.embed = nn.Conv3d(channels, dim, (1, patch, patch), stride=(1, patch, patch))
        self.spatial_pos = nn.Parameter(torch.randn(1, 1, (size // patch) ** 2, dim) * 0.1)
        self.temporal_pos = nn.Parameter(torch.randn(1, frames, 1, dim) * 0.1)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(FactorizedBlock(dim, heads, temporal=i % 2 == 1) for i in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch * patch * channels)

    def forward(self, hidden_states, timestep, return_dict=True):
        B, C, Fr, H, W = hidden_states.shape
        p = self.patch
        h, w = H // p, W // p
        x = self.embed(hidden_states).flatten(3).transpose(1, 3).transpose(1, 2)  # [B, F, hw, D]
        x = (x + self.spatial_pos + self.temporal_pos).flatten(1, 2)             # [B, F * hw, D]
        temb = self.t_embedder(timestep)
        for block in self.blocks:
            x = block(x, temb, Fr)
        x = self.proj_out(self.norm_out(x))                                      # [B, F * hw, p * p * C]
        x = x.reshape(B, Fr, h, w, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
        return _out(x.reshape(B, C, Fr, H, W), return_dict)


def make_factorized_video_dit():
    torch.manual_seed(0)
    model = FactorizedVideoDiT()
    return model.eval(), dict(hidden_states=torch.randn(BATCH, CHANNELS, 4, SIZE, SIZE),
                              timestep=torch.full((BATCH,), 500, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------------------
# g. packed tokens with 2-D RoPE from integer position ids


def rope_2d(ids: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin [S, head_dim / 2] from integer positions [S, 2]: half the rotated pairs per axis."""
    per_axis = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, per_axis, 2, dtype=torch.float32, device=ids.device) / per_axis)
    angles = torch.cat([ids[:, axis].float()[:, None] * inv_freq[None] for axis in range(2)], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, H, S, D], rotated in adjacent pairs."""
    x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RopeBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        B, S, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=-1)
        q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D)
        x = x + gate1.unsqueeze(1) * self.proj(o)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PackedRopeDiT(nn.Module):
    """Input already patchified and packed like Flux's: [B, S, C] with S = 8 x 8 tokens, C = 4 x 2 x 2;
    2-D RoPE from `img_ids` [S, 2] (row, column), its cos/sin computed in forward."""

    def __init__(self, in_channels=CHANNELS * PATCH * PATCH, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.config = SimpleNamespace(patch_size=1)
        self.x_embedder = nn.Linear(in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(RopeBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, in_channels)

    def forward(self, hidden_states, timestep, img_ids, return_dict=True):
        x = self.x_embedder(hidden_states)
        c = self.t_embedder(timestep)
        cos, sin = rope_2d(img_ids, x.shape[-1] // self.heads)
        for block in self.blocks:
            x = block(x, c, cos, sin)
        return _out(self.proj_out(self.norm_out(x)), return_dict)


def make_packed_rope_dit(rows=SIZE // PATCH, cols=SIZE // PATCH):
    torch.manual_seed(0)
    model = PackedRopeDiT()
    ids = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
    return model.eval(), dict(hidden_states=torch.randn(BATCH, rows * cols, CHANNELS * PATCH * PATCH),
                              timestep=torch.full((BATCH,), 0.5),
                              img_ids=ids.reshape(rows * cols, 2))


# ---------------------------------------------------------------------------------------------------------
# h. MM-DiT with RoPE written in place into the image part of the joint query and key


class JointRopeBlock(JointBlock):
    """The joint q and k are `cat([text, image])` themselves (no projection after the cat), and RoPE is
    written into their image part in place: `q[:, :, text_len:] = rope(q[:, :, text_len:])` (EasyAnimate)."""

    def forward(self, img, txt, c, cos, sin):
        i_mod = self.img.mod(c).chunk(6, dim=1)
        t_mod = self.txt.mod(c).chunk(6, dim=1)
        iq, ik, iv = self._qkv(self.img, img, i_mod[0], i_mod[1])
        tq, tk, tv = self._qkv(self.txt, txt, t_mod[0], t_mod[1])
        q = torch.cat([tq, iq], dim=2)
        k = torch.cat([tk, ik], dim=2)
        v = torch.cat([tv, iv], dim=2)
        n = txt.shape[1]
        q[:, :, n:] = apply_rope(q[:, :, n:], cos, sin)
        k[:, :, n:] = apply_rope(k[:, :, n:], cos, sin)
        o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).flatten(2)
        txt_o, img_o = o.split([n, o.shape[1] - n], dim=1)
        img = img + i_mod[2].unsqueeze(1) * self.img.proj(img_o)
        img = img + i_mod[5].unsqueeze(1) * self.img.mlp(modulate(self.img.norm2(img), i_mod[3], i_mod[4]))
        txt = txt + t_mod[2].unsqueeze(1) * self.txt.proj(txt_o)
        txt = txt + t_mod[5].unsqueeze(1) * self.txt.mlp(modulate(self.txt.norm2(txt), t_mod[3], t_mod[4]))
        return img, txt


class HandMMDiTRope(HandMMDiT):
    """HandMMDiT with 2-D RoPE on the image tokens of the joint attention, applied in place (JointRopeBlock)."""

    def __init__(self, size=SIZE, patch=PATCH, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__(size=size, patch=patch, dim=dim, depth=depth, heads=heads)
        self.heads = heads
        self.blocks = nn.ModuleList(JointRopeBlock(dim, heads) for _ in range(depth))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        img = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos
        txt = self.context_embedder(encoder_hidden_states)
        c = self.t_embedder(timestep)
        ids = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1)
        cos, sin = rope_2d(ids.reshape(h * w, 2), img.shape[-1] // self.heads)
        for block in self.blocks:
            img, txt = block(img, txt, c, cos, sin)
        x = self.final_layer(img, c)
        return _out(unpatchify(x, self.patch, self.channels, h, w), return_dict)


def make_hand_mmdit_rope():
    torch.manual_seed(0)
    model = HandMMDiTRope()
    return model.eval(), _prompt_kwargs()


# ---------------------------------------------------------------------------------------------------------
# i. a conv FFN (Sana's GLUMBConv, written plainly): tokens back on the latent grid, 1x1 conv, depthwise 3x3


class ConvFFN(nn.Module):
    """[B, h * w, C] -> [B, C, h, w]; 1x1 conv to 2 * hidden; SiLU; depthwise 3x3 conv (mixes neighbouring token
    rows); GLU gate; 1x1 conv back; -> [B, h * w, C]."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv_in = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x, h, w):
        b, n, c = x.shape
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        x = self.conv_depth(F.silu(self.conv_in(x)))
        x, gate = x.chunk(2, dim=1)
        x = self.conv_out(x * F.silu(gate))
        return x.flatten(2).transpose(1, 2)


class ConvBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = ConvFFN(dim, 2 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, h, w):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp), h, w)
        return x


class ConvFFNDiT(TimmDiT):
    """The timm-style DiT with a depthwise conv FFN in every block (each block: one self-attention, one conv
    over the token rows)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(DIM, HEADS) for _ in range(DEPTH))

    def forward(self, hidden_states, timestep, class_labels, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(timestep) + self.y_embedder(class_labels)
        for block in self.blocks:
            x = block(x, c, h, w)
        x = self.final_layer(x, c)
        return _out(self.unpatchify(x, h, w), return_dict)


def make_conv_ffn_dit():
    torch.manual_seed(0)
    model = ConvFFNDiT()
    return model.eval(), _class_kwargs()


# ---------------------------------------------------------------------------------------------------------
# j. ReLU linear attention (Sana's, written plainly) next to the conv FFN


class LinearAttention(nn.Module):
    """out_n = (sum_m v_m relu(k_m)^T) relu(q_n) / (sum_m relu(k_m) . relu(q_n)): the sum over the tokens m is a
    matmul contracting the token axis of both operands ([B, H, D + 1, N] @ [B, H, N, D]); the ones row padded
    onto v gives the normalizer in the same product."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.heads = num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q = F.relu(self.to_q(x).transpose(1, 2).unflatten(1, (self.heads, -1)))                   # [B, H, D, N]
        k = F.relu(self.to_k(x).transpose(1, 2).unflatten(1, (self.heads, -1))).transpose(2, 3)   # [B, H, N, D]
        v = F.pad(self.to_v(x).transpose(1, 2).unflatten(1, (self.heads, -1)), (0, 0, 0, 1), value=1.0)
        out = torch.matmul(torch.matmul(v, k), q)                                                   # [B, H, D + 1, N]
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-6)
        return self.proj(out.flatten(1, 2).transpose(1, 2))


class LinearConvBlock(ConvBlock):
    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.attn = LinearAttention(dim, num_heads)


class LinearAttentionDiT(ConvFFNDiT):
    """Sana's block structure, by hand: ReLU linear attention and a depthwise conv FFN; no softmax attention."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(LinearConvBlock(DIM, HEADS) for _ in range(DEPTH))


def make_linear_attention_dit():
    torch.manual_seed(0)
    model = LinearAttentionDiT()
    return model.eval(), _class_kwargs()


# ---------------------------------------------------------------------------------------------------------
# k. image queries over [image | text] keys: the text K/V come from the prompt alone, the text has no queries


class TextKeysBlock(nn.Module):
    """Image tokens attend over their own K/V and the prompt's (NucleusMoE-Image, PRX); the prompt is never
    updated, so its K/V depend on no image token. `text_first`: keys [text | image] on [B, H, S, D] (PRX's
    order), with a key mask over the prompt; else [image | text] on [B, S, H, D], then moved to [B, H, S, D]
    the way diffusers' attention dispatch does."""

    def __init__(self, dim, heads, text_first: bool):
        super().__init__()
        self.heads, self.text_first = heads, text_first
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.txt_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, txt, c, key_mask):
        B, N, C = x.shape
        T = txt.shape[1]
        shift, scale, gate, shift2, scale2, gate2 = self.mod(c).chunk(6, dim=1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift, scale)).view(B, N, 3, self.heads, -1).unbind(2)
        tk, tv = self.txt_kv(txt).view(B, T, 2, self.heads, -1).unbind(2)
        if self.text_first:   # [B, H, S, D], text first, a mask that drops the prompt's padding
            q, k, v, tk, tv = (t.transpose(1, 2) for t in (q, k, v, tk, tv))
            mask = torch.cat([key_mask, key_mask.new_ones(B, N)], dim=1)[:, None, None, :]
            o = F.scaled_dot_product_attention(q, torch.cat([tk, k], 2), torch.cat([tv, v], 2), attn_mask=mask)
        else:                 # [B, S, H, D], image first, permuted to [B, H, S, D] after the concatenation
            k, v = torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
            o = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))
        x = x + gate.unsqueeze(1) * self.proj(o.transpose(1, 2).reshape(B, N, C))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TextKeysDiT(nn.Module):
    def __init__(self, text_first=False, size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH,
                 heads=HEADS):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.config = SimpleNamespace(patch_size=patch)
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.context_embedder = nn.Linear(dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(TextKeysBlock(dim, heads, text_first) for _ in range(depth))
        self.final_layer = FinalLayer(dim, patch, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos
        txt = self.context_embedder(encoder_hidden_states)
        c = self.t_embedder(timestep)
        for block in self.blocks:
            x = block(x, txt, c, encoder_attention_mask)
        return _out(unpatchify(self.final_layer(x, c), self.patch, self.channels, h, w), return_dict)


def make_text_keys_dit(text_first=False):
    torch.manual_seed(0)
    model = TextKeysDiT(text_first=bool(text_first))
    mask = torch.ones(BATCH, PROMPT, dtype=torch.bool)
    mask[1, PROMPT - 2:] = False   # the second prompt is shorter (padded)
    return model.eval(), dict(_prompt_kwargs(), encoder_attention_mask=mask)


class MixedKeysDiT(nn.Module):
    """Joint [text | image] attention blocks (a text stream with its own queries) alternating with image
    queries over [text | image] keys. `keys_from`: "prompt", the text keys come from the prompt's embedding
    (the same for every patch); "stream", from the text stream the joint blocks update (tokens of the text
    piece, which runs no query through the image-query blocks: no rule)."""

    def __init__(self, keys_from="prompt", size=SIZE, patch=PATCH, channels=CHANNELS, dim=DIM, depth=DEPTH,
                 heads=HEADS):
        super().__init__()
        self.patch, self.channels, self.keys_from = patch, channels, keys_from
        self.config = SimpleNamespace(patch_size=patch)
        self.x_embedder = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.1)
        self.context_embedder = nn.Linear(dim, dim)
        self.t_embedder = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(JointBlock(dim, heads) if i % 2 == 0 else TextKeysBlock(dim, heads, True)
                                    for i in range(depth))
        self.final_layer = FinalLayer(dim, patch, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True):
        h, w = hidden_states.shape[-2] // self.patch, hidden_states.shape[-1] // self.patch
        img = self.x_embedder(hidden_states).flatten(2).transpose(1, 2) + self.pos
        prompt = txt = self.context_embedder(encoder_hidden_states)
        c = self.t_embedder(timestep)
        for block in self.blocks:
            if isinstance(block, JointBlock):
                img, txt = block(img, txt, c)
            else:
                img = block(img, prompt if self.keys_from == "prompt" else txt, c, encoder_attention_mask)
        return _out(unpatchify(self.final_layer(img, c), self.patch, self.channels, h, w), return_dict)


def make_mixed_keys_dit(keys_from="prompt"):
    _, kwargs = make_text_keys_dit()
    torch.manual_seed(0)
    return MixedKeysDiT(keys_from).eval(), kwargs
